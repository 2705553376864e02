"""``file:///path``: a local directory as a source, read through the same engine as the remote stores.

Why it exists: it is the fastest way to exercise the whole filesystem (inodes, listing, read engine, kernel side)
without a server, and it is the oracle the mount tests compare against.

- Layout: fixed-size blocks (``SourceOptions.block_size_bytes``, or ``?block_size_bytes=N`` in the URL so tests can
  use tiny blocks and cross many block edges with little data).
- Version: ``size:mtime_ns:inode``. A file rewritten in place changes size or mtime; a file replaced by rename
  changes inode.
- Reads (whole blocks, or any range for the read engine's random reads: ``RangeReadable``): ``os.pread`` on an fd
  opened at ``open()``, in a worker thread (``trio.to_thread``) so a slow disk or NFS never stalls the trio loop.
  After every read the fd is ``fstat``-ed again: if size or mtime moved since open, the
  bytes may mix two versions, so ``StaleFileError`` (ESTALE) is raised instead of returning them. A file replaced by
  rename keeps serving the old inode's bytes: that version is still whole and consistent.
- Listing: ``os.scandir`` in a thread, delivered in pages of ``LIST_PAGE_ENTRIES``. Symlinks are followed (like
  ``cp -L``); entries that are neither files nor folders (sockets, fifos, devices) and dangling links are skipped;
  names a listing may not hold (``valid_name``, or bytes that are not UTF-8) are skipped with a warning.
- Symlinks stay inside the root (issue 13 M8): a link whose target resolves outside the source folder is not part of
  the tree. Listings skip it with a warning, a lookup answers ENOENT (the same as the listing: the name is not
  there), so a user who can write into the tree cannot plant ``x -> /etc/shadow`` and read it through a mount run by
  root. ENOENT rather than EACCES: EACCES would say the entry exists, and ``ls`` would list a name it cannot show.
  Links inside the root (``latest -> v2``) are followed as before; ``SourceOptions.follow_symlinks``
  (``--follow-symlinks``) follows every link, for trees whose links point at other disks on purpose. Paths are
  checked with ``realpath`` against the root's own real path; a file read is checked again on the opened fd
  (``/proc/self/fd``), so a link swapped in between the check and the open still cannot be read. A swap between the
  check and a ``stat`` or a listing may show one outside entry's size and times or names, never its bytes.

Concurrency: the source holds no mutable state; every OpenFile owns one fd, closed exactly once by ``aclose``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from ..errors import (
    ConfigError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    NamespaceError,
    NotADirectory,
    PermissionDeniedError,
    StaleFileError,
)
from .base import BlockLayout, Entry, OpenFile, Source, SourceOptions, join, valid_name

log = logging.getLogger(__name__)

# One scandir page: big enough that a 10,000-entry folder costs 10 thread hops, small enough that the first entries
# reach the caller quickly.
LIST_PAGE_ENTRIES: Final = 1000


def _version(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _printable(name: str) -> str:
    """A name safe to log: undecodable bytes shown as escapes, control characters as repr."""
    return repr(name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def _usable_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir keeps non-UTF-8 bytes as lone surrogates
        return False
    return valid_name(name)


def _os_error(exc: OSError, path: str) -> NamespaceError:
    """Map an OSError from the local filesystem to our tree (the message names the relative path only)."""
    shown = path or "/"
    if exc.errno in (errno.ENOENT, errno.ELOOP):
        return EntryNotFoundError(filename=shown)
    if exc.errno == errno.ENOTDIR:
        return NotADirectory(filename=shown)
    if exc.errno == errno.EISDIR:
        return IsADirectory(filename=shown)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError(filename=shown)
    return NamespaceError(f"local filesystem error: {exc.strerror}", filename=shown)


def _entry(name: str, st: os.stat_result) -> Entry | None:
    if stat_mod.S_ISDIR(st.st_mode):
        return Entry(name=name, is_dir=True, size=0, mtime_ns=st.st_mtime_ns, version=_version(st))
    if stat_mod.S_ISREG(st.st_mode):
        return Entry(name=name, is_dir=False, size=st.st_size, mtime_ns=st.st_mtime_ns, version=_version(st))
    return None


class LocalOpenFile:
    """One opened version of a local file: an fd plus its fixed-size layout."""

    def __init__(self, fd: int, path: str, layout: BlockLayout) -> None:
        self._fd = fd
        self._path = path
        self._layout = layout
        self._closed = False

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    def _read_sync(self, start: int, length: int) -> bytes:
        data = os.pread(self._fd, length, start)
        if len(data) != length or _version(os.fstat(self._fd)) != self._layout.version:
            raise StaleFileError(filename=self._path)
        return data

    async def _read(self, start: int, length: int) -> bytes:
        if self._closed:
            raise StaleFileError("file handle already closed", filename=self._path)
        try:
            return await trio.to_thread.run_sync(self._read_sync, start, length)
        except StaleFileError:
            raise
        except OSError as exc:
            raise _os_error(exc, self._path) from exc

    async def fetch_block(self, index: int) -> bytes:
        if not 0 <= index < self._layout.block_count:
            raise InvalidArgumentError(
                f"block {index} outside a file of {self._layout.block_count} blocks", filename=self._path
            )
        return await self._read(self._layout.block_start(index), self._layout.block_length(index))

    async def fetch_range(self, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (``RangeReadable``), with the same version check as a block."""
        size = self._layout.size
        if start < 0 or length <= 0 or start + length > size:
            raise InvalidArgumentError(f"range {start}+{length} outside a file of {size} bytes", filename=self._path)
        return await self._read(start, length)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
        await trio.lowlevel.checkpoint()


class LocalSource:
    """A local directory tree. ``root`` is absolute; paths below it are relative and ``/``-separated.
    ``follow_symlinks``: also follow links that leave the root (module docstring)."""

    def __init__(self, root: str, *, block_size_bytes: int, follow_symlinks: bool = False) -> None:
        if block_size_bytes <= 0:
            raise ConfigError(f"block size must be positive, not {block_size_bytes}")
        self._root = os.path.abspath(root)
        # The root may itself be a link (/srv/data -> /disks/1/data): "inside" means inside what it resolves to.
        self._real_root = os.path.realpath(self._root)
        self._follow_symlinks = follow_symlinks
        self.block_size_bytes = block_size_bytes

    @property
    def display_url(self) -> str:
        return f"file://{self._root}"

    def _abs(self, path: str) -> str:
        return os.path.join(self._root, path) if path else self._root

    def _inside(self, real: str) -> bool:
        return real == self._real_root or real.startswith(self._real_root.rstrip("/") + "/")

    def _check_beneath(self, path: str) -> None:
        """ENOENT (with a warning) when ``path`` resolves outside the root and links may not lead out."""
        if self._follow_symlinks or self._inside(os.path.realpath(self._abs(path))):
            return
        log.warning("refusing %r: a symlink leads out of %s (--follow-symlinks allows it)", path or "/", self._root)
        raise EntryNotFoundError("symlink leads out of the source folder", filename=path or "/")

    def _stat_sync(self, path: str) -> os.stat_result:
        self._check_beneath(path)
        return os.stat(self._abs(path))

    async def stat(self, path: str) -> Entry:
        try:
            st = await trio.to_thread.run_sync(self._stat_sync, path)
        except NamespaceError:
            raise
        except OSError as exc:
            raise _os_error(exc, path) from exc
        entry = _entry(path.rpartition("/")[2], st)
        if entry is None:
            raise EntryNotFoundError("not a regular file or folder", filename=path or "/")
        return entry

    def _scan_sync(self, path: str) -> list[list[Entry]]:
        self._check_beneath(path)
        pages: list[list[Entry]] = [[]]
        with os.scandir(self._abs(path)) as it:
            for dirent in it:
                name = dirent.name
                if not _usable_name(name):
                    log.warning("skipping an entry with an invalid name in %r: %s", path or "/", _printable(name))
                    continue
                checked = not self._follow_symlinks and dirent.is_symlink()
                if checked and not self._inside(os.path.realpath(dirent.path)):
                    log.warning(
                        "skipping %r: a symlink that leads out of %s (--follow-symlinks allows it)",
                        join(path, name),
                        self._root,
                    )
                    continue
                try:
                    st = dirent.stat(follow_symlinks=True)
                except OSError as exc:
                    log.debug("skipping %r: %s", join(path, name), exc.strerror)
                    continue
                entry = _entry(name, st)
                if entry is None:
                    continue
                if len(pages[-1]) >= LIST_PAGE_ENTRIES:
                    pages.append([])
                pages[-1].append(entry)
        return pages

    async def list_dir(self, path: str) -> AsyncIterator[Entry]:
        # One thread hop for the whole folder: scandir is cheap, and the pages only bound what a caller holds
        # between checkpoints. A remote source streams its pages instead.
        try:
            pages = await trio.to_thread.run_sync(self._scan_sync, path)
        except NamespaceError:
            raise
        except OSError as exc:
            raise _os_error(exc, path) from exc
        for page in pages:
            for entry in page:
                yield entry
            await trio.lowlevel.checkpoint()

    def _opened_inside(self, fd: int) -> bool:
        """Whether the file behind ``fd`` lies inside the root now that it is open (what was read is what is
        checked: a link swapped in after ``_check_beneath`` is caught here)."""
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: the path check before the open is all there is
            return True
        return self._inside(real)

    def _open_sync(self, path: str, entry: Entry) -> LocalOpenFile:
        self._check_beneath(path)
        fd = os.open(self._abs(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not self._follow_symlinks and not self._opened_inside(fd):
                log.warning("refusing %r: it was swapped for a symlink leading out of %s", path, self._root)
                raise EntryNotFoundError("symlink leads out of the source folder", filename=path)
            st = os.fstat(fd)
            if stat_mod.S_ISDIR(st.st_mode):
                raise IsADirectory(filename=path)
            if _version(st) != entry.version:
                raise StaleFileError(filename=path)
        except BaseException:
            os.close(fd)
            raise
        return LocalOpenFile(fd, path, BlockLayout.fixed(entry.version, st.st_size, self.block_size_bytes))

    async def open(self, path: str, entry: Entry) -> OpenFile:
        if entry.is_dir:
            raise IsADirectory(filename=path)
        try:
            return await trio.to_thread.run_sync(self._open_sync, path, entry)
        except NamespaceError:
            raise
        except OSError as exc:
            raise _os_error(exc, path) from exc

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def create(url: str, options: SourceOptions) -> Source:
    """``file:///abs/path[?block_size_bytes=N]``: the folder must exist."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ConfigError(f"not a local file URL (want file:///absolute/path): {url!r}")
    root = unquote(parts.path)
    if not root.startswith("/"):
        raise ConfigError(f"file:// URL needs an absolute path: {url!r}")
    block_size_bytes = options.block_size_bytes
    for key, values in parse_qs(parts.query, keep_blank_values=True, strict_parsing=False).items():
        if key != "block_size_bytes":
            raise ConfigError(f"unknown file:// URL option {key!r} (known: block_size_bytes)")
        try:
            block_size_bytes = int(values[-1])
        except ValueError:
            raise ConfigError(f"block_size_bytes must be an integer, not {values[-1]!r}") from None
    if not os.path.isdir(root):
        raise ConfigError(f"not a folder: {root}")
    return LocalSource(root, block_size_bytes=block_size_bytes, follow_symlinks=options.follow_symlinks)
