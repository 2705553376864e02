"""The config file (TOML), its environment twins and how both fold under the command-line flags.

Precedence, lowest first: built-in defaults < config file (``[mount]``, then ``[source.NAME]`` and its
``[source.NAME.mount]``) < environment (``DIRECTFS_*``) < flags (and ``-o`` options, which are flags in fstab
clothing). Each layer only fills what the layers above it left unset, so every value has exactly one origin.

File layout (``examples/directfs.toml`` is the annotated reference)::

    [mount]                      # defaults for every mount
    cache_size = "512M"          # sizes: bytes or K/M/G/T (binary); durations: seconds or 500ms/10s/5m/1h
    metadata_ttl = "5s"
    metrics_address = "127.0.0.1:9567"

    [source.projects]            # `directfs mount projects` / systemd `directfs@projects` / fstab `projects ...`
    url = "ctera+https://portal.example.com/projects"
    mountpoint = "/mnt/projects"
    access_key_id = "AKIA..."
    secret_access_key_credential = "ctera-secret"   # systemd LoadCredential=ctera-secret:/etc/directfs/ctera.key
    [source.projects.mount]      # per-source overrides of [mount]
    allow_other = true

Secrets (``secret_access_key``, ``password``, ``token``) come in three spellings: ``KEY_file = "/path"`` (read once,
trailing newline stripped), ``KEY_credential = "name"`` (the file ``$CREDENTIALS_DIRECTORY/name`` that systemd's
``LoadCredential=`` provides, readable only by the unit) or ``KEY = "value"`` inline, which is accepted only when the
config file is not readable by group or others (``chmod 600``). Secret values never appear in errors, ``repr`` or
logs; file and credential *paths* travel to the daemon in argv, the values never do.

Every error is a ``ConfigError`` naming the file, the key, the value (``<hidden>`` for secrets) and the reason;
an unknown key also names the closest known one. Unknown ``DIRECTFS_*`` variables only log a warning: the
environment is shared with other tools and versions, and refusing to mount over a stray variable helps nobody.

This module is imported by commands at parse time: it stays light (stdlib + the ``units`` and ``values`` parsers
only). It never imports ``commands``: the parsers it shares with the flags live in ``values``, below both.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import ConfigError
from .units import parse_duration_seconds, parse_size
from .values import MetricsAddress, parse_block_size, parse_endpoint_url

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH: Final = "/etc/directfs/directfs.toml"
ENV_CONFIG: Final = "DIRECTFS_CONFIG"
ENV_CREDENTIALS_DIRECTORY: Final = "CREDENTIALS_DIRECTORY"  # set by systemd for units with LoadCredential=

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
SECRET_KEYS: Final = ("secret_access_key", "password", "token")

# A config file is a page of TOML: anything bigger is the wrong file (and is not read into memory).
MAX_CONFIG_FILE_BYTES: Final = 1024 * 1024


# --- value parsers: each takes the raw TOML/env value and returns the normalised one or raises ValueError(reason) ---


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


def _as_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('expected a size: bytes or a string such as "512M"')
    try:
        size = parse_size(str(value))
    except ConfigError as exc:
        raise ValueError(exc.strerror) from None
    if size <= 0:
        raise ValueError("must be more than 0")
    return size


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
    if seconds >= 365 * 86400:  # the same bound as the --metadata-ttl flag: a year is "forever" in a typo
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


def _as_url(value: object) -> str:
    text = _as_str(value)
    if "://" not in text:
        raise ValueError("expected a URL such as ctera+https://portal.example.com/folder or file:///srv/data")
    return text


def _as_endpoint_url(value: object) -> str:
    try:
        return parse_endpoint_url(_as_str(value), "endpoint_url")
    except ConfigError as exc:
        raise ValueError(exc.strerror) from None


def _as_block_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('expected a size: bytes or a string such as "8M"')
    try:
        return parse_block_size(str(value), "block_size")
    except ConfigError as exc:
        raise ValueError(exc.strerror) from None


def _as_abs_path(value: object) -> str:
    text = _as_str(value)
    if not os.path.isabs(text):
        raise ValueError("expected an absolute path")
    return text


def _as_credential_name(value: object) -> str:
    text = _as_str(value)
    if "/" in text or text in (".", ".."):
        raise ValueError("expected a credential name (as in LoadCredential=NAME:...), not a path")
    return text


def parse_metrics_address(value: object) -> MetricsAddress:
    """``HOST:PORT`` or ``[V6]:PORT`` (a bare ``PORT`` means 127.0.0.1:PORT); ValueError(reason) otherwise."""
    text = _as_str(value) if not isinstance(value, int) or isinstance(value, bool) else str(value)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9567")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9567") from None
    if not 0 < port < 65536:
        raise ValueError("port must be between 1 and 65535")
    return MetricsAddress(host, port)


# --- the key tables: one line per key, the parser and the argparse ``dest`` it fills ------------------------------


@dataclass(frozen=True)
class _Key:
    parse: Callable[[object], Any]
    dest: str  # the argparse attribute of `directfs mount` this key fills
    secret: bool = False


MOUNT_KEYS: Final[Mapping[str, _Key]] = {
    "cache_size": _Key(_as_size, "cache_size"),
    "read_ahead": _Key(_as_size, "read_ahead"),
    "metadata_ttl": _Key(_as_ttl_seconds, "metadata_ttl"),
    "allow_other": _Key(_as_bool, "allow_other"),
    "uid": _Key(_as_id, "uid"),
    "gid": _Key(_as_id, "gid"),
    "umask": _Key(_as_umask, "umask"),
    "log_level": _Key(_as_log_level, "log_level"),
    "log_file": _Key(_as_abs_path, "log_file"),
    "metrics_address": _Key(parse_metrics_address, "metrics_address"),
    "metrics_allow_remote": _Key(_as_bool, "metrics_allow_remote"),
}

SOURCE_KEYS: Final[Mapping[str, _Key]] = {
    "url": _Key(_as_url, "source"),
    "mountpoint": _Key(_as_abs_path, "mountpoint"),
    "access_key_id": _Key(_as_str, "access_key_id"),
    "username": _Key(_as_str, "username"),
    "verify_tls": _Key(_as_bool, "verify_tls"),
    "verify_storage_tls": _Key(_as_bool, "verify_storage_tls"),
    "ca_file": _Key(_as_abs_path, "ca_file"),
    "client_cert": _Key(_as_abs_path, "client_cert"),
    "client_key": _Key(_as_abs_path, "client_key"),
    "connect_timeout": _Key(_as_positive_seconds, "connect_timeout"),
    "read_timeout": _Key(_as_positive_seconds, "read_timeout"),
    "endpoint_url": _Key(_as_endpoint_url, "endpoint_url"),
    "block_size": _Key(_as_block_size, "block_size"),
    "staging_deadline": _Key(_as_seconds, "staging_deadline"),
    **{name: _Key(_as_str, name, secret=True) for name in SECRET_KEYS},
    **{f"{name}_file": _Key(_as_abs_path, f"{name}_file") for name in SECRET_KEYS},
    **{f"{name}_credential": _Key(_as_credential_name, f"{name}_file") for name in SECRET_KEYS},
}

# Environment twins of the config keys (credentials have theirs in commands.common: DIRECTFS_ACCESS_KEY_ID, ...).
ENV_KEYS: Final[Mapping[str, str]] = {
    "DIRECTFS_CACHE_SIZE": "cache_size",
    "DIRECTFS_READ_AHEAD": "read_ahead",
    "DIRECTFS_METADATA_TTL": "metadata_ttl",
    "DIRECTFS_ALLOW_OTHER": "allow_other",
    "DIRECTFS_UID": "uid",
    "DIRECTFS_GID": "gid",
    "DIRECTFS_UMASK": "umask",
    "DIRECTFS_LOG_LEVEL": "log_level",
    "DIRECTFS_LOG_FILE": "log_file",
    "DIRECTFS_METRICS_ADDRESS": "metrics_address",
    "DIRECTFS_METRICS_ALLOW_REMOTE": "metrics_allow_remote",
    "DIRECTFS_CA_FILE": "ca_file",
    "DIRECTFS_VERIFY_TLS": "verify_tls",
    "DIRECTFS_CONNECT_TIMEOUT": "connect_timeout",
    "DIRECTFS_READ_TIMEOUT": "read_timeout",
    "DIRECTFS_ENDPOINT_URL": "endpoint_url",
    "DIRECTFS_BLOCK_SIZE": "block_size",
    "DIRECTFS_STAGING_DEADLINE": "staging_deadline",
}
# Other variables of ours, known so they do not draw the "unknown variable" warning.
OTHER_ENV: Final = frozenset(
    {
        ENV_CONFIG,
        "DIRECTFS_RUNTIME_DIR",  # directfs.metrics: where control sockets live
        "DIRECTFS_ACCESS_KEY_ID",
        "DIRECTFS_SECRET_ACCESS_KEY",
        "DIRECTFS_USERNAME",
        "DIRECTFS_PASSWORD",
        "DIRECTFS_TOKEN",
    }
)


# --- the parsed file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    """One ``[source.NAME]``: ``values`` maps config keys to parsed values (secrets hidden from repr)."""

    name: str
    values: Mapping[str, Any] = field(repr=False)
    mount: Mapping[str, Any]

    @property
    def url(self) -> str:
        url: str = self.values["url"]
        return url

    @property
    def mountpoint(self) -> str | None:
        mountpoint: str | None = self.values.get("mountpoint")
        return mountpoint


@dataclass(frozen=True)
class Config:
    path: str | None
    mount: Mapping[str, Any]
    sources: Mapping[str, SourceConfig]

    def source(self, name: str) -> SourceConfig:
        try:
            return self.sources[name]
        except KeyError:
            where = self.path or "no config file"
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigError(f"{where}: no [source.{name}] (sources defined: {known})") from None


EMPTY_CONFIG: Final = Config(path=None, mount={}, sources={})


def _shown(key: str, value: object, table: Mapping[str, _Key]) -> str:
    spec = table.get(key)
    return "<hidden>" if spec is not None and spec.secret else repr(value)


def _unknown(path: str, section: str, key: str, value: object, table: Mapping[str, _Key]) -> ConfigError:
    close = difflib.get_close_matches(key, list(table), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    # The value of an unknown key may be a mistyped secret (passwrod = "..."): hide it when the name looks secret.
    looks_secret = any(word in key.lower() for word in ("secret", "pass", "token", "key", "cred"))
    shown = "<hidden>" if looks_secret or isinstance(value, dict) else repr(value)
    return ConfigError(f"{path}: [{section}] unknown key {key} = {shown} ({hint}known: {', '.join(table)})")


def _parse_table(path: str, section: str, table: Mapping[str, object], keys: Mapping[str, _Key]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, raw in table.items():
        spec = keys.get(key)
        if spec is None:
            raise _unknown(path, section, key, raw, keys)
        try:
            parsed[key] = spec.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{path}: [{section}] {key} = {_shown(key, raw, keys)}: {exc}") from None
    return parsed


def _check_secret_spellings(path: str, section: str, values: Mapping[str, Any], file_mode: int) -> None:
    for name in SECRET_KEYS:
        given = [key for key in (name, f"{name}_file", f"{name}_credential") if key in values]
        if len(given) > 1:
            raise ConfigError(f"{path}: [{section}] {' and '.join(given)}: give the {name} only one way")
        if name in values and file_mode & 0o077:
            raise ConfigError(
                f"{path}: [{section}] {name} = <hidden>: the file holds a secret but is readable by others "
                f"(mode {stat.S_IMODE(file_mode):03o}); chmod 600 it, or use {name}_file / {name}_credential"
            )


def parse_config(text: str, *, path: str = "<config>", file_mode: int = 0o600) -> Config:
    """Parse and validate config text (``file_mode``: the file's st_mode, for the inline-secret rule)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key, value in document.items():
        if key not in ("mount", "source"):
            raise ConfigError(f"{path}: unknown top-level key {key!r} (known: mount, source)")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key} = {value!r}: expected a table ([{key}] or [{key}.NAME])")
    mount = _parse_table(path, "mount", document.get("mount", {}), MOUNT_KEYS)
    sources: dict[str, SourceConfig] = {}
    for name, table in document.get("source", {}).items():
        section = f"source.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: source.{name} = <hidden>: expected a table [source.{name}]")
        if "://" in name or "/" in name or not name.strip():
            raise ConfigError(f"{path}: [source.{name}]: a source name must not be empty or hold '/' or '://'")
        body = dict(table)
        overrides = body.pop("mount", {})
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: [{section}] mount = {overrides!r}: expected a table [{section}.mount]")
        values = _parse_table(path, section, body, SOURCE_KEYS)
        if "url" not in values:
            raise ConfigError(f'{path}: [{section}] has no url (e.g. url = "ctera+https://portal.example.com")')
        _check_secret_spellings(path, section, values, file_mode)
        sources[name] = SourceConfig(name, values, _parse_table(path, f"{section}.mount", overrides, MOUNT_KEYS))
    return Config(path=path, mount=mount, sources=sources)


def load_config(path: str) -> Config:
    """Read and validate the config file at ``path`` (ConfigError naming the path if it cannot)."""
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"config file {path!r} is larger than {MAX_CONFIG_FILE_BYTES} bytes: wrong file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not UTF-8 text") from None
    return parse_config(text, path=path, file_mode=mode)


def find_config_path(explicit: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """``--config`` if given, else ``$DIRECTFS_CONFIG``, else the default path when that file exists, else None."""
    if explicit:
        return explicit
    if env.get(ENV_CONFIG):
        return env[ENV_CONFIG]
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def load_for(explicit: str | None, env: Mapping[str, str] = os.environ) -> Config:
    """The config ``find_config_path`` picks, or an empty one when there is none."""
    path = find_config_path(explicit, env)
    return load_config(path) if path is not None else EMPTY_CONFIG


def env_values(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Config-key -> parsed value from ``DIRECTFS_*`` variables; ConfigError names the variable and the reason."""
    values: dict[str, Any] = {}
    keys = {**MOUNT_KEYS, **SOURCE_KEYS}
    for name, text in env.items():
        if not name.startswith("DIRECTFS_"):
            continue
        key = ENV_KEYS.get(name)
        if key is None:
            if name not in OTHER_ENV:
                log.warning("ignoring unknown environment variable %s (known: %s)", name, ", ".join(ENV_KEYS))
            continue
        try:
            values[key] = keys[key].parse(text)
        except ValueError as exc:
            raise ConfigError(f"environment {name}={text!r}: {exc}") from None
    return values


def is_source_name(text: str) -> bool:
    """Whether a SOURCE argument names a ``[source.NAME]`` rather than being a URL."""
    return "://" not in text


def secret_file_path(key: str, value: str, env: Mapping[str, str]) -> str:
    """The file behind ``KEY_file`` (as is) or ``KEY_credential`` (under $CREDENTIALS_DIRECTORY)."""
    if not key.endswith("_credential"):
        return value
    directory = env.get(ENV_CREDENTIALS_DIRECTORY)
    if not directory:
        raise ConfigError(
            f"{key} = {value!r}: ${ENV_CREDENTIALS_DIRECTORY} is not set (run under systemd with "
            f"LoadCredential={value}:/path/to/file, or use {key.removesuffix('_credential')}_file)"
        )
    path = os.path.join(directory, value)
    if not os.path.isfile(path):
        raise ConfigError(f"{key} = {value!r}: no such credential in ${ENV_CREDENTIALS_DIRECTORY} ({path})")
    return path


# --- folding the layers into `directfs mount`'s arguments ----------------------------------------------------------

# argparse defaults that mean "not given on the command line" (store_false flags default to True).
_UNSET_WHEN_TRUE: Final = frozenset({"verify_tls", "verify_storage_tls"})


def _flag_given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest, None)
    if dest in _UNSET_WHEN_TRUE:
        return value is False
    return value is not None and value is not False


def _o_keys(args: argparse.Namespace) -> set[str]:
    """Keys given with ``-o`` (they rank with flags)."""
    keys: set[str] = set()
    for value in getattr(args, "options", None) or []:
        for item in value.split(","):
            if item:
                keys.add(item.partition("=")[0].strip().replace("-", "_"))
    return keys


def _as_arg(key: str, value: Any) -> Any:
    """A parsed value in the form `directfs mount` expects in its Namespace (the flag's own type)."""
    if key in ("cache_size", "read_ahead", "block_size"):
        return str(value)  # bytes; parse_size accepts a plain number
    if key in ("connect_timeout", "read_timeout", "staging_deadline"):
        return repr(float(value))  # seconds; parse_duration_seconds accepts a plain number
    if key == "metrics_address":
        return str(value)
    return value


def apply_to_mount_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Config:
    """Fill every attribute of a parsed ``directfs mount`` Namespace the command line left unset, from the
    environment, then the named source, then ``[mount]``. Resolves a SOURCE that names a ``[source.NAME]`` into
    its URL and (unless given) its mountpoint. Returns the config used.

    Credentials: a secret given by flag, flag file or its ``DIRECTFS_*`` variable wins over the config, whose
    ``KEY_file``/``KEY_credential`` become ``--KEY-file`` paths and inline values stay in memory only.
    """
    config = load_for(getattr(args, "config", None), env)
    source = _resolve_source_name(args, config)
    layered: dict[str, Any] = dict(config.mount)
    if source is not None:
        layered.update(source.values)
        layered.update(source.mount)
    _fill(args, layered, env)
    if not getattr(args, "mountpoint", None):
        named = f"[source.{source.name}] has no mountpoint" if source is not None else "no MOUNTPOINT given"
        raise ConfigError(f'{named}: give MOUNTPOINT on the command line or mountpoint = "/mnt/..." in the config')
    return config


def apply_to_source_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Config:
    """The same folding for commands that read a store without mounting it (``ls``, ``cp``, ``stage``): fills the
    source keys of ``[source.NAME]`` (credentials, TLS, store flags) and their ``DIRECTFS_*`` twins into ``args``
    where the flags left them unset, and turns ``args.source`` from a NAME into its URL. ``[mount]`` and the
    per-source mount keys are not used: there is no mount."""
    config = load_for(getattr(args, "config", None), env)
    source = _resolve_source_name(args, config)
    layered: dict[str, Any] = dict(source.values) if source is not None else {}
    layered.pop("mountpoint", None)
    _fill(args, layered, env, keys=SOURCE_KEYS)
    return config


def _resolve_source_name(args: argparse.Namespace, config: Config) -> SourceConfig | None:
    if is_source_name(args.source):
        source = config.source(args.source)
        args.source_name = args.source
        args.source = source.url
        return source
    args.source_name = None
    return None


def _fill(
    args: argparse.Namespace,
    layered: dict[str, Any],
    env: Mapping[str, str],
    keys: Mapping[str, _Key] | None = None,
) -> None:
    """Environment over ``layered`` (file values), then every key the flags (and ``-o``) left unset into ``args``.
    ``keys``: only these config keys (None: mount and source keys)."""
    from_env = env_values(env)
    if keys is not None:
        from_env = {key: value for key, value in from_env.items() if key in keys}
    layered.update(from_env)
    layered.pop("url", None)
    o_keys = _o_keys(args)
    for name in SECRET_KEYS:
        env_name = f"DIRECTFS_{name.upper()}"
        flags_given = _flag_given(args, name) or _flag_given(args, f"{name}_file")
        spellings = [key for key in (name, f"{name}_file", f"{name}_credential") if key in layered]
        if flags_given or env.get(env_name):
            for key in spellings:
                layered.pop(key)
            continue
        for key in spellings:
            if key != name:
                layered[key] = secret_file_path(key, layered[key], env)
    for key, value in layered.items():
        spec = MOUNT_KEYS.get(key) or SOURCE_KEYS[key]
        if key in o_keys or _flag_given(args, spec.dest):
            continue
        if key == "mountpoint" and getattr(args, "mountpoint", None):
            continue
        setattr(args, spec.dest, _as_arg(key, value))
