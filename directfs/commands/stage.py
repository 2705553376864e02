"""``directfs stage PATH... [--max-workers N]``: bring nearline (tape-backed) files online ahead of reading them.

Each PATH is one of:

* a file or folder inside a running directfs mount: every file below it is read whole *through the mount* and the
  data discarded. The daemon waits out each block's staging (503 + Retry-After, S3 InvalidObjectState) within the
  mount's ``--staging-deadline`` and its block cache keeps what fits in ``--cache-size``;
* a store URL or ``NAME[/sub/path]``: the same reads through the Source API in this process, no mount needed, within
  this command's ``--staging-deadline``.

What it does *not* do: keep everything in memory. The mount's cache holds only what fits in its ``--cache-size``
(256 MiB by default), and without a mount nothing is kept at all, unless ``--disk-cache DIR`` is given: then the
blocks are written to that disk cache, named as a mount of the same source URL names them, so a later mount sharing
DIR reads them without a GET (``cp.open_disk``). On a tape system the lasting effect is that the
store stages the files to its disk tier, where later reads find them quickly; that is the point of this command.

Output: one line per file, ``ready PATH`` or ``failed PATH: <errno message>`` (ETIMEDOUT: not online within the
staging deadline), then a summary ``N ready, M failed, B bytes``. Exit status 0 only when every file is ready.

Concurrency: ``--max-workers`` files are read at once (a tape library recalls several files in parallel from its
drives); without a mount it also bounds the blocks in flight across files, as ``directfs cp`` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import common

if TYPE_CHECKING:
    from ..engine.diskcache import DiskCache
    from ..sources.base import Entry, Source, SourceOptions
    from .progress import Progress

HELP = (
    "Bring nearline (tape) files online ahead of time: read files or folders whole, through a mount or from a "
    "store URL, and report what is ready."
)

# 4 files at once: enough to keep a few tape drives (or a recall queue) busy and to overlap the waits, few enough not
# to flood a mount's cache (each sequential reader gets read-ahead) or a store's staging queue.
DEFAULT_MAX_WORKERS: Final = 4
# Reads through a mount: 1 MiB, the kernel's largest READ to FUSE (docs/testbed.md §3), so each syscall is one request.
READ_CHUNK_BYTES: Final = 1024 * 1024
DIRECTFS_FSTYPE: Final = "fuse.directfs"  # the mount's subtype=directfs (directfs.mount)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        metavar="PATH",
        nargs="+",
        help="a file or folder inside a directfs mount, a store URL (s3://, webdav(s)://, http(s)://, "
        "ctera+https://, file://) or NAME[/sub/path] of a [source.NAME] in the config file",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        metavar="N",
        help=f"files read at once (default {DEFAULT_MAX_WORKERS}); without a mount also the blocks in flight",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar (the ready and failed lines are still printed)"
    )
    common.add_source_arguments(parser)
    parser.epilog = (
        "Through a mount, the daemon's block cache keeps only what fits in its --cache-size, and "
        "without a mount nothing is kept: on a tape system the lasting effect is that the store stages the data to "
        "its disk tier, so that later reads are fast. Per-read waiting is bounded by the staging deadline (the "
        "mount's --staging-deadline, or this command's for URLs)."
    )


@dataclass
class _Job:
    given: str  # the PATH argument as typed
    local: str | None = None  # a path inside a directfs mount
    url: str | None = None  # a store URL (NAMEs resolved)
    options: SourceOptions | None = None


def mount_fstype(path: str) -> str | None:
    """The file system type of the mount holding ``path`` (``fuse.directfs`` for ours), from /proc/self/mountinfo by
    device number; None if it cannot be told."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as lines:
            for line in lines:
                fields, _, rest = line.partition(" - ")
                parts = fields.split(" ")
                if len(parts) > 2 and parts[2] == device:
                    fstype = rest.split(" ", 1)[0]
                    return fstype
    except OSError:
        return None
    return None


def _plan(args: argparse.Namespace) -> list[_Job]:
    from ..errors import ConfigError
    from .storeio import resolve_source_arg

    jobs: list[_Job] = []
    for given in args.paths:
        if "://" not in given and os.path.exists(given):
            fstype = mount_fstype(given)
            if fstype != DIRECTFS_FSTYPE:
                raise ConfigError(
                    f"{given}: not inside a directfs mount (file system {fstype or 'unknown'}); "
                    "give a mounted path, a store URL or a source NAME"
                )
            jobs.append(_Job(given, local=os.path.abspath(given)))
            continue
        url, options = resolve_source_arg(args, given)  # each URL/NAME folds its own [source.NAME] under the flags
        jobs.append(_Job(given, url=url, options=options))
    return jobs


def run(args: argparse.Namespace) -> int:
    import trio

    from .storeio import check_max_workers

    check_max_workers(args.max_workers)
    jobs = _plan(args)
    return trio.run(_stage, args, jobs)


class _Stager:
    def __init__(self, max_workers: int) -> None:
        import trio

        self.file_slots = trio.Semaphore(max_workers)
        self.block_slots = trio.Semaphore(max_workers)
        self.ready = 0
        self.failed = 0
        self.bytes_read = 0
        self.progress: Progress | None = None
        self.disk: DiskCache | None = None  # --disk-cache: blocks read and written there as a mount's are

    def report(self, place: str, error: OSError | None) -> None:
        from .storeio import describe

        assert self.progress is not None
        if error is None:
            self.ready += 1
            line = f"ready {place}"
        else:
            self.failed += 1
            line = f"failed {describe(error, place)}"
        self.progress.line(line)
        self.progress.file_done()

    async def through_mount(self, path: str, place: str) -> None:
        import trio

        assert self.progress is not None
        progress = self.progress
        token = trio.lowlevel.current_trio_token()

        def advance(count: int) -> None:
            trio.from_thread.run_sync(progress.advance, count, trio_token=token)

        try:
            # abandon_on_cancel: Ctrl-C must not wait out a staging the daemon is still waiting for.
            count = await trio.to_thread.run_sync(_read_whole, path, advance, abandon_on_cancel=True)
        except OSError as exc:
            self.report(place, exc)
            return
        self.bytes_read += count
        self.report(place, None)

    async def from_source(self, source: Source, path: str, entry: Entry, place: str) -> None:
        import trio

        from ..errors import DirectFSError
        from .storeio import fetch_blocks

        assert self.progress is not None
        progress = self.progress
        got = 0

        async def discard(offset: int, data: memoryview) -> None:
            nonlocal got
            got += len(data)
            progress.advance(len(data))
            await trio.lowlevel.checkpoint()

        from .cp import disk_tier

        try:
            handle = await source.open(path, entry)
            try:
                await fetch_blocks(handle, self.block_slots, discard, disk=disk_tier(self.disk, source), path=path)
            finally:
                with trio.CancelScope(shield=True):
                    await handle.aclose()
        except DirectFSError as exc:
            self.report(place, exc)
            return
        self.bytes_read += got
        self.report(place, None)


def _read_whole(path: str, advance: Callable[[int], None]) -> int:
    """Read ``path`` to its end, discarding the data; the byte count. Runs in a worker thread."""
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, READ_CHUNK_BYTES):
            total += len(chunk)
            advance(len(chunk))
    finally:
        os.close(fd)
    return total


def _walk_local(root: str) -> tuple[list[tuple[str, int]], list[tuple[str, OSError]]]:
    """Files below ``root`` (or ``root`` itself) with their sizes, and the folders that could not be listed."""
    if not os.path.isdir(root):
        return [(root, os.stat(root).st_size)], []
    files: list[tuple[str, int]] = []
    errors: list[tuple[str, OSError]] = []

    def on_error(exc: OSError) -> None:
        errors.append((exc.filename or root, exc))

    for folder, _dirs, names in os.walk(root, onerror=on_error):
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                files.append((path, os.stat(path).st_size))
            except OSError as exc:
                errors.append((path, exc))
    return files, errors


async def _stage(args: argparse.Namespace, jobs: list[_Job]) -> int:
    import trio

    from ..errors import DirectFSError
    from .cp import open_disk
    from .progress import Progress
    from .storeio import describe, open_target, walk, where

    stager = _Stager(args.max_workers)
    try:
        stager.disk = await open_disk(args)
    except DirectFSError as exc:
        print(f"directfs stage: {exc}", file=sys.stderr)
        return 1
    # Plan every job first (listings), so the progress line knows the totals; then read everything.
    local_files: list[tuple[str, int]] = []
    remote: list[tuple[Source, str, Entry, str]] = []
    sources: list[Source] = []
    early: list[tuple[str, OSError]] = []
    try:
        for job in jobs:
            if job.local is not None:
                try:
                    found, errors = await trio.to_thread.run_sync(_walk_local, job.local)
                except OSError as exc:
                    early.append((job.local, exc))
                    continue
                local_files.extend(found)
                early.extend(errors)
                continue
            assert job.url is not None and job.options is not None
            try:
                target = await open_target(job.url, job.options)
            except DirectFSError as exc:
                early.append((where(job.url, ""), exc))
                continue
            sources.append(target.source)
            if target.children is None:
                remote.append((target.source, target.path, target.entry, where(job.url, "")))
                continue

            def on_error(path: str, exc: DirectFSError, url: str = job.url) -> None:
                early.append((where(url, path), exc))

            async for rel, entry in walk(target.source, target.path, target.children, on_error):
                if not entry.is_dir:
                    full = f"{target.path}/{rel}" if target.path else rel
                    remote.append((target.source, full, entry, where(job.url, rel)))
        total = sum(size for _, size in local_files) + sum(entry.size for _, _, entry, _ in remote)
        stager.progress = Progress("stage", files=len(local_files) + len(remote), total_bytes=total, quiet=args.quiet)
        for place, problem in early:
            stager.failed += 1
            stager.progress.line(f"failed {describe(problem, place)}")  # the bar is on screen already

        async def bounded_local(path: str) -> None:
            try:
                await stager.through_mount(path, path)
            finally:
                stager.file_slots.release()

        async def bounded_remote(source: Source, path: str, entry: Entry, place: str) -> None:
            try:
                await stager.from_source(source, path, entry, place)
            finally:
                stager.file_slots.release()

        async with trio.open_nursery() as nursery:
            for path, _size in local_files:
                await stager.file_slots.acquire()
                nursery.start_soon(bounded_local, path)
            for source, path, entry, place in remote:
                await stager.file_slots.acquire()
                nursery.start_soon(bounded_remote, source, path, entry, place)
        stager.progress.finish()
    finally:
        with trio.CancelScope(shield=True):
            for source in sources:
                await source.aclose()
    elapsed = stager.progress.elapsed_seconds if stager.progress is not None else 0.0
    print(
        f"{stager.ready} ready, {stager.failed} failed, {stager.bytes_read} bytes "
        f"({stager.bytes_read / 2**20:.1f} MiB) in {elapsed:.1f} s"
    )
    return 0 if stager.failed == 0 else 1
