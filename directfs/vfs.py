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

Writes (``--rw``: a ``WriteBack`` given; directfs.writeback has the model)
    Write access joins the path's spool; the last writer's ``flush`` (close) or any ``fsync`` uploads it and answers
    with the result. While a spool is active its size and mtime are what stat shows, store refreshes of that path are
    skipped (nothing newer can come until the upload), and a new file's spool stands for it in lookups and its
    folder's listing. Our own changes (create, mkdir, unlink, rmdir, rename, a finished upload) update the cached
    listing of the parent in place (copied first when an open directory handle shares it) and the inode table
    (a rename moves the known inodes below a folder), so a ``tar -x`` does not re-list a folder per file. Writers and
    readers opened beside an active writer get ``direct_io``. Without a ``WriteBack`` every write is EROFS.

Concurrency (every ``await`` is an interleaving point; handlers run concurrently on one trio thread)
    - The inode table, the caches and the handle tables change only in synchronous code between awaits, so no lock
      is needed: each handler re-reads the state it needs after an await (``_remember`` after every store call).
    - Store calls for the same path are single-flight (``_SingleFlight``): N concurrent lookups of one name cost one
      ``stat``; a cancelled leader lets its followers retry instead of failing them.
    - Every store call has a deadline (``metadata_deadline_seconds``); overrunning it is ``NamespaceTimeout``.
"""

from __future__ import annotations

import contextlib
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
    CrossDeviceError,
    DirectFSError,
    DirectoryNotEmptyError,
    EntryExistsError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    NamespaceTimeout,
    NoSuchAttributeError,
    NotADirectory,
    ReadOnlyError,
    StaleFileError,
    WriteNotSupportedError,
    replay_error,
)
from .sources.base import Entry, OpenFile, Source, Writable, join, valid_name
from .writeback import Spool, WriteBack

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
    shared: bool = False  # ``entries`` is a directory handle's snapshot too


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


@dataclass
class _SpoolHandle:
    """A handle on a spool (``--rw``): a writer (``writer``), or a reader of a new file whose only bytes are there."""

    inode: int
    spool: Spool
    writer: bool
    readable: bool


@dataclass(frozen=True, slots=True)
class OpenAnswer:
    fh: int
    keep_cache: bool
    # direct_io: writers (their bytes must not enter the page cache before the upload lands), and readers opened
    # while a writer is active (the page cache is shared by every handle of the inode).
    direct_io: bool


# rename(2) flags (linux/fs.h): pyfuse3 passes them through.
RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2

# How an in-place update reads the old content into the spool: one engine read at a time (the engine's read-ahead
# keeps the next blocks coming).
_LOAD_CHUNK_BYTES: Final = 1024 * 1024


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
    """A filesystem over one ``Source``, read-only unless given a ``WriteBack`` (``--rw``); see the module
    docstring for the rules it keeps."""

    def __init__(
        self,
        source: Source,
        engine: ReadEngineLike,
        settings: VfsSettings | None = None,
        writeback: WriteBack | None = None,
    ) -> None:
        self.source = source
        self.engine = engine
        self.settings = settings or VfsSettings()
        # --rw: the spools and uploads (directfs.writeback); None = a read-only mount, every write EROFS.
        self.writeback = writeback
        self._store: Writable | None = source if writeback is not None and isinstance(source, Writable) else None
        if writeback is not None and self._store is None:
            raise InvalidArgumentError(f"{source.display_url} cannot be written")
        if writeback is not None:
            writeback.on_committed = self._committed
        self._spool_handles: dict[int, _SpoolHandle] = {}
        self._modes: dict[str, int] = {}  # chmod of this mount's lifetime (no store keeps modes)
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
        self.counters: dict[str, int] = {"stat": 0, "list": 0, "open": 0, "invalidations": 0, "store_changes": 0}

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
        """Close every open handle (unmount with files still open); idempotent. Writers are detached without an
        upload: ``WriteBack.drain`` uploads their spools next, within the drain timeout."""
        handles = list(self._files)
        with trio.CancelScope(shield=True):
            for fh in handles:
                await self.release(fh)
            for handle in list(self._spool_handles.values()):
                if self.writeback is not None:
                    self.writeback.detach(handle.spool, writer=handle.writer)
            self._spool_handles.clear()
        self._dirs.clear()
        self._invalidate_send.close()

    def statistics(self) -> dict[str, int]:
        return {
            **self.counters,
            "inodes": len(self._nodes),
            "open_files": len(self._files) + len(self._spool_handles),
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
            if self.writeback is not None:
                for spool in self.writeback.spools_below(path):
                    parent, _, name = spool.path.rpartition("/")
                    if parent == path and spool.base is None and name not in by_name:
                        by_name[name] = _spool_entry(spool)
                        entries.append(by_name[name])
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
        """The entry at ``path`` and when it was fetched, from the caches when fresh, else from the store (a new file
        still in its spool: the spool's)."""
        now = trio.current_time()
        spool = self._active_spool(path)
        if spool is not None and spool.base is None:
            await trio.lowlevel.checkpoint()
            return _spool_entry(spool), now
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
        if self._active_spool(node.path) is not None:
            return node  # being written here: the store has nothing newer to say until the upload lands
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
        writable = self.writeback is not None
        # 1: the subfolder count is unknown without a listing; 1 tells find(1) not to use its leaf shortcut.
        nlink = 1
        if entry.is_dir:
            permissions = 0o755 if writable else 0o555
            kind = 0o040000
        else:
            permissions = 0o644 if writable else 0o444
            kind = 0o100000
        permissions = self._modes.get(node.path, permissions)
        mode = kind | (permissions & ~(self.settings.umask & 0o777))
        size, mtime_ns = entry.size, entry.mtime_ns
        spool = self._active_spool(node.path) if not entry.is_dir else None
        if spool is not None:
            size, mtime_ns = spool.size if spool.loaded else size, spool.modified_ns
        return Attributes(
            inode=node.inode,
            is_dir=entry.is_dir,
            mode=mode,
            size=size,
            mtime_ns=mtime_ns,
            uid=self.settings.uid,
            gid=self.settings.gid,
            nlink=nlink,
            blksize=BLKSIZE_BYTES,
            blocks=(size + 511) // 512,
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
        listing.shared = True  # a change of this listing copies it first (_listing_put): the snapshot stays stable
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
        """``open_file`` as ``(fh, keep_cache)``."""
        answer = await self.open_file(inode, flags)
        return answer.fh, answer.keep_cache

    async def open_file(self, inode: int, flags: int) -> OpenAnswer:
        """Open a file. Read-only mounts: any write access is ``ReadOnlyError`` (EROFS). ``--rw``: write access
        joins the path's spool (``_open_writer``); a reader sees the store's version, or the spool of a new file."""
        writes = flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND)
        if writes or (flags & os.O_CREAT and self.writeback is None):
            if self.writeback is None:
                raise ReadOnlyError()
            return await self._open_writer(self._node(inode), flags)
        node = self._node(inode)
        if node.entry.is_dir:
            raise IsADirectory(filename=node.path)
        spool = self._active_spool(node.path)
        if spool is not None and spool.base is None:  # a new file not uploaded yet: its bytes are only in the spool
            assert self.writeback is not None
            self.writeback.attach_reader(spool)
            fh = next(self._next_fh)
            self._spool_handles[fh] = _SpoolHandle(node.inode, spool, writer=False, readable=True)
            return OpenAnswer(fh, keep_cache=False, direct_io=True)
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
        # direct_io while a writer is active here: the kernel shrank the inode at its O_TRUNC and its pages must
        # not be filled with the old version's bytes; this handle reads exactly the store's version.
        direct_io = spool is not None
        self._files[fh] = _FileHandle(node.inode, node.path, entry, file, reader)
        keep_cache = node.served_version in (None, entry.version) and not direct_io
        if not direct_io:
            node.served_version = entry.version
        return OpenAnswer(fh, keep_cache, direct_io)

    async def _open_version(self, node: _Node) -> OpenFile:
        return await self._open_entry(node.path, node.entry)

    async def _open_entry(self, path: str, entry: Entry) -> OpenFile:
        with trio.move_on_after(self.settings.metadata_deadline_seconds):
            return await self.source.open(path, entry)
        raise NamespaceTimeout("timed out opening the file", filename=path)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._files.get(fh)
        if handle is None:
            spooled = self._spool_handles.get(fh)
            if spooled is None:
                raise StaleFileError("unknown file handle")
            assert self.writeback is not None
            await self._load(spooled.spool)
            return await self.writeback.read(spooled.spool, offset, size)
        if offset >= handle.entry.size or size <= 0:
            await trio.lowlevel.checkpoint()
            return b""
        return await handle.reader.read(offset, size)

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is None:
            spooled = self._spool_handles.pop(fh, None)
            if spooled is not None and self.writeback is not None:
                with trio.CancelScope(shield=True):
                    await self.writeback.leave(spooled.spool, writer=spooled.writer)
                return
            await trio.lowlevel.checkpoint()
            return
        # Shielded: a release interrupted by shutdown must still close the reader (prefetch tasks) and the file.
        with trio.CancelScope(shield=True):
            try:
                await handle.reader.aclose()
            finally:
                await handle.file.aclose()

    # --- writes (--rw; directfs.writeback has the model) ------------------------------------------------------------

    def _active_spool(self, path: str) -> Spool | None:
        return self.writeback.spool(path) if self.writeback is not None else None

    def _writable(self) -> tuple[WriteBack, Writable]:
        if self.writeback is None or self._store is None:
            raise ReadOnlyError()
        return self.writeback, self._store

    async def _store_call(self, path: str, call: Callable[[], Awaitable[T]]) -> T:
        """A change of the store (mkdir, unlink, rename, ...) under the metadata deadline."""
        self.counters["store_changes"] += 1
        with trio.move_on_after(self.settings.metadata_deadline_seconds):
            return await call()
        raise NamespaceTimeout("timed out changing the store", filename=path or "/")

    def _child(self, parent_inode: int, name: str) -> tuple[_Node, str]:
        parent = self._node(parent_inode)
        if not parent.entry.is_dir:
            raise NotADirectory(filename=parent.path or "/")
        if not valid_name(name):
            raise InvalidArgumentError(f"invalid name {name!r}", filename=parent.path or "/")
        return parent, join(parent.path, name)

    async def _exists(self, path: str) -> Entry | None:
        try:
            entry, _ = await self._resolve(path)
        except EntryNotFoundError:
            return None
        return entry

    def _listing_put(self, path: str, entry: Entry | None) -> None:
        """Keep the parent's cached listing true after our own change: ``entry`` at ``path``, or nothing there."""
        parent, _, name = path.rpartition("/")
        listing = self._listings.get(parent)
        if listing is None:
            return
        if listing.shared:  # an open directory handle iterates the old list: leave it as it was
            listing.entries = list(listing.entries)
            listing.shared = False
        old = listing.by_name.pop(name, None)
        if old is not None:
            listing.entries.remove(old)
        if entry is not None:
            listing.by_name[name] = entry
            listing.entries.append(entry)

    def _created(self, path: str, entry: Entry) -> _Node:
        """A name this mount made (create, mkdir): remembered, in its folder's listing, +1 kernel reference."""
        self._negative.pop(path, None)
        node = self._remember(path, entry, trio.current_time())
        node.lookups += 1
        self._listing_put(path, entry)
        return node

    def _removed(self, path: str) -> None:
        """``path`` is gone (unlink, rmdir, rename away): the inode stays for open handles, the name answers ENOENT."""
        inode = self._by_path.pop(path, None)
        if inode is not None and (node := self._nodes.get(inode)) is not None:
            node.expires_at = 0.0
        self._listings.pop(path, None)
        self._listing_put(path, None)
        self._modes.pop(path, None)
        self._negative[path] = trio.current_time() + self.settings.negative_ttl

    def _committed(self, spool: Spool, entry: Entry) -> None:
        """An upload landed (the write-back layer's hook): new opens read the new version; stale pages are dropped."""
        path = spool.path
        named = entry if entry.name == path.rpartition("/")[2] else _renamed(entry, path.rpartition("/")[2])
        self._negative.pop(path, None)
        self._remember(path, named, trio.current_time())
        self._listing_put(path, named)

    async def _load(self, spool: Spool) -> None:
        """Before an in-place update: read the old content into the spool through the read engine (cache,
        read-ahead), or refuse with EOPNOTSUPP above ``--write-max-size``."""
        if spool.loaded:
            await trio.lowlevel.checkpoint()
            return
        writeback, _ = self._writable()
        base = spool.base
        assert base is not None
        if base.size > writeback.settings.max_update_size_bytes:
            raise WriteNotSupportedError(
                f"changing {base.size} bytes in place needs them in the spool first; the limit is "
                f"--write-max-size {writeback.settings.max_update_size_bytes} (open with O_TRUNC to replace the file)",
                filename=spool.path,
            )
        file = await self._open_entry(spool.path, base)
        reader = self.engine.open(file, (spool.path, base.version))
        offset = 0

        async def chunk() -> bytes:
            nonlocal offset
            if offset >= base.size:
                return b""
            data = bytes(await reader.read(offset, min(_LOAD_CHUNK_BYTES, base.size - offset)))
            if not data:
                raise StaleFileError("the file got shorter while it was read for an update", filename=spool.path)
            offset += len(data)
            return data

        try:
            await writeback.load(spool, chunk)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await reader.aclose()
                finally:
                    await file.aclose()

    async def _open_writer(self, node: _Node, flags: int, *, created: bool = False) -> OpenAnswer:
        writeback, _ = self._writable()
        if node.entry.is_dir:
            raise IsADirectory(filename=node.path)
        spool = self._active_spool(node.path)
        if spool is None:
            node = await self._fresh_node(node, force=True)  # the version an update starts from must be current
            if node.entry.is_dir:
                raise IsADirectory(filename=node.path)
        base = None if created else (spool.base if spool is not None else node.entry)
        spool = await writeback.join(node.path, base, truncate=bool(flags & os.O_TRUNC))
        fh = next(self._next_fh)
        readable = flags & os.O_ACCMODE == os.O_RDWR
        self._spool_handles[fh] = _SpoolHandle(node.inode, spool, writer=True, readable=readable)
        self.counters["open"] += 1
        return OpenAnswer(fh, keep_cache=False, direct_io=True)

    def _writer(self, fh: int) -> _SpoolHandle:
        handle = self._spool_handles.get(fh)
        if handle is None or not handle.writer:
            if fh in self._files or handle is not None:
                raise InvalidArgumentError("the file is not open for writing")  # EBADF's nearest: the kernel checks
            raise StaleFileError("unknown file handle")
        return handle

    async def create(self, parent_inode: int, name: str, mode: int, flags: int) -> tuple[OpenAnswer, Attributes]:
        """Create and open a file (O_CREAT on a name the kernel found absent); +1 lookup on the new inode."""
        writeback, _ = self._writable()
        _, path = self._child(parent_inode, name)
        existing = await self._exists(path)
        if existing is not None:  # made elsewhere since the kernel looked
            if flags & os.O_EXCL:
                raise EntryExistsError(filename=path)
            node = self._remember(path, existing, trio.current_time())
            answer = await self._open_writer(node, flags)
            node.lookups += 1
            return answer, self._attributes(node)
        spool = await writeback.join(path, None, truncate=False)
        node = self._created(path, _spool_entry(spool))
        self._modes[path] = mode & 0o7777
        fh = next(self._next_fh)
        self._spool_handles[fh] = _SpoolHandle(
            node.inode, spool, writer=True, readable=flags & os.O_ACCMODE == os.O_RDWR
        )
        self.counters["open"] += 1
        return OpenAnswer(fh, keep_cache=False, direct_io=True), self._attributes(node)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._writer(fh)
        writeback, _ = self._writable()
        await self._load(handle.spool)
        return await writeback.write(handle.spool, offset, data)

    async def flush(self, fh: int) -> None:
        """close(2) of a handle: the last writer uploads now and answers with the upload's result."""
        handle = self._spool_handles.get(fh)
        if handle is None or not handle.writer or self.writeback is None:
            await trio.lowlevel.checkpoint()
            return
        spool = handle.spool
        if spool.writers == 1 and spool.dirty and not spool.unlinked:
            await self.writeback.commit(spool)
        elif spool.failed is not None:
            await self.writeback.commit(spool)  # raises the failure again: this close must not claim success
        else:
            await trio.lowlevel.checkpoint()

    async def fsync(self, fh: int) -> None:
        """fsync(2): upload now (any writer handle) and answer with the result."""
        handle = self._spool_handles.get(fh)
        if handle is None or not handle.writer or self.writeback is None:
            await trio.lowlevel.checkpoint()
            return
        if handle.spool.unlinked:
            await trio.lowlevel.checkpoint()
            return
        await self.writeback.commit(handle.spool)

    async def setattr(
        self,
        inode: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
    ) -> Attributes:
        """truncate/ftruncate, chmod, utimens (chown is accepted and not kept: no store keeps owners)."""
        writeback, store = self._writable()
        node = self._node(inode)
        if size is not None:
            if node.entry.is_dir:
                raise IsADirectory(filename=node.path)
            handle = self._spool_handles.get(fh) if fh is not None else None
            spool = handle.spool if handle is not None and handle.writer else self._active_spool(node.path)
            if spool is not None and spool.writers > 0:
                if size > 0:
                    await self._load(spool)
                await writeback.truncate(spool, size)
            else:  # truncate(2) of a file nobody writes: a write of its own, uploaded now
                answer = await self._open_writer(node, os.O_WRONLY | (os.O_TRUNC if size == 0 else 0))
                try:
                    own = self._spool_handles[answer.fh].spool
                    if size > 0:
                        await self._load(own)
                        await writeback.truncate(own, size)
                    await writeback.commit(own)
                finally:
                    await self.release(answer.fh)
        if mode is not None:
            self._modes[node.path] = mode & 0o7777
        if mtime_ns is not None:
            spool = self._active_spool(node.path)
            if spool is not None:
                spool.mtime_ns = spool.modified_ns = mtime_ns  # stored with the upload where the store keeps times
            elif node.inode != ROOT_INODE:
                path = node.path
                kept = await self._store_call(path, lambda: store.set_mtime(path, mtime_ns))
                if kept:
                    node.entry = _with_mtime(node.entry, mtime_ns)
        await trio.lowlevel.checkpoint()
        return self._attributes(node)

    async def mkdir(self, parent_inode: int, name: str, mode: int) -> Attributes:
        _, store = self._writable()
        _, path = self._child(parent_inode, name)
        if await self._exists(path) is not None:
            raise EntryExistsError(filename=path)
        entry = await self._store_call(path, lambda: store.make_dir(path))
        node = self._created(path, _renamed(entry, name) if entry.name != name else entry)
        self._modes[path] = mode & 0o7777
        return self._attributes(node)

    async def unlink(self, parent_inode: int, name: str) -> None:
        writeback, store = self._writable()
        _, path = self._child(parent_inode, name)
        spool = self._active_spool(path)
        async with spool.lock if spool is not None else contextlib.nullcontext():  # not under a running upload
            if spool is None or spool.base is not None:
                entry = await self._exists(path)
                if entry is None:
                    raise EntryNotFoundError(filename=path)
                if entry.is_dir:
                    raise IsADirectory(filename=path)
                await self._store_call(path, lambda: store.remove_file(path))
            writeback.unlink(path)
            self._removed(path)

    async def rmdir(self, parent_inode: int, name: str) -> None:
        writeback, store = self._writable()
        _, path = self._child(parent_inode, name)
        entry = await self._exists(path)
        if entry is None:
            raise EntryNotFoundError(filename=path)
        if not entry.is_dir:
            raise NotADirectory(filename=path)
        if writeback.spools_below(path):
            raise DirectoryNotEmptyError("files in it are being written", filename=path)
        await self._store_call(path, lambda: store.remove_dir(path))
        self._removed(path)

    async def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int = 0) -> None:
        writeback, store = self._writable()
        if flags & RENAME_EXCHANGE:
            raise InvalidArgumentError("RENAME_EXCHANGE is not supported")
        _, old = self._child(old_parent, old_name)
        _, new = self._child(new_parent, new_name)
        if old == new:
            await trio.lowlevel.checkpoint()
            return
        if new.startswith(old + "/"):
            raise InvalidArgumentError("cannot move a folder into itself", filename=old)
        spool = self._active_spool(old)
        only_spooled = spool is not None and spool.base is None
        entry = _spool_entry(spool) if spool is not None and only_spooled else await self._exists(old)
        if entry is None:
            raise EntryNotFoundError(filename=old)
        target = await self._exists(new)
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise EntryExistsError(filename=new)
            if target.is_dir and not entry.is_dir:
                raise IsADirectory(filename=new)
            if entry.is_dir and not target.is_dir:
                raise NotADirectory(filename=new)
        if entry.is_dir and not store.write_features.folder_rename:
            raise CrossDeviceError("this store cannot rename folders (mv copies instead)", filename=old)
        # Not under a running upload of this file: it would land at the old name after the move.
        async with spool.lock if spool is not None else contextlib.nullcontext():
            only_spooled = spool is not None and spool.base is None
            if not only_spooled:
                await self._store_call(old, lambda: store.rename(old, new, is_dir=entry.is_dir))
            writeback.rename(old, new)
            self._move(old, new, entry)

    def _move(self, old: str, new: str, entry: Entry) -> None:
        """The inode table and caches after ``old`` became ``new`` (and, for a folder, everything below it)."""
        replaced = self._by_path.pop(new, None)
        if replaced is not None and (gone := self._nodes.get(replaced)) is not None:
            gone.expires_at = 0.0
        moves = [(old, self._by_path.pop(old, None))]
        if entry.is_dir:
            prefix = old + "/"
            moves += [(p, self._by_path.pop(p)) for p in [p for p in self._by_path if p.startswith(prefix)]]
            for cached in [p for p in self._listings if p == old or p.startswith(prefix)]:
                self._listings.pop(cached, None)
        name = new.rpartition("/")[2]
        moved = _renamed(entry, name)
        for path, inode in moves:
            if inode is None:
                continue
            node = self._nodes.get(inode)
            if node is None:
                continue
            node.path = new + path[len(old) :]
            if path == old:
                node.entry = moved
            self._by_path[node.path] = inode
        for path in [p for p in self._modes if p == old or p.startswith(old + "/")]:
            self._modes[new + path[len(old) :]] = self._modes.pop(path)
        self._listing_put(old, None)
        self._listing_put(new, moved)
        self._negative.pop(new, None)
        self._negative[old] = trio.current_time() + self.settings.negative_ttl

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
        """Read-only mounts: every write-class operation (write, create, mkdir, unlink, rename, setattr, setxattr...).
        ``--rw`` mounts: what no store here can keep (symlinks, hard links, special files, extended attributes)."""
        if self.writeback is None:
            raise ReadOnlyError()
        raise WriteNotSupportedError("the store keeps no symlinks, hard links, special files or extended attributes")


def _spool_entry(spool: Spool) -> Entry:
    """What a new file still in its spool looks like (no store version yet)."""
    return Entry(
        name=spool.path.rpartition("/")[2],
        is_dir=False,
        size=spool.size,
        mtime_ns=spool.modified_ns,
        version=f"spool:{spool.id}",
    )


def _renamed(entry: Entry, name: str) -> Entry:
    return Entry(name, entry.is_dir, entry.size, entry.mtime_ns, entry.version, entry.file_id, entry.xattrs)


def _with_mtime(entry: Entry, mtime_ns: int) -> Entry:
    return Entry(entry.name, entry.is_dir, entry.size, mtime_ns, entry.version, entry.file_id, entry.xattrs)


__all__ = [
    "BLKSIZE_BYTES",
    "FILEID_XATTR",
    "ROOT_INODE",
    "Attributes",
    "FileReader",
    "FileSystem",
    "OpenAnswer",
    "ReadEngineLike",
    "StatFs",
    "VfsSettings",
]
