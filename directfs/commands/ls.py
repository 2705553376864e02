"""``directfs ls URL [-l] [-R]``: list a folder, or show a file, of any store without mounting it.

Reads through the Source API, exactly as a mount would (same URLs, credentials, TLS and store flags). Output, one
entry a line, names sorted: the name; with ``-R`` every entry below URL as a path relative to it; with ``-l`` the
columns ``TYPE SIZE MTIME FILEID NAME`` (``d`` or ``-``, bytes, UTC ``YYYY-MM-DDTHH:MM:SSZ`` or ``-`` when the store
has none, the CTERA Direct IO file id or ``-``), the name last so a script can split off four columns. Control
characters in names are printed as ``\\xNN`` escapes and a backslash as ``\\\\`` (a server must not drive your
terminal). Errors: one line on stderr, ``directfs ls: WHERE: <errno message> (<detail>)``; the exit status is 1
when anything could not be listed.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from . import common

if TYPE_CHECKING:
    from ..sources.base import Entry, SourceOptions

HELP = "List a folder (or show a file) of any store URL or NAME without a mount: s3://, webdav(s)://, http(s)://, ..."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="URL",
        help="ctera+https://HOST/path, s3://BUCKET/prefix, webdav(s)://HOST/path, http(s)://HOST/path, "
        "file:///path, or NAME[/sub/path] of a [source.NAME] in the config file",
    )
    parser.add_argument(
        "-l", dest="long", action="store_true", help="long format: type, size, mtime (UTC), CTERA file id, name"
    )
    parser.add_argument("-R", dest="recursive", action="store_true", help="everything below, as paths relative to URL")
    common.add_source_arguments(parser)


def format_entry(entry: Entry, name: str, *, long: bool) -> str:
    from .storeio import printable

    shown = printable(name)
    if not long:
        return shown
    kind = "d" if entry.is_dir else "-"
    if entry.mtime_ns > 0:
        mtime = datetime.fromtimestamp(entry.mtime_ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    else:
        mtime = "-"
    return f"{kind} {entry.size:>14} {mtime:>20} {entry.file_id or '-':>10} {shown}"


def run(args: argparse.Namespace) -> int:
    import trio

    from .storeio import resolve_source_arg

    url, options = resolve_source_arg(args)
    return trio.run(_list, args, url, options)


async def _list(args: argparse.Namespace, url: str, options: SourceOptions) -> int:
    from ..errors import DirectFSError
    from .storeio import describe, open_target, walk, where

    failures = 0
    out = sys.stdout

    def on_error(path: str, exc: DirectFSError) -> None:
        nonlocal failures
        failures += 1
        out.flush()  # keep stdout and stderr in order on a terminal
        print(f"directfs ls: {describe(exc, where(url, path))}", file=sys.stderr)

    try:
        target = await open_target(url, options)
    except DirectFSError as exc:
        on_error("", exc)
        return 1
    try:
        if target.children is None:  # a file
            print(format_entry(target.entry, target.entry.name, long=args.long), file=out)
            return 0
        if not args.recursive:
            for entry in sorted(target.children, key=lambda e: e.name):
                print(format_entry(entry, entry.name, long=args.long), file=out)
        else:
            async for rel, entry in walk(target.source, target.path, target.children, on_error):
                print(format_entry(entry, rel, long=args.long), file=out)
    finally:
        await target.source.aclose()
    return 1 if failures else 0
