"""The option table: every setting of ``directfs mount`` and of the store commands, each spelled once.

One ``Option`` per setting holds its name (the TOML key, the ``-o`` key unless it says otherwise, the argparse
``dest``), its parser (one for every spelling: flag, ``-o``, ``DIRECTFS_*``, TOML), its unit, where its default
lives (``Home``: a field of the settings dataclass the value goes into, read from there, never restated), what it
does and why the default is what it is, its environment twin, its ``-o`` key, its TOML section and whether it is a
secret. Everything else is generated from the table:

- argparse flags (``add_flags``) of ``mount``, ``ls``, ``cp``, ``stage``, ``get`` and ``stats``, help texts with
  the defaults included;
- ``-o`` parsing (``parse_o``), the only one: ``directfs mount -o`` and the mount(8) helper ``mount.directfs`` both
  call it;
- the TOML keys ``config`` validates (``TOML_KEYS``) and the environment twins it reads (``ENV_NAMES``);
- the README's option tables (``readme_blocks``; ``python -m directfs.options README.md`` rewrites them and
  ``tests/unit/test_options.py`` fails when they are stale).

Values: sizes are bytes or K/M/G/T (binary); durations are seconds or ``500ms``/``10s``/``5m``/``1h``/``1d``, the
same ``units`` parser everywhere (``--metadata-ttl 5s``, ``--metadata-ttl 5`` and ``metadata_ttl = 5`` agree).

Parse time stays light (stdlib, ``errors``, ``units``, ``values``): a ``Home`` names its dataclass by module and
class and is imported only when a default is shown (``--help``, the README), since the read engine and the
filesystem import trio. Layering: below ``config`` and ``commands``, above the modules its homes name.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from .errors import ConfigError
from .units import format_duration, format_size, parse_duration_seconds, parse_size
from .values import parse_block_size, parse_endpoint_url, parse_metrics_address, shown_endpoint_url

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
CHANGE_FEED_MODES: Final = ("on", "off", "auto")
SECRET_KEYS: Final = ("access_key_id", "secret_access_key", "password", "token")

Parser = Callable[[object], Any]
Group = Literal["config", "mount", "credentials", "tls", "stores", "source"]
Section = Literal["mount", "source"]
Kind = Literal["text", "size", "duration", "switch", "id", "octal"]

# Flags of each command, by group (the order of --help and of the README table).
MOUNT_GROUPS: Final[tuple[Group, ...]] = ("config", "mount", "credentials", "tls", "stores")
STORE_GROUPS: Final[tuple[Group, ...]] = ("config", "credentials", "tls", "stores")  # ls, cp, stage
GET_GROUPS: Final[tuple[Group, ...]] = ("credentials", "tls")  # get: no config file, no plain stores
_GROUP_TITLES: Final[Mapping[Group, str | None]] = {
    "config": None,
    "mount": None,
    "credentials": "credentials (flag > file > environment)",
    "tls": "TLS and network",
    "stores": "stores",
    "source": None,
}


# --- value parsers: each takes the raw value (flag/-o/env text, or a TOML value) and returns the typed one or raises
# ValueError(reason); the caller names where the value came from and shows it -----------------------------------


def _as_str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    if "\x00" in value or "\n" in value:
        raise ValueError("must not contain NUL or newline")
    return value


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('expected a size: bytes or a string such as "512M"')
    try:
        return parse_size(str(value))
    except ConfigError as exc:
        raise ValueError(exc.strerror) from None


def _as_size(value: object) -> int:
    size = _size(value)
    if size <= 0:
        raise ValueError("must be more than 0")
    return size


def _as_size_or_zero(value: object) -> int:
    return _size(value)  # parse_size never returns a negative number


def _as_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError('expected a duration: seconds or a string such as "5s"')
    if isinstance(value, int | float):
        seconds = float(value)
        if not 0 <= seconds < float("inf"):
            raise ValueError("must be 0 or more seconds")
        return seconds
    try:
        return parse_duration_seconds(value)
    except ConfigError as exc:
        raise ValueError(exc.strerror) from None


def _as_positive_seconds(value: object) -> float:
    seconds = _as_seconds(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


def _as_ttl_seconds(value: object) -> float:
    seconds = _as_seconds(value)
    if seconds >= 365 * 86400:  # a year is "forever" in a typo
        raise ValueError("must be less than a year")
    return seconds


def _as_id(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, str):
        try:
            value = int(value, 10)
        except ValueError:
            raise ValueError("expected a number") from None
    if not isinstance(value, int) or not 0 <= value < 2**32 - 1:
        raise ValueError("expected a user/group id between 0 and 4294967294")
    return value


def _as_umask(value: object) -> int:
    # TOML has no leading-zero integers, so an octal umask is a string ("022"); a plain int is taken as octal digits.
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise ValueError('expected octal digits in a string, e.g. "022"')
    try:
        umask = int(text, 8)
    except ValueError:
        raise ValueError('expected octal digits, e.g. "022"') from None
    if not 0 <= umask <= 0o777:
        raise ValueError("must be between 000 and 777")
    return umask


def _as_log_level(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _as_change_feed(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in CHANGE_FEED_MODES:
        raise ValueError(f"expected one of {', '.join(CHANGE_FEED_MODES)}")
    return value.lower()


def _as_url(value: object) -> str:
    text = _as_str(value)
    if "://" not in text:
        raise ValueError("expected a URL such as ctera+https://portal.example.com/folder or file:///srv/data")
    return text


def _as_endpoint_url(value: object) -> str:
    try:
        return parse_endpoint_url(_as_str(value))
    except ConfigError as exc:
        raise ValueError(exc.strerror) from None


def _as_block_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('expected a size: bytes or a string such as "8M"')
    try:
        return parse_block_size(str(value))
    except ConfigError as exc:
        raise ValueError(exc.strerror) from None


def _as_abs_path(value: object) -> str:
    text = _as_str(value)
    if not os.path.isabs(text):
        raise ValueError("expected an absolute path")
    return text


def _as_made_absolute(value: object) -> str:
    """On the command line a relative path means one below the current folder (a daemon later moves to /)."""
    return os.path.abspath(_as_str(value))


def _as_credential_name(value: object) -> str:
    text = _as_str(value)
    if "/" in text or text in (".", ".."):
        raise ValueError("expected a credential name (as in LoadCredential=NAME:...), not a path")
    return text


def _as_metrics_address(value: object) -> Any:
    return parse_metrics_address(value)


def duration_arg(text: str) -> float:
    """argparse ``type=`` for the durations of other commands (``umount --wait``, ``serve --rescan-interval``): the
    same syntax as every option here."""
    try:
        return _as_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- the table --------------------------------------------------------------------------------------------------

_FACTORY: Final = object()  # a default computed per instance (default_factory): shown by the option's default_text


@dataclass(frozen=True)
class Home:
    """The field an option's value goes into, and so where its default lives: a field of a settings dataclass (or a
    parameter of a function), named so that nothing is imported until the default is shown."""

    module: str
    owner: str  # the dataclass (or function); ``Settings.kwargs(owner)`` gives its keyword arguments
    attr: str

    def default(self) -> object:
        owner = getattr(importlib.import_module(self.module), self.owner)
        if dataclasses.is_dataclass(owner):
            for item in dataclasses.fields(owner):
                if item.name == self.attr:
                    return item.default if item.default is not dataclasses.MISSING else _FACTORY
            raise LookupError(f"{self.module}.{self.owner} has no field {self.attr}")
        default = inspect.signature(owner).parameters[self.attr].default
        return None if default is inspect.Parameter.empty else default


def _home(spec: str) -> Home:
    path, _, attr = spec.rpartition(".")
    module, _, owner = path.rpartition(":")
    return Home(module, owner, attr)


_READ = "directfs.engine.reader:ReadSettings."
_VFS = "directfs.vfs:VfsSettings."
_SOURCE = "directfs.sources.base:SourceOptions."
_CREDENTIALS = "directfs.sources.base:Credentials."
_MOUNT = "directfs.mount:MountConfig."
_WRITE = "directfs.writeback:WriteSettings."


@dataclass(frozen=True)
class Option:
    """One setting. ``name`` is its TOML key, its ``-o`` key (unless ``o`` says otherwise) and its argparse dest."""

    name: str
    group: Group
    parse: Parser
    help: str  # what it does: short, for --help and the README
    kind: Kind = "text"
    home: Home | None = None  # where the value goes and the default lives; None: default_text says it
    reason: str = ""  # why the default is what it is (--help)
    default_text: str | None = None  # shown instead of the home's default (None and factories need words)
    unit: str = ""  # metavar: SIZE, DURATION, PATH, ...
    flags: tuple[str, ...] = ()
    switch: bool | None = None  # a flag (and -o key) without a value: the value it sets
    choices: tuple[str, ...] | None = None
    env: str | None = None  # the DIRECTFS_* twin
    o: str | None = None  # the -o key (also mount.directfs's)
    o_as_flag: bool = False  # mount.directfs turns it into the flag instead of passing it on in -o
    toml: Section | None = None  # [mount] (and [source.NAME.mount]) or [source.NAME]
    secret: bool = False
    argv_parse: Parser | None = None  # flags and -o, when the command line accepts more (relative paths)
    toml_help: str | None = None  # the TOML key's meaning, when the flag says the opposite (--no-verify-tls)
    redact: Callable[[str], str] | None = None  # how an error message shows a value that may hold credentials

    @property
    def flag(self) -> str:
        """The long flag (``--cache-size``), or the option's name when it has none (a TOML-only key)."""
        return self.flags[-1] if self.flags else self.name

    def default(self) -> object:
        return self.home.default() if self.home is not None else None

    def default_shown(self) -> str | None:
        """The default as people write it (``256M``, ``5s``, ``000``), or the option's words for it."""
        if self.default_text is not None:
            return self.default_text
        value = self.default()
        if value is None or value is _FACTORY:
            return None
        if self.kind == "size" and isinstance(value, int):
            return format_size(value)
        if self.kind == "duration" and isinstance(value, int | float):
            return format_duration(value)
        if self.kind == "octal" and isinstance(value, int):
            return f"{value:03o}"
        if self.kind == "switch" and isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def shown(self, value: object) -> str:
        """``value`` as an error message may show it."""
        if self.secret:
            return "<hidden>"
        if self.redact is not None and isinstance(value, str):
            return repr(self.redact(value))
        return repr(value)

    def from_text(self, raw: object, where: str) -> Any:
        """``raw`` from the command line (a flag, ``-o``) parsed; ConfigError naming ``where`` (``--uid``)."""
        parse = self.argv_parse if self.argv_parse is not None else self.parse
        try:
            return parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{where} {self.shown(raw)}: {exc}") from None

    def argv(self, value: str | None) -> list[str]:
        """The flag that says what ``-o KEY[=value]`` says (mount.directfs)."""
        return [self.flag] if self.switch is not None else [self.flag, value or ""]

    def flag_help(self) -> str:
        text = self.help
        if self.secret:
            text += f" (discouraged: visible to every user in ps; prefer {self.flag}-file or ${self.env})"
        default = self.default_shown()
        if default is not None and self.default_text is not None:  # words: "default: the mounting user"
            text += f" (default: {default}; {self.reason})" if self.reason else f" (default: {default})"
        elif default is not None:  # a value: "default 256M"
            text += f" (default {default}: {self.reason})" if self.reason else f" (default {default})"
        elif self.reason:
            text += f" ({self.reason})"
        if self.env and not self.secret:
            text += f" [${self.env}]"
        return text.replace("%", "%%")


def _row(
    name: str,
    group: Group,
    parse: Parser,
    help: str,
    *,
    flag: bool | tuple[str, ...] = False,
    env: bool = False,
    o: bool | str = False,
    **fields: Any,
) -> Option:
    """An ``Option`` whose flag (``--cache-size``), environment twin (``DIRECTFS_CACHE_SIZE``) and ``-o`` key
    (``cache_size``) follow from its name when given as True: the name is spelled once."""
    flags = flag if isinstance(flag, tuple) else (f"--{name.replace('_', '-')}",) if flag else ()
    return Option(
        name,
        group,
        parse,
        help,
        flags=flags,
        env=f"DIRECTFS_{name.upper()}" if env else None,
        o=o if isinstance(o, str) else name if o else None,
        **fields,
    )


def _secret(name: str, flag_unit: str, what: str, *, file_help: str) -> tuple[Option, Option, Option]:
    """A secret's three spellings: ``NAME_file`` (a path, read once), ``NAME`` (the value) and ``NAME_credential``
    (a systemd credential name, TOML only). Only the value has an environment twin; ``-o`` takes only the file."""
    value = _row(
        name,
        "credentials",
        _as_str,
        what,
        home=_home(f"{_CREDENTIALS}{name}"),
        unit=flag_unit,
        flag=True,
        env=True,
        toml="source",
        secret=True,
    )
    return (
        _row(
            f"{name}_file",
            "credentials",
            _as_abs_path,
            f"{file_help} (or ${value.env})",
            unit="PATH",
            flag=True,
            o=True,
            o_as_flag=True,
            toml="source",
            argv_parse=_as_str,  # the daemon keeps the caller's folder until it has read it
        ),
        value,
        _row(
            f"{name}_credential",
            "source",
            _as_credential_name,
            f"the {what} from $CREDENTIALS_DIRECTORY/NAME (systemd LoadCredential=NAME:...)",
            toml="source",
        ),
    )


TABLE: Final[tuple[Option, ...]] = (
    _row(
        "config",
        "config",
        _as_str,
        "config file",
        unit="PATH",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        default_text="/etc/directfs/directfs.toml when present",
        reason="precedence: file < DIRECTFS_* environment < flags",
    ),
    _row(
        "strict_permissions",
        "credentials",
        _as_bool,
        "refuse, instead of a warning, a config file that group, others or another user may write, and a secret "
        "file that group or others may read or write, or another user owns",
        kind="switch",
        flag=True,
        switch=True,
        env=True,
        # Not a config key: the file it judges would carry it, and whoever may rewrite that file could drop it.
        default_text="a warning",
        reason="an existing install keeps mounting while its admin fixes the modes the warning names",
    ),
    _row(
        "foreground",
        "mount",
        _as_bool,
        "stay in the foreground and log to stderr",
        kind="switch",
        flag=("-f", "--foreground"),
        switch=True,
        default_text="detach, returning once the mount is live",
    ),
    _row(
        "metrics_address",
        "mount",
        _as_metrics_address,
        "serve Prometheus metrics on http://HOST:PORT/metrics",
        home=_home(f"{_MOUNT}metrics_address"),
        unit="HOST:PORT",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="mount",
        default_text="off",
        reason="`directfs stats` works without it; loopback only unless --metrics-allow-remote",
    ),
    _row(
        "metrics_allow_remote",
        "mount",
        _as_bool,
        "allow a non-loopback --metrics-address",
        kind="switch",
        home=_home(f"{_MOUNT}metrics_allow_remote"),
        flag=True,
        switch=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="mount",
        reason="the endpoint has no authentication",
    ),
    _row(
        "cache_size",
        "mount",
        _as_size,
        "memory for decrypted blocks, prefetch included",
        kind="size",
        home=_home(f"{_READ}cache_size_bytes"),
        unit="SIZE",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="the prefetch budget plus a working set for random readers; prefetch gets half of it",
    ),
    _row(
        "read_ahead",
        "mount",
        _as_size_or_zero,
        "largest read-ahead window per sequential reader; 0 turns read-ahead off",
        kind="size",
        home=_home(f"{_READ}read_ahead_max_bytes"),
        unit="SIZE",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="what 8 parallel 4 MiB block fetches keep in flight; a larger window only holds memory",
    ),
    _row(
        "metadata_ttl",
        "mount",
        _as_ttl_seconds,
        "how long listings, attributes and 'no such file' answers are trusted",
        kind="duration",
        home=_home(f"{_VFS}metadata_ttl_seconds"),
        unit="DURATION",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="remote changes show up within seconds while repeated ls/stat calls cost one server request",
    ),
    _row(
        "metadata_ttl_with_feed",
        "mount",
        _as_ttl_seconds,
        "how long listings, attributes and 'no such file' answers are trusted while the store's change feed is up "
        "(CTERA); the kernel's entry/attribute timeouts follow it",
        kind="duration",
        home=_home(f"{_VFS}metadata_ttl_with_feed_seconds"),
        unit="DURATION",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="each remote change is invalidated by its event within about a second, so this only bounds what a "
        "missed event could cost, and a find repeated within the hour asks the Portal nothing",
    ),
    _row(
        "change_feed",
        "mount",
        _as_change_feed,
        "follow the store's change feed (CTERA Portal Notification Service): auto uses it when the store has one "
        "and it answers, on makes a feed that fails at start an error, off never uses it",
        home=_home(f"{_MOUNT}change_feed"),
        unit="on/off/auto",
        flag=True,
        choices=CHANGE_FEED_MODES,
        env=True,
        o=True,
        toml="mount",
        reason="fresher and cheaper than polling where a feed exists, and the short TTL where none does",
    ),
    _row(
        "allow_other",
        "mount",
        _as_bool,
        "let other users see the mount; needs user_allow_other in /etc/fuse.conf unless root",
        kind="switch",
        home=_home(f"{_MOUNT}allow_other"),
        flag=True,
        switch=True,
        env=True,
        o=True,
        toml="mount",
        reason="as FUSE intends",
    ),
    _row(
        "rw",
        "mount",
        _as_bool,
        "allow writes (file://, s3://, webdav(s)://, ctera+https://): files are spooled on local disk and uploaded "
        "when the last handle closes, and close() returns the upload's result",
        kind="switch",
        home=_home(f"{_WRITE}enabled"),
        flag=True,
        switch=True,
        env=True,
        o=True,
        toml="mount",
        reason="read-only unless asked: a mount that cannot change the store cannot lose or damage data there",
    ),
    _row(
        "write_spool_dir",
        "mount",
        _as_abs_path,
        "where files being written are spooled (mode 0700); failed uploads are kept in its failed/ folder",
        unit="PATH",
        home=_home(f"{_WRITE}spool_dir"),
        flag=True,
        env=True,
        o=True,
        toml="mount",
        argv_parse=_as_made_absolute,
        default_text="$STATE_DIRECTORY, /var/lib/directfs (root) or ~/.local/state/directfs, then spool/MOUNTPOINT",
        reason="a state folder survives reboots, so a killed daemon's spool is found at the next mount",
    ),
    _row(
        "write_max_size",
        "mount",
        _as_size,
        "largest existing file that may be changed in place (append, update) without O_TRUNC; above it EOPNOTSUPP",
        kind="size",
        home=_home(f"{_WRITE}max_update_size_bytes"),
        unit="SIZE",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="an update downloads the whole old content into the spool first; 1 GiB bounds that wait and disk use",
    ),
    _row(
        "write_drain_timeout",
        "mount",
        _as_seconds,
        "how long unmount (SIGTERM) waits for pending uploads; what is left is kept in the spool's failed/ folder",
        kind="duration",
        home=_home(f"{_WRITE}drain_timeout_seconds"),
        unit="DURATION",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="within systemd's 90 s stop timeout, with room for the unmount itself",
    ),
    _row(
        "uid",
        "mount",
        _as_id,
        "owner shown for every entry",
        kind="id",
        home=_home(f"{_VFS}uid"),
        unit="N",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        default_text="the mounting user",
    ),
    _row(
        "gid",
        "mount",
        _as_id,
        "group shown for every entry",
        kind="id",
        home=_home(f"{_VFS}gid"),
        unit="N",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        default_text="the mounting user's group",
    ),
    _row(
        "umask",
        "mount",
        _as_umask,
        "bits removed from the r--r--r-- / r-xr-xr-x modes, e.g. 077",
        kind="octal",
        home=_home(f"{_VFS}umask"),
        unit="OCTAL",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="a read-only tree hides nothing from users who may see the mount",
    ),
    _row(
        "xattrs",
        "mount",
        _as_bool,
        "extended attributes: on answers user.ctera.fileid and user.etag; off answers the first getxattr/listxattr "
        "ENOSYS, so the kernel stops asking for the rest of the mount: ls -l no longer sends two getxattr per entry "
        "(security.selinux, system.posix_acl_access), and getfattr shows nothing (file ids stay in `directfs ls -l`)",
        kind="switch",
        home=_home(f"{_VFS}xattrs"),
        unit="on/off",
        flag=True,
        choices=("on", "off"),
        env=True,
        o=True,
        toml="mount",
        reason="scripts read a file's id and ETag with getfattr; off makes a warm ls -l of a big folder several "
        "times faster",
    ),
    _row(
        "log_level",
        "mount",
        _as_log_level,
        "stderr log level: debug, info, warning or error",
        home=_home("directfs.logs:setup_logging.level"),
        unit="LEVEL",
        flag=True,
        choices=LOG_LEVELS,
        env=True,
        o=True,
        o_as_flag=True,
        toml="mount",
        reason="mount, unmount and problems, no per-request noise",
    ),
    _row(
        "log_file",
        "mount",
        _as_abs_path,
        "where a detached daemon writes its log",
        unit="PATH",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="mount",
        argv_parse=_as_made_absolute,
        default_text="discarded; use -f to see logs on the terminal",
    ),
    # A secret (issue 13 L5): the key id alone is the Bearer of /directio, which unlocks native files.
    *_secret("access_key_id", "ID", "Direct IO access key id", file_help="file holding the Direct IO access key id"),
    *_secret(
        "secret_access_key",
        "KEY",
        "Direct IO secret access key",
        file_help="file holding the Direct IO secret access key",
    ),
    _row(
        "username",
        "credentials",
        _as_str,
        "Portal / WebDAV user name",
        home=_home(f"{_CREDENTIALS}username"),
        unit="NAME",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="source",
    ),
    *_secret("password", "PASSWORD", "password", file_help="file holding the password"),
    *_secret("token", "TOKEN", "Bearer token", file_help="file holding a Bearer token, re-read when it changes"),
    _row(
        "verify_tls",
        "tls",
        _as_bool,
        "accept any server certificate (Portal and storage)",
        kind="switch",
        home=_home(f"{_SOURCE}verify_tls"),
        flag=("--no-verify-tls",),
        switch=False,
        env=True,
        o="no_verify_tls",
        o_as_flag=True,
        toml="source",
        default_text="verify",
        reason="anything else lets a network attacker read your data",
        toml_help="verify server certificates (Portal and storage); false accepts any",
    ),
    _row(
        "verify_storage_tls",
        "tls",
        _as_bool,
        "accept any certificate from object storage only (presigned block URLs); the Portal is still verified",
        kind="switch",
        home=_home(f"{_SOURCE}storage_verify_tls"),
        flag=("--no-verify-storage-tls",),
        switch=False,
        env=True,
        o="no_verify_storage_tls",
        o_as_flag=True,
        toml="source",
        default_text="as for the Portal",
        toml_help="verify object storage's certificates (presigned block URLs); unset: as verify_tls",
    ),
    _row(
        "ca_file",
        "tls",
        _as_str,
        "extra trusted CA certificates (PEM), e.g. a private CA, trusted on top of the system's",
        home=_home(f"{_SOURCE}ca_file"),
        unit="PEM",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="source",
    ),
    _row(
        "storage_ca_file",
        "tls",
        _as_str,
        "extra trusted CA certificates (PEM) for object storage (presigned block URLs); the Portal keeps --ca-file",
        home=_home(f"{_SOURCE}storage_ca_file"),
        unit="PEM",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="source",
        default_text="--ca-file",
    ),
    _row(
        "allow_insecure_storage",
        "tls",
        _as_bool,
        "accept plain http:// block URLs, and block URLs to this machine, from any Portal (link-local and cloud "
        "metadata hosts stay refused)",
        kind="switch",
        home=_home(f"{_SOURCE}allow_insecure_storage"),
        flag=True,
        switch=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="source",
        reason="blocks carry no MAC: over http a network attacker can change them; only a loopback http:// Portal "
        "gets them without it",
    ),
    _row(
        "client_cert",
        "tls",
        _as_str,
        "client certificate for mutual TLS",
        home=_home(f"{_CREDENTIALS}client_cert"),
        unit="PEM",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="source",
    ),
    _row(
        "client_key",
        "tls",
        _as_str,
        "key of --client-cert (if not in the same file)",
        home=_home(f"{_CREDENTIALS}client_key"),
        unit="PEM",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="source",
    ),
    _row(
        "connect_timeout",
        "tls",
        _as_positive_seconds,
        "TCP+TLS connect deadline",
        kind="duration",
        home=_home(f"{_SOURCE}connect_timeout_seconds"),
        unit="DURATION",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="source",
        reason="LAN connects take ms, 5 s tolerates a congested WAN",
    ),
    _row(
        "read_timeout",
        "tls",
        _as_positive_seconds,
        "deadline for each socket read",
        kind="duration",
        home=_home(f"{_SOURCE}read_timeout_seconds"),
        unit="DURATION",
        flag=True,
        env=True,
        o=True,
        o_as_flag=True,
        toml="source",
        reason="per read, so a slow but moving body never times out",
    ),
    _row(
        "endpoint_url",
        "stores",
        _as_endpoint_url,
        "s3:// only: an S3-compatible server, http(s)://HOST[:PORT]; plain http:// only on loopback",
        home=_home(f"{_SOURCE}endpoint_url"),
        unit="URL",
        flag=True,
        env=True,
        o=True,
        toml="source",
        default_text="$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS",
        redact=shown_endpoint_url,  # may carry credentials: never echoed back
    ),
    _row(
        "block_size",
        "stores",
        _as_block_size,
        "plain stores (s3, webdav, http, file): bytes per ranged GET and per cached block, 4K to 256M; ctera "
        "sources use the Portal's own blocks",
        kind="size",
        home=_home(f"{_SOURCE}block_size_bytes"),
        unit="SIZE",
        flag=True,
        env=True,
        o=True,
        toml="source",
        reason="measured against SeaweedFS, it amortises the per-request cost while a random read waits ~20 ms",
    ),
    _row(
        "staging_deadline",
        "stores",
        _as_seconds,
        "nearline stores: how long one read waits for data to come online from tape (503 + Retry-After, S3 "
        "InvalidObjectState) before it fails with ETIMEDOUT",
        kind="duration",
        home=_home(f"{_SOURCE}staging_deadline_seconds"),
        unit="DURATION",
        flag=True,
        env=True,
        o=True,
        toml="source",
        reason="a disk-cache recall; stage bigger recalls ahead with `directfs stage`",
    ),
    _row(
        "no_range_max_size",
        "stores",
        _as_size,
        "http(s):// servers that ignore Range, read as one stream from byte 0: how far ahead of that stream a read "
        "may be and still wait for it (at least one block); a read further away fails with EOPNOTSUPP",
        kind="size",
        home=_home(f"{_SOURCE}no_range_max_size_bytes"),
        unit="SIZE",
        flag=True,
        env=True,
        o=True,
        toml="source",
        reason="covers the read-ahead window plus a block, and a random read waits under a second at 1 Gb/s",
    ),
    _row(
        "follow_symlinks",
        "stores",
        _as_bool,
        "file:// only: follow symlinks that lead out of the source folder (links inside it are always followed)",
        kind="switch",
        home=_home(f"{_SOURCE}follow_symlinks"),
        flag=True,
        switch=True,
        env=True,
        o=True,
        toml="source",
        reason="whoever can write into the tree could link to any file the daemon may read (/etc/shadow under root)",
    ),
    # The disk cache (directfs.engine.diskcache, docs/disk-cache.md): mount, cp and stage read through the same engine,
    # so these are store flags; in a config file they are [mount] keys (a copy or a stage takes them as flags).
    _row(
        "disk_cache",
        "stores",
        _as_abs_path,
        "keep fetched blocks in this folder (encrypted), across remounts and shared by mounts, cp and stage on this "
        "host; off unless given",
        unit="DIR",
        home=_home("directfs.engine.diskcache:DiskCacheSettings.directory"),
        flag=True,
        env=True,
        o=True,
        toml="mount",
        argv_parse=_as_made_absolute,
        default_text="off",
        reason="a disk cache uses disk space and is a copy of data (encrypted): it is asked for, never assumed",
    ),
    _row(
        "disk_cache_size",
        "stores",
        _as_size,
        "largest total size of the --disk-cache folder; least recently used blocks are removed beyond it",
        kind="size",
        home=_home("directfs.engine.diskcache:DiskCacheSettings.size_bytes"),
        unit="SIZE",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="a few epochs of a mid-size dataset, small next to a data disk; raise it for larger working sets",
    ),
    _row(
        "disk_cache_min_free",
        "stores",
        _as_size_or_zero,
        "free space the --disk-cache folder's filesystem keeps: the cache evicts (or stops writing) below it",
        kind="size",
        home=_home("directfs.engine.diskcache:DiskCacheSettings.min_free_bytes"),
        unit="SIZE",
        flag=True,
        env=True,
        o=True,
        toml="mount",
        reason="room for logs, spools and other programs: a full disk is never the cache's doing",
    ),
    _row(
        "disk_cache_key_file",
        "stores",
        _as_abs_path,
        "the --disk-cache key (created 0600 when missing; outside the cache folder): it seals blocks of plain "
        "stores and native CTERA files; lose it and the cache is simply cold",
        unit="PATH",
        home=_home("directfs.engine.diskcache:DiskCacheSettings.key_file"),
        flag=True,
        env=True,
        o=True,
        toml="mount",
        argv_parse=_as_made_absolute,
        default_text="$XDG_STATE_HOME/directfs/disk-cache.key (~/.local/state/...)",
        reason="one key per user, so that user's mounts sharing a folder share its key",
    ),
    _row(
        "url",
        "source",
        _as_url,
        "what to mount: ctera+https://…, s3://…, webdav(s)://…, http(s)://…, file:///… (required)",
        toml="source",
    ),
    _row(
        "mountpoint",
        "source",
        _as_abs_path,
        "where `directfs mount NAME` (systemd, fstab) mounts it when no MOUNTPOINT is given",
        toml="source",
    ),
)

OPTIONS: Final[Mapping[str, Option]] = {option.name: option for option in TABLE}
TOML_KEYS: Final[Mapping[Section, Mapping[str, Option]]] = {
    section: {option.name: option for option in TABLE if option.toml == section} for section in ("mount", "source")
}
ENV_NAMES: Final[Mapping[str, Option]] = {option.env: option for option in TABLE if option.env}
O_KEYS: Final[Mapping[str, Option]] = {option.o: option for option in TABLE if option.o}


def names_in(groups: Iterable[Group]) -> frozenset[str]:
    """The options of these groups."""
    wanted = set(groups)
    return frozenset(option.name for option in TABLE if option.group in wanted)


# --- argparse ------------------------------------------------------------------------------------------------


class _Flag(argparse.Action):
    """A flag of the table: stores the text as given (parsed later, with the other layers, so every spelling of a
    value goes through one parser) or the switch's value; unset flags stay None. The help is rendered when asked for,
    since a default may live in a module too heavy to import just to parse argv."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, option: Option, **kwargs: Any) -> None:
        self.option = option
        kwargs.pop("help", None)
        super().__init__(
            option_strings,
            dest,
            nargs=0 if option.switch is not None else None,
            default=None,
            choices=option.choices,
            metavar=option.unit or None,
            **kwargs,
        )

    @property
    def help(self) -> str:
        return self.option.flag_help()

    @help.setter
    def help(self, value: object) -> None:  # argparse.Action.__init__ assigns it: the table's text stands
        pass

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self.option.switch if self.option.switch is not None else values)


def add_flags(parser: argparse.ArgumentParser, *groups: Group) -> None:
    """The flags of these groups, in table order (credentials, TLS and stores as argument groups)."""
    for group in groups:
        title = _GROUP_TITLES[group]
        target = parser.add_argument_group(title) if title else parser
        for option in TABLE:
            if option.group == group and option.flags:
                target.add_argument(*option.flags, dest=option.name, action=_Flag, option=option)


def given_flags(args: argparse.Namespace, groups: Iterable[Group]) -> dict[str, Any]:
    """Option name -> typed value of every flag of ``groups`` given on the command line; ConfigError names the flag."""
    wanted = set(groups)
    given: dict[str, Any] = {}
    for option in TABLE:
        raw = getattr(args, option.name, None) if option.group in wanted and option.flags else None
        if raw is None:
            continue
        given[option.name] = raw if isinstance(raw, bool) else option.from_text(raw, option.flag)
    return given


# --- -o: the one parser (directfs mount and mount.directfs) -------------------------------------------------------

# mount(8) and fstab words that mean nothing to directfs: for mount(8), systemd or the admin, or kernel flags mount(8)
# passes along. Ignored by mount.directfs (fstab=True), `rw` included: mount(8) hands `rw` to every helper, so in
# fstab writes are asked for with `directfs_rw` or `rw = true` in the config file. `directfs mount -o` knows ro and rw.
FSTAB_IGNORED: Final = frozenset(
    {
        "_netdev",
        "nofail",
        "noauto",
        "auto",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "defaults",
        "ro",
        "rw",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "relatime",
        "norelatime",
        "async",
        "sync",
    }
)
FSTAB_IGNORED_PREFIXES: Final = ("x-", "comment=")  # x-systemd.*, x-mount.*


@dataclass(frozen=True)
class OItem:
    """One ``KEY[=VALUE]`` of ``-o``: ``text`` as written, ``value`` None for a switch."""

    text: str
    option: Option
    value: str | None

    @property
    def where(self) -> str:
        return f"-o {self.option.o}"

    def parsed(self) -> Any:
        """The typed value; ConfigError naming ``-o KEY``."""
        if self.option.switch is not None:
            return self.option.switch
        return self.option.from_text(self.value, self.where)


def parse_o(groups: Iterable[str], *, fstab: bool = False, sloppy: bool = False) -> list[OItem]:
    """``-o`` values (each a comma list of ``KEY[=VALUE]``, ``-`` and ``_`` alike in keys) -> the options they set,
    in order; ``ro`` (the default) and, with ``fstab``, mount(8)'s own words are dropped (``rw`` among them; fstab
    says ``directfs_rw``). ConfigError for an unknown key (unless ``sloppy``), a secret value (fstab and argv are
    world-readable), a switch given a value or a value option without one. Values are parsed by ``OItem.parsed``."""
    items: list[OItem] = []
    known = ", ".join(sorted([*O_KEYS, "ro"]))
    for group in groups:
        for text in group.split(","):
            text = text.strip()
            if not text:
                continue
            key, sep, value = text.partition("=")
            key = key.strip().replace("-", "_")
            if key == "ro" or (fstab and (key in FSTAB_IGNORED or text.startswith(FSTAB_IGNORED_PREFIXES))):
                continue
            if key == "directfs_rw":  # fstab's spelling of rw (the plain word is mount(8)'s, given to every helper)
                key = "rw"
            option = O_KEYS.get(key)
            if option is None:
                named = OPTIONS.get(key)
                if named is not None and named.secret:
                    raise ConfigError(
                        f"option {key}= would put a secret in fstab and in ps; use {key}_file=PATH or the config file"
                    )
                if sloppy:
                    continue
                close = difflib.get_close_matches(key, list(O_KEYS), n=1)
                hint = ("use -s to ignore unknown options; " if fstab else "") + (
                    f"did you mean {close[0]!r}? " if close else ""
                )
                raise ConfigError(f"unknown option {key!r} ({hint}known: {known})")
            if option.switch is not None:
                if sep:
                    raise ConfigError(f"option {key} takes no value")
                items.append(OItem(text, option, None))
            else:
                if not sep or not value:
                    raise ConfigError(f"option {key} needs a value ({key}=...)")
                items.append(OItem(text, option, value))
    return items


def o_help() -> str:
    keys = ", ".join([*(option.o for option in TABLE if option.o and not option.o_as_flag), "ro"])
    return (
        f"mount options as in fstab ({keys}, and the twins of the other flags, e.g. log_level=debug, "
        "no_verify_tls; flags win, rw is refused)"
    )


# --- the README's tables ----------------------------------------------------------------------------------------


def _code(text: str) -> str:
    return f"`{text}`"


def _flag_cell(option: Option) -> str:
    unit = f" {option.unit}" if option.unit else ""
    return ", ".join(_code(flag + (unit if flag == option.flag else "")) for flag in option.flags)


def _meaning(option: Option, *, toml: bool = False) -> str:
    text = option.toml_help if toml and option.toml_help else option.help
    if option.secret:
        text = (
            f"the {text}: inline only in a file nobody else can read (chmod 600)"
            if toml
            else (f"{text}; visible in ps, so discouraged: use `{option.flag}-file`")
        )
    default = option.default_shown()
    words = option.default_text is not None  # "default: the mounting user", but "default 256M"
    if toml and option.kind == "switch":  # true/false, as the file spells them
        value = option.default()
        default, words = ("true" if value else "false") if isinstance(value, bool) else None, False
    if default is not None:
        text += f" (default: {default})" if words else f" (default {default})"
    return text.replace("|", "\\|")


def _o_cell(option: Option, prefix: str = "") -> str:
    return _code(f"{prefix}{option.o}{'' if option.switch is not None else '='}")


def _twins(option: Option) -> str:
    cells = []
    if option.toml:
        cells.append(f"`{option.name}` [{option.toml}]")
    if option.env:
        cells.append(_code(f"${option.env}"))
    if option.o:
        cells.append(_o_cell(option, "-o "))
    return ", ".join(cells)


def _mount_table() -> str:
    rows = ["| option | meaning | also as |", "|---|---|---|"]
    for group in MOUNT_GROUPS:
        for option in TABLE:
            if option.group == group and option.flags:
                rows.append(f"| {_flag_cell(option)} | {_meaning(option)} | {_twins(option)} |")
        if group == "mount":
            keys = ", ".join(_code(option.o) for option in TABLE if option.o and not option.o_as_flag)
            rows.append(
                f"| `-o KEY[=VALUE],...` | fstab-style options: every option with an `-o` form, e.g. {keys}; `ro` is "
                "accepted (the default) (flags win over `-o`) | |"
            )
    return "\n".join(rows)


def _store_table() -> str:
    rows = ["| flag | meaning |", "|---|---|"]
    rows += [f"| {_flag_cell(option)} | {_meaning(option)} |" for option in TABLE if option.group == "stores"]
    return "\n".join(rows)


def _config_table() -> str:
    rows = ["| key | where | meaning |", "|---|---|---|"]
    for section in ("mount", "source"):
        for option in TOML_KEYS[section].values():
            where = "[mount], [source.NAME.mount]" if section == "mount" else "[source.NAME]"
            rows.append(f"| `{option.name}` | {where} | {_meaning(option, toml=True)} |")
    return "\n".join(rows)


def _wrap(text: str, indent: str = "") -> str:
    """Prose the way the README is written: lines of at most 120 characters (``indent`` for a bullet's later lines)."""
    return textwrap.fill(text, width=120, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def _environment() -> str:
    names = ", ".join(_code(name) for name in ENV_NAMES)
    return _wrap(
        f"Environment twins (the environment beats the config file, flags beat both): {names}. Secrets come from "
        "their variable only when no flag gives them. `directfs mount NAME` mounts `[source.NAME]` at its `mountpoint`."
    )


def _fstab() -> str:
    as_flags = ", ".join(_o_cell(option) for option in TABLE if option.o and option.o_as_flag)
    passed = ", ".join(_o_cell(option) for option in TABLE if option.o and not option.o_as_flag)
    bullets = [
        "- Ignored: `_netdev`, `nofail`, `noauto`, `auto`, `user(s)`, `defaults`, `ro`/`rw` (mount(8) passes `rw` to "
        "every helper: say `directfs_rw` to allow writes), `x-*`, "
        "`comment=*`, and the kernel flags mount(8) passes along.",
        f"- Mapped to flags: {as_flags}.",
        f"- Passed on as `-o`: {passed}.",
        "- Secret values in options are refused (use the `*_file=` options or the config file); any other option is an "
        "error unless `-s`. `mount` returns only when the mount is live. Exit codes: 0 mounted, 1 bad invocation, 32 "
        "mount failed.",
    ]
    return "\n".join(_wrap(bullet, "  ") for bullet in bullets)


def readme_blocks() -> dict[str, str]:
    """Marker name -> the text between ``<!-- options:NAME -->`` and ``<!-- /options:NAME -->`` in README.md."""
    return {
        "mount": _mount_table(),
        "stores": _store_table(),
        "config": _config_table(),
        "environment": _environment(),
        "fstab": _fstab(),
    }


def update_readme(text: str) -> str:
    """``text`` (README.md) with every generated block replaced by what the table says now; KeyError for a block the
    README lacks."""
    for name, block in readme_blocks().items():
        match = re.search(rf"<!-- options:{name} -->\n(.*?)\n<!-- /options:{name} -->", text, re.DOTALL)
        if match is None:
            raise KeyError(f"README has no <!-- options:{name} --> block")
        text = text[: match.start(1)] + block + text[match.end(1) :]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m directfs.options README.md`` rewrites the README's option tables (``--check``: only report)."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [arg for arg in args if arg != "--check"] or ["README.md"]
    stale = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        updated = update_readme(text)
        if updated != text:
            stale.append(path)
            if not check:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(updated)
    for path in stale:
        print(f"{path}: option tables {'stale' if check else 'rewritten'}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
