"""``directfs mount SOURCE MOUNTPOINT``: the namespace as a read-only local tree."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError
from ..logs import LEVELS, setup_logging
from ..units import parse_size
from . import common

HELP = (
    "Mount a store read-only at MOUNTPOINT: ctera+https://HOST[/folder], s3://BUCKET[/prefix], "
    "webdav(s)://HOST/path, http(s)://HOST/path, file:///path, or a [source.NAME] of the config file."
)


# Names accepted in -o, each the twin of a flag (fstab-style); "ro" is accepted because the mount always is.
O_KEYS: Final = (
    "allow_other",
    "uid",
    "gid",
    "umask",
    "cache_size",
    "read_ahead",
    "metadata_ttl",
    "endpoint_url",
    "block_size",
    "staging_deadline",
    "ro",
)
# The -o keys that are flags of common.add_store_arguments: copied into args when the flag is absent.
_O_STORE_KEYS: Final = ("endpoint_url", "block_size", "staging_deadline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="ctera+https://HOST[:PORT][/sub/folder] (CTERA Portal, Direct IO), s3://BUCKET[/prefix] (AWS or "
        "--endpoint-url), webdav://HOST[:PORT]/path or webdavs://..., http(s)://HOST/folder/ (an index page) or "
        "http(s)://HOST/file, file:///path, or the NAME of a [source.NAME] in the config file",
    )
    parser.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        nargs="?",
        help="an existing empty folder (default: the source's mountpoint)",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $DIRECTFS_CONFIG, else /etc/directfs/directfs.toml when present); "
        "precedence: file < DIRECTFS_* environment < flags",
    )
    parser.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off; `directfs stats` works without it)",
    )
    parser.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        default=None,
        help="allow a non-loopback --metrics-address (the endpoint has no authentication)",
    )
    parser.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground and log to stderr (default: detach, returning once the mount is live)",
    )
    parser.add_argument(
        "--cache-size",
        metavar="SIZE",
        help="memory for decrypted blocks, prefetch included, with K/M/G suffix (default 256M: the prefetch budget "
        "plus a working set for random readers; prefetch gets half of it)",
    )
    parser.add_argument(
        "--read-ahead",
        metavar="SIZE",
        help="largest read-ahead window per sequential reader, K/M/G (default 32M: what 8 parallel 4 MiB block "
        "fetches keep in flight; a larger window only holds memory)",
    )
    parser.add_argument(
        "--metadata-ttl",
        type=float,
        metavar="SECONDS",
        help="how long listings, attributes and 'no such file' answers are trusted (default 5: remote changes "
        "show up within seconds while repeated ls/stat calls cost one server request)",
    )
    parser.add_argument(
        "--allow-other",
        action="store_true",
        default=None,
        help="let other users see the mount (needs user_allow_other in /etc/fuse.conf unless root; default: off, "
        "as FUSE intends)",
    )
    parser.add_argument("--uid", type=int, help="owner shown for every entry (default: the mounting user)")
    parser.add_argument("--gid", type=int, help="group shown for every entry (default: the mounting user's group)")
    parser.add_argument(
        "--umask",
        type=lambda text: int(text, 8),
        metavar="OCTAL",
        help="bits removed from the r--r--r-- / r-xr-xr-x modes, e.g. 077 (default 000: a read-only tree hides "
        "nothing from users who may see the mount)",
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="KEY[=VALUE],...",
        help=f"mount options as in fstab, the twins of the flags above: {', '.join(O_KEYS)} (flags win)",
    )
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default=None,
        help="stderr log level (default info: mount, unmount and problems, no per-request noise)",
    )
    parser.add_argument(
        "--log-file",
        metavar="PATH",
        help="where a detached daemon writes its log (default: discarded; use -f to see logs on the terminal)",
    )
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # daemon mode: see directfs.mount
    common.add_credential_arguments(parser)
    common.add_tls_arguments(parser)
    common.add_store_arguments(parser)


@dataclass(frozen=True)
class _Options:
    allow_other: bool
    uid: int | None
    gid: int | None
    umask: int | None
    cache_size_bytes: int | None
    read_ahead_max_bytes: int | None
    metadata_ttl_seconds: float | None


def _parse_o(values: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            if not item:
                continue
            key, sep, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if key == "rw":
                raise ConfigError("-o rw: directfs mounts are read-only")
            if key not in O_KEYS:
                raise ConfigError(f"unknown mount option -o {key} (known: {', '.join(O_KEYS)})")
            parsed[key] = val if sep else ""
    return parsed


def _int(key: str, text: str, base: int = 10) -> int:
    try:
        return int(text, base)
    except ValueError:
        raise ConfigError(f"-o {key}: not a number: {text!r}") from None


def resolve_options(args: argparse.Namespace) -> _Options:
    """Flags first, then -o, then defaults; every value validated (ConfigError, EINVAL)."""
    o = _parse_o(args.options)
    for key in _O_STORE_KEYS:  # validated by common.build_source_options, like the flags
        if getattr(args, key, None) is None and o.get(key):
            setattr(args, key, o[key])
    cache_size = args.cache_size if args.cache_size is not None else o.get("cache_size")
    read_ahead = args.read_ahead if args.read_ahead is not None else o.get("read_ahead")
    ttl: float | None = args.metadata_ttl
    if ttl is None and "metadata_ttl" in o:
        try:
            ttl = float(o["metadata_ttl"])
        except ValueError:
            raise ConfigError(f"-o metadata_ttl: not a number: {o['metadata_ttl']!r}") from None
    if ttl is not None and not 0 <= ttl < 86400 * 365:
        raise ConfigError(f"metadata TTL must be >= 0 seconds, not {ttl}")
    uid = args.uid if args.uid is not None else (_int("uid", o["uid"]) if "uid" in o else None)
    gid = args.gid if args.gid is not None else (_int("gid", o["gid"]) if "gid" in o else None)
    umask = args.umask if args.umask is not None else (_int("umask", o["umask"], 8) if "umask" in o else None)
    if umask is not None and not 0 <= umask <= 0o777:
        raise ConfigError(f"umask must be between 000 and 777, not {umask:o}")
    cache_size_bytes = parse_size(cache_size) if cache_size is not None else None
    read_ahead_bytes = parse_size(read_ahead) if read_ahead is not None else None
    return _Options(
        allow_other=bool(args.allow_other) or "allow_other" in o,
        uid=uid,
        gid=gid,
        umask=umask,
        cache_size_bytes=cache_size_bytes,
        read_ahead_max_bytes=read_ahead_bytes,
        metadata_ttl_seconds=ttl,
    )


def run(args: argparse.Namespace) -> int:
    from ..config import apply_to_mount_args, parse_metrics_address
    from ..mount import MountConfig, run_mount, spawn_daemon
    from ..vfs import VfsSettings

    apply_to_mount_args(args)  # config file and DIRECTFS_* fill what the flags left unset; NAME -> URL + mountpoint
    setup_logging(args.log_level or "info")
    metrics_address = None
    if args.metrics_address:
        try:
            address = parse_metrics_address(args.metrics_address)
        except ValueError as exc:
            raise ConfigError(f"--metrics-address {args.metrics_address!r}: {exc}") from None
        metrics_address = (address.host, address.port)
    options = resolve_options(args)
    credentials = common.resolve_credentials(args)
    source_options = common.build_source_options(args, credentials)
    if not args.foreground:
        # The child re-reads the same flags and environment; secrets never pass through argv we add.
        return spawn_daemon(sys.argv[1:], log_file=os.path.abspath(args.log_file) if args.log_file else None)

    settings = VfsSettings()
    overrides: dict[str, float | int] = {}
    if options.metadata_ttl_seconds is not None:
        overrides["metadata_ttl_seconds"] = options.metadata_ttl_seconds
    if options.uid is not None:
        overrides["uid"] = options.uid
    if options.gid is not None:
        overrides["gid"] = options.gid
    if options.umask is not None:
        overrides["umask"] = options.umask
    if overrides:
        import dataclasses

        settings = dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]
    config = MountConfig(
        source_url=args.source,
        mountpoint=os.path.abspath(args.mountpoint),
        source_options=source_options,
        vfs_settings=settings,
        cache_size_bytes=options.cache_size_bytes,
        read_ahead_max_bytes=options.read_ahead_max_bytes,
        allow_other=options.allow_other,
        ready_fd=args.ready_fd,
        metrics_address=metrics_address,
        metrics_allow_remote=bool(args.metrics_allow_remote),
    )
    return run_mount(config)
