"""``directfs cp SOURCE DEST [-r] [--force] [--max-workers N]``: copy a file (or a folder with -r) between local disk
and any store, without a mount. DEST decides the direction: a store URL (``scheme://``) is written through the store's
``Writable`` (an upload from a local SOURCE, or a copy from a store URL SOURCE); anything else is a local path that
receives a download, as before.

Downloads (``cp URL DEST``, ``URL`` also ``NAME[/sub/path]`` of the config file):

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

Uploads and store-to-store copies (``cp LOCAL_PATH URL``, ``cp -r LOCAL_DIR URL``, ``cp [-r] URL URL``):

* SOURCE without ``scheme://`` is a local path (a config NAME names only a download's source). A file goes to the
  file URL names, or into it with its own name when URL names a folder or ends with ``/`` (made if missing); ``-r``
  puts a folder's *contents* into the folder URL (made if missing), as downloads do. A store without ``Writable``
  (http(s)://) is refused with EROFS before any request.
* A file that exists at the target is replaced only with ``--force``; without it, ``skipped PATH: TARGET exists (use
  --force to replace it)`` and the copy goes on. The check is made before the upload (the store is not locked: a
  file made meanwhile by someone else is replaced). A file where a folder is (or the other way round) fails.
* Each file is one ``Upload``: a local file is its own spool (its descriptor goes to ``commit``, which sends it all);
  from a store URL, the file is first read through the block engine (as a download) into an unnamed temp file in
  ``$TMPDIR`` (``tempfile.TemporaryFile``: gone on any exit), then committed. The file's mtime goes with it (kept
  where the store keeps times); with ``-r``, folder mtimes are set after their contents, where the store keeps them.
  A local file that changed while it was sent fails (its new version may be mixed on the store): copy it again.
* The local tree is followed as ``cp -rL`` does: a link to a file is that file, a link to a folder is that folder,
  except a link to a folder that holds it (a loop), which is skipped. Sockets, fifos and devices are skipped; a
  dangling link or a name no store can hold (control characters, bidi overrides, not UTF-8) fails.
* The progress bar counts a file's bytes when its upload is complete (``commit`` sends the whole file and reports
  nothing before it ends). Each failure prints ``failed PATH: reason`` on stderr (PATH: the local path or source
  URL), each skip ``skipped PATH: ...``; a last line counts them when there were any. Exit status 1 if any file
  failed, 0 otherwise (skips included: the store already holds a file of that name, as asked without ``--force``).

Disk cache: with ``--disk-cache DIR`` a download reads and fills that cache (``directfs.engine.diskcache``), naming
blocks as a mount of the same source URL does, so a copy from a warm cache sends no block GETs and a mount sharing
DIR finds what a copy fetched (``disk_tier``; ``stage`` uses the same).

Concurrency: ``--max-workers`` bounds the blocks fetched or held at once across all files (one semaphore), and the
files open (or sent) at once. Local file system calls run in worker threads, never on the trio thread.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Final, NamedTuple

from . import common
from .partfile import PartFile, open_folder, pwrite_all, set_folder_mtime

if TYPE_CHECKING:
    from ..engine.diskcache import DiskCache, DiskTier
    from ..sources.base import Entry, Source, SourceOptions
    from .progress import Progress
    from .storeio import Target, WriteTarget

HELP = "Copy a file (or a folder with -r) between local disk and any store URL (or NAME), without a mount."

# 8 blocks in flight: the Streamer's and the read engine's prefetch concurrency (docs/testbed.md §5: 4-8 connections
# hide object-store latency; more only add contention). Memory: 8 blocks (64 MiB with 8 MiB plain-store blocks).
DEFAULT_MAX_WORKERS: Final = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="a file or folder: ctera+https://HOST/path, s3://BUCKET/key, webdav(s)://HOST/path, "
        "http(s)://HOST/path, file:///path, or NAME[/sub/path] of a [source.NAME] in the config file; "
        "when DEST is a URL, a local path too (an upload)",
    )
    parser.add_argument(
        "dest",
        metavar="DEST",
        help="local file or folder (with -r: the folder that receives SOURCE's contents), or a store URL to upload "
        "to (s3://, webdav(s)://, ctera+https://, file://)",
    )
    parser.add_argument("-r", "--recursive", action="store_true", help="copy a folder and everything below it")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar (notices and errors are still printed)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace files that exist at a store URL DEST (default: report them as skipped; downloads replace "
        "local files, as cp does)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        metavar="N",
        help=f"blocks fetched (and held in memory) at once, over all files, and files sent at once "
        f"(default {DEFAULT_MAX_WORKERS})",
    )
    common.add_source_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import trio

    from .storeio import check_max_workers, resolve_source_arg

    check_max_workers(args.max_workers)
    if is_store_url(args.dest):
        return trio.run(_put, args)
    url, options = resolve_source_arg(args)
    return trio.run(_copy, args, url, options)


def is_store_url(text: str) -> bool:
    """Whether a DEST names a store (an upload) rather than a local path (a download)."""
    return "://" in text


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
        self.disk: DiskTier | None = None  # --disk-cache: set by _copy once the cache is open

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
                    await trio.to_thread.run_sync(pwrite_all, fd, data, offset)
                    self.progress.advance(len(data))

                await fetch_blocks(handle, self.block_slots, write, disk=self.disk, path=path)
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
        cache = await open_disk(args)
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
            progress = Progress("cp", files=1, total_bytes=target.entry.size, quiet=args.quiet)
            copier = _Copier(args, url, target.source, progress)
            copier.disk = disk_tier(cache, target.source)
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
        progress = Progress("cp", files=len(files), total_bytes=sum(entry.size for _, entry in files), quiet=args.quiet)
        copier = _Copier(args, url, target.source, progress)
        copier.disk = disk_tier(cache, target.source)
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


async def open_disk(args: argparse.Namespace) -> DiskCache | None:
    """The ``--disk-cache`` of a command (flags over ``DIRECTFS_*``; a config file's ``[mount]`` keys are a mount's),
    opened, or None when not asked for. Raises ``ConfigError`` for an unusable folder or key file."""
    from ..config import Settings, env_values
    from ..engine.diskcache import DiskCacheSettings, open_disk_cache
    from ..options import given_flags

    names = {"disk_cache", "disk_cache_size", "disk_cache_min_free", "disk_cache_key_file"}
    values = {**env_values(os.environ, names), **given_flags(args, ("stores",))}
    settings = Settings(values={k: v for k, v in values.items() if k in names}, origins={})
    disk = DiskCacheSettings(**settings.kwargs("DiskCacheSettings"))
    return await open_disk_cache(disk) if disk.directory is not None else None


def disk_tier(cache: DiskCache | None, source: Source) -> DiskTier | None:
    """``cache`` for the blocks of ``source``, keyed by its display URL (no credentials) as a mount's are."""
    from ..engine.diskcache import DiskTier

    return DiskTier(cache, source.display_url) if cache is not None else None


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


def _set_mtime(dest: str, rel: str, mtime_ns: int) -> None:
    set_folder_mtime(dest, _parts(rel), mtime_ns)


# --- uploads and store-to-store copies (DEST is a store URL) -------------------------------------------------------


class _File(NamedTuple):
    """One file to send: ``rel`` below the copied folder (``""`` for a single file), how it is ``shown`` in
    messages, and where its bytes are: the ``local`` path, or ``entry`` at ``path`` of the source store."""

    rel: str
    shown: str
    size: int
    local: str | None = None
    path: str = ""
    entry: Entry | None = None


class _Folder(NamedTuple):
    rel: str
    shown: str
    mtime_ns: int


class _Tree(NamedTuple):
    """What ``-r`` copies: folders parents first (the copied folder itself, ``""``, first), files, and what the
    walk already reports: ``(kind, shown, reason)`` with kind ``failed`` or ``skipped``."""

    folders: list[_Folder]
    files: list[_File]
    problems: list[tuple[str, str, str]]


def _scan_local(top: str) -> _Tree:
    """The local folder ``top`` as ``cp -rL`` sees it (module docstring); blocking: run in a worker thread."""
    import stat

    from ..errors import DirectFSError, InvalidArgumentError
    from ..sources.base import join, valid_name
    from .storeio import MAX_DEPTH, printable, reason

    top_info = os.stat(top)
    tree = _Tree([_Folder("", printable(top), top_info.st_mtime_ns)], [], [])

    def visit(folder: str, rel: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            tree.problems.append(("failed", printable(folder), reason(exc)))
            return
        for dirent in entries:
            child, shown = join(rel, dirent.name), printable(dirent.path)
            if not valid_name(dirent.name):  # also names that are not UTF-8 (lone surrogates)
                error = InvalidArgumentError(
                    "a name no store can hold: control characters, bidi overrides or not UTF-8"
                )
                tree.problems.append(("failed", shown, reason(error)))
                continue
            try:
                info = os.stat(dirent.path)  # links followed, as cp -rL
            except OSError as exc:
                tree.problems.append(("failed", shown, reason(exc)))  # a dangling link: ENOENT
                continue
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    tree.problems.append(("skipped", shown, "a link to a folder that holds it (a loop); not followed"))
                elif len(ancestors) > MAX_DEPTH:
                    too_deep = DirectFSError(f"more than {MAX_DEPTH} folder levels; not descending")
                    tree.problems.append(("failed", shown, reason(too_deep)))
                else:
                    tree.folders.append(_Folder(child, shown, info.st_mtime_ns))
                    visit(dirent.path, child, ancestors | {key})
            elif stat.S_ISREG(info.st_mode):
                tree.files.append(_File(child, shown, info.st_size, local=dirent.path))
            else:
                tree.problems.append(("skipped", shown, "not a regular file or folder"))

    visit(top, "", frozenset({(top_info.st_dev, top_info.st_ino)}))
    return tree


async def _scan_store(url: str, target: Target) -> _Tree:
    """The folder ``target`` of the source store, walked as downloads walk it."""
    from .storeio import reason, walk, where

    assert target.children is not None
    tree = _Tree([_Folder("", where(url, ""), target.entry.mtime_ns)], [], [])
    listing = walk(
        target.source, "", target.children, lambda p, e: tree.problems.append(("failed", where(url, p), reason(e)))
    )
    async for rel, entry in listing:
        if entry.is_dir:
            tree.folders.append(_Folder(rel, where(url, rel), entry.mtime_ns))
        else:
            tree.files.append(_File(rel, where(url, rel), entry.size, path=rel, entry=entry))
    return tree


def _open_local(path: str) -> tuple[int, os.stat_result]:
    """A local file to send, opened for reading, and its stat; never a fifo, socket or device (not even opened)."""
    import stat

    from ..errors import InvalidArgumentError

    not_regular = InvalidArgumentError("not a regular file: only files and folders are copied")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise not_regular
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # O_NONBLOCK: a fifo swapped in never blocks
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise not_regular
    except BaseException:
        os.close(fd)
        raise
    return fd, info


class _Sender:
    """Sends files into a ``WriteTarget``'s store, ``--max-workers`` at once, and reports each failure and skip."""

    def __init__(
        self, args: argparse.Namespace, target: WriteTarget, progress: Progress, source: Source | None
    ) -> None:
        import trio

        self.force: bool = args.force
        self.writer = target.writer
        self.progress = progress
        self.source = source  # the store files are read from (cp URL URL); None for uploads
        self.block_slots = trio.Semaphore(args.max_workers)
        self.file_slots = trio.Semaphore(args.max_workers)
        self.sent = self.failed = self.skipped = 0

    def report(self, kind: str, shown: str, text: str) -> None:
        if kind == "failed":
            self.failed += 1
        else:
            self.skipped += 1
        self.progress.line(f"{kind} {shown}: {text}", file=sys.stderr)

    def fail(self, shown: str, exc: OSError) -> None:
        from .storeio import reason

        self.report("failed", shown, reason(exc))

    def exists(self, item: _File, existing: Entry, store_path: str, place: str) -> bool:
        """Report a file whose target is taken; True if it is to be sent anyway (``--force``, and a file there)."""
        from ..errors import IsADirectory

        if existing.is_dir:
            self.fail(item.shown, IsADirectory(f"a folder is at {place}"))
            return False
        if not self.force:
            self.report("skipped", item.shown, f"{place} exists (use --force to replace it)")
            return False
        return True

    def summary(self) -> None:
        if self.failed or self.skipped:
            self.progress.message(f"{self.sent} copied, {self.skipped} skipped, {self.failed} failed")

    async def send(self, item: _File, store_path: str) -> None:
        """One file to ``store_path``; failures are reported (never raised) except cancellation."""
        try:
            if item.local is not None:
                size = await self._send_local(item.local, store_path)
            else:
                size = await self._send_stored(item, store_path)
        except OSError as exc:  # DirectFSError included
            self.fail(item.shown, exc)
            return
        self.sent += 1
        self.progress.advance(size)
        self.progress.file_done()

    async def _commit(self, store_path: str, fd: int, size: int, mtime_ns: int) -> None:
        import trio

        upload = self.writer.begin_upload(store_path)
        try:
            await upload.commit(fd, size, mtime_ns=mtime_ns if mtime_ns > 0 else None)
        except BaseException:
            with trio.CancelScope(shield=True):
                await upload.abort()  # idempotent, never raises: whatever a failed or cancelled commit left
            raise

    async def _send_local(self, path: str, store_path: str) -> int:
        import trio

        from ..errors import StaleFileError

        fd, before = await trio.to_thread.run_sync(_open_local, path)
        try:
            await self._commit(store_path, fd, before.st_size, before.st_mtime_ns)
            after = await trio.to_thread.run_sync(os.fstat, fd)
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise StaleFileError("it changed while it was sent: the store may hold a mix of versions; copy it again")
        return before.st_size

    async def _send_stored(self, item: _File, store_path: str) -> int:
        import tempfile

        import trio

        from .storeio import fetch_blocks

        assert self.source is not None and item.entry is not None
        handle = await self.source.open(item.path, item.entry)
        size = handle.layout.size
        try:
            # Unnamed (O_TMPFILE where it can), so no spool outlives the command, not even a killed one.
            spool = await trio.to_thread.run_sync(tempfile.TemporaryFile)
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle.aclose()
            raise
        try:
            fd = spool.fileno()
            try:
                await trio.to_thread.run_sync(os.ftruncate, fd, size)

                async def write(offset: int, data: memoryview) -> None:
                    await trio.to_thread.run_sync(pwrite_all, fd, data, offset)

                await fetch_blocks(handle, self.block_slots, write)
            finally:
                with trio.CancelScope(shield=True):
                    await handle.aclose()
            await self._commit(store_path, fd, size, item.entry.mtime_ns)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(spool.close)
        return size


async def _put(args: argparse.Namespace) -> int:
    """``cp SOURCE URL``: what SOURCE names (a local path, or a store URL) into the store at URL."""
    import trio

    from ..errors import DirectFSError, EntryNotFoundError, IsADirectory
    from .storeio import describe, open_target, open_write_target, printable, resolve_source_arg, where

    dest_url, dest_options = resolve_source_arg(args, args.dest)
    source: Target | None = None
    if is_store_url(args.source):
        source_url, source_options = resolve_source_arg(args)
        shown_source = where(source_url, "")
        try:
            source = await open_target(source_url, source_options)
        except DirectFSError as exc:
            print(f"directfs cp: {describe(exc, shown_source)}", file=sys.stderr)
            return 1
        is_folder = source.children is not None
    else:
        shown_source = printable(args.source)
        kind = await trio.to_thread.run_sync(_local_kind, args.source)
        if kind is None:
            print(f"directfs cp: {describe(EntryNotFoundError(), shown_source)}", file=sys.stderr)
            return 1
        is_folder = kind == "dir"
    try:
        if is_folder and not args.recursive:
            error = IsADirectory("a folder: use -r to copy it and everything below")
            print(f"directfs cp: {describe(error, shown_source)}", file=sys.stderr)
            return 1
        try:
            target = await open_write_target(dest_url, dest_options)
        except DirectFSError as exc:
            print(f"directfs cp: {describe(exc, where(dest_url, ''))}", file=sys.stderr)
            return 1
        try:
            if is_folder:
                return await _put_tree(args, source, target, dest_url)
            return await _put_file(args, source, target, dest_url)
        except DirectFSError as exc:  # the target itself (its folder cannot be made, a file where a folder is)
            print(f"directfs cp: {describe(exc, where(dest_url, ''))}", file=sys.stderr)
            return 1
        finally:
            with trio.CancelScope(shield=True):
                await target.store.aclose()
    finally:
        if source is not None:
            with trio.CancelScope(shield=True):
                await source.source.aclose()


def _local_kind(path: str) -> str | None:
    return None if not os.path.exists(path) else "dir" if os.path.isdir(path) else "file"


async def _make_folder(target: WriteTarget, path: str) -> bool:
    """Make folder ``path`` of the target's store: True if made, False if it was there; NotADirectory for a file."""
    from ..errors import EntryExistsError, EntryNotFoundError, NotADirectory, WriteError

    try:
        await target.writer.make_dir(path)
        return True
    except EntryExistsError:
        try:
            entry = await target.store.stat(path)
        except EntryNotFoundError:  # WebDAV's 405 is "exists", and also a server's "no MKCOL here"
            raise WriteError(
                f"the store refused to make folder {path}: it says it exists, yet it is not there"
            ) from None
        if not entry.is_dir:
            raise NotADirectory(f"a file is at {path}") from None
        return False


async def _taken(target: WriteTarget, path: str) -> dict[str, bool]:
    """The names in folder ``path`` of the target's store: name -> is a folder."""
    return {entry.name: entry.is_dir async for entry in target.store.list_dir(path)}


async def _put_file(args: argparse.Namespace, source: Target | None, target: WriteTarget, url: str) -> int:
    from ..errors import EntryNotFoundError, InvalidArgumentError
    from ..sources.base import join, valid_name
    from .progress import Progress
    from .storeio import printable, where

    if source is None:
        size = (await _stat_local(args.source)).st_size
        name = _local_name(args.source)
        item = _File("", printable(args.source), size, local=args.source)
    else:
        name = source.entry.name
        item = _File("", where(args.source, ""), source.entry.size, path=source.path, entry=source.entry)
    progress = Progress("cp", files=1, total_bytes=item.size, quiet=args.quiet)
    sender = _Sender(args, target, progress, source.source if source is not None else None)
    with progress:
        into_folder = target.folder or (target.entry is not None and target.entry.is_dir)
        if not into_folder:
            store_path, existing = target.path, target.entry
        elif not valid_name(name):
            sender.fail(item.shown, InvalidArgumentError("a name no store can hold"))
            return 1
        else:
            if target.entry is None:
                await _make_folder(target, target.path)
            store_path = join(target.path, name)
            try:
                existing = await target.store.stat(store_path)
            except EntryNotFoundError:
                existing = None
        place = where(url, name if into_folder else "")
        if existing is None or sender.exists(item, existing, store_path, place):
            await sender.send(item, store_path)
    sender.summary()
    return 1 if sender.failed else 0


def _below(base: str, rel: str) -> str:
    """Store path of ``rel`` (``""``: the folder itself) below folder ``base`` (``""``: the store's root)."""
    return f"{base}/{rel}" if base and rel else base or rel


def _local_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


async def _stat_local(path: str) -> os.stat_result:
    import trio

    return await trio.to_thread.run_sync(os.stat, path)


async def _put_tree(args: argparse.Namespace, source: Target | None, target: WriteTarget, url: str) -> int:
    import trio

    from ..errors import DirectFSError, EntryExistsError, IsADirectory, NotADirectory
    from ..sources.base import join
    from .progress import Progress
    from .storeio import where

    if target.entry is not None and not target.entry.is_dir:
        raise NotADirectory("a file: -r copies a folder's contents into a folder")
    base = target.path
    made = target.entry is None and await _make_folder(target, base)
    tree = await (
        _scan_store(args.source, source) if source is not None else trio.to_thread.run_sync(_scan_local, args.source)
    )
    total = sum(item.size for item in tree.files)
    progress = Progress("cp", files=len(tree.files), total_bytes=total, quiet=args.quiet)
    sender = _Sender(args, target, progress, source.source if source is not None else None)

    with progress:
        for kind, shown, text in tree.problems:
            sender.report(kind, shown, text)
        # What the target already holds, folder by folder (rel -> name -> is a folder); a folder that could not be
        # made or read is "dead": nothing below it is tried (its failure is reported once).
        taken: dict[str, dict[str, bool]] = {}
        dead: set[str] = set()
        try:
            taken[""] = {} if made else await _taken(target, base)
        except DirectFSError as exc:
            sender.fail(tree.folders[0].shown, exc)
            sender.summary()
            return 1
        for folder in tree.folders[1:]:
            parent, _, name = folder.rel.rpartition("/")
            if parent in dead:
                dead.add(folder.rel)
                continue
            try:
                if name not in taken[parent]:
                    try:
                        await target.writer.make_dir(join(base, folder.rel))
                        taken[folder.rel] = {}
                        continue
                    except EntryExistsError:  # made by someone else since the listing
                        taken[parent][name] = (await target.store.stat(join(base, folder.rel))).is_dir
                if not taken[parent][name]:
                    raise NotADirectory(f"a file is at {where(url, folder.rel)}")
                taken[folder.rel] = await _taken(target, join(base, folder.rel))
            except DirectFSError as exc:
                sender.fail(folder.shown, exc)
                dead.add(folder.rel)

        async def bounded(item: _File, store_path: str) -> None:
            try:
                await sender.send(item, store_path)
            finally:
                sender.file_slots.release()

        async with trio.open_nursery() as nursery:
            for item in tree.files:
                parent, _, name = item.rel.rpartition("/")
                if parent in dead:
                    continue
                store_path = join(base, item.rel)
                is_dir = taken[parent].get(name)
                if is_dir is not None:
                    if is_dir:
                        sender.fail(item.shown, IsADirectory(f"a folder is at {where(url, item.rel)}"))
                        continue
                    if not sender.force:
                        sender.report(
                            "skipped", item.shown, f"{where(url, item.rel)} exists (use --force to replace it)"
                        )
                        continue
                await sender.file_slots.acquire()  # no more tasks than files in flight: a tree may hold millions
                nursery.start_soon(bounded, item, store_path)
        # Folder mtimes last (a new child changes its folder's mtime), children before parents.
        if target.writer.write_features.keeps_mtime:
            for folder in reversed(tree.folders):
                if folder.rel not in dead and folder.mtime_ns > 0:
                    try:
                        await target.writer.set_mtime(_below(base, folder.rel), folder.mtime_ns)
                    except DirectFSError as exc:
                        sender.fail(folder.shown, exc)
    sender.summary()
    return 1 if sender.failed else 0
