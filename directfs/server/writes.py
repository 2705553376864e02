"""Writing into DIR for the WebDAV write methods of ``directfs serve --writable`` (issue 14; docs/serve-writes.md).

Each operation changes DIR and then records the change in the index (:mod:`.index`, the ``record_*`` methods), so
PROPFIND, Direct IO and the change feed see it at once, without a rescan. Every method here is synchronous and runs
in a worker thread, one at a time with the scans (the server's ``scan_lock``, ``Portal.mutate``); only
:meth:`Writer.check_put`, :meth:`Writer.open_upload` and the :class:`Upload` writes run outside that lock (they touch
nothing but the upload's own temp file).

Staying beneath DIR (issue 13): every folder is opened from the index's descriptor of DIR one component at a time
with ``O_NOFOLLOW`` (:meth:`Writer._open_folder`), and every entry is then named relative to that folder's descriptor
(``dir_fd``, ``follow_symlinks=False``), so a symlink anywhere on the way fails instead of leading out of DIR. Names a
client may create follow the client's own rule (``directfs.sources.base.valid_name``: no control characters, no bidi
overrides, no ``/``, at most 255 bytes), and the upload temp prefix is reserved. The state dir, when it is inside DIR,
is never written, removed or moved, nor are its ancestors removed or moved. Entries the read side does not publish
(symlinks, FIFOs, devices, sockets) are never replaced or removed: to a client they do not exist, or are in the way.

Uploads: :meth:`Writer.open_upload` creates ``UPLOAD_TEMP_PREFIX<random>.part`` in the target folder (never
published); the body is written to it and fsynced; :meth:`Writer.commit_upload` encodes it, renames it over the
target (atomic: a reader sees the old file or the new one, never a mix) and fsyncs the folder. However an upload
ends, the temp file is removed unless it became the target.

Errors: a refusal with its HTTP status is :class:`WriteRefused` (it never leaves the server: ``app.py`` answers it);
anything else is the ``OSError`` the system call raised, answered by :func:`status_for`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Final

from ..sources.base import valid_name
from .index import UPLOAD_TEMP_PREFIX, Index, Node

# Folders on the way: never through a symlink (O_NOFOLLOW applies to the one component opened each time).
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The temp file: created new (O_EXCL: never an existing file or a planted symlink), never followed; read back by the
# encoder before it is renamed.
_TEMP_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# 0666 less the umask: what any program creating a file gets (a replaced file does not pass its mode on, as with
# every temp-file-and-rename writer).
_NEW_FILE_MODE: Final = 0o666
_TEMP_TOKEN_BYTES: Final = 8  # 16 hex digits: a name no one guesses or collides with


class WriteRefused(Exception):
    """A write the portal answers with ``status`` (and ``headers``), for the reason ``message``. Internal to the
    server: the handlers in ``app.py`` turn it into the reply."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# The statuses of the system's errors, where no operation gives a more precise one.
_ERRNO_STATUS: Final = {
    errno.ENOSPC: 507,  # RFC 4918 §11.5 Insufficient Storage
    errno.EDQUOT: 507,
    errno.EFBIG: 413,
    errno.EACCES: 403,
    errno.EPERM: 403,
    errno.EROFS: 403,
    errno.ENOENT: 409,  # a folder on the way is missing (RFC 4918 §9.7.1)
    errno.ENOTDIR: 409,
    errno.ELOOP: 409,  # a symlink on the way: not a folder a client can see
    errno.ENOTEMPTY: 409,
    errno.EEXIST: 409,
    errno.ESTALE: 409,  # the upload changed while it was encoded: someone else wrote its temp file
    errno.ENAMETOOLONG: 400,
}


def status_for(exc: OSError) -> int:
    """The HTTP status for a system error of a write (500 for the unexpected)."""
    return _ERRNO_STATUS.get(exc.errno or 0, 500)


def folder_allow(writable: bool) -> str:
    """The ``Allow`` header of a folder (and of everything when read-only)."""
    return "OPTIONS, GET, HEAD, PROPFIND" + (", PROPPATCH, DELETE, MOVE" if writable else "")


def file_allow(writable: bool) -> str:
    """The ``Allow`` header of a file."""
    return "OPTIONS, GET, HEAD, PROPFIND" + (", PROPPATCH, PUT, DELETE, MOVE" if writable else "")


def _allow(st: os.stat_result | None) -> dict[str, str]:
    return {"Allow": folder_allow(True) if st is None or stat_mod.S_ISDIR(st.st_mode) else file_allow(True)}


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def check_relpath(parts: list[str]) -> str:
    """The relative path of a write from its decoded URL components: each one a name the client rules allow
    (``valid_name``) and not the upload temp prefix, else 400."""
    for part in parts:
        if not valid_name(part):
            raise WriteRefused(400, "a name in the path is not allowed (control characters, bidi overrides, '/')")
        if part.startswith(UPLOAD_TEMP_PREFIX):
            raise WriteRefused(400, f"names starting with {UPLOAD_TEMP_PREFIX} are reserved by the server")
    return "/".join(parts)


@dataclass(frozen=True)
class PutConditions:
    """The preconditions of a PUT (RFC 9110 §13.1): ``If-Match`` (``*`` or strong ETags) and ``If-None-Match: *``
    (create only). Checked before the body is read and again, atomically, when the upload is renamed into place."""

    if_match: tuple[str, ...] | None = None
    if_none_match_any: bool = False

    def check(self, exists: bool, node: Node | None) -> None:
        if self.if_none_match_any and exists:
            raise WriteRefused(412, "If-None-Match: * and the file exists")
        if self.if_match is not None:
            if not exists:
                raise WriteRefused(412, "If-Match and there is no such file")
            if "*" not in self.if_match and (node is None or node.etag not in self.if_match):
                raise WriteRefused(412, "If-Match names another version of the file")


@dataclass
class Upload:
    """A PUT body on its way into DIR: the temp file in the target folder, and that folder's descriptor."""

    path: str
    parent_fd: int
    parent_id: tuple[int, int]  # (st_dev, st_ino) of the folder: the commit checks it is still the one at the path
    temp_name: str
    fd: int
    size_bytes: int = 0
    renamed: bool = False
    _closed: bool = field(default=False, repr=False)

    def write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
            self.size_bytes += written

    def finish(self) -> None:
        """The whole body is written: make it durable before it is renamed into place."""
        os.fsync(self.fd)

    def discard(self) -> None:
        """Close the descriptors and remove the temp file unless it became the target. Idempotent; the caller makes
        sure no thread is still writing (a descriptor number closed under a writer could name another file)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.renamed:
                with contextlib.suppress(FileNotFoundError):  # a DELETE of the folder took it already
                    os.unlink(self.temp_name, dir_fd=self.parent_fd)
        finally:
            os.close(self.fd)
            os.close(self.parent_fd)


class Writer:
    """The write operations on DIR for one index (cheap: holds nothing but the index)."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # --- walking ---------------------------------------------------------------------------------------------

    def _refuse_state_dir(self, path: str, *, subtree: bool) -> None:
        """403 for the state dir and what is in it; with ``subtree`` (DELETE, MOVE) for its ancestors too."""
        state = self.index.state_dir_relpath
        if state is None:
            return
        inside = path == state or path.startswith(state + "/") or state == ""
        above = subtree and (path == "" or state.startswith(path + "/"))
        if inside or above:
            raise WriteRefused(403, "reserved: the server's state dir")

    def _open_folder(self, relpath: str, *, missing_status: int) -> int:
        """An ``O_DIRECTORY`` descriptor of the folder ``relpath``, walked from DIR one component at a time without
        following symlinks. ``missing_status`` when a component is missing or not a folder (409 for the parent of
        something to create, 404 for the parent of something that must exist)."""
        fd = os.open(".", _DIR_FLAGS, dir_fd=self.index.root_fd)
        try:
            for part in relpath.split("/") if relpath else []:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):
                    raise WriteRefused(missing_status, "a folder on the path does not exist") from None
                except OSError as exc:
                    if exc.errno == errno.ELOOP:  # a symlink: not a folder any client can see
                        raise WriteRefused(missing_status, "a folder on the path does not exist") from None
                    raise
                os.close(fd)
                fd = child
                if self.index.is_state_dir(os.fstat(fd)):
                    raise WriteRefused(403, "reserved: the server's state dir")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _lstat(parent_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _published(self, path: str, parent_fd: int, name: str) -> tuple[Node, os.stat_result]:
        """The indexed node at ``path`` and its lstat, or 404: not indexed, gone (then forgotten at once), or now of
        another kind than indexed (a symlink, a FIFO... is left alone)."""
        node = self.index.snapshot.nodes.get(path)
        if node is None:
            raise WriteRefused(404, "not found")
        st = self._lstat(parent_fd, name)
        if st is None:
            self.index.record_removed(path)  # gone from DIR since the last scan: the listing follows now
            raise WriteRefused(404, "not found")
        if not (stat_mod.S_ISDIR(st.st_mode) if node.is_dir else stat_mod.S_ISREG(st.st_mode)):
            raise WriteRefused(404, "not found (no longer the entry that was listed)")
        if node.is_dir and self.index.is_state_dir(st):
            raise WriteRefused(403, "reserved: the server's state dir")
        return node, st

    # --- PUT -------------------------------------------------------------------------------------------------

    def _check_put_target(self, path: str, st: os.stat_result | None, conditions: PutConditions) -> None:
        if st is not None and stat_mod.S_ISDIR(st.st_mode):
            raise WriteRefused(405, "a folder is there: PUT writes files", headers=_allow(st))
        if st is not None and not stat_mod.S_ISREG(st.st_mode):
            raise WriteRefused(409, "something that is not a regular file is in the way")
        conditions.check(st is not None, self.index.snapshot.nodes.get(path))

    def check_put(self, path: str, conditions: PutConditions) -> bool:
        """Whether a PUT of ``path`` can go ahead (refusals before the body is read: with ``Expect: 100-continue``
        the client then sends none). True when it replaces a file. Checked again by :meth:`commit_upload`."""
        if not path:
            raise WriteRefused(405, "the root is a folder", headers=_allow(None))
        self._refuse_state_dir(path, subtree=False)
        parent, name = _split(path)
        parent_fd = self._open_folder(parent, missing_status=409)
        try:
            st = self._lstat(parent_fd, name)
        finally:
            os.close(parent_fd)
        self._check_put_target(path, st, conditions)
        return st is not None

    def open_upload(self, path: str) -> Upload:
        """The temp file an upload of ``path`` is written to, in the target folder (so the rename stays there)."""
        parent, _ = _split(path)
        parent_fd = self._open_folder(parent, missing_status=409)
        try:
            st = os.fstat(parent_fd)
            temp_name = f"{UPLOAD_TEMP_PREFIX}{secrets.token_hex(_TEMP_TOKEN_BYTES)}.part"
            fd = os.open(temp_name, _TEMP_FLAGS, _NEW_FILE_MODE, dir_fd=parent_fd)
        except BaseException:
            os.close(parent_fd)
            raise
        return Upload(path=path, parent_fd=parent_fd, parent_id=(st.st_dev, st.st_ino), temp_name=temp_name, fd=fd)

    def commit_upload(self, upload: Upload, conditions: PutConditions) -> tuple[Node, bool]:
        """Encode the complete, fsynced upload, rename it over its target and record it under a new id. Returns the
        new node and whether the file is new. Always disposes of ``upload`` (the temp file is gone unless it became
        the target)."""
        try:
            parent, name = _split(upload.path)
            current = self._open_folder(parent, missing_status=409)
            try:
                st = os.fstat(current)
            finally:
                os.close(current)
            if (st.st_dev, st.st_ino) != upload.parent_id:
                raise WriteRefused(409, "the target folder was moved or replaced during the upload")
            existing = self._lstat(upload.parent_fd, name)
            self._check_put_target(upload.path, existing, conditions)
            prepared = self.index.encode_upload(upload.path, upload.fd)
            try:
                os.rename(upload.temp_name, name, src_dir_fd=upload.parent_fd, dst_dir_fd=upload.parent_fd)
            except BaseException:
                self.index.discard_upload(prepared)
                raise
            upload.renamed = True
            try:
                os.fsync(upload.parent_fd)  # the rename itself survives a crash
                node = self.index.commit_upload(prepared, os.fstat(upload.fd))
            except BaseException:
                # The file is in DIR but not recorded (a folder on the way vanished...): the next scan indexes it,
                # and the objects are the collector's unless that scan uses them again.
                self.index.discard_upload(prepared)
                raise
            return node, existing is None
        finally:
            upload.discard()

    # --- MKCOL, DELETE, MOVE, PROPPATCH ----------------------------------------------------------------------

    def mkcol(self, path: str) -> Node:
        if not path:
            raise WriteRefused(405, "the root exists", headers=_allow(None))
        self._refuse_state_dir(path, subtree=False)
        parent, name = _split(path)
        parent_fd = self._open_folder(parent, missing_status=409)
        try:
            try:
                os.mkdir(name, dir_fd=parent_fd)  # 0777 less the umask
            except FileExistsError:
                allow = _allow(self._lstat(parent_fd, name))
                raise WriteRefused(405, "something exists there already", headers=allow) from None
            os.fsync(parent_fd)
        finally:
            os.close(parent_fd)
        return self.index.record_folder(path)

    def delete(self, path: str) -> None:
        """Remove the file or folder ``path`` (a folder with everything in it, RFC 4918 §9.6.1)."""
        if not path:
            raise WriteRefused(403, "the root cannot be deleted")
        self._refuse_state_dir(path, subtree=True)
        parent, name = _split(path)
        parent_fd = self._open_folder(parent, missing_status=404)
        try:
            node, _ = self._published(path, parent_fd, name)
            self._remove(path, parent_fd, name, is_dir=node.is_dir)
            os.fsync(parent_fd)
        finally:
            os.close(parent_fd)
        self.index.record_removed(path)

    def _remove(self, path: str, parent_fd: int, name: str, *, is_dir: bool) -> None:
        """Remove the entry ``name`` of ``parent_fd`` (``path`` in DIR). When a folder's removal fails part-way, the
        index forgets what did go before the error is raised, so the listing matches DIR."""
        if not is_dir:
            os.unlink(name, dir_fd=parent_fd)
            return
        try:
            # fd-based and never following symlinks (shutil.rmtree.avoids_symlink_attacks on Linux).
            shutil.rmtree(name, dir_fd=parent_fd)
        except BaseException:
            self.index.record_gone_beneath(path)
            raise

    def move(self, src: str, dst: str, *, overwrite: bool) -> bool:
        """Rename ``src`` to ``dst`` (a folder with its subtree), keeping every file id. With ``overwrite`` an entry
        at ``dst`` is replaced (a folder there is removed first), else 412. True when ``dst`` did not exist."""
        if not src or not dst:
            raise WriteRefused(403, "the root cannot be moved or replaced")
        if src == dst:
            raise WriteRefused(403, "the source and the destination are the same")
        if dst.startswith(src + "/"):
            raise WriteRefused(400, "a folder cannot be moved into itself")
        if src.startswith(dst + "/"):
            raise WriteRefused(400, "the destination contains the source")
        self._refuse_state_dir(src, subtree=True)
        self._refuse_state_dir(dst, subtree=True)
        src_parent, src_name = _split(src)
        dst_parent, dst_name = _split(dst)
        src_fd = self._open_folder(src_parent, missing_status=404)
        try:
            node, before = self._published(src, src_fd, src_name)
            dst_fd = self._open_folder(dst_parent, missing_status=409)
            try:
                existing = self._lstat(dst_fd, dst_name)
                if existing is not None:
                    if not overwrite:
                        raise WriteRefused(412, "the destination exists and Overwrite is F")
                    if not (stat_mod.S_ISDIR(existing.st_mode) or stat_mod.S_ISREG(existing.st_mode)):
                        raise WriteRefused(409, "something that is not a file or folder is at the destination")
                    if self.index.is_state_dir(existing):
                        raise WriteRefused(403, "reserved: the server's state dir")
                    # A file over a file is replaced by the rename itself, atomically; anything else is removed first.
                    if stat_mod.S_ISDIR(existing.st_mode) or node.is_dir:
                        self._remove(dst, dst_fd, dst_name, is_dir=stat_mod.S_ISDIR(existing.st_mode))
                try:
                    os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                except BaseException:
                    if existing is not None and self._lstat(dst_fd, dst_name) is None:
                        self.index.record_removed(dst)  # removed above, and the rename did not take its place
                    raise
                after = os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)
                os.fsync(dst_fd)
                if dst_parent != src_parent:
                    os.fsync(src_fd)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        if existing is not None:
            self.index.record_removed(dst)
        self.index.record_moved(src, dst, before, after)
        return existing is None

    def set_mtime(self, path: str, mtime_ns: int) -> None:
        """PROPPATCH of ``DAV:getlastmodified``: the mtime of the file or folder ``path`` (its id stays)."""
        if not path:
            node = self.index.snapshot.nodes.get("")
            if node is None:
                raise WriteRefused(404, "not found")
            before = os.fstat(self.index.root_fd)
            os.utime(self.index.root_fd, ns=(before.st_atime_ns, mtime_ns))
            self.index.record_times("", before, os.fstat(self.index.root_fd))
            return
        self._refuse_state_dir(path, subtree=False)
        parent, name = _split(path)
        parent_fd = self._open_folder(parent, missing_status=404)
        try:
            _, before = self._published(path, parent_fd, name)
            os.utime(name, ns=(before.st_atime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
            after = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        finally:
            os.close(parent_fd)
        self.index.record_times(path, before, after)
