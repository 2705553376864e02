"""The two drivers of the filesystem behaviour suite (tests/support/behaviour.py), and the stores they read.

A driver is what a program sees of a directfs tree: paths, stat results, names, bytes, xattrs and errnos. Both
raise ``OSError`` with the errno a program would get (every ``DirectFSError`` is one):

* ``VfsDriver``: ``directfs.vfs.FileSystem`` and the read engine called directly, no FUSE. Each call is what the
  kernel sends for the same system call: a path is a walk of ``lookup`` from the root, a listing is
  ``opendir`` + ``readdir`` in kernel-sized pages + ``releasedir``, a read is ``read`` on an ``open`` handle.
* ``MountDriver``: plain ``os`` calls on a real mount (tests/support/mountd.py), each in a worker thread so that
  concurrent tasks of a behaviour are concurrent system calls.

A store serves a tree on disk as a source URL: ``file`` (the local source) or ``ctera`` (the reference portal,
``directfs serve``, with Direct IO blocks: encrypted, compressed, 64 KiB).
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_mod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
import trio

from directfs.engine.reader import ReadEngine, ReadSettings
from directfs.errors import EntryNotFoundError
from directfs.sources.base import Credentials, SourceOptions
from directfs.sources.registry import create_source
from directfs.vfs import ROOT_INODE, Attributes, FileSystem, VfsSettings

from .mountd import mounted
from .portal import Portal, start_portal

BLOCK = 64 * 1024  # blocks of both stores: a few MiB of data cross hundreds of block edges
STORES = ("file", "ctera")


# --- what a program sees ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """The part of stat(2) the behaviours compare (inode numbers are each driver's own business)."""

    is_dir: bool
    mode: int  # full st_mode, type bits included
    size: int
    mtime_ns: int
    uid: int
    gid: int
    nlink: int
    blksize: int
    blocks: int

    @classmethod
    def of_os(cls, st: os.stat_result) -> Stat:
        return cls(
            is_dir=stat_mod.S_ISDIR(st.st_mode),
            mode=st.st_mode,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            uid=st.st_uid,
            gid=st.st_gid,
            nlink=st.st_nlink,
            blksize=st.st_blksize,
            blocks=st.st_blocks,
        )

    @classmethod
    def of_attributes(cls, attrs: Attributes) -> Stat:
        return cls(
            is_dir=attrs.is_dir,
            mode=attrs.mode,
            size=attrs.size,
            mtime_ns=attrs.mtime_ns,
            uid=attrs.uid,
            gid=attrs.gid,
            nlink=attrs.nlink,
            blksize=attrs.blksize,
            blocks=attrs.blocks,
        )


@dataclass(frozen=True)
class FsStat:
    name_max: int
    block_size: int


# Write-class operations a behaviour may try (all must fail with EROFS): the ones that change a folder, and the ones
# that change the entry itself. ``rename`` takes the new path as its one extra argument.
NAMESPACE_WRITES: frozenset[str] = frozenset({"unlink", "mkdir", "rmdir", "rename"})
ENTRY_WRITES: frozenset[str] = frozenset({"truncate", "chmod", "setxattr"})


class Driver(Protocol):
    """Paths are relative POSIX strings, ``""`` is the root. Handles are whatever ``open`` returns."""

    async def stat(self, path: str) -> Stat: ...

    async def listdir(self, path: str) -> list[str]: ...

    async def scandir(self, path: str) -> dict[str, Stat]:
        """Every entry of a folder with the attributes its listing carries (readdirplus)."""
        ...

    async def open(self, path: str, flags: int = os.O_RDONLY) -> int: ...

    async def pread(self, handle: int, offset: int, size: int) -> bytes: ...

    async def close(self, handle: int) -> None: ...

    async def getxattr(self, path: str, name: str) -> bytes: ...

    async def listxattr(self, path: str) -> list[str]: ...

    async def statfs(self) -> FsStat: ...

    async def write(self, op: str, path: str, *args: str) -> None:
        """One write-class operation (``NAMESPACE_WRITES`` or ``ENTRY_WRITES``)."""
        ...


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


class VfsDriver:
    """``FileSystem`` called the way the kernel calls it (see the module docstring); no FUSE, no kernel caches."""

    # Entries offered per readdir call: about what one 4 KiB READDIRPLUS buffer of the kernel takes, so a listing
    # resumes from the offset of the last accepted entry many times, as it does under a mount.
    READDIR_PAGE_ENTRIES = 30

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs

    async def _attributes(self, path: str) -> Attributes:
        attrs = await self.fs.getattr(ROOT_INODE)
        for name in _parts(path):
            attrs = await self.fs.lookup(attrs.inode, name)
        return attrs

    async def stat(self, path: str) -> Stat:
        return Stat.of_attributes(await self._attributes(path))

    def _readdir_page(self, fh: int, start: int) -> list[tuple[str, Attributes, int]]:
        page: list[tuple[str, Attributes, int]] = []

        def emit(name: str, attrs: Attributes, next_id: int) -> bool:
            if len(page) >= self.READDIR_PAGE_ENTRIES:
                return False  # the kernel's buffer is full: it asks again from the last accepted entry
            page.append((name, attrs, next_id))
            return True

        self.fs.readdir(fh, start, emit)
        return page

    async def scandir(self, path: str) -> dict[str, Stat]:
        fh = await self.fs.opendir((await self._attributes(path)).inode)
        try:
            entries: dict[str, Stat] = {}
            start = 0
            while page := self._readdir_page(fh, start):
                for name, attrs, next_id in page:
                    entries[name] = Stat.of_attributes(attrs)
                    start = next_id
            return entries
        finally:
            self.fs.releasedir(fh)

    async def listdir(self, path: str) -> list[str]:
        return list(await self.scandir(path))

    async def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        if flags & os.O_CREAT:
            parent, _, name = path.rpartition("/")
            folder = await self._attributes(parent)
            try:
                attrs = await self.fs.lookup(folder.inode, name)
            except EntryNotFoundError:
                self.fs.refuse_write()  # a missing name with O_CREAT: the kernel sends CREATE
        else:
            attrs = await self._attributes(path)
        fh, _ = await self.fs.open(attrs.inode, flags)
        return fh

    async def pread(self, handle: int, offset: int, size: int) -> bytes:
        return bytes(await self.fs.read(handle, offset, size))

    async def close(self, handle: int) -> None:
        await self.fs.release(handle)

    async def getxattr(self, path: str, name: str) -> bytes:
        return self.fs.getxattr((await self._attributes(path)).inode, name)

    async def listxattr(self, path: str) -> list[str]:
        return self.fs.listxattr((await self._attributes(path)).inode)

    async def statfs(self) -> FsStat:
        await trio.lowlevel.checkpoint()
        st = self.fs.statfs()
        return FsStat(name_max=st.name_max, block_size=st.block_size)

    async def write(self, op: str, path: str, *args: str) -> None:
        # The kernel resolves what it needs before it sends the request: the folder for a namespace change, the
        # entry itself for an attribute change. Every write-class handler then answers refuse_write().
        assert op in NAMESPACE_WRITES | ENTRY_WRITES, op
        await self._attributes(path.rpartition("/")[0] if op in NAMESPACE_WRITES else path)
        self.fs.refuse_write()


class MountDriver:
    """Plain ``os`` calls on a live mount, one worker thread per call."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint

    def _path(self, path: str) -> Path:
        return self.mountpoint.joinpath(*_parts(path))

    async def stat(self, path: str) -> Stat:
        return Stat.of_os(await trio.to_thread.run_sync(os.stat, self._path(path)))

    async def scandir(self, path: str) -> dict[str, Stat]:
        def scan(folder: Path) -> dict[str, Stat]:
            with os.scandir(folder) as entries:
                return {entry.name: Stat.of_os(entry.stat()) for entry in entries}

        return await trio.to_thread.run_sync(scan, self._path(path))

    async def listdir(self, path: str) -> list[str]:
        return await trio.to_thread.run_sync(os.listdir, self._path(path))

    async def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        return await trio.to_thread.run_sync(os.open, self._path(path), flags, 0o644)

    async def pread(self, handle: int, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, handle, size, offset)

    async def close(self, handle: int) -> None:
        await trio.to_thread.run_sync(os.close, handle)

    async def getxattr(self, path: str, name: str) -> bytes:
        return await trio.to_thread.run_sync(os.getxattr, self._path(path), name)

    async def listxattr(self, path: str) -> list[str]:
        return await trio.to_thread.run_sync(os.listxattr, self._path(path))

    async def statfs(self) -> FsStat:
        st = await trio.to_thread.run_sync(os.statvfs, self.mountpoint)
        return FsStat(name_max=st.f_namemax, block_size=st.f_bsize)

    async def write(self, op: str, path: str, *args: str) -> None:
        target = self._path(path)
        calls: dict[str, Callable[[], object]] = {
            "unlink": lambda: os.unlink(target),
            "mkdir": lambda: os.mkdir(target),
            "rmdir": lambda: os.rmdir(target),
            "rename": lambda: os.rename(target, self._path(args[0])),
            "truncate": lambda: os.truncate(target, 0),
            "chmod": lambda: os.chmod(target, 0o644),
            "setxattr": lambda: os.setxattr(target, "user.x", b"1"),
        }
        await trio.to_thread.run_sync(calls[op])


# --- stores ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """A tree as a source: the URL, the environment (credentials) a mount needs, and what the store keeps."""

    kind: str
    url: str
    env: dict[str, str] = field(default_factory=dict)
    portal: Portal | None = None

    @property
    def folder_mtimes(self) -> bool:
        # A portal folder's mtime is its own (PROPFIND), not the local directory's.
        return self.kind == "file"

    def mtime_ns(self, local_ns: int) -> int:
        """The mtime this store shows for a file whose local mtime is ``local_ns``: WebDAV's getlastmodified is an
        HTTP date (whole seconds); file:// keeps nanoseconds."""
        return local_ns if self.kind == "file" else (local_ns // 10**9) * 10**9

    def file_id(self, path: str) -> str | None:
        """The ``user.ctera.fileid`` a file must carry (None: the store has no file ids)."""
        return None if self.portal is None else self.portal.file_id(path)

    def rescan(self) -> None:
        """After a change on disk: the portal notices changes on its rescan (SIGHUP); a local tree needs nothing."""
        if self.portal is not None:
            self.portal.rescan()

    def source_options(self) -> SourceOptions:
        """What ``directfs mount`` builds from ``env`` for the in-process driver."""
        if self.portal is None:
            return SourceOptions()
        credentials = Credentials(
            access_key_id=self.portal.access_key_id,
            secret_access_key=self.portal.secret_access_key,
            username=self.portal.username,
            password=self.portal.password,
        )
        return SourceOptions(credentials=credentials)


def file_url(root: Path) -> str:
    return f"file://{root}?block_size_bytes={BLOCK}"


def portal_env(portal: Portal) -> dict[str, str]:
    return {
        "DIRECTFS_ACCESS_KEY_ID": portal.access_key_id,
        "DIRECTFS_SECRET_ACCESS_KEY": portal.secret_access_key,
        "DIRECTFS_USERNAME": portal.username,
        "DIRECTFS_PASSWORD": portal.password,
    }


@contextlib.contextmanager
def serve(root: Path, kind: str) -> Iterator[Store]:
    """Serve ``root`` as a ``kind`` store until the block exits."""
    if kind == "file":
        yield Store("file", file_url(root))
        return
    assert kind == "ctera", kind
    with start_portal(root, extra_args=["--block-size", "64K"]) as portal:
        yield Store("ctera", "ctera+" + portal.url, portal_env(portal), portal)


# --- drivers over a store --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def vfs_driver(store: Store, *, metadata_ttl_seconds: float) -> AsyncIterator[VfsDriver]:
    """``FileSystem`` over ``store`` with the read engine the daemon builds (``directfs.mount._read_engine``)."""
    source = create_source(store.url, store.source_options())
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            engine = ReadEngine(ReadSettings(drop_behind=True), nursery)
            fs = FileSystem(source, engine, VfsSettings(metadata_ttl_seconds=metadata_ttl_seconds))
            await fs.start()
            try:
                yield VfsDriver(fs)
            except (Exception, pytest.fail.Exception) as exc:  # the caller's failure: raised below as it is,
                failure = exc  # not inside the nursery's exception group
            finally:
                await fs.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await source.aclose()
    if failure is not None:
        raise failure


def mount_args(metadata_ttl_seconds: float) -> list[str]:
    return ["--metadata-ttl", f"{metadata_ttl_seconds}s"]


@contextlib.asynccontextmanager
async def fresh_vfs(root: Path, kind: str, metadata_ttl_seconds: float) -> AsyncIterator[tuple[Driver, Store]]:
    """Serve ``root`` and drive it in-process (a portal starts in a worker thread: it takes seconds)."""
    stack = contextlib.ExitStack()
    try:
        store = await trio.to_thread.run_sync(stack.enter_context, serve(root, kind))
        async with vfs_driver(store, metadata_ttl_seconds=metadata_ttl_seconds) as driver:
            yield driver, store
    finally:
        await trio.to_thread.run_sync(stack.close)


@contextlib.asynccontextmanager
async def fresh_mount(root: Path, kind: str, metadata_ttl_seconds: float) -> AsyncIterator[tuple[Driver, Store]]:
    """Serve ``root`` and mount it (start-up and teardown in worker threads: they poll for seconds)."""
    stack = contextlib.ExitStack()
    try:
        store = await trio.to_thread.run_sync(stack.enter_context, serve(root, kind))
        mount = await trio.to_thread.run_sync(
            stack.enter_context, mounted(store.url, extra_args=mount_args(metadata_ttl_seconds), env=store.env)
        )
        yield MountDriver(mount.mountpoint), store
    finally:
        await trio.to_thread.run_sync(stack.close)
