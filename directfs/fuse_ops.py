"""The thin pyfuse3 adapter: translate pyfuse3 types, call ``directfs.vfs.FileSystem``, translate back. Nothing else.

One boundary (``_boundary``) wraps every handler: a ``DirectFSError`` becomes ``FUSEError(its errno)``; anything
unexpected is logged with its traceback and answered ``EIO``, so one bug costs one failed request, never the mount
(an exception escaping a pyfuse3 handler kills the daemon and leaves "Transport endpoint is not connected").
Exception groups from nurseries are unwrapped: only our errors inside means their errno, anything else means EIO.
``trio.Cancelled`` (shutdown) passes through untouched. ``forget`` never raises.

Kernel invalidation runs in ``drain_invalidations``, a task of its own, never inside a handler (the kernel would
wait on the very request we are answering): page caches of changed files, and the change feed's dentries
(``invalidate_entry``) and attributes. The calls run in a worker thread, a batch of queued notes per thread call:
libfuse's notify blocks in the kernel (``invalidate_entry`` until a lookup of that folder in progress is answered),
and the trio thread must keep serving requests meanwhile.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, ParamSpec, TypeVar

import pyfuse3
import trio

from .errors import EntryNotFoundError, InvalidArgumentError, errno_of, log_level_of, ours_only
from .metrics import OpStats
from .vfs import Absent, Attributes, AttrNote, EntryNote, FileSystem, KernelInvalidation, OpenAnswer

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def fuse_errno(exc: Exception) -> int:
    """The errno to answer for ``exc``; logs it with traceback when it is not one of ours (``errors.ours_only``)."""
    ours = ours_only(exc)
    if ours is not None:
        return errno_of(ours)
    log.error("unexpected error in a FUSE handler; answering EIO", exc_info=exc)
    return errno.EIO


def failure_level(exc: Exception) -> int:
    """The level of the one line a failed request logs: the class's ``log_level`` for ours (absent names, absent
    xattrs and writes to a read-only mount are DEBUG, a corrupt block ERROR, a timeout WARNING: see
    ``directfs.errors``); WARNING for anything else, whose traceback ``fuse_errno`` already logged at ERROR."""
    ours = ours_only(exc)
    return log_level_of(ours) if ours is not None else logging.WARNING


def _boundary(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    # Metrics: every answer is counted by op and errno with its latency (directfs.metrics.OpStats, plain counters
    # written only here, on the trio thread). A failure is one line naming the op, its inode or handle and the errno,
    # at the level its class carries (failure_level); logs.RateLimitFilter bounds repeats.
    op = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        stats: OpStats | None = getattr(args[0], "op_stats", None) if args else None
        started = time.perf_counter()
        code = 0
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            code = exc.errno
            raise
        except Exception as exc:  # ExceptionGroup included; trio.Cancelled (a BaseException) is not
            code = fuse_errno(exc)
            target = args[1] if len(args) > 1 else "-"
            log.log(failure_level(exc), "%s %s failed: %s (%s)", op, target, errno.errorcode.get(code, code), exc)
            raise pyfuse3.FUSEError(code) from None
        finally:
            if stats is not None:
                stats.record(op, code, time.perf_counter() - started)

    return wrapper


def _decode(name: bytes) -> str:
    # Names come from the kernel as bytes; the namespace is UTF-8. A name that is not UTF-8 cannot exist in it.
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise EntryNotFoundError("name is not UTF-8") from None


def _decode_new(name: bytes) -> str:
    # A name to create: one that is not UTF-8 could never be listed again, so it is refused (EINVAL), not made.
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError("name is not UTF-8") from None


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False  # no NFS export: the kernel never asks us for '.'/'..'
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem, *, negative_ttl_seconds: float, op_stats: OpStats | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.op_stats = op_stats
        self.negative_ttl_seconds = negative_ttl_seconds

    # --- translation helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _entry_attributes(attrs: Attributes) -> pyfuse3.EntryAttributes:
        out = pyfuse3.EntryAttributes()
        out.st_ino = attrs.inode
        out.generation = 0
        out.entry_timeout = attrs.ttl_seconds
        out.attr_timeout = attrs.ttl_seconds
        out.st_mode = attrs.mode
        out.st_nlink = attrs.nlink
        out.st_uid = attrs.uid
        out.st_gid = attrs.gid
        out.st_rdev = 0
        out.st_size = attrs.size
        out.st_blksize = attrs.blksize
        out.st_blocks = attrs.blocks
        out.st_atime_ns = attrs.mtime_ns
        out.st_mtime_ns = attrs.mtime_ns
        out.st_ctime_ns = attrs.mtime_ns
        return out

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def init(self) -> None:
        log.debug("FUSE session initialised")

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            self.fs.forget(inode_list)
        except Exception:  # forget has no reply: an error here can only be logged
            log.exception("forget failed")

    # --- metadata ------------------------------------------------------------------------------------------------

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            answer = await self.fs.lookup_or_absent(parent_inode, _decode(name))
        except EntryNotFoundError:
            answer = Absent(self.negative_ttl_seconds)
        if isinstance(answer, Absent):
            # A negative entry (st_ino 0) lets the kernel cache the miss for the answer's TTL, not count a lookup.
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = answer.ttl_seconds
            return negative
        return self._entry_attributes(answer)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry_attributes(await self.fs.getattr(inode))

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.fs.opendir(inode)

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def emit(name: str, attrs: Attributes, next_id: int) -> bool:
            accepted: bool = pyfuse3.readdir_reply(token, name.encode(), self._entry_attributes(attrs), next_id)
            return accepted

        self.fs.readdir(fh, start_id, emit)
        await trio.lowlevel.checkpoint()

    @_boundary
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)
        await trio.lowlevel.checkpoint()

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        await trio.lowlevel.checkpoint()
        fs = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = fs.block_size
        out.f_frsize = fs.fragment_size
        out.f_blocks = fs.blocks
        out.f_bfree = fs.blocks_free
        out.f_bavail = fs.blocks_available
        out.f_files = fs.files
        out.f_ffree = fs.files_free
        out.f_favail = fs.files_free
        out.f_namemax = fs.name_max
        return out

    # --xattrs off: ENOSYS means "not implemented", and the kernel remembers it for the whole connection
    # (fc->no_getxattr / no_listxattr in fs/fuse/xattr.c), answering EOPNOTSUPP itself from then on. So the mount gets
    # one getxattr and one listxattr in its life instead of two probes per entry of every ls -l (security.selinux,
    # system.posix_acl_access). EOPNOTSUPP or ENODATA from us would be asked again for every name.

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.fs.settings.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return self.fs.getxattr(inode, name.decode("utf-8", "surrogateescape"))

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        await trio.lowlevel.checkpoint()
        if not self.fs.settings.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return [name.encode() for name in self.fs.listxattr(inode)]

    # --- data ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _file_info(answer: OpenAnswer) -> pyfuse3.FileInfo:
        info = pyfuse3.FileInfo(fh=answer.fh)
        info.keep_cache = answer.keep_cache
        # Off for plain reads: direct_io breaks mmap and bypasses the page cache (docs/design-notes.md §1). On for
        # writers and for readers opened while a writer is active (vfs.OpenAnswer), so no handle sees a mix of versions.
        info.direct_io = answer.direct_io
        info.nonseekable = False
        return info

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return self._file_info(await self.fs.open_file(inode, flags))

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        return await self.fs.read(fh, off, size)

    @_boundary
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_boundary
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)  # the last writer's close(): the upload's result

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    # --- write class: EROFS without --rw (FileSystem raises it) ---------------------------------------------------

    @_boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        attrs = await self.fs.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh,
        )
        return self._entry_attributes(attrs)

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        answer, attrs = await self.fs.create(parent_inode, _decode_new(name), mode, flags)
        return self._file_info(answer), self._entry_attributes(attrs)

    @_boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry_attributes(await self.fs.mkdir(parent_inode, _decode_new(name), mode))

    @_boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.fs.refuse_write()

    @_boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.fs.refuse_write()

    @_boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.fs.refuse_write()

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, _decode(name))

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, _decode(name))

    @_boundary
    async def rename(
        self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.rename(p_old, _decode(n_old), p_new, _decode_new(n_new), flags)

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.refuse_write()

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.refuse_write()


# Notes per worker-thread call: a feed outage invalidates every long timeout at once (two notes per inode the kernel
# holds); 1,000 notify calls take a few ms, and the thread hop (~0.1 ms) is paid once per batch, not per note.
INVALIDATION_BATCH: Final = 1000


def _invalidate(note: KernelInvalidation) -> None:
    try:
        if isinstance(note, EntryNote):
            pyfuse3.invalidate_entry(note.parent_inode, note.name.encode())
        elif isinstance(note, AttrNote):
            pyfuse3.invalidate_inode(note.inode, attr_only=True)
        else:
            pyfuse3.invalidate_inode(note, attr_only=False)
    except OSError as exc:
        # ENOENT: the kernel already forgot the inode or the name, so there is nothing cached to drop.
        if exc.errno != errno.ENOENT:
            log.warning("could not invalidate the kernel cache (%r): %s", note, os.strerror(exc.errno or 0))


def _invalidate_all(notes: list[KernelInvalidation]) -> None:
    for note in notes:
        _invalidate(note)


async def drain_invalidations(fs: FileSystem) -> None:
    """Apply every kernel invalidation the filesystem queues (changed pages, the feed's dentries and attributes),
    in order, in batches; runs until cancelled."""
    async with fs.invalidation_requests:
        async for first in fs.invalidation_requests:
            batch = [first]
            while len(batch) < INVALIDATION_BATCH:
                try:
                    batch.append(fs.invalidation_requests.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            log.debug("invalidating %d kernel cache entries (first: %r)", len(batch), first)
            await trio.to_thread.run_sync(_invalidate_all, batch)
