"""Flags and builders shared by commands: credentials, TLS and network options, plain-store options.

The flags come from the option table (``directfs.options``); the values arrive as ``config.Settings`` (flags, ``-o``,
``DIRECTFS_*`` and the config file folded and parsed once) and become the typed objects the layers below take:
``Credentials`` and ``SourceOptions``, whose dataclass defaults stand for every option nobody gave.

Credentials come from, in order of precedence: a flag with the value, a flag naming a file that holds it, an
environment variable (``DIRECTFS_ACCESS_KEY_ID``, ``DIRECTFS_SECRET_ACCESS_KEY``, ``DIRECTFS_USERNAME``,
``DIRECTFS_PASSWORD``, ``DIRECTFS_TOKEN``), then the config file. Secret values on the command line are accepted but
discouraged: every user of the machine sees them in ``ps``. Secret files are read once, with trailing newlines
stripped.

This module is imported by every command at parse time: it must stay light (no trio, httpx, pyfuse3).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from ..config import check_secret_file
from ..errors import ConfigError
from ..options import OPTIONS, SECRET_KEYS, STORE_GROUPS, add_flags
from ..sources.base import Credentials, SourceOptions

if TYPE_CHECKING:
    from ..config import Settings


def _env(name: str) -> str:
    variable = OPTIONS[name].env
    assert variable is not None, name
    return variable


ENV_ACCESS_KEY_ID: Final = _env("access_key_id")
ENV_SECRET_ACCESS_KEY: Final = _env("secret_access_key")
ENV_USERNAME: Final = _env("username")
ENV_PASSWORD: Final = _env("password")
ENV_TOKEN: Final = _env("token")

# A secret file is a key, password or token: anything larger is the wrong file (and is not read into memory).
MAX_SECRET_FILE_BYTES: Final = 64 * 1024


def add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every credential a source may need (Direct IO key pair, WebDAV user/password or token)."""
    add_flags(parser, "credentials")


def read_secret_file(path: str, *, strict_permissions: bool = False) -> str:
    """The content of a secret file without trailing newlines; ConfigError naming the path (never the content).
    A file group or others may read draws a warning, or with ``strict_permissions`` a ConfigError."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path!r}: {exc.strerror}") from None
    check_secret_file(path, info, strict=strict_permissions)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"secret file {path!r} is larger than {MAX_SECRET_FILE_BYTES} bytes: wrong file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"secret file {path!r} is not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if not text:
        raise ConfigError(f"secret file {path!r} is empty")
    return text


def _pick(value: str | None, path: str | None, env: Mapping[str, str], name: str, *, strict: bool) -> str | None:
    if value:
        return value
    if path:
        return read_secret_file(path, strict_permissions=strict)
    return env.get(name) or None


def resolve_credentials(settings: Settings, env: Mapping[str, str] = os.environ) -> Credentials:
    """Credentials from ``settings`` and, for secret values nobody else gave, the environment (flag > file > env)."""
    strict = bool(settings.get("strict_permissions", False))
    fields = settings.kwargs("Credentials")
    for name in SECRET_KEYS:
        fields[name] = _pick(settings.get(name), settings.get(f"{name}_file"), env, _env(name), strict=strict)
    token_file = settings.get("token_file") if not settings.get("token") else None
    if token_file:  # re-read by the store when it changes; its permissions are judged once, here
        try:
            info = os.stat(token_file)
        except OSError:
            pass  # the store reports a missing token file where it reads it
        else:
            check_secret_file(token_file, info, strict=strict)
    fields["token_file"] = token_file
    return Credentials(**fields)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS and network flags (verification, CA file, client certificate, timeouts)."""
    add_flags(parser, "tls")


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of plain stores (s3://, webdav(s)://, http(s)://, file://) and of nearline (tape) data."""
    add_flags(parser, "stores")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and every credential, TLS and store flag: what a command reading a store without a mount needs
    (``ls``, ``cp``, ``stage``)."""
    add_flags(parser, *STORE_GROUPS)


def build_source_options(settings: Settings, credentials: Credentials) -> SourceOptions:
    """Store-independent options from ``settings`` (options nobody gave keep ``SourceOptions``'s defaults)."""
    for name in ("ca_file", "storage_ca_file"):
        ca_file = settings.get(name)
        if ca_file and not os.path.isfile(ca_file):
            raise ConfigError(f"{settings.origin(name)} {ca_file!r} is not a file")
    return SourceOptions(credentials=credentials, **settings.kwargs("SourceOptions"))
