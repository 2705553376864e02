"""The config file (TOML), its environment twins, and the typed settings of a command: every layer folded once.

Precedence, lowest first: built-in defaults (the settings dataclasses') < config file (``[mount]``, then
``[source.NAME]`` and its ``[source.NAME.mount]``) < environment (``DIRECTFS_*``) < ``-o`` options < flags.
``mount_settings``/``source_settings``/``flag_settings`` read the parsed flags, parse every value once with the
option table's parser (``directfs.options``: keys, twins and parsers are generated from it) and return ``Settings``:
typed values and the origin of each. Nothing writes back into the argparse Namespace, and nothing is turned back
into text to be parsed again.

File layout (``examples/directfs.toml`` is the annotated reference)::

    [mount]                      # defaults for every mount
    cache_size = "512M"          # sizes: bytes or K/M/G/T (binary); durations: seconds or 500ms/10s/5m/1h
    metadata_ttl = "5s"
    metrics_address = "127.0.0.1:9567"

    [source.projects]            # `directfs mount projects` / systemd `directfs@projects` / fstab `projects ...`
    url = "ctera+https://portal.example.com/projects"
    mountpoint = "/mnt/projects"
    access_key_id_credential = "ctera-key-id"       # systemd LoadCredential=ctera-key-id:/etc/directfs/ctera-key-id
    secret_access_key_credential = "ctera-secret"   # systemd LoadCredential=ctera-secret:/etc/directfs/ctera.key
    [source.projects.mount]      # per-source overrides of [mount]
    allow_other = true

Secrets (``access_key_id``, ``secret_access_key``, ``password``, ``token``) come in three spellings:
``KEY_file = "/path"`` (read once, trailing newline stripped), ``KEY_credential = "name"`` (the file
``$CREDENTIALS_DIRECTORY/name`` that systemd's ``LoadCredential=`` provides, readable only by the unit) or
``KEY = "value"`` inline, which is accepted only when the config file is not readable by group or others
(``chmod 600``). Secret values never appear in errors, ``repr`` or
logs; file and credential *paths* travel to the daemon in argv, the values never do.

Permissions (issue 13 L5): a config file that group, others or a user other than root and ourselves may write could
aim the daemon at another Portal or at files of the writer's choosing, and a secret file that group or others may
read (or that another user owns, and so may rewrite) gives its secret away. Both draw a warning naming the file and
the fix; ``--strict-permissions`` (or ``$DIRECTFS_STRICT_PERMISSIONS``) refuses them instead (``check_config_file``,
``check_secret_file``). The access key id is one of the secrets: alone it unlocks native files through /directio.

Every error is a ``ConfigError`` naming the file, the key, the value (``<hidden>`` for secrets) and the reason;
an unknown key also names the closest known one. Unknown ``DIRECTFS_*`` variables only log a warning: the
environment is shared with other tools and versions, and refusing to mount over a stray variable helps nobody.

Light (stdlib, ``options`` and the value parsers below it): commands import it when they run, before anything
heavy. It never imports ``commands``: the table it shares with the flags lives in ``options``, below both.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import ConfigError
from .options import (
    ENV_NAMES,
    GET_GROUPS,
    MOUNT_GROUPS,
    OPTIONS,
    SECRET_KEYS,
    STORE_GROUPS,
    TOML_KEYS,
    Group,
    Option,
    given_flags,
    names_in,
    parse_o,
)
from .values import MetricsAddress as MetricsAddress  # re-exported: the config's own types
from .values import parse_metrics_address as parse_metrics_address

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH: Final = "/etc/directfs/directfs.toml"
ENV_CONFIG: Final = OPTIONS["config"].env or "DIRECTFS_CONFIG"
ENV_CREDENTIALS_DIRECTORY: Final = "CREDENTIALS_DIRECTORY"  # set by systemd for units with LoadCredential=

# A config file is a page of TOML: anything bigger is the wrong file (and is not read into memory).
MAX_CONFIG_FILE_BYTES: Final = 1024 * 1024

# The keys of each section and the environment twins, from the option table (directfs.options).
MOUNT_KEYS: Final[Mapping[str, Option]] = TOML_KEYS["mount"]
SOURCE_KEYS: Final[Mapping[str, Option]] = TOML_KEYS["source"]
ENV_KEYS: Final[Mapping[str, str]] = {name: option.name for name, option in ENV_NAMES.items()}
# Twins read elsewhere, not by env_values: the config path (find_config_path) and secret values (read only when the
# credentials are built, so they never sit in Settings).
_ENV_READ_ELSEWHERE: Final = frozenset({"config", *SECRET_KEYS})
# Other variables of ours, known so they do not draw the "unknown variable" warning.
# directfs.metrics: where control sockets live; directfs.fsspec_ctera: the Portal of ctera:// (no flag has it)
OTHER_ENV: Final = frozenset({"DIRECTFS_RUNTIME_DIR", "DIRECTFS_PORTAL_URL"})


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


def _shown(key: str, value: object, table: Mapping[str, Option]) -> str:
    spec = table.get(key)
    return spec.shown(value) if spec is not None else repr(value)


def _unknown(path: str, section: str, key: str, value: object, table: Mapping[str, Option]) -> ConfigError:
    close = difflib.get_close_matches(key, list(table), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    # The value of an unknown key may be a mistyped secret (passwrod = "..."): hide it when the name looks secret.
    looks_secret = any(word in key.lower() for word in ("secret", "pass", "token", "key", "cred"))
    shown = "<hidden>" if looks_secret or isinstance(value, dict) else repr(value)
    return ConfigError(f"{path}: [{section}] unknown key {key} = {shown} ({hint}known: {', '.join(table)})")


def _parse_table(path: str, section: str, table: Mapping[str, object], keys: Mapping[str, Option]) -> dict[str, Any]:
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


def load_config(path: str, *, strict_permissions: bool = False) -> Config:
    """Read and validate the config file at ``path`` (ConfigError naming the path if it cannot). A file others may
    write draws a warning, or with ``strict_permissions`` a ConfigError (``check_config_file``)."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    check_config_file(path, info, strict=strict_permissions)
    mode = info.st_mode
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


def load_for(explicit: str | None, env: Mapping[str, str] = os.environ, *, strict_permissions: bool = False) -> Config:
    """The config ``find_config_path`` picks, or an empty one when there is none."""
    path = find_config_path(explicit, env)
    return load_config(path, strict_permissions=strict_permissions) if path is not None else EMPTY_CONFIG


def env_values(env: Mapping[str, str] = os.environ, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Option name -> parsed value from ``DIRECTFS_*`` variables (``names``: only these options); ConfigError names
    the variable and the reason. Secret values and the config path are not among them: they are read where used."""
    wanted = None if names is None else frozenset(names)
    values: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith("DIRECTFS_"):
            continue
        option = ENV_NAMES.get(name)
        if option is None:
            if name not in OTHER_ENV:
                log.warning("ignoring unknown environment variable %s (known: %s)", name, ", ".join(ENV_NAMES))
            continue
        if option.name in _ENV_READ_ELSEWHERE or (wanted is not None and option.name not in wanted):
            continue
        try:
            values[option.name] = option.parse(text)
        except ValueError as exc:
            raise ConfigError(f"environment {name}={option.shown(text)}: {exc}") from None
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


# --- file permissions (issue 13 L5) -------------------------------------------------------------------------------


def _foreign_owner(info: os.stat_result) -> bool:
    """Owned by neither root nor us: that user may chmod and rewrite the file whatever its mode says."""
    return info.st_uid not in (0, os.geteuid())


def _judge(what: str, path: str, problems: list[str], fix: str, *, strict: bool) -> None:
    if not problems:
        return
    message = f"{what} {path!r} is {' and '.join(problems)}: {fix}"
    if strict:
        raise ConfigError(message + " (refused: --strict-permissions)")
    log.warning("%s (--strict-permissions refuses it)", message)


def check_config_file(path: str, info: os.stat_result, *, strict: bool = False) -> None:
    """Warn about (``strict``: refuse) a config file group, others or another user may write."""
    problems = []
    if info.st_mode & 0o022:
        problems.append(f"writable by group or others (mode {stat.S_IMODE(info.st_mode):03o})")
    if _foreign_owner(info):
        problems.append(f"owned by uid {info.st_uid}")
    _judge("config file", path, problems, "chmod go-w it and let root own it", strict=strict)


def check_secret_file(path: str, info: os.stat_result, *, strict: bool = False) -> None:
    """Warn about (``strict``: refuse) a secret file group or others may read or write, or another user owns.
    systemd credentials ($CREDENTIALS_DIRECTORY, 0400 and the unit's own) and Kubernetes Secret volumes with
    ``defaultMode: 0400`` pass."""
    problems = []
    if info.st_mode & 0o077:
        problems.append(f"open to group or others (mode {stat.S_IMODE(info.st_mode):03o})")
    if _foreign_owner(info):
        problems.append(f"owned by uid {info.st_uid}")
    _judge("secret file", path, problems, "chmod 600 it and let root or this user own it", strict=strict)


def strict_permissions_given(given: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    """``--strict-permissions`` (in ``given``, the command line's values) or ``$DIRECTFS_STRICT_PERMISSIONS``: known
    before the config file is read, since that file is among what it judges."""
    if "strict_permissions" in given:
        return bool(given["strict_permissions"])
    option = OPTIONS["strict_permissions"]
    text = env.get(option.env or "")
    if not text:
        return False
    try:
        return bool(option.parse(text))
    except ValueError as exc:
        raise ConfigError(f"environment {option.env}={option.shown(text)}: {exc}") from None


# --- the typed config of one command: the layers folded once ----------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What one command runs with: every option some layer gave, parsed once into its type, and where it came from
    (``origins``, for messages). An option nobody gave is absent, and its default is the one of the settings
    dataclass it goes into (``kwargs``): defaults have one home.

    Layers, lowest first: the config file (``[mount]``, ``[source.NAME]``, ``[source.NAME.mount]``) < ``DIRECTFS_*``
    < ``-o`` < flags. A secret is taken from the highest layer that gives it in any spelling (a flag's file beats the
    config's inline value); ``KEY_credential`` arrives as the ``KEY_file`` path under $CREDENTIALS_DIRECTORY, and
    secret values from the environment are read when the credentials are built, never copied here.
    """

    values: Mapping[str, Any] = field(repr=False)
    origins: Mapping[str, str]
    source: str | None = None  # the SOURCE URL, a NAME resolved (None: a command without one)
    source_name: str | None = None  # the [source.NAME] it came from
    mountpoint: str | None = None  # directfs mount: MOUNTPOINT, else the source's mountpoint
    config: Config = field(default=EMPTY_CONFIG, repr=False)

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def origin(self, name: str) -> str:
        """Where ``name`` came from: ``--ca-file``, ``-o ca_file``, ``$DIRECTFS_CA_FILE``, ``PATH: [source.p] ...``."""
        return self.origins.get(name, OPTIONS[name].flag)

    def kwargs(self, owner: str) -> dict[str, Any]:
        """Keyword arguments for ``owner`` (``SourceOptions``, ``VfsSettings``, ``ReadSettings``, ``MountConfig``,
        ``Credentials``, ``setup_logging``): the given options whose ``Home`` is there, under its field names."""
        return {
            option.home.attr: self.values[name]
            for name, option in OPTIONS.items()
            if name in self.values and option.home is not None and option.home.owner == owner
        }


def mount_settings(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Settings:
    """``directfs mount``'s settings: its flags, ``-o``, the environment, then the named source (SOURCE may be a
    ``[source.NAME]``: its URL, and its mountpoint unless MOUNTPOINT is given), then ``[mount]``."""
    return _resolve(args, MOUNT_GROUPS, env, source=args.source, mount=True)


def source_settings(
    args: argparse.Namespace, env: Mapping[str, str] = os.environ, *, source: str | None = None
) -> Settings:
    """The settings of a command that reads a store without mounting it (``ls``, ``cp``, ``stage``): ``source``
    (default ``args.source``; a URL or a NAME) and the source keys of its ``[source.NAME]`` under the flags and their
    ``DIRECTFS_*`` twins. ``[mount]`` and the per-source mount keys are not used: there is no mount."""
    return _resolve(args, STORE_GROUPS, env, source=source if source is not None else args.source, mount=False)


def flag_settings(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Settings:
    """Flags and ``DIRECTFS_*`` only, no config file (``directfs get``: credentials and TLS)."""
    return _resolve(args, GET_GROUPS, env, source=None, mount=False, use_file=False)


@dataclass
class _Layer:
    """The values one layer gives and, for each, where it came from."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, value: Any, origin: str) -> None:
        self.values[name] = value
        self.origins[name] = origin


def _resolve(
    args: argparse.Namespace,
    groups: tuple[Group, ...],
    env: Mapping[str, str],
    *,
    source: str | None,
    mount: bool,
    use_file: bool = True,
) -> Settings:
    command_line = _Layer()  # flags over -o
    if mount:
        for item in parse_o(getattr(args, "options", None) or []):
            command_line.add(item.option.name, item.parsed(), item.where)
    for name, value in given_flags(args, groups).items():
        command_line.add(name, value, OPTIONS[name].flag)

    config = EMPTY_CONFIG
    named: SourceConfig | None = None
    files: list[_Layer] = []  # lowest first
    if use_file:
        strict = strict_permissions_given(command_line.values, env)
        config = load_for(command_line.values.get("config"), env, strict_permissions=strict)
        where = config.path or "<config>"
        sections: list[tuple[str, Mapping[str, Any]]] = [("mount", config.mount)] if mount else []
        if source is not None and is_source_name(source):
            named = config.source(source)
            sections.append((f"source.{named.name}", named.values))
            if mount:
                sections.append((f"source.{named.name}.mount", named.mount))
        for section, values in sections:
            layer = _Layer()
            for key, value in values.items():
                if key not in ("url", "mountpoint"):
                    layer.add(key, value, f"{where}: [{section}] {key}")
            files.append(layer)
    environment = _Layer()
    for name, value in env_values(env, names_in(groups)).items():
        environment.add(name, value, f"${OPTIONS[name].env}")

    # A secret comes from the highest layer that gives it in any spelling: command line, then its variable, then the
    # file (whose KEY_credential is the KEY_file path under $CREDENTIALS_DIRECTORY).
    for name in SECRET_KEYS:
        spellings = (name, f"{name}_file", f"{name}_credential")
        variable = OPTIONS[name].env
        above = any(key in command_line.values for key in spellings) or bool(variable and env.get(variable))
        for layer in files:
            for key in spellings:
                if key in layer.values:
                    value, origin = layer.values.pop(key), layer.origins.pop(key)
                    if not above:
                        path = secret_file_path(key, value, env) if key.endswith("_credential") else value
                        layer.add(f"{name}_file" if key.endswith("_credential") else key, path, origin)

    merged = _Layer()
    for layer in [*files, environment, command_line]:
        merged.values.update(layer.values)
        merged.origins.update(layer.origins)

    mountpoint = None
    if mount:
        mountpoint = getattr(args, "mountpoint", None) or (named.mountpoint if named is not None else None)
        if not mountpoint:
            what = f"[source.{named.name}] has no mountpoint" if named is not None else "no MOUNTPOINT given"
            raise ConfigError(f'{what}: give MOUNTPOINT on the command line or mountpoint = "/mnt/..." in the config')
    return Settings(
        values=merged.values,
        origins=merged.origins,
        source=named.url if named is not None else source,
        source_name=named.name if named is not None else None,
        mountpoint=mountpoint,
        config=config,
    )
