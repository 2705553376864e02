"""``directfs mount SOURCE MOUNTPOINT``: the namespace as a read-only local tree.

The flags and ``-o`` keys come from the option table (``directfs.options``); ``run`` folds flags, ``-o``, the
environment and the config file into one ``config.Settings`` and builds the ``MountConfig`` from it once.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ..logs import setup_logging
from ..options import add_flags, o_help
from . import common

if TYPE_CHECKING:
    from ..config import Settings
    from ..mount import MountConfig

HELP = (
    "Mount a store read-only at MOUNTPOINT: ctera+https://HOST[/folder], s3://BUCKET[/prefix], "
    "webdav(s)://HOST/path, http(s)://HOST/path, file:///path, or a [source.NAME] of the config file."
)


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
    add_flags(parser, "config", "mount")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="KEY[=VALUE],...", help=o_help())
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # daemon mode: see directfs.mount
    add_flags(parser, "credentials", "tls", "stores")


def mount_config(settings: Settings, *, ready_fd: int | None = None) -> MountConfig:
    """The daemon's config from ``settings``: every option nobody gave keeps its settings dataclass's default.
    Reads the secret files (so a wrong path fails here, before a daemon is started)."""
    from ..engine.diskcache import DiskCacheSettings
    from ..mount import MountConfig
    from ..vfs import VfsSettings
    from ..writeback import WriteSettings

    assert settings.source is not None and settings.mountpoint is not None  # mount_settings guarantees both
    credentials = common.resolve_credentials(settings)
    fields = settings.kwargs("MountConfig")
    if "metrics_address" in fields:
        fields["metrics_address"] = (fields["metrics_address"].host, fields["metrics_address"].port)
    return MountConfig(
        source_url=settings.source,
        mountpoint=os.path.abspath(settings.mountpoint),
        source_options=common.build_source_options(settings, credentials),
        vfs_settings=VfsSettings(**settings.kwargs("VfsSettings")),
        write_settings=WriteSettings(**settings.kwargs("WriteSettings")),
        disk_cache=DiskCacheSettings(**settings.kwargs("DiskCacheSettings")),
        ready_fd=ready_fd,
        **settings.kwargs("ReadSettings"),  # cache_size_bytes, read_ahead_max_bytes: the read engine's fields
        **fields,
    )


def run(args: argparse.Namespace) -> int:
    from ..config import mount_settings
    from ..mount import run_mount, spawn_daemon

    settings = mount_settings(args)  # flags > -o > DIRECTFS_* > config file; NAME -> URL + mountpoint
    setup_logging(**settings.kwargs("setup_logging"))
    config = mount_config(settings, ready_fd=args.ready_fd)
    if not settings.get("foreground"):
        # The child re-reads the same flags and environment; secrets never pass through argv we add.
        return spawn_daemon(sys.argv[1:], log_file=settings.get("log_file"))
    return run_mount(config)
