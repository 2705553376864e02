"""Flags and parsing shared by commands: credentials, TLS and network options, sizes and durations.

Credentials come from, in order of precedence: a flag with the value, a flag naming a file that holds it, an
environment variable (``DIRECTFS_ACCESS_KEY_ID``, ``DIRECTFS_SECRET_ACCESS_KEY``, ``DIRECTFS_USERNAME``,
``DIRECTFS_PASSWORD``, ``DIRECTFS_TOKEN``). Secret values on the command line are accepted but discouraged: every
user of the machine sees them in ``ps``. Secret files are read once, with trailing newlines stripped.

This module is imported by every command at parse time: it must stay light (no trio, httpx, pyfuse3).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Final

from ..errors import ConfigError
from ..sources.base import Credentials, SourceOptions
from ..units import parse_duration_seconds
from ..values import parse_block_size, parse_endpoint_url

ENV_ACCESS_KEY_ID: Final = "DIRECTFS_ACCESS_KEY_ID"
ENV_SECRET_ACCESS_KEY: Final = "DIRECTFS_SECRET_ACCESS_KEY"  # noqa: S105 - a variable name, not a secret
ENV_USERNAME: Final = "DIRECTFS_USERNAME"
ENV_PASSWORD: Final = "DIRECTFS_PASSWORD"  # noqa: S105
ENV_TOKEN: Final = "DIRECTFS_TOKEN"  # noqa: S105

# A secret file is a key, password or token: anything larger is the wrong file (and is not read into memory).
MAX_SECRET_FILE_BYTES: Final = 64 * 1024

_VISIBLE = "discouraged: visible to every user in ps; prefer %s or $%s"


def add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every credential a source may need (Direct IO key pair, WebDAV user/password or token)."""
    group = parser.add_argument_group("credentials (flag > file > environment)")
    group.add_argument("--access-key-id", metavar="ID", help=f"Direct IO access key id (or ${ENV_ACCESS_KEY_ID})")
    group.add_argument(
        "--secret-access-key-file",
        metavar="PATH",
        help=f"file holding the Direct IO secret access key (or ${ENV_SECRET_ACCESS_KEY})",
    )
    group.add_argument(
        "--secret-access-key",
        metavar="KEY",
        help=_VISIBLE % ("--secret-access-key-file", ENV_SECRET_ACCESS_KEY),
    )
    group.add_argument("--username", metavar="NAME", help=f"Portal / WebDAV user name (or ${ENV_USERNAME})")
    group.add_argument("--password-file", metavar="PATH", help=f"file holding the password (or ${ENV_PASSWORD})")
    group.add_argument("--password", metavar="PASSWORD", help=_VISIBLE % ("--password-file", ENV_PASSWORD))
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"file holding a Bearer token, re-read when it changes (or ${ENV_TOKEN})",
    )
    group.add_argument("--token", metavar="TOKEN", help=_VISIBLE % ("--token-file", ENV_TOKEN))


def read_secret_file(path: str) -> str:
    """The content of a secret file without trailing newlines; ConfigError naming the path (never the content)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path!r}: {exc.strerror}") from None
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


def _pick(value: str | None, path: str | None, env: Mapping[str, str], name: str) -> str | None:
    if value:
        return value
    if path:
        return read_secret_file(path)
    return env.get(name) or None


def resolve_credentials(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Credentials:
    """Credentials from flags, files and the environment (flag > file > environment)."""
    token_file = getattr(args, "token_file", None)
    return Credentials(
        access_key_id=_pick(getattr(args, "access_key_id", None), None, env, ENV_ACCESS_KEY_ID),
        secret_access_key=_pick(
            getattr(args, "secret_access_key", None),
            getattr(args, "secret_access_key_file", None),
            env,
            ENV_SECRET_ACCESS_KEY,
        ),
        username=_pick(getattr(args, "username", None), None, env, ENV_USERNAME),
        password=_pick(getattr(args, "password", None), getattr(args, "password_file", None), env, ENV_PASSWORD),
        token=_pick(getattr(args, "token", None), token_file, env, ENV_TOKEN),
        token_file=token_file if not getattr(args, "token", None) else None,
        client_cert=getattr(args, "client_cert", None),
        client_key=getattr(args, "client_key", None),
    )


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS and network flags (verification, CA file, client certificate, timeouts)."""
    group = parser.add_argument_group("TLS and network")
    group.add_argument(
        "--no-verify-tls",
        dest="verify_tls",
        action="store_false",
        help="accept any server certificate (Portal and storage). Default: verify, as anything else lets a "
        "network attacker read your data",
    )
    group.add_argument(
        "--no-verify-storage-tls",
        dest="verify_storage_tls",
        action="store_false",
        help="accept any certificate from object storage only (presigned block URLs); the Portal is still verified",
    )
    group.add_argument("--ca-file", metavar="PEM", help="extra trusted CA certificates (PEM), e.g. a private CA")
    group.add_argument("--client-cert", metavar="PEM", help="client certificate for mutual TLS")
    group.add_argument("--client-key", metavar="PEM", help="key of --client-cert (if not in the same file)")
    group.add_argument(
        "--connect-timeout",
        metavar="DURATION",
        help="TCP+TLS connect deadline, e.g. 5s (default 5s: LAN connects take ms, 5 s tolerates a congested WAN)",
    )
    group.add_argument(
        "--read-timeout",
        metavar="DURATION",
        help="deadline for each socket read, e.g. 10s (default 10s: per read, so a slow but moving body never "
        "times out)",
    )


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of plain stores (s3://, webdav(s)://, http(s)://, file://) and of nearline (tape) data."""
    group = parser.add_argument_group("stores")
    group.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="s3:// only: an S3-compatible server, http(s)://HOST[:PORT] (default: $AWS_ENDPOINT_URL_S3, "
        "$AWS_ENDPOINT_URL, else AWS; plain http:// only on loopback)",
    )
    group.add_argument(
        "--block-size",
        metavar="SIZE",
        help="plain stores: bytes per ranged GET and per cached block, K/M suffix, 4K to 256M (default 8M: "
        "measured against SeaweedFS, it amortises the per-request cost while a random read waits ~20 ms; "
        "ctera sources use the Portal's own blocks)",
    )
    group.add_argument(
        "--staging-deadline",
        metavar="DURATION",
        help="nearline stores: how long one read waits for data to come online from tape (503 + Retry-After, "
        "S3 InvalidObjectState) before it fails with ETIMEDOUT, e.g. 30m (default 5m: a disk-cache recall; "
        "stage bigger recalls ahead with `directfs stage`)",
    )


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and every credential, TLS and store flag: what a command reading a store without a mount needs
    (``ls``, ``cp``, ``stage``)."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file for a source NAME (default: $DIRECTFS_CONFIG, else /etc/directfs/directfs.toml when "
        "present); precedence: file < DIRECTFS_* environment < flags",
    )
    add_credential_arguments(parser)
    add_tls_arguments(parser)
    add_store_arguments(parser)


def build_source_options(args: argparse.Namespace, credentials: Credentials) -> SourceOptions:
    """Store-independent options from the TLS/network and store flags (absent flags keep ``SourceOptions``
    defaults)."""
    defaults = SourceOptions()
    verify_tls = bool(getattr(args, "verify_tls", True))
    storage_verify = None if getattr(args, "verify_storage_tls", True) else False
    ca_file = getattr(args, "ca_file", None)
    if ca_file and not os.path.isfile(ca_file):
        raise ConfigError(f"--ca-file {ca_file!r} is not a file")
    connect = getattr(args, "connect_timeout", None)
    read = getattr(args, "read_timeout", None)
    endpoint = getattr(args, "endpoint_url", None)
    block_size = getattr(args, "block_size", None)
    staging = getattr(args, "staging_deadline", None)
    return SourceOptions(
        credentials=credentials,
        verify_tls=verify_tls,
        ca_file=ca_file,
        storage_verify_tls=storage_verify,
        connect_timeout_seconds=_positive(connect, "--connect-timeout", defaults.connect_timeout_seconds),
        read_timeout_seconds=_positive(read, "--read-timeout", defaults.read_timeout_seconds),
        endpoint_url=parse_endpoint_url(endpoint) if endpoint else None,
        block_size_bytes=parse_block_size(block_size) if block_size is not None else defaults.block_size_bytes,
        staging_deadline_seconds=(
            parse_duration_seconds(staging) if staging is not None else defaults.staging_deadline_seconds
        ),
    )


def _positive(text: str | None, flag: str, default: float) -> float:
    if text is None:
        return default
    seconds = parse_duration_seconds(text)
    if seconds <= 0:
        raise ConfigError(f"{flag} must be more than 0, not {text!r}")
    return seconds
