"""``directfs cp URL DEST [-r] [--max-workers N]``: copy a file (or a folder with -r) from any store to local disk.

* A file URL is written to ``DEST`` (or ``DEST/NAME`` when DEST is a folder); a folder URL needs ``-r`` and its
  *contents* go into the folder DEST (created if missing), as ``rclone copy`` does.
* Every file is written to a new ``NAME.<random>.part`` beside its destination, fsynced, given the store's mtime
  and only then renamed over ``NAME``: a destination never holds a partial file, even after a crash. Symbolic links
  are never written through: the part file is created ``O_EXCL | O_NOFOLLOW``, a link at ``NAME`` is replaced (its
  target untouched), and with ``-r`` a sub-folder of DEST that is a link is refused (``directfs.commands.partfile``).
  A DEST that is a link to a folder is that folder, as for ``cp``. Folders get their mtimes after their contents.
* A file that fails (its ``.part`` removed) is reported on stderr with its errno and the copy goes on with the
  others; the exit status is 1 if any failed.

Blocks come through the block engine like every other reader's (``storeio.fetch_blocks``: its length checks,
single-flight and worker threads), but as a whole-file window at full concurrency from the start instead of the
mount's adaptive read-ahead, and with no cache (each block is read once); each is written with ``pwrite`` at its
offset (no reordering buffer).

Concurrency: ``--max-workers`` bounds the blocks fetched or held at once across all files (one semaphore), and the
files open at once. Local file system calls run in worker threads, never on the trio thread.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Final, NamedTuple

from . import common
from .partfile import PartFile, open_folder, set_folder_mtime

if TYPE_CHECKING:
    from ..sources.base import Entry, Source, SourceOptions
    from .progress import Progress

HELP = "Copy a file (or a folder with -r) from any store URL or NAME to local disk, without a mount."

# 8 blocks in flight: the Streamer's and the read engine's prefetch concurrency (docs/testbed.md §5: 4-8 connections
# hide object-store latency; more only add contention). Memory: 8 blocks (64 MiB with 8 MiB plain-store blocks).
DEFAULT_MAX_WORKERS: Final = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="URL",
        help="a file or folder: ctera+https://HOST/path, s3://BUCKET/key, webdav(s)://HOST/path, "
        "http(s)://HOST/path, file:///path, or NAME[/sub/path] of a [source.NAME] in the config file",
    )
    parser.add_argument(
        "dest", metavar="DEST", help="local file or folder (with -r: the folder that receives URL's contents)"
    )
    parser.add_argument("-r", "--recursive", action="store_true", help="copy a folder and everything below it")
    parser.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        metavar="N",
        help=f"blocks fetched (and held in memory) at once, over all files (default {DEFAULT_MAX_WORKERS})",
    )
    common.add_source_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import trio

    from .storeio import check_max_workers, resolve_source_arg

    check_max_workers(args.max_workers)
    url, options = resolve_source_arg(args)
    return trio.run(_copy, args, url, options)


class _Copier:
    def __init__(self, args: argparse.Namespace, url: str, source: Source, progress: Progress) -> None:
        import trio

        self.args = args
        self.url = url
        self.source = source
        self.progress = progress
        self.block_slots = trio.Semaphore(args.max_workers)
        self.file_slots = trio.Semaphore(args.max_workers)
        self.failed = 0

    def fail(self, path: str, exc: OSError) -> None:
        from .storeio import describe, where

        self.failed += 1
        self.progress.message(describe(exc, where(self.url, path)))

    async def copy_file(self, path: str, entry: Entry, dest: Dest) -> None:
        """One file to ``dest`` via a part file beside it; failures are reported (never raised) except cancellation."""
        import trio

        from ..errors import DirectFSError
        from .storeio import fetch_blocks

        part: PartFile | None = None
        try:
            handle = await self.source.open(path, entry)
            try:
                part = await trio.to_thread.run_sync(_create, dest, handle.layout.size)
                fd = part.fd

                async def write(offset: int, data: memoryview) -> None:
                    await trio.to_thread.run_sync(_pwrite_all, fd, data, offset)
                    self.progress.advance(len(data))

                await fetch_blocks(handle, self.block_slots, write)
            finally:
                with trio.CancelScope(shield=True):
                    await handle.aclose()
            await trio.to_thread.run_sync(part.commit, entry.mtime_ns)
        except BaseException as exc:
            if part is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(part.discard)
            if isinstance(exc, DirectFSError | OSError):
                self.fail(path, exc)
                return
            raise
        self.progress.file_done()


async def _copy(args: argparse.Namespace, url: str, options: SourceOptions) -> int:
    import trio

    from ..errors import DirectFSError, IsADirectory
    from .progress import Progress
    from .storeio import describe, open_target, walk, where

    try:
        target = await open_target(url, options)
    except DirectFSError as exc:
        print(f"directfs cp: {describe(exc, where(url, ''))}", file=sys.stderr)
        return 1
    try:
        if target.children is None:  # one file
            dest = args.dest
            if await trio.to_thread.run_sync(os.path.isdir, dest):  # a link to a folder is that folder, as for cp
                dest = os.path.join(dest, target.entry.name)
            folder, name = os.path.split(dest)  # DEST's folder as the user named it; the name itself is not followed
            copier = _Copier(args, url, target.source, Progress("cp", files=1, total_bytes=target.entry.size))
            await copier.copy_file(target.path, target.entry, Dest(folder or ".", (), name))
            copier.progress.finish()
            return 1 if copier.failed else 0
        if not args.recursive:
            error = IsADirectory("a folder: use -r to copy it and everything below")
            print(f"directfs cp: {describe(error, where(url, ''))}", file=sys.stderr)
            return 1
        failed_listing: list[tuple[str, DirectFSError]] = []
        listing = walk(target.source, target.path, target.children, lambda p, e: failed_listing.append((p, e)))
        items = [item async for item in listing]
        files = [(rel, entry) for rel, entry in items if not entry.is_dir]
        progress = Progress("cp", files=len(files), total_bytes=sum(entry.size for _, entry in files))
        copier = _Copier(args, url, target.source, progress)
        for path, problem in failed_listing:
            copier.fail(path, problem)
        folders = [("", target.entry)] + [(rel, entry) for rel, entry in items if entry.is_dir]
        try:
            await trio.to_thread.run_sync(_make_folders, args.dest, [rel for rel, _ in folders])
        except OSError as exc:
            copier.fail("", exc)
            return 1

        async def bounded(rel: str, entry: Entry) -> None:
            try:
                await copier.copy_file(join_path(target.path, rel), entry, _local(args.dest, rel))
            finally:
                copier.file_slots.release()

        async with trio.open_nursery() as nursery:
            for rel, entry in files:
                await copier.file_slots.acquire()  # no more tasks than open files: a tree may hold millions
                nursery.start_soon(bounded, rel, entry)
        # Folder mtimes last (writing a child changes its folder's mtime), deepest first.
        for rel, entry in sorted(folders, key=lambda item: item[0].count("/") + bool(item[0]), reverse=True):
            if entry.mtime_ns > 0:
                await trio.to_thread.run_sync(_set_mtime, args.dest, rel, entry.mtime_ns)
        progress.finish()
        return 1 if copier.failed else 0
    finally:
        with trio.CancelScope(shield=True):
            await target.source.aclose()


def join_path(parent: str, rel: str) -> str:
    return f"{parent}/{rel}" if parent else rel


class Dest(NamedTuple):
    """Where a file goes: ``root`` as the user named it (links in it followed), then ``folders`` below it (never
    through a link) and the file's ``name``."""

    root: str
    folders: tuple[str, ...]
    name: str


def _parts(rel: str) -> tuple[str, ...]:
    # rel's parts passed valid_name in storeio.walk: no "..", no "/", no NUL, so the result stays under dest.
    return tuple(rel.split("/")) if rel else ()


def _local(dest: str, rel: str) -> Dest:
    parts = _parts(rel)
    return Dest(dest, parts[:-1], parts[-1])


def _make_folders(dest: str, rels: list[str]) -> None:
    os.makedirs(dest, exist_ok=True)  # DEST itself: the user's path
    for rel in rels:
        if rel:
            os.close(open_folder(dest, _parts(rel), create=True))  # below it: made, never through a link


def _create(dest: Dest, size: int) -> PartFile:
    part = PartFile.create(dest.root, dest.folders, dest.name)
    try:
        os.ftruncate(part.fd, size)  # the final size at once: blocks land anywhere with pwrite
    except BaseException:
        part.discard()
        raise
    return part


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _set_mtime(dest: str, rel: str, mtime_ns: int) -> None:
    set_folder_mtime(dest, _parts(rel), mtime_ns)
