"""Local files that ``cp`` and ``get`` write: a new ``NAME.<random>.part`` beside the destination, renamed over it
when complete, never through a symbolic link (issue 13 L7).

A destination folder may be shared with other users (``/tmp``, a group's project folder); whoever can write there can
plant ``NAME.part -> ~victim/.bashrc`` or swap a sub-folder for a link. So:

* the part file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name: it is always a new file of
  ours, never an existing file or a link's target (a name taken is tried again with another suffix);
* everything happens relative to an ``O_DIRECTORY`` descriptor of its folder: the folder the user named (``DEST``
  or its parent; symbolic links in that path are followed, the user chose it), and below it, for ``cp -r``, every
  sub-folder opened with ``O_NOFOLLOW`` (a link there is refused with ``ELOOP``, never followed);
* the final step is ``rename(2)`` within that folder: a symbolic link at the final name is *replaced* by the file,
  never written through, and its target is untouched (an existing regular file is replaced, as ``cp`` does); a
  failure before it removes the part file.

Everything here is blocking file system work: callers run it in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from typing import Final

_PART_ATTEMPTS: Final = 16  # random names tried before giving up: 32 random bits each, a collision is someone's doing
_MAX_PREFIX_BYTES: Final = 200  # NAME_MAX is 255: room for ".<8 hex>.part" after a long name
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_PART_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _link_refused(path: str) -> OSError:
    return OSError(errno.ELOOP, "a symbolic link in the destination: not followed", path)


def _is_link(name: str, folder_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_folder(root: str, folders: Sequence[str] = (), *, create: bool = False) -> int:
    """An ``O_DIRECTORY`` descriptor of ``root/folders...``: ``root`` as the user named it (links followed), each of
    ``folders`` opened (with ``create``: made when missing) without following a link. The caller closes it."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for position, name in enumerate(folders):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=fd)
            try:
                child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                # Linux answers ENOTDIR for O_DIRECTORY | O_NOFOLLOW on a link (ELOOP without O_DIRECTORY).
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(name, fd):
                    raise _link_refused(os.path.join(root, *folders[: position + 1])) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _part_name(name: str) -> str:
    prefix = os.fsencode(name)
    if len(prefix) > _MAX_PREFIX_BYTES:
        name = os.fsdecode(prefix[:_MAX_PREFIX_BYTES])
    return f"{name}.{os.urandom(4).hex()}.part"  # os.urandom: `secrets` costs ~9 ms to import


class PartFile:
    """A new part file for ``name`` in the folder ``folder_fd`` (which this object then owns and closes): write
    through ``fd``, then :meth:`commit` (rename over ``name``) or :meth:`discard` (remove it). Either closes both."""

    def __init__(self, folder_fd: int, name: str, *, shown: str) -> None:
        if not name or name in (".", "..") or "/" in name:
            raise IsADirectoryError(errno.EISDIR, "the destination names a folder, not a file", shown)
        self.folder_fd = folder_fd
        self.name = name
        self.shown = shown  # the destination's path, for messages
        self.part = ""
        self.fd = -1
        for _ in range(_PART_ATTEMPTS):
            part = _part_name(name)
            try:
                self.fd = os.open(part, _PART_FLAGS, 0o666, dir_fd=folder_fd)
            except FileExistsError:
                continue
            self.part = part
            return
        raise FileExistsError(errno.EEXIST, f"no free part file name after {_PART_ATTEMPTS} tries", shown)

    @classmethod
    def create(cls, root: str, folders: Sequence[str], name: str) -> PartFile:
        """A part file for ``root/folders.../name`` (see :func:`open_folder` for which links are followed)."""
        folder_fd = open_folder(root, folders)
        try:
            return cls(folder_fd, name, shown=os.path.join(root, *folders, name))
        except BaseException:
            os.close(folder_fd)
            raise

    @classmethod
    def beside(cls, dest: str) -> PartFile:
        """A part file for the path ``dest`` as the user gave it: its folder's path is followed, its name is not."""
        folder, name = os.path.split(dest)
        return cls.create(folder or ".", (), name)

    def commit(self, mtime_ns: int = 0) -> None:
        """fsync, give the store's mtime (when > 0), rename over the final name; the part file is gone either way."""
        try:
            os.fsync(self.fd)
            if mtime_ns > 0:
                os.utime(self.fd, ns=(mtime_ns, mtime_ns))
            os.replace(self.part, self.name, src_dir_fd=self.folder_fd, dst_dir_fd=self.folder_fd)
            self.part = ""
        finally:
            self.discard()

    def discard(self) -> None:
        """Close, and remove the part file unless it was committed (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.part:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.part, dir_fd=self.folder_fd)
            self.part = ""
        if self.folder_fd >= 0:
            os.close(self.folder_fd)
            self.folder_fd = -1


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """All of ``data`` at ``offset`` of ``fd`` (``os.pwrite`` may write less than asked); blocking: for workers."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def set_folder_mtime(root: str, folders: Sequence[str], mtime_ns: int) -> None:
    """Give ``root/folders...`` this mtime, reached as :func:`open_folder` reaches it (no link below ``root``)."""
    fd = open_folder(root, folders)
    try:
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)


__all__ = ["PartFile", "open_folder", "set_folder_mtime"]
