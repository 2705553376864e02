"""``directfs get PORTAL FILE_ID DEST``: download one file (or a byte range of it) with the Streamer API.

The file is written to a new ``DEST.<random>.part`` and renamed to ``DEST`` only when complete, so ``DEST`` never
holds a partial file, and no symbolic link is written through (a link at ``DEST`` is replaced, its target untouched:
``directfs.commands.partfile``); ``-`` writes to stdout. A stream that stops on a block error resumes from
``StreamError.offset`` (a new stream with fresh presigned URLs) up to ``--resumes`` times. A progress line goes to
stderr when it is a terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, BinaryIO, Final

from ..errors import ConfigError
from ..values import parse_decimal
from . import common
from .partfile import PartFile

if TYPE_CHECKING:
    from ..api import DirectIO
    from ..sources.base import SourceOptions
    from .progress import Progress

HELP = "Download a file by its Direct IO file id (ctera+https://HOST FILE_ID DEST, '-' for stdout)."

# Block errors that survive the per-block retries (timeouts, a storage node restarting) often clear within
# seconds; 3 fresh streams ride out a short outage without looping forever on a file that cannot be read.
DEFAULT_RESUMES: Final = 3
# The Streamer's own default (8): enough to hide object-store latency, few enough to bound memory (8 blocks).
DEFAULT_MAX_WORKERS: Final = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("portal", metavar="PORTAL", help="ctera+https://HOST[:PORT] (ctera+http:// only for loopback)")
    parser.add_argument("file_id", metavar="FILE_ID", help="the Direct IO file id (a decimal number)")
    parser.add_argument("dest", metavar="DEST", help="local file to write, or - for stdout")
    parser.add_argument(
        "--range",
        dest="byte_range",
        metavar="START-END",
        help="only bytes START to END, END inclusive (START- runs to the end of the file)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        metavar="N",
        help=f"blocks fetched (and buffered) at once (default {DEFAULT_MAX_WORKERS})",
    )
    parser.add_argument(
        "--resumes",
        type=int,
        default=DEFAULT_RESUMES,
        metavar="N",
        help=f"times to resume a stream that stopped on a block error (default {DEFAULT_RESUMES})",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar (notices and errors are still printed)"
    )
    common.add_credential_arguments(parser)
    common.add_tls_arguments(parser)


def parse_portal(text: str) -> str:
    """``ctera+https://host[:port]`` -> ``https://host[:port]``; plain http only for loopback hosts."""
    from ..http import is_loopback_host  # light, but keep command import time minimal

    scheme, sep, rest = text.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    hostname = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if not sep or scheme.lower() not in ("ctera+https", "ctera+http") or not hostname:
        raise ConfigError(f"PORTAL must be ctera+https://HOST[:PORT], not {text.split('?', 1)[0]!r}")
    if scheme.lower() == "ctera+http" and not is_loopback_host(hostname):
        raise ConfigError("ctera+http:// sends the access key in clear text: only loopback hosts may use it")
    return f"{scheme.lower().removeprefix('ctera+')}://{host}"


def parse_range(text: str | None) -> tuple[int, int | None]:
    """``"START-END"`` (END inclusive) or ``"START-"`` -> (start, end or None)."""
    if text is None:
        return 0, None
    start_text, sep, end_text = text.strip().partition("-")
    start, end = parse_decimal(start_text), parse_decimal(end_text)
    if not sep or start is None or (end is None and end_text != ""):
        raise ConfigError(f"--range must be START-END or START- (bytes, END inclusive), not {text!r}")
    if end is not None and end < start:
        raise ConfigError(f"--range end {end} is before its start {start}")
    return start, end


def run(args: argparse.Namespace) -> int:
    import trio

    portal = parse_portal(args.portal)
    start, end = parse_range(args.byte_range)
    if args.max_workers < 1 or args.resumes < 0:
        raise ConfigError("--max-workers must be >= 1 and --resumes >= 0")
    from ..config import flag_settings

    settings = flag_settings(args)  # no config file: flags and DIRECTFS_* only
    credentials = common.resolve_credentials(settings)
    if not credentials.access_key_id or not credentials.secret_access_key:
        raise ConfigError(
            "directfs get needs --access-key-id and --secret-access-key-file (or $DIRECTFS_ACCESS_KEY_ID and "
            "$DIRECTFS_SECRET_ACCESS_KEY)"
        )
    options = common.build_source_options(settings, credentials)
    return trio.run(_download, portal, args, options, start, end)


async def _download(portal: str, args: argparse.Namespace, options: SourceOptions, start: int, end: int | None) -> int:
    import trio

    from ..api import DirectIO, DirectIOSettings
    from .progress import Progress

    credentials = options.credentials
    assert credentials.access_key_id and credentials.secret_access_key  # checked by run()
    settings = DirectIOSettings.from_options(options)
    to_stdout = args.dest == "-"
    progress = Progress("get", total_bytes=None, files=1, quiet=args.quiet)  # the size comes with the first stream
    async with DirectIO(portal, credentials.access_key_id, credentials.secret_access_key, settings=settings) as dio:
        if to_stdout:
            await _stream(dio, args, start, end, sys.stdout.buffer, progress)
            sys.stdout.buffer.flush()
            return 0
        part = await trio.to_thread.run_sync(PartFile.beside, args.dest)
        try:
            with os.fdopen(part.fd, "wb", closefd=False) as sink:  # the writes run in a worker thread
                await _stream(dio, args, start, end, sink, progress)
            await trio.to_thread.run_sync(part.commit)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(part.discard)
            raise
    return 0


async def _stream(
    dio: DirectIO, args: argparse.Namespace, start: int, end: int | None, sink: BinaryIO, progress: Progress
) -> None:
    import trio

    from ..api import ByteRange
    from ..errors import StreamError

    position, resumes = start, 0
    with progress:  # the final line on every way out, so an error printed after it starts a line of its own
        while True:
            try:
                async with dio.streamer(args.file_id, ByteRange(position, end), max_workers=args.max_workers) as stream:
                    if progress.total_bytes is None:
                        progress.total_bytes = max(0, stream.stop - stream.start)
                    async for fragment in stream:
                        # One thread hop per fragment (a whole block): the trio thread keeps fetching meanwhile.
                        await trio.to_thread.run_sync(sink.write, fragment)
                        position += len(fragment)
                        progress.advance(len(fragment))
                progress.file_done()
                return
            except StreamError as exc:
                if resumes >= args.resumes:
                    raise
                resumes += 1
                position = exc.offset
                progress.message(f"stream stopped ({exc.__cause__ or exc}); resuming at byte {position} ({resumes})")
