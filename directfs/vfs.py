"""The filesystem without FUSE: inodes, handles, metadata caches, and the hand-off to the read engine.

``FileSystem`` answers the questions the kernel asks (lookup, getattr, readdir, open, read, ...) in plain Python
types, so it is tested directly and fast; ``directfs.fuse_ops`` only translates these answers to pyfuse3.

Inode table
    Root is inode 1 and is never dropped. Every other inode maps to one path while the kernel knows it. Lookup
    counts follow the FUSE contract: ``lookup`` +1, each directory entry the kernel accepts in ``readdir`` +1 (never
    for ``.``/``..``, which pyfuse3 does not send to us), ``forget`` decrements; at 0 the inode is dropped. Inode
    numbers are never reused, so a stale kernel reference can never reach another file.

Metadata cache
    Entries carry an expiry (``metadata_ttl_seconds``); so do folder listings (kept per folder, bounded by their
    total number of entries) and negative lookups (``negative_ttl_seconds``). A fresh listing of the parent answers
    a lookup (positive or negative) without asking the store, so ``ls -l`` of a big folder costs one listing.

Versions
    ``Entry.version`` names the content (CTERA: file id + size + mtime + ETag). When a refresh shows a new version for
    a known inode, new handles get the new version and the inode is sent on ``invalidation_requests``: the FUSE
    layer drains that channel from a separate task and drops the kernel's page cache there (doing it inside a
    handler deadlocks the kernel). ``open`` answers ``keep_cache=True`` only while the version is the one the kernel
    may already cache.

Concurrency (every ``await`` is an interleaving point; handlers run concurrently on one trio thread)
    - The inode table, the caches and the handle tables change only in synchronous code between awaits, so no lock
      is needed: each handler re-reads the state it needs after an await (``_remember`` after every store call).
    - Store calls for the same path are single-flight (``_SingleFlight``): N concurrent lookups of one name cost one
      ``stat``; a cancelled leader lets its followers retry instead of failing them.
    - Every store call has a deadline (``metadata_deadline_seconds``); overrunning it is ``NamespaceTimeout``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, NoReturn, Protocol, TypeVar

import cachetools
import trio

from .errors import (
    DirectFSError,
    EntryNotFoundError,
    IsADirectory,
    NamespaceTimeout,
    NoSuchAttributeError,
    NotADirectory,
    ReadOnlyError,
    StaleFileError,
    replay_error,
)
from .sources.base import Entry, OpenFile, Source, join, valid_name

log = logging.getLogger(__name__)

T = TypeVar("T")

ROOT_INODE: Final = 1

# st_blksize: cat/cp size their buffers from it, and the kernel sends 1 MiB READs at most (max_pages=256), so
# 1 MiB makes one read(2) one FUSE request (docs/testbed.md §3: with direct_io, cat ran ~3x faster at 1 MiB).
BLKSIZE_BYTES: Final = 1024 * 1024

# The xattr holding a file's CTERA Direct IO id (issue 4 interface).
FILEID_XATTR: Final = "user.ctera.fileid"


# --- what the read engine offers (directfs.engine.reader); a Protocol: this layer does not depend on its internals


class FileReader(Protocol):
    async def read(self, offset: int, size: int) -> bytes | memoryview: ...

    async def aclose(self) -> None: ...


class ReadEngineLike(Protocol):
    def open(self, file: OpenFile, identity: Hashable) -> FileReader: ...


# --- settings and answers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VfsSettings:
    # 5 s: another user's change shows up within seconds, while a script that stats the same tree repeatedly (ls,
    # make, rsync) asks the Portal once per 5 s instead of once per call. Also the kernel's entry/attr timeout.
    metadata_ttl_seconds: float = 5.0
    # None = the metadata TTL: a name created remotely appears as fast as a change to an existing one does.
    negative_ttl_seconds: float | None = None
    # Deadline for one store call (stat, open, one listing page): under the ~25 s per-read budget
    # (docs/design-notes.md §5), so a dead Portal shows up as ETIMEDOUT instead of a hung shell.
    metadata_deadline_seconds: float = 20.0
    uid: int = field(default_factory=os.getuid)  # owner shown for every entry: the mounting user
    gid: int = field(default_factory=os.getgid)
    # Read-only tree: files r--r--r--, folders r-xr-xr-x, minus umask (e.g. 0o077 to hide it from other users).
    umask: int = 0
    # Listings kept at once, counted in entries: ~300 bytes each, so 200,000 entries is ~60 MiB at worst.
    listing_cache_entries: int = 200_000
    # Negative lookups remembered at once (shell completion and PATH searches make many).
    negative_cache_names: int = 100_000

    @property
    def negative_ttl(self) -> float:
        return self.metadata_ttl_seconds if self.negative_ttl_seconds is None else self.negative_ttl_seconds


@dataclass(frozen=True, slots=True)
class Attributes:
    """What stat(2) shows for one inode, plus how long the kernel may cache it."""

    inode: int
    is_dir: bool
    mode: int  # full st_mode (type bits included)
    size: int
    mtime_ns: int
    uid: int
    gid: int
    nlink: int
    blksize: int
    blocks: int  # 512-byte units, as stat(2) counts them
    ttl_seconds: float


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    fragment_size: int
    blocks: int
    blocks_free: int
    blocks_available: int
    files: int
    files_free: int
    name_max: int


# --- internal state ----------------------------------------------------------------------------------------------


class _Node:
    __slots__ = ("entry", "expires_at", "fetched_at", "inode", "lookups", "path", "served_version")

    def __init__(self, inode: int, path: str, entry: Entry, fetched_at: float, expires_at: float) -> None:
        self.inode = inode
        self.path = path
        self.entry = entry
        self.fetched_at = fetched_at
        self.expires_at = expires_at
        self.lookups = 0
        # The version whose bytes the kernel may hold in its page cache (set by open); None = never opened.
        self.served_version: str | None = None


@dataclass
class _Listing:
    entries: list[Entry]
    by_name: dict[str, Entry]
    fetched_at: float
    expires_at: float


@dataclass
class _DirHandle:
    path: str
    entries: list[Entry]  # snapshot taken at opendir: readdir offsets index into it, so they stay stable
    fetched_at: float


@dataclass
class _FileHandle:
    inode: int
    path: str
    entry: Entry
    file: OpenFile
    reader: FileReader


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "finished", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.finished = False  # False after done: the leader was cancelled, a follower retries
        self.result: T | None = None
        self.error: Exception | None = None


class _SingleFlight(Generic[T]):
    """One call per key at a time; concurrent callers wait for the leader's result (or its exception)."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                flight = _Flight()
                self._flights[key] = flight
                try:
                    flight.result = await fn()
                    flight.finished = True
                    return flight.result
                except Exception as exc:
                    flight.error = exc
                    flight.finished = True
                    raise
                finally:
                    del self._flights[key]
                    flight.done.set()
            await flight.done.wait()
            if not flight.finished:
                continue
            if flight.error is not None:
                error = flight.error
                # Each follower raises its own copy (chained to the leader's): one shared object raised from many
                # tasks would splice all their tracebacks onto it (errors.replay_error, as the block cache does).
                if isinstance(error, DirectFSError):
                    raise replay_error(error)  # chained to the leader's (its __cause__)
                raise error
            return flight.result  # type: ignore[return-value]


def _listing_size(listing: _Listing) -> int:
    return len(listing.entries) + 1


# --- the filesystem ----------------------------------------------------------------------------------------------


class FileSystem:
    """A read-only filesystem over one ``Source``; see the module docstring for the rules it keeps."""

    def __init__(self, source: Source, engine: ReadEngineLike, settings: VfsSettings | None = None) -> None:
        self.source = source
        self.engine = engine
        self.settings = settings or VfsSettings()
        self._nodes: dict[int, _Node] = {}
        self._by_path: dict[str, int] = {}
        self._next_inode = itertools.count(ROOT_INODE + 1)
        self._next_fh = itertools.count(1)
        self._dirs: dict[int, _DirHandle] = {}
        self._files: dict[int, _FileHandle] = {}
        self._listings: cachetools.LRUCache[str, _Listing] = cachetools.LRUCache(
            maxsize=self.settings.listing_cache_entries, getsizeof=_listing_size
        )
        self._negative: cachetools.LRUCache[str, float] = cachetools.LRUCache(
            maxsize=self.settings.negative_cache_names
        )
        self._stat_flights: _SingleFlight[Entry] = _SingleFlight()
        self._list_flights: _SingleFlight[_Listing] = _SingleFlight()
        # Unbounded on purpose: one item per remote change we notice, and dropping one would leave stale pages.
        send, receive = trio.open_memory_channel[int](math.inf)
        self._invalidate_send = send
        self.invalidation_requests: trio.MemoryReceiveChannel[int] = receive
        self.counters: dict[str, int] = {"stat": 0, "list": 0, "open": 0, "invalidations": 0}

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Stat the root so a wrong URL or credentials fail the mount before it goes live."""
        entry = await self._stat("")
        if not entry.is_dir:
            raise NotADirectory("the source root is not a folder", filename="/")
        now = trio.current_time()
        root = _Node(ROOT_INODE, "", entry, now, now + self.settings.metadata_ttl_seconds)
        root.lookups = 1  # the kernel holds the root from mount to unmount
        self._nodes[ROOT_INODE] = root
        self._by_path[""] = ROOT_INODE

    async def aclose(self) -> None:
        """Close every open handle (unmount with files still open); idempotent."""
        handles = list(self._files)
        with trio.CancelScope(shield=True):
            for fh in handles:
                await self.release(fh)
        self._dirs.clear()
        self._invalidate_send.close()

    def statistics(self) -> dict[str, int]:
        return {
            **self.counters,
            "inodes": len(self._nodes),
            "open_files": len(self._files),
            "open_dirs": len(self._dirs),
            "cached_listings": len(self._listings),
            "negative_names": len(self._negative),
        }

    # --- store calls (deadline + single-flight) ------------------------------------------------------------------

    async def _stat(self, path: str) -> Entry:
        async def call() -> Entry:
            self.counters["stat"] += 1
            with trio.move_on_after(self.settings.metadata_deadline_seconds):
                return await self.source.stat(path)
            raise NamespaceTimeout(filename=path or "/")

        return await self._stat_flights.run(path, call)

    async def _list(self, path: str) -> _Listing:
        async def call() -> _Listing:
            self.counters["list"] += 1
            entries: list[Entry] = []
            by_name: dict[str, Entry] = {}
            iterator = aiter(self.source.list_dir(path))
            try:
                while True:
                    # The deadline is per item: a remote source's next page arrives in one wait, local ones at once.
                    with trio.move_on_after(self.settings.metadata_deadline_seconds) as scope:
                        try:
                            entry = await anext(iterator)
                        except StopAsyncIteration:
                            break
                    if scope.cancelled_caught:
                        raise NamespaceTimeout(f"listing stalled after {len(entries)} entries", filename=path or "/")
                    if not valid_name(entry.name):  # sources skip these; never trust that for the tree's sake
                        log.warning("listing of %r holds an invalid name %r: skipped", path or "/", entry.name)
                        continue
                    if entry.name in by_name:
                        log.warning("listing of %r repeats the name %r: kept the first", path or "/", entry.name)
                        continue
                    by_name[entry.name] = entry
                    entries.append(entry)
            finally:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            now = trio.current_time()
            listing = _Listing(entries, by_name, now, now + self.settings.metadata_ttl_seconds)
            if _listing_size(listing) <= self.settings.listing_cache_entries:
                self._listings[path] = listing
            return listing

        return await self._list_flights.run(path, call)

    # --- metadata cache ------------------------------------------------------------------------------------------

    def _fresh_listing(self, path: str) -> _Listing | None:
        listing = self._listings.get(path)
        if listing is not None and listing.expires_at > trio.current_time():
            return listing
        return None

    async def _resolve(self, path: str) -> tuple[Entry, float]:
        """The entry at ``path`` and when it was fetched, from the caches when fresh, else from the store."""
        now = trio.current_time()
        expiry = self._negative.get(path)
        if expiry is not None:
            if expiry > now:
                raise EntryNotFoundError(filename=path)
            self._negative.pop(path, None)
        if path:
            parent, _, name = path.rpartition("/")
            listing = self._fresh_listing(parent)
            if listing is not None:
                found = listing.by_name.get(name)
                if found is None:
                    raise EntryNotFoundError(filename=path)
                return found, listing.fetched_at
        try:
            entry = await self._stat(path)
        except EntryNotFoundError:
            self._negative[path] = trio.current_time() + self.settings.negative_ttl
            raise
        return entry, trio.current_time()

    def _remember(self, path: str, entry: Entry, fetched_at: float) -> _Node:
        """Record what the store said about ``path``; returns the (possibly new) inode for it."""
        self._negative.pop(path, None)
        expires_at = fetched_at + self.settings.metadata_ttl_seconds
        inode = self._by_path.get(path)
        node = self._nodes.get(inode) if inode is not None else None
        if node is not None and node.entry.is_dir != entry.is_dir:
            # A file became a folder (or back): the kernel must never see an inode change type. Detach the old inode
            # (it answers ESTALE until forgotten) and give the path a new one.
            del self._by_path[path]
            node = None
        if node is None:
            node = _Node(next(self._next_inode), path, entry, fetched_at, expires_at)
            self._nodes[node.inode] = node
            self._by_path[path] = node.inode
            return node
        if fetched_at < node.fetched_at:
            return node  # an older snapshot (a long readdir) must not roll back a newer answer
        if node.entry.version != entry.version and not entry.is_dir:
            log.info("%r changed on the server (version %s -> %s)", path, node.entry.version, entry.version)
            if node.served_version is not None and node.served_version != entry.version:
                self.counters["invalidations"] += 1
                self._invalidate_send.send_nowait(node.inode)
        node.entry = entry
        node.fetched_at = fetched_at
        node.expires_at = expires_at
        return node

    def _node(self, inode: int) -> _Node:
        node = self._nodes.get(inode)
        if node is None:
            raise StaleFileError("unknown inode", filename=str(inode))
        return node

    async def _fresh_node(self, node: _Node, *, force: bool = False) -> _Node:
        """``node`` with an entry no older than the TTL (re-asking the store when expired or ``force``)."""
        if not force and node.expires_at > trio.current_time():
            return node
        if force:
            self._negative.pop(node.path, None)
            self._listings.pop(node.path.rpartition("/")[0] if node.path else "", None)
        entry, fetched_at = await self._resolve(node.path)
        if node.inode == ROOT_INODE and not entry.is_dir:
            raise NotADirectory("the source root is no longer a folder", filename="/")
        current = self._remember(node.path, entry, fetched_at)
        if current is not node and node.inode != ROOT_INODE:
            raise StaleFileError("the entry changed type on the server", filename=node.path)
        return node

    def _attributes(self, node: _Node) -> Attributes:
        entry = node.entry
        if entry.is_dir:
            mode = 0o040555 & ~(self.settings.umask & 0o777)
            # 1: the subfolder count is unknown without a listing; 1 tells find(1) not to use its leaf shortcut.
            nlink = 1
        else:
            mode = 0o100444 & ~(self.settings.umask & 0o777)
            nlink = 1
        return Attributes(
            inode=node.inode,
            is_dir=entry.is_dir,
            mode=mode,
            size=entry.size,
            mtime_ns=entry.mtime_ns,
            uid=self.settings.uid,
            gid=self.settings.gid,
            nlink=nlink,
            blksize=BLKSIZE_BYTES,
            blocks=(entry.size + 511) // 512,
            ttl_seconds=self.settings.metadata_ttl_seconds,
        )

    # --- namespace operations ------------------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: str) -> Attributes:
        """Resolve ``name`` in a folder; +1 on the inode's lookup count (the kernel will ``forget`` it)."""
        parent = self._node(parent_inode)
        if not parent.entry.is_dir:
            raise NotADirectory(filename=parent.path or "/")
        if not valid_name(name):
            raise EntryNotFoundError(filename=join(parent.path, name))
        path = join(parent.path, name)
        entry, fetched_at = await self._resolve(path)
        node = self._remember(path, entry, fetched_at)
        node.lookups += 1
        return self._attributes(node)

    def forget(self, inode_counts: Iterable[tuple[int, int]]) -> None:
        """The kernel dropped ``count`` references to each inode; never raises (it has no way to answer)."""
        for inode, count in inode_counts:
            node = self._nodes.get(inode)
            if node is None or inode == ROOT_INODE:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self._nodes[inode]
                if self._by_path.get(node.path) == inode:
                    del self._by_path[node.path]

    def lookup_count(self, inode: int) -> int:
        """The kernel's references to ``inode`` as we count them (0 when unknown); for tests and statistics."""
        node = self._nodes.get(inode)
        return node.lookups if node is not None else 0

    def inode_of(self, path: str) -> int | None:
        return self._by_path.get(path)

    async def getattr(self, inode: int) -> Attributes:
        node = await self._fresh_node(self._node(inode))
        return self._attributes(node)

    async def opendir(self, inode: int) -> int:
        node = self._node(inode)
        if not node.entry.is_dir:
            raise NotADirectory(filename=node.path or "/")
        listing = self._fresh_listing(node.path) or await self._list(node.path)
        fh = next(self._next_fh)
        self._dirs[fh] = _DirHandle(node.path, listing.entries, listing.fetched_at)
        return fh

    def readdir(self, fh: int, start_id: int, emit: Callable[[str, Attributes, int], bool]) -> None:
        """Offer entries from offset ``start_id`` to ``emit(name, attributes, next_id)`` until it returns False.

        Offsets index the snapshot taken at ``opendir``, so they stay valid whatever changes on the server. Each
        accepted entry is a kernel reference (+1 lookup); a refused one is not, and an inode created only for it is
        dropped again.
        """
        handle = self._dirs.get(fh)
        if handle is None:
            raise StaleFileError("unknown directory handle")
        for index in range(start_id, len(handle.entries)):
            entry = handle.entries[index]
            path = join(handle.path, entry.name)
            node = self._remember(path, entry, handle.fetched_at)
            if not emit(entry.name, self._attributes(node), index + 1):
                if node.lookups == 0:
                    self.forget([(node.inode, 0)])
                return
            node.lookups += 1

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- file data -----------------------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int) -> tuple[int, bool]:
        """Open for reading; returns ``(fh, keep_cache)``. Any write access is ``ReadOnlyError`` (EROFS)."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT | os.O_APPEND):
            raise ReadOnlyError()
        node = self._node(inode)
        if node.entry.is_dir:
            raise IsADirectory(filename=node.path)
        node = await self._fresh_node(node)
        try:
            file = await self._open_version(node)
        except StaleFileError:
            # Our metadata is older than the store's: ask again once, then open what is there now.
            node = await self._fresh_node(node, force=True)
            file = await self._open_version(node)
        entry = node.entry
        self.counters["open"] += 1
        try:
            reader = self.engine.open(file, (node.path, entry.version))
        except BaseException:
            with trio.CancelScope(shield=True):
                await file.aclose()
            raise
        fh = next(self._next_fh)
        self._files[fh] = _FileHandle(node.inode, node.path, entry, file, reader)
        keep_cache = node.served_version in (None, entry.version)
        node.served_version = entry.version
        return fh, keep_cache

    async def _open_version(self, node: _Node) -> OpenFile:
        with trio.move_on_after(self.settings.metadata_deadline_seconds):
            return await self.source.open(node.path, node.entry)
        raise NamespaceTimeout("timed out opening the file", filename=node.path)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._files.get(fh)
        if handle is None:
            raise StaleFileError("unknown file handle")
        if offset >= handle.entry.size or size <= 0:
            await trio.lowlevel.checkpoint()
            return b""
        return await handle.reader.read(offset, size)

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is None:
            await trio.lowlevel.checkpoint()
            return
        # Shielded: a release interrupted by shutdown must still close the reader (prefetch tasks) and the file.
        with trio.CancelScope(shield=True):
            try:
                await handle.reader.aclose()
            finally:
                await handle.file.aclose()

    # --- everything else -----------------------------------------------------------------------------------------

    def statfs(self) -> StatFs:
        # A namespace has no meaningful capacity; df shows 0 used/0 free rather than an invented number.
        return StatFs(
            block_size=BLKSIZE_BYTES,
            fragment_size=BLKSIZE_BYTES,
            blocks=0,
            blocks_free=0,
            blocks_available=0,
            files=len(self._nodes),
            files_free=0,
            name_max=255,
        )

    def _xattrs(self, node: _Node) -> dict[str, bytes]:
        values: dict[str, bytes] = {}
        if node.entry.file_id is not None:
            values[FILEID_XATTR] = node.entry.file_id.encode()
        for name, value in node.entry.xattrs:
            values.setdefault(name, value)
        return values

    def getxattr(self, inode: int, name: str) -> bytes:
        value = self._xattrs(self._node(inode)).get(name)
        if value is None:
            raise NoSuchAttributeError(filename=name)
        return value

    def listxattr(self, inode: int) -> list[str]:
        return list(self._xattrs(self._node(inode)))

    def refuse_write(self) -> NoReturn:
        """Every write-class operation (write, create, mkdir, unlink, rename, setattr, setxattr, ...)."""
        raise ReadOnlyError()


__all__ = [
    "BLKSIZE_BYTES",
    "FILEID_XATTR",
    "ROOT_INODE",
    "Attributes",
    "FileReader",
    "FileSystem",
    "ReadEngineLike",
    "StatFs",
    "VfsSettings",
]
