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

Writes (``Writable``, for ``--rw`` mounts and ``directfs cp`` uploads):

- Every change happens relative to an ``O_DIRECTORY`` descriptor of the entry's parent folder, opened after the same
  ``realpath`` check as a read and checked again on the opened descriptor (``/proc/self/fd``), so a write never goes
  through a symlink out of the root (unless ``follow_symlinks``), not even one swapped in after the check. The final
  name is never followed on the way to a change: a new file is created ``O_EXCL``, ``unlink``/``rmdir``/``rename``
  act on the name itself (a link is replaced or removed, its target untouched; a link leading out of the root is not
  in the tree, so ENOENT as on reads). ``set_mtime`` follows a link inside the root (the tree shows its target) and
  checks the opened target. Every component must pass ``valid_name`` (no ``..``): ``InvalidArgumentError`` otherwise.
- An upload (``begin_upload``) sends nothing until ``commit``, which (in a worker thread) copies the spool
  (``copy_file_range``, else ``pread``) into a new unnamed file of the target folder (``O_TMPFILE``; a
  ``.NAME.<random>.tmp`` created ``O_EXCL | O_NOFOLLOW`` where the file system has none), fsyncs it, gives it the
  mtime, links it under a temporary name and renames it over the target (then fsyncs the folder): a reader sees the
  old or the new file, never a mix, and a failed or killed commit leaves no file behind (the named fallback is
  removed on failure; only a kill between its creation and the rename can leave one). A new file's mode is
  ``0666`` minus the process umask, as for any file the user creates; a replaced file keeps its permission bits
  (``0777`` part), so a private ``0600`` file never becomes readable by replacing it. Ownership is the process's.
- OSErrors become the write branch of the tree: ENOSPC/EFBIG ``NoSpaceError``, EDQUOT ``QuotaExceededError``,
  EACCES/EPERM ``WriteAccessError`` (a local refusal is the same answer a store gives refused credentials: EACCES, and
  the write-back layer keeps the bytes), ETIMEDOUT ``UploadTimeout`` (NFS), EXDEV ``CrossDeviceError`` (a rename
  across a mount point inside the root: ``mv`` copies), ENOTEMPTY ``DirectoryNotEmptyError``, EEXIST
  ``EntryExistsError`` (``DirectoryNotEmptyError`` from ``rename``, where POSIX allows EEXIST for it), ENOENT/ELOOP
  ``EntryNotFoundError``, ENOTDIR/EISDIR/EINVAL as themselves, EROFS ``ReadOnlyError`` (a read-only local file
  system: the errno says it exactly); anything else (EIO) ``UploadError`` or ``WriteError`` with the file system's
  message.

Concurrency: the source holds no mutable state; every OpenFile owns one fd, closed exactly once by ``aclose``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat as stat_mod
from collections.abc import AsyncIterator, Callable
from typing import Final, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from ..errors import (
    ConfigError,
    CrossDeviceError,
    DirectFSError,
    DirectoryNotEmptyError,
    EntryExistsError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    NamespaceError,
    NoSpaceError,
    NotADirectory,
    PermissionDeniedError,
    QuotaExceededError,
    ReadOnlyError,
    StaleFileError,
    UploadError,
    UploadTimeout,
    WriteAccessError,
    WriteError,
)
from .base import BlockLayout, Entry, OpenFile, Source, SourceOptions, Upload, WriteFeatures, join, valid_name

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# One scandir page: big enough that a 10,000-entry folder costs 10 thread hops, small enough that the first entries
# reach the caller quickly.
LIST_PAGE_ENTRIES: Final = 1000
# file:// keeps folders and their moves, and stores times itself (os.utime).
WRITE_FEATURES: Final = WriteFeatures(folder_rename=True, keeps_mtime=True)
# One pread/pwrite of a commit where copy_file_range cannot be used: 1 MiB keeps thread hops and syscalls few (a 40 MiB
# file is 40 of each) while a commit holds little memory however many run at once.
COPY_CHUNK_BYTES: Final = 1024 * 1024
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_TMPFILE: the new content has no name until it is complete, so a killed commit leaves nothing behind. 0 where the
# platform has none (the named fallback is used).
_O_TMPFILE: Final = getattr(os, "O_TMPFILE", 0)
_TEMP_ATTEMPTS: Final = 16  # random temp names tried: 32 random bits each, a collision is someone's doing
_MAX_TEMP_PREFIX_BYTES: Final = 200  # NAME_MAX is 255: room for ".", ".<8 hex>.tmp" around a long name
# copy_file_range refusals that mean "not between these two files" (other file systems, old kernels, seccomp): the
# commit copies with pread/pwrite instead.
_NO_COPY_RANGE: Final = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM})


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


def _write_error(exc: OSError, path: str, *, upload: bool = False, rename: bool = False) -> DirectFSError:
    """Map an OSError of a change (module docstring, "Writes") to our tree; the message names the relative path."""
    shown = path or "/"
    code = exc.errno
    if code in (errno.ENOSPC, errno.EFBIG):
        return NoSpaceError(f"local file system: {exc.strerror}", filename=shown)
    if code == errno.EDQUOT:
        return QuotaExceededError(filename=shown)
    if code in (errno.EACCES, errno.EPERM):
        return WriteAccessError("permission denied by the local file system", filename=shown)
    if code == errno.ETIMEDOUT:
        return UploadTimeout("local file system: timed out", filename=shown)
    if code == errno.EXDEV:
        return CrossDeviceError("the rename crosses a mount point inside the source folder", filename=shown)
    if code == errno.ENOTEMPTY or (code == errno.EEXIST and rename):
        return DirectoryNotEmptyError(filename=shown)
    if code == errno.EEXIST:
        return EntryExistsError(filename=shown)
    if code == errno.EINVAL:
        return InvalidArgumentError(f"local file system: {exc.strerror}", filename=shown)
    if code == errno.EROFS:
        return ReadOnlyError("the local file system is mounted read-only", filename=shown)
    if code in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
        return _os_error(exc, path)
    error = UploadError if upload else WriteError
    return error(f"local file system: {exc.strerror}", filename=shown)


def _names(path: str) -> tuple[str, str]:
    """``(parent, name)`` of a path a change names; every component must be a valid name (no ``..``, no ``/``)."""
    if not path or not all(valid_name(part) for part in path.split("/")):
        raise InvalidArgumentError("not a valid path below the source folder", filename=path or "/")
    parent, _, name = path.rpartition("/")
    return parent, name


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

    # --- writes (Writable) ---------------------------------------------------------------------------------------

    @property
    def write_features(self) -> WriteFeatures:
        return WRITE_FEATURES

    def _open_dir(self, path: str) -> int:
        """An ``O_DIRECTORY`` descriptor of folder ``path``, inside the root (checked before and after the open)."""
        self._check_beneath(path)
        fd = os.open(self._abs(path), _DIR_FLAGS)
        if not self._follow_symlinks and not self._opened_inside(fd):
            os.close(fd)
            log.warning("refusing %r: it was swapped for a symlink leading out of %s", path or "/", self._root)
            raise EntryNotFoundError("symlink leads out of the source folder", filename=path or "/")
        return fd

    def _leads_out(self, dir_fd: int, name: str) -> bool:
        """Whether ``name`` in ``dir_fd`` is a link leading out of the root (so not in the tree, as on reads)."""
        if self._follow_symlinks:
            return False
        try:
            if not stat_mod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return False
            folder = os.readlink(f"/proc/self/fd/{dir_fd}")
        except OSError:
            return False  # gone (the change answers for it), or no /proc: the folder check is all there is
        return not self._inside(os.path.realpath(os.path.join(folder, name)))

    def _in_parent(self, path: str, change: Callable[[int, str], _T], **mapping: bool) -> _T:
        """Run ``change(parent_fd, name)`` in a checked descriptor of ``path``'s parent; OSErrors mapped."""
        parent, name = _names(path)
        try:
            dir_fd = self._open_dir(parent)
            try:
                if self._leads_out(dir_fd, name):
                    raise EntryNotFoundError("symlink leads out of the source folder", filename=path)
                return change(dir_fd, name)
            finally:
                os.close(dir_fd)
        except DirectFSError:
            raise
        except OSError as exc:
            raise _write_error(exc, path, **mapping) from exc

    def begin_upload(self, path: str) -> Upload:
        _names(path)  # a bad path fails here, before anyone spools for it
        return LocalUpload(self, path)

    def _make_dir_sync(self, path: str) -> Entry:
        def change(dir_fd: int, name: str) -> Entry:
            os.mkdir(name, 0o777, dir_fd=dir_fd)  # minus the umask, as for any folder the user makes
            entry = _entry(name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
            assert entry is not None
            return entry

        return self._in_parent(path, change)

    async def make_dir(self, path: str) -> Entry:
        return await trio.to_thread.run_sync(self._make_dir_sync, path)

    def _remove_file_sync(self, path: str) -> None:
        def change(dir_fd: int, name: str) -> None:
            st = os.stat(name, dir_fd=dir_fd)  # a link to a folder is a folder in the tree
            if stat_mod.S_ISDIR(st.st_mode):
                raise IsADirectory(filename=path)
            os.unlink(name, dir_fd=dir_fd)  # a link itself, never its target

        self._in_parent(path, change)

    async def remove_file(self, path: str) -> None:
        await trio.to_thread.run_sync(self._remove_file_sync, path)

    def _remove_dir_sync(self, path: str) -> None:
        def change(dir_fd: int, name: str) -> None:
            os.rmdir(name, dir_fd=dir_fd)

        self._in_parent(path, change)

    async def remove_dir(self, path: str) -> None:
        await trio.to_thread.run_sync(self._remove_dir_sync, path)

    def _rename_sync(self, old: str, new: str) -> None:
        new_parent, new_name = _names(new)

        def change(old_fd: int, old_name: str) -> None:
            try:
                new_fd = self._open_dir(new_parent)
            except DirectFSError:
                raise
            except OSError as exc:
                raise _write_error(exc, new, rename=True) from exc
            try:
                os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)  # POSIX rename(2): atomic
                os.fsync(new_fd)
                if not os.path.samestat(os.fstat(old_fd), os.fstat(new_fd)):
                    os.fsync(old_fd)
            finally:
                os.close(new_fd)

        self._in_parent(old, change, rename=True)

    async def rename(self, old: str, new: str, *, is_dir: bool) -> None:
        # is_dir needs no check: rename(2) itself refuses a file onto a folder (EISDIR), a folder onto a file
        # (ENOTDIR), onto a non-empty folder (ENOTEMPTY) and into itself (EINVAL).
        await trio.to_thread.run_sync(self._rename_sync, old, new)

    def _set_mtime_sync(self, path: str, mtime_ns: int) -> bool:
        if path:
            _names(path)
        try:
            # O_PATH follows a final link (the tree shows its target), then the opened target itself is checked.
            self._check_beneath(path)
            fd = os.open(self._abs(path), os.O_PATH | os.O_CLOEXEC)
        except DirectFSError:
            raise
        except OSError as exc:
            raise _write_error(exc, path) from exc
        try:
            if not self._follow_symlinks and not self._opened_inside(fd):
                log.warning("refusing %r: it was swapped for a symlink leading out of %s", path, self._root)
                raise EntryNotFoundError("symlink leads out of the source folder", filename=path)
            # An O_PATH descriptor has no futimens: its /proc link names exactly the opened file (without /proc, the
            # checked path is all there is).
            proc = f"/proc/self/fd/{fd}"
            os.utime(proc if os.path.exists(proc) else self._abs(path), ns=(mtime_ns, mtime_ns))
        except PermissionError:
            return False  # not the owner: a refusal, which set_mtime answers with False
        except DirectFSError:
            raise
        except OSError as exc:
            raise _write_error(exc, path) from exc
        finally:
            os.close(fd)
        return True

    async def set_mtime(self, path: str, mtime_ns: int) -> bool:
        return await trio.to_thread.run_sync(self._set_mtime_sync, path, mtime_ns)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class LocalUpload:
    """One upload to ``path`` of a ``LocalSource``: nothing happens until ``commit`` (module docstring, "Writes")."""

    def __init__(self, source: LocalSource, path: str) -> None:
        self._source = source
        self._path = path
        self._done = False

    async def part_ready(self, spool_fd: int, end: int) -> None:
        await trio.lowlevel.checkpoint()  # the whole copy happens at commit: a local copy gains nothing from parts

    async def commit(self, spool_fd: int, size: int, *, mtime_ns: int | None = None) -> Entry:
        if self._done:
            raise InvalidArgumentError("upload already committed or aborted", filename=self._path)
        if size < 0:
            raise InvalidArgumentError(f"negative upload size {size}", filename=self._path)
        self._done = True
        return await trio.to_thread.run_sync(self._commit_sync, spool_fd, size, mtime_ns)

    async def abort(self) -> None:
        self._done = True  # nothing exists before commit, and a failed commit removed its own temp file
        await trio.lowlevel.checkpoint()

    def _commit_sync(self, spool_fd: int, size: int, mtime_ns: int | None) -> Entry:
        def change(dir_fd: int, name: str) -> Entry:
            mode: int | None = None
            try:
                old = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat_mod.S_ISDIR(old.st_mode):
                    raise IsADirectory(filename=self._path)  # before copying what rename would refuse anyway
                if stat_mod.S_ISREG(old.st_mode):
                    mode = stat_mod.S_IMODE(old.st_mode) & 0o777  # keep a private file private; no set-id bits
            temp = _TempFile(dir_fd, name)
            try:
                if mode is not None:
                    os.fchmod(temp.fd, mode)
                _copy_spool(spool_fd, temp.fd, size, self._path)
                os.fsync(temp.fd)
                if mtime_ns is not None:
                    os.utime(temp.fd, ns=(mtime_ns, mtime_ns))
                temp.replace(name)
                os.fsync(dir_fd)  # the rename itself survives a crash
                st = os.fstat(temp.fd)
            finally:
                temp.close()
            entry = _entry(name, st)
            assert entry is not None
            return entry

        return self._source._in_parent(self._path, change, upload=True)


class _TempFile:
    """The new content of ``name`` in folder ``dir_fd``: an unnamed ``O_TMPFILE`` (a named ``.NAME.<random>.tmp``
    where the file system has none); ``replace`` renames it over ``name``, ``close`` drops whatever is not replaced."""

    def __init__(self, dir_fd: int, name: str) -> None:
        self._dir_fd = dir_fd
        self._name = name
        self._temp = ""  # the temp name while one exists
        self.fd = -1
        if _O_TMPFILE:
            try:
                self.fd = os.open(".", _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise  # ENOSPC, EACCES...: the named file would fail the same way
        self.fd, self._temp = self._create_named()

    def _create_named(self) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(_TEMP_ATTEMPTS):
            temp = self._temp_name()
            try:
                return os.open(temp, flags, 0o666, dir_fd=self._dir_fd), temp
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, f"no free temp file name after {_TEMP_ATTEMPTS} tries")

    def _temp_name(self) -> str:
        prefix = os.fsencode(self._name)
        name = os.fsdecode(prefix[:_MAX_TEMP_PREFIX_BYTES]) if len(prefix) > _MAX_TEMP_PREFIX_BYTES else self._name
        return f".{name}.{os.urandom(4).hex()}.tmp"

    def replace(self, name: str) -> None:
        if not self._temp:  # O_TMPFILE: give it a name first (linkat of the fd, as open(2) describes)
            for _ in range(_TEMP_ATTEMPTS):
                temp = self._temp_name()
                try:
                    os.link(f"/proc/self/fd/{self.fd}", temp, dst_dir_fd=self._dir_fd, follow_symlinks=True)
                except FileExistsError:
                    continue
                self._temp = temp
                break
            else:
                raise FileExistsError(errno.EEXIST, f"no free temp file name after {_TEMP_ATTEMPTS} tries")
        os.replace(self._temp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        self._temp = ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._temp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp, dir_fd=self._dir_fd)
            self._temp = ""


def _copy_spool(spool_fd: int, fd: int, size: int, path: str) -> None:
    """``size`` bytes of the spool into ``fd`` (both from offset 0; the spool's offset never moves)."""
    offset = 0
    in_kernel = True
    while offset < size:
        count = size - offset
        copied = 0
        if in_kernel:
            try:
                copied = os.copy_file_range(spool_fd, fd, count, offset, offset)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
            if not copied:  # refused, or 0 (some file systems answer it instead of copying): copy by hand
                in_kernel = False
                continue
        else:
            data = os.pread(spool_fd, min(count, COPY_CHUNK_BYTES), offset)
            if not data:
                raise UploadError(f"the spool holds {offset} bytes, not {size}", filename=path)
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset + copied)
                view = view[written:]
                copied += written
        offset += copied


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
