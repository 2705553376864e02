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

Change feed (a source with ``ChangeFeed``: CTERA; the follower is ``directfs.sources.ctera.feed``)
    The filesystem is the feed's ``ChangeSink``. While the feed is up, an answer is trusted for
    ``metadata_ttl_with_feed_seconds`` (1 h) instead of the short TTL, and the kernel gets that long entry/attr
    timeout too, when three things hold: it *started* after the feed's current cursor chain was caught up (its
    ``_Stamp.epoch`` is the current epoch), nothing invalidated its path or its folder while it ran
    (``_Stamp.generation`` against ``_touched``), and the change feed can name it (the entry's ``guid`` is known; a
    listing's folder's guid, a negative answer's parent's guid). Anything else keeps the short TTL, as without a
    feed.

    - ``apply_changes``: each event is placed by guid (``_guid_paths``, learnt from every PROPFIND answer) and by
      ``parent_guid`` + ``name``; the entry's attributes, its negative entry and its parent's listing are dropped,
      at the old place and the new one for a rename or move, for the whole subtree when a folder moves or goes. The
      kernel's dentry (``EntryNote``) and attributes (``AttrNote``) are queued for ``fuse_ops.drain_invalidations``;
      cached pages go when the refreshed entry shows a new version (see Versions). An event naming only unknown
      guids touches nothing: nothing of it is cached.
    - ``feed_down``: the short TTL applies again at once (the same records, judged by their short expiry), and every
      long timeout handed to the kernel (nodes marked ``kernel_long``, ``_kernel_negatives``) is invalidated, since
      the kernel would otherwise keep them for up to an hour. ``feed_up(new_cursor=False)`` (the feed resumed its old
      cursor and missed nothing): records of the same epoch are trusted again.
    - ``feed_reset`` (the cursor was refused, so changes may have been missed): every cache is dropped, the epoch
      ends, the kernel's long timeouts are invalidated; ``feed_up(new_cursor=True)`` begins a new epoch.
    - A guid seen at a new path (a rename learnt from a PROPFIND before its event) invalidates its old place.
    - An event whose state every cache record already shows (same guid, file id, size, mtime to the second: our own
      --rw change coming back) drops nothing. That is safe because the kernel is told whenever the cache learns a
      change before its event: a node handed out long whose entry changes (``AttrNote``), a long negative dentry
      whose name a new answer shows (``EntryNote``).

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
    - Who changes what: FUSE handlers fill the caches and the inode table; the feed's task (the only caller of the
      ``ChangeSink`` methods, all synchronous) drops cache records, ends epochs and queues kernel notes; the drain task
      (``fuse_ops.drain_invalidations``) only reads the notes channel. Nobody else writes here.
    - An invalidation racing a store call: the call's ``_Stamp`` is taken before its first await (by the
      single-flight leader, whose answer its followers share); an event that touches its path, its folder or a guid
      in its answer meanwhile bumps ``_touched``/``_touched_guids`` past the stamp's generation, and the answer is
      then returned to its caller but stored already expired (kernel timeout 0), never with the long TTL. The
      touch records are kept while a stamp older than them is alive (``_live``: store calls in flight, open folder
      handles) and pruned after; past ``MAX_TOUCHED`` they are dropped all at once and every live stamp counts as
      raced (``_floor``).
    - Store calls for the same path are single-flight (``_SingleFlight``): N concurrent lookups of one name cost one
      ``stat``; a cancelled leader lets its followers retry instead of failing them.
    - Every store call has a deadline (``metadata_deadline_seconds``); overrunning it is ``NamespaceTimeout``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, NamedTuple, NoReturn, Protocol, TypeVar

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
from .sources.base import ChangeEvent, Entry, OpenFile, Source, Writable, join, valid_name
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
    # 1 h while the change feed is up: a remote change is invalidated by its event within about a second whatever
    # this says, so it only bounds what one missed event could cost; a find/ls -lR repeated within the hour sends no
    # PROPFIND. The kernel's entry/attr timeouts follow it, and feed loss invalidates them (see the module docstring).
    metadata_ttl_with_feed_seconds: float = 3600.0
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
    # Extended attributes answered (user.ctera.fileid, user.etag): on, since scripts read ids with getfattr. Off,
    # fuse_ops answers getxattr/listxattr ENOSYS and the kernel stops sending them (ls -l probes two per entry).
    xattrs: bool = True

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
class Absent:
    """A lookup's "no such name", with how long the kernel may cache that."""

    ttl_seconds: float


class EntryNote(NamedTuple):
    """Kernel note: forget the dentry ``name`` in folder ``parent_inode`` (positive or negative): pyfuse3
    ``invalidate_entry``."""

    parent_inode: int
    name: str


class AttrNote(NamedTuple):
    """Kernel note: forget the cached attributes of ``inode`` (not its pages): ``invalidate_inode(attr_only=True)``."""

    inode: int


# What ``FileSystem.invalidation_requests`` carries: a bare inode is "drop its attributes and cached pages" (a file
# whose content changed); the notes above are the change feed's.
KernelInvalidation = int | EntryNote | AttrNote


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


class _Stamp(NamedTuple):
    """Where an answer comes from: when its store call started, the feed epoch and the invalidation generation then."""

    at: float
    epoch: int | None
    generation: int


class _Node:
    __slots__ = (
        "entry",
        "epoch",
        "expires_at",
        "fetched_at",
        "inode",
        "kernel_long",
        "lookups",
        "path",
        "served_version",
    )

    def __init__(
        self, inode: int, path: str, entry: Entry, fetched_at: float, expires_at: float, epoch: int | None = None
    ) -> None:
        self.inode = inode
        self.path = path
        self.entry = entry
        self.fetched_at = fetched_at
        self.expires_at = expires_at  # the short TTL's expiry; 0.0 = ask the store again
        self.epoch = epoch  # the feed epoch it is trusted under (long TTL); None = not trusted long
        self.kernel_long = False  # the kernel was given the long timeout for it (feed loss must invalidate it)
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
    epoch: int | None = None  # trusted long under this feed epoch (None: the short TTL only)
    generation: int = 0  # the invalidation generation when its store call started

    @property
    def stamp(self) -> _Stamp:
        return _Stamp(self.fetched_at, self.epoch, self.generation)


class _Absent(NamedTuple):
    """A negative cache record: the short expiry, when it was learnt, the epoch it is trusted long under."""

    expires_at: float
    at: float
    epoch: int | None


@dataclass
class _DirHandle:
    path: str
    entries: list[Entry]  # snapshot taken at opendir: readdir offsets index into it, so they stay stable
    fetched_at: float
    stamp: _Stamp  # the listing's: its entries are remembered as of then (and it keeps touch records alive)


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

# Touch records (paths and guids invalidated, by generation) kept at most; past it they are dropped at once and every
# store call in flight counts as raced (its answer is not kept long). 100,000 records are ~15 MB; pruning (records
# no live stamp is older than) keeps far fewer unless a folder handle stays open for hours.
MAX_TOUCHED: Final = 100_000
# Long negative dentries handed to the kernel that feed loss can invalidate; past it, negatives get the short TTL.
MAX_KERNEL_NEGATIVES: Final = 100_000

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
        self._negative: cachetools.LRUCache[str, _Absent] = cachetools.LRUCache(
            maxsize=self.settings.negative_cache_names
        )
        self._stat_flights: _SingleFlight[tuple[Entry, _Stamp]] = _SingleFlight()
        self._list_flights: _SingleFlight[_Listing] = _SingleFlight()
        # Unbounded on purpose: one item per remote change we notice, and dropping one would leave stale pages.
        send, receive = trio.open_memory_channel[KernelInvalidation](math.inf)
        self._invalidate_send = send
        self.invalidation_requests: trio.MemoryReceiveChannel[KernelInvalidation] = receive
        self.counters: dict[str, int] = {
            "stat": 0,
            "list": 0,
            "open": 0,
            "invalidations": 0,
            "store_changes": 0,
            "feed_invalidations": 0,  # cache records dropped for change-feed events
            "kernel_notes": 0,  # dentry/attribute invalidations queued for the kernel
        }
        # --- the change feed (module docstring "Change feed"); written only by the ChangeSink methods and the
        # store-call bookkeeping below, all synchronous code on the trio thread.
        self._feed_epoch: int | None = None  # the cursor chain answers are stamped with; None: none yet
        self._feed_healthy = False  # the feed is up: answers of the current epoch are trusted long
        self._epochs = itertools.count(1)
        self._generation = 0  # bumped by every invalidation
        self._floor = 0  # a path or guid without a touch record counts as touched at this generation
        self._touched: dict[str, int] = {}  # path -> generation of its last invalidation
        self._touched_guids: dict[str, int] = {}  # guid -> generation of its last event
        self._prune_at = 1024
        self._live: collections.Counter[int] = collections.Counter()  # generations of stamps still in use
        self._guid_paths: dict[str, str] = {}  # guid -> the path it was last seen at (PROPFIND answers, events)
        self._guid_gc_at = 4096
        self._kernel_negatives: dict[tuple[int, str], float] = {}  # long negative dentries -> their expiry

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Stat the root so a wrong URL or credentials fail the mount before it goes live."""
        entry, stamp = await self._stat("")
        if not entry.is_dir:
            raise NotADirectory("the source root is not a folder", filename="/")
        root = _Node(ROOT_INODE, "", entry, stamp.at, stamp.at + self.settings.metadata_ttl_seconds)
        root.lookups = 1  # the kernel holds the root from mount to unmount
        self._nodes[ROOT_INODE] = root
        self._by_path[""] = ROOT_INODE
        if entry.guid is not None:
            self._guid_paths[entry.guid] = ""

    async def refresh_root(self) -> None:
        """Ask the store for the root again, so that its answer is stamped under the feed (``--change-feed on``: the
        feed comes up after ``start``'s stat, which therefore is never trusted long)."""
        await self._fresh_node(self._nodes[ROOT_INODE], force=True)

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
        for dir_handle in self._dirs.values():
            self._end(dir_handle.stamp)
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
            "guids_known": len(self._guid_paths),
            "feed_trusted": int(self._feed_healthy),
        }

    # --- store calls (deadline + single-flight) ------------------------------------------------------------------

    async def _stat(self, path: str) -> tuple[Entry, _Stamp]:
        """The store's entry at ``path`` and the stamp of the call that fetched it (the single-flight leader's, so a
        follower never dates an older answer later). An absent name is remembered here, by the leader."""

        async def call() -> tuple[Entry, _Stamp]:
            self.counters["stat"] += 1
            stamp = self._begin()
            try:
                with trio.move_on_after(self.settings.metadata_deadline_seconds):
                    try:
                        return await self.source.stat(path), stamp
                    except EntryNotFoundError:
                        self._remember_absent(path, stamp)
                        raise
                raise NamespaceTimeout(filename=path or "/")
            finally:
                self._end(stamp)

        return await self._stat_flights.run(path, call)

    async def _list(self, path: str) -> _Listing:
        async def call() -> _Listing:
            self.counters["list"] += 1
            stamp = self._begin()
            try:
                return await fetch(stamp)
            finally:
                self._end(stamp)

        async def fetch(stamp: _Stamp) -> _Listing:
            entries: list[Entry] = []
            by_name: dict[str, Entry] = {}
            iterator = aiter(self.source.list_dir(path))
            deadline_seconds = self.settings.metadata_deadline_seconds
            # The deadline is on progress: each entry moves it on, so a huge folder may take as long as it keeps
            # coming (the sources pace their bodies) and a stall is cut. One scope for the listing: a scope per entry
            # cost 12% of a listing's CPU and left a million stale deadlines in trio's heap.
            try:
                with trio.move_on_after(deadline_seconds) as scope:
                    while True:
                        try:
                            entry = await anext(iterator)
                        except StopAsyncIteration:
                            break
                        scope.deadline = trio.current_time() + deadline_seconds
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
            if scope.cancelled_caught:
                raise NamespaceTimeout(f"listing stalled after {len(entries)} entries", filename=path or "/")
            if self.writeback is not None:
                for spool in self.writeback.spools_below(path):
                    parent, _, name = spool.path.rpartition("/")
                    if parent == path and spool.base is None and name not in by_name:
                        by_name[name] = _spool_entry(spool)
                        entries.append(by_name[name])
            raced = self._raced(path, stamp, entries)
            expires_at = 0.0 if raced else stamp.at + self.settings.metadata_ttl_seconds
            epoch = stamp.epoch if not raced and self._folder_named(path) else None
            listing = _Listing(entries, by_name, stamp.at, expires_at, epoch=epoch, generation=stamp.generation)
            if not raced:
                for entry in entries:
                    if entry.guid is not None:
                        self._learn_guid(entry.guid, join(path, entry.name))
                    if self._kernel_negatives:
                        self._kernel_negative_gone(path, entry.name)
                if _listing_size(listing) <= self.settings.listing_cache_entries:
                    self._listings[path] = listing
            return listing

        return await self._list_flights.run(path, call)

    # --- metadata cache ------------------------------------------------------------------------------------------

    def _fresh(self, expires_at: float, epoch: int | None, at: float) -> bool:
        """Whether a cache record may answer now: within its short expiry, or trusted under the live feed epoch and
        within the long TTL."""
        now = trio.current_time()
        return now < expires_at or (self._trusted(epoch) and now < at + self.settings.metadata_ttl_with_feed_seconds)

    def _trusted(self, epoch: int | None) -> bool:
        return epoch is not None and self._feed_healthy and epoch == self._feed_epoch

    def _fresh_listing(self, path: str) -> _Listing | None:
        listing = self._listings.get(path)
        if listing is not None and self._fresh(listing.expires_at, listing.epoch, listing.fetched_at):
            return listing
        return None

    def _absent_record(self, path: str) -> _Absent | None:
        """The negative record of ``path`` while it holds (an expired one is dropped)."""
        record = self._negative.get(path)
        if record is None:
            return None
        if self._fresh(record.expires_at, record.epoch, record.at):
            return record
        self._negative.pop(path, None)
        return None

    async def _resolve(self, path: str) -> tuple[Entry, _Stamp]:
        """The entry at ``path`` and the stamp of the answer, from the caches when fresh, else from the store (a new
        file still in its spool: the spool's, never trusted long)."""
        spool = self._active_spool(path)
        if spool is not None and spool.base is None:
            await trio.lowlevel.checkpoint()
            return _spool_entry(spool), _Stamp(trio.current_time(), None, self._generation)
        if self._absent_record(path) is not None:
            raise EntryNotFoundError(filename=path)
        if path:
            parent, _, name = path.rpartition("/")
            listing = self._fresh_listing(parent)
            if listing is not None:
                found = listing.by_name.get(name)
                if found is None:
                    raise EntryNotFoundError(filename=path)
                return found, listing.stamp
        return await self._stat(path)

    def _remember_absent(self, path: str, stamp: _Stamp) -> None:
        """The store said ``path`` does not exist (answer stamped ``stamp``)."""
        raced = self._raced(path, stamp, parent=True)
        parent = path.rpartition("/")[0] if path else None
        named = parent is not None and self._folder_named(parent)
        self._negative[path] = _Absent(
            0.0 if raced else stamp.at + self.settings.negative_ttl,
            stamp.at,
            stamp.epoch if named and not raced else None,
        )

    def _remember(self, path: str, entry: Entry, stamp: _Stamp | float) -> _Node:
        """Record what the store said about ``path`` (an answer stamped ``stamp``; a bare time: our own change, known
        then); returns the (possibly new) inode for it. An answer raced by an invalidation is kept already expired."""
        if not isinstance(stamp, _Stamp):
            stamp = _Stamp(stamp, self._feed_epoch, self._generation)
        inode = self._by_path.get(path)
        node = self._nodes.get(inode) if inode is not None else None
        if (
            node is not None
            and node.entry is entry
            and node.fetched_at == stamp.at
            and stamp.generation == self._generation
        ):
            # This very answer is what the node holds already (readdir of the same snapshot) and nothing was
            # invalidated since it was taken: everything below was done when it was first remembered.
            return node
        self._negative.pop(path, None)
        fetched_at = stamp.at
        raced = self._raced(path, stamp, (entry,), parent=True)
        expires_at = 0.0 if raced else fetched_at + self.settings.metadata_ttl_seconds
        epoch = stamp.epoch if entry.guid is not None and not raced else None
        if entry.guid is not None and not raced:
            self._learn_guid(entry.guid, path)
        if self._kernel_negatives and path:
            self._kernel_negative_gone(path.rpartition("/")[0], path.rpartition("/")[2])
        if node is not None and node.entry.is_dir != entry.is_dir:
            # A file became a folder (or back): the kernel must never see an inode change type. Detach the old inode
            # (it answers ESTALE until forgotten) and give the path a new one.
            del self._by_path[path]
            node = None
        if node is None:
            node = _Node(next(self._next_inode), path, entry, fetched_at, expires_at, epoch)
            self._nodes[node.inode] = node
            self._by_path[path] = node.inode
            return node
        if fetched_at < node.fetched_at:
            return node  # an older snapshot (a long readdir) must not roll back a newer answer
        if node.kernel_long and _shown(node.entry) != _shown(entry):
            # The kernel holds the old attributes for the long TTL: it must ask again (its event may already be
            # applied, or be skipped as "already shown" when it comes: apply_changes).
            node.kernel_long = False
            self._note(AttrNote(node.inode))
        if node.entry.version != entry.version and not entry.is_dir:
            log.info("%r changed on the server (version %s -> %s)", path, node.entry.version, entry.version)
            if node.served_version is not None and node.served_version != entry.version:
                self.counters["invalidations"] += 1
                self._invalidate_send.send_nowait(node.inode)
        node.entry = entry
        node.fetched_at = fetched_at
        node.expires_at = expires_at
        node.epoch = epoch
        return node

    def _kernel_negative_gone(self, folder: str, name: str) -> None:
        """``name`` exists in ``folder`` after all: a long negative dentry the kernel holds for it must go."""
        parent = self._by_path.get(folder)
        if parent is not None and self._kernel_negatives.pop((parent, name), None) is not None:
            self._note(EntryNote(parent, name))

    def _node(self, inode: int) -> _Node:
        node = self._nodes.get(inode)
        if node is None:
            raise StaleFileError("unknown inode", filename=str(inode))
        return node

    async def _fresh_node(self, node: _Node, *, force: bool = False) -> _Node:
        """``node`` with an entry no older than the TTL (re-asking the store when expired or ``force``)."""
        if not force and self._fresh(node.expires_at, node.epoch, node.fetched_at):
            return node
        if self._active_spool(node.path) is not None:
            return node  # being written here: the store has nothing newer to say until the upload lands
        if force:
            self._negative.pop(node.path, None)
            self._listings.pop(node.path.rpartition("/")[0] if node.path else "", None)
        entry, stamp = await self._resolve(node.path)
        if node.inode == ROOT_INODE and not entry.is_dir:
            raise NotADirectory("the source root is no longer a folder", filename="/")
        current = self._remember(node.path, entry, stamp)
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
            ttl_seconds=self._kernel_ttl(node),
        )

    def _kernel_ttl(self, node: _Node) -> float:
        """The entry/attr timeout handed to the kernel with ``node``'s attributes: what is left of the long TTL while
        the feed vouches for it (marked ``kernel_long``: feed loss invalidates it), 0 for an answer an invalidation
        raced (the kernel asks again), else the short TTL, as without a feed."""
        if self._trusted(node.epoch):
            left = node.fetched_at + self.settings.metadata_ttl_with_feed_seconds - trio.current_time()
            if left > self.settings.metadata_ttl_seconds:
                node.kernel_long = True
                return left
        if node.expires_at == 0.0:
            return 0.0
        return self.settings.metadata_ttl_seconds

    # --- namespace operations ------------------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: str) -> Attributes:
        """Resolve ``name`` in a folder; +1 on the inode's lookup count (the kernel will ``forget`` it)."""
        parent = self._node(parent_inode)
        if not parent.entry.is_dir:
            raise NotADirectory(filename=parent.path or "/")
        if not valid_name(name):
            raise EntryNotFoundError(filename=join(parent.path, name))
        path = join(parent.path, name)
        entry, stamp = await self._resolve(path)
        node = self._remember(path, entry, stamp)
        node.lookups += 1
        return self._attributes(node)

    async def lookup_or_absent(self, parent_inode: int, name: str) -> Attributes | Absent:
        """``lookup``, with an absent name answered as ``Absent`` and how long the kernel may cache the miss: the long
        TTL while the feed vouches for the miss (recorded in ``_kernel_negatives``, so feed loss can invalidate it),
        else the negative TTL."""
        try:
            return await self.lookup(parent_inode, name)
        except EntryNotFoundError:
            parent = self._nodes.get(parent_inode)
            if parent is None:
                raise
            return Absent(self._negative_kernel_ttl(parent, name))

    def _negative_kernel_ttl(self, parent: _Node, name: str) -> float:
        path = join(parent.path, name)
        now = trio.current_time()
        at: float | None = None
        record = self._negative.get(path)
        if record is not None and self._trusted(record.epoch):
            at = record.at
        else:
            listing = self._listings.get(parent.path)
            if listing is not None and self._trusted(listing.epoch) and name not in listing.by_name:
                at = listing.fetched_at
        short = self.settings.negative_ttl
        full = len(self._kernel_negatives) >= MAX_KERNEL_NEGATIVES
        if at is None or (full and not self._prune_kernel_negatives()):
            return short
        left = at + self.settings.metadata_ttl_with_feed_seconds - now
        if left <= short:
            return short
        self._kernel_negatives[(parent.inode, name)] = now + left
        return left

    def _prune_kernel_negatives(self) -> bool:
        """Drop the records of long negatives the kernel has let go of; True when there is room again."""
        now = trio.current_time()
        for key in [key for key, expiry in self._kernel_negatives.items() if expiry <= now]:
            del self._kernel_negatives[key]
        return len(self._kernel_negatives) < MAX_KERNEL_NEGATIVES

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
        stamp = listing.stamp
        self._live[stamp.generation] += 1  # its entries are remembered later: keep the touch records it needs
        self._dirs[fh] = _DirHandle(node.path, listing.entries, listing.fetched_at, stamp)
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
            node = self._remember(path, entry, handle.stamp)
            if not emit(entry.name, self._attributes(node), index + 1):
                if node.lookups == 0:
                    self.forget([(node.inode, 0)])
                return
            node.lookups += 1

    def releasedir(self, fh: int) -> None:
        handle = self._dirs.pop(fh, None)
        if handle is not None:
            self._end(handle.stamp)

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
            _expire(node)
        self._listings.pop(path, None)
        self._listing_put(path, None)
        self._modes.pop(path, None)
        self._remember_absent(path, _Stamp(trio.current_time(), self._feed_epoch, self._generation))

    def _committed(self, spool: Spool, entry: Entry) -> None:
        """An upload landed (the write-back layer's hook): new opens read the new version; stale pages are dropped."""
        path = spool.path
        named = dataclasses.replace(entry, name=path.rpartition("/")[2])  # the name it has here (a renamed spool)
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
                    node.entry = dataclasses.replace(node.entry, mtime_ns=mtime_ns)
        await trio.lowlevel.checkpoint()
        return self._attributes(node)

    async def mkdir(self, parent_inode: int, name: str, mode: int) -> Attributes:
        _, store = self._writable()
        _, path = self._child(parent_inode, name)
        if await self._exists(path) is not None:
            raise EntryExistsError(filename=path)
        entry = await self._store_call(path, lambda: store.make_dir(path))
        node = self._created(path, dataclasses.replace(entry, name=name))
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
            _expire(gone)
        moves = [(old, self._by_path.pop(old, None))]
        if entry.is_dir:
            moves += [(p, self._by_path.pop(p)) for p in [p for p in self._by_path if _below(p, old)]]
            for cached in [p for p in self._listings if p == old or _below(p, old)]:
                self._listings.pop(cached, None)
        name = new.rpartition("/")[2]
        moved = dataclasses.replace(entry, name=name)
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
            if node.entry.guid is not None:
                self._guid_paths[node.entry.guid] = node.path  # the feed's events for it name the new place
        for path in [p for p in self._modes if p == old or p.startswith(old + "/")]:
            self._modes[new + path[len(old) :]] = self._modes.pop(path)
        self._listing_put(old, None)
        self._listing_put(new, moved)
        self._negative.pop(new, None)
        self._remember_absent(old, _Stamp(trio.current_time(), self._feed_epoch, self._generation))

    # --- the change feed (ChangeSink; module docstring "Change feed") ---------------------------------------------

    def _begin(self) -> _Stamp:
        """The stamp of a store call starting now; ``_end`` it when the call is over."""
        stamp = _Stamp(trio.current_time(), self._feed_epoch, self._generation)
        self._live[stamp.generation] += 1
        return stamp

    def _end(self, stamp: _Stamp) -> None:
        left = self._live[stamp.generation] - 1
        if left > 0:
            self._live[stamp.generation] = left
        else:
            del self._live[stamp.generation]

    def _raced(self, path: str, stamp: _Stamp, entries: Iterable[Entry] = (), *, parent: bool = False) -> bool:
        """Whether something invalidated ``path`` (and with ``parent`` its folder), or one of the guids of
        ``entries``, after the call stamped ``stamp`` began."""
        generation = stamp.generation
        if self._touched.get(path, self._floor) > generation:
            return True
        if parent and path and self._touched.get(path.rpartition("/")[0], self._floor) > generation:
            return True
        if self._touched_guids:
            for entry in entries:
                if entry.guid is not None and self._touched_guids.get(entry.guid, self._floor) > generation:
                    return True
        elif self._floor > generation:
            return True
        return False

    def _touch(self, path: str | None = None, guid: str | None = None) -> None:
        self._generation += 1
        if path is not None:
            self._touched[path] = self._generation
        if guid is not None:
            self._touched_guids[guid] = self._generation
        if len(self._touched) + len(self._touched_guids) > self._prune_at:
            self._prune_touched()

    def _prune_touched(self) -> None:
        """Forget touch records no live stamp is older than; past ``MAX_TOUCHED`` forget them all and raise the
        floor, so every live stamp counts as raced."""
        oldest = min(self._live, default=None)
        if oldest is None:
            self._touched.clear()
            self._touched_guids.clear()
        else:
            self._touched = {k: g for k, g in self._touched.items() if g > oldest}
            self._touched_guids = {k: g for k, g in self._touched_guids.items() if g > oldest}
        if len(self._touched) + len(self._touched_guids) > MAX_TOUCHED:
            self._touch_everything()
        self._prune_at = max(1024, 2 * (len(self._touched) + len(self._touched_guids)))

    def _touch_everything(self) -> None:
        self._generation += 1
        self._floor = self._generation
        self._touched.clear()
        self._touched_guids.clear()

    def _folder_named(self, path: str) -> bool:
        """Whether events can name the folder ``path`` (its guid is known to be there): its listing and the absent
        names in it may then be trusted long."""
        inode = self._by_path.get(path)
        node = self._nodes.get(inode) if inode is not None else None
        guid = node.entry.guid if node is not None else None
        return guid is not None and self._guid_paths.get(guid) == path

    def _learn_guid(self, guid: str, path: str) -> None:
        """``guid`` is at ``path`` now (a store answer no invalidation raced). Seen elsewhere before: it was renamed
        or moved, and its old place is dropped now, before its event comes."""
        old = self._guid_paths.get(guid)
        if old == path:
            return
        self._guid_paths[guid] = path
        if old is not None:
            self.counters["feed_invalidations"] += self._invalidate(old, subtree=self._cached_dir(old))
        if len(self._guid_paths) > self._guid_gc_at:
            self._collect_guids()

    def _collect_guids(self) -> None:
        """Rebuild ``_guid_paths`` from what is cached (nodes and listings): guids of evicted listings go. What stays
        covers every record the feed must be able to reach."""
        known: dict[str, str] = {}
        for node in self._nodes.values():
            if node.entry.guid is not None and self._by_path.get(node.path) == node.inode:
                known[node.entry.guid] = node.path
        for folder, listing in self._listings.items():
            for entry in listing.entries:
                if entry.guid is not None:
                    known.setdefault(entry.guid, join(folder, entry.name))
        self._guid_paths = known
        self._guid_gc_at = max(4096, 2 * len(known))

    def _cached_dir(self, path: str) -> bool:
        inode = self._by_path.get(path)
        node = self._nodes.get(inode) if inode is not None else None
        return (node is not None and node.entry.is_dir) or path in self._listings

    def _note(self, note: KernelInvalidation) -> None:
        self.counters["kernel_notes"] += 1
        with contextlib.suppress(trio.ClosedResourceError):  # unmounting: the kernel forgets everything anyway
            self._invalidate_send.send_nowait(note)

    def _kernel_forget(self, node: _Node) -> None:
        """Queue the kernel's forgetting of ``node``'s dentry (in its folder) and of its attributes."""
        if node.inode != ROOT_INODE and self._by_path.get(node.path) == node.inode:
            folder, _, name = node.path.rpartition("/")
            parent = self._by_path.get(folder)
            if parent is not None:
                self._note(EntryNote(parent, name))
        self._note(AttrNote(node.inode))

    def _invalidate(self, path: str, *, subtree: bool = False) -> int:
        """Drop what is cached about ``path`` here and in the kernel: its attributes, its negative entry, its folder's
        listing and its dentry there; with ``subtree`` (a folder that moved or went) everything below it too. Returns
        how many cache records were dropped."""
        dropped = 0
        folder = path.rpartition("/")[0] if path else None
        self._touch(path)
        if folder is not None:
            self._touch(folder)
        inode = self._by_path.get(path)
        node = self._nodes.get(inode) if inode is not None else None
        if node is not None:
            if node.expires_at or node.epoch is not None:
                dropped += 1
            _expire(node)
            node.kernel_long = False
            self._note(AttrNote(node.inode))
        if self._negative.pop(path, None) is not None:
            dropped += 1
        if folder is not None:
            if self._listings.pop(folder, None) is not None:
                dropped += 1
            parent = self._by_path.get(folder)
            if parent is not None:
                name = path.rpartition("/")[2]
                self._kernel_negatives.pop((parent, name), None)
                self._note(EntryNote(parent, name))  # the kernel's dentry of it, positive or negative
        if subtree:
            dropped += self._sweep({path})
        return dropped

    def _sweep(self, folders: set[str]) -> int:
        """Drop everything cached below ``folders`` (folders that moved or went) in one pass over the caches, however
        many folders: a moved tree's events name each of its folders, and one pass each would cost O(cache x
        folders). Returns how many cache records were dropped."""
        tops = {f for f in folders if not any(_below(f, other) for other in folders if other != f)}
        if not tops:
            return 0
        self._touch_everything()  # whatever is being fetched below them now is raced

        def inside(path: str) -> bool:
            return any(path == top or _below(path, top) for top in tops)

        dropped = 0
        for key in [key for key in self._listings if inside(key)]:
            self._listings.pop(key, None)
            dropped += 1
        for key in [key for key in self._negative if inside(key)]:
            self._negative.pop(key, None)
            dropped += 1
        below = {inode for p, inode in self._by_path.items() if p not in tops and inside(p)}
        for inode in below:
            if (child := self._nodes.get(inode)) is not None:
                _expire(child)
                child.kernel_long = False
                dropped += 1
                self._note(AttrNote(inode))  # the folder's dentry going drops the dentries below it
        for dentry in [dentry for dentry in self._kernel_negatives if dentry[0] in below]:
            del self._kernel_negatives[dentry]
        return dropped

    def _already_shown(self, event: ChangeEvent, path: str) -> bool:
        """Whether every cache record of ``path`` already shows the state ``event`` reports (our own upload, mkdir or
        PROPPATCH coming back through the feed, or a repeated event): the same guid, kind, file id and size, and the
        same mtime to the second (all PROPFIND has). Then there is nothing to drop, and a ``tar -x`` through a --rw
        mount does not lose its folder's listing to the events of its own files."""
        if event.deleted or event.size is None or event.mtime_ns is None:
            return False
        if not event.is_dir and event.file_id is None:
            return False
        shown: list[Entry] = []
        inode = self._by_path.get(path)
        node = self._nodes.get(inode) if inode is not None else None
        if node is not None and (node.expires_at or node.epoch is not None):
            shown.append(node.entry)
        folder, _, name = path.rpartition("/")
        listing = self._listings.get(folder) if path else None
        if listing is not None and (entry := listing.by_name.get(name)) is not None:
            shown.append(entry)
        elif listing is not None:
            return False  # the listing does not show it at all
        return bool(shown) and all(
            entry.guid == event.guid
            and entry.is_dir == event.is_dir
            and (entry.is_dir or (entry.file_id == event.file_id and entry.size == event.size))
            and entry.mtime_ns // 10**9 == event.mtime_ns // 10**9
            for entry in shown
        )

    def apply_changes(self, events: Sequence[ChangeEvent]) -> int:
        """Invalidate what each event changed (ChangeSink); returns the cache records dropped. Subtrees of folders
        that moved or went are swept once for the batch, at its end (nothing runs in between: no await here)."""
        dropped = 0
        swept: set[str] = set()
        for event in events:
            guid = event.guid or None
            old = self._guid_paths.get(guid) if guid is not None else None
            folder = self._guid_paths.get(event.parent_guid) if event.parent_guid is not None else None
            new = join(folder, event.name) if folder is not None and valid_name(event.name) else None
            if guid is not None:
                self._touch(guid=guid)
            if old is not None and new == old and self._already_shown(event, old):
                self._touch(old)  # nothing to drop; an answer in flight for it is still treated as raced
                continue
            if new is not None:
                moved = new != old
            elif event.deleted or old is None:
                moved = True
            elif old == "":
                moved = False  # the mount root: its folder is above the mount, and only its attributes changed
            elif folder is None:
                moved = event.name != old.rpartition("/")[2]  # in a folder we cannot name: moved if renamed
            else:
                moved = True  # to a name we cannot use
            if old is not None:
                dropped += self._invalidate(old)
                if (event.deleted or moved) and (event.is_dir or self._cached_dir(old)):
                    swept.add(old)
            if new is not None and new != old:
                dropped += self._invalidate(new)
                if self._cached_dir(new):
                    swept.add(new)  # a folder replaced: what was below it is not what is there now
            elif folder is not None and new is None:
                # A name we cannot use: the folder's listing still changed.
                self._touch(folder)
                if self._listings.pop(folder, None) is not None:
                    dropped += 1
            if guid is not None:
                if event.deleted:
                    if old is not None:
                        del self._guid_paths[guid]
                elif new is not None:
                    self._guid_paths[guid] = new
                elif old is not None and moved:
                    del self._guid_paths[guid]  # moved somewhere we cannot name
        dropped += self._sweep(swept)
        self.counters["feed_invalidations"] += dropped
        return dropped

    def feed_up(self, *, new_cursor: bool) -> None:
        """The feed is caught up (ChangeSink): answers stamped from now on are trusted long; with ``new_cursor`` a
        new epoch begins, so nothing stamped before is."""
        if new_cursor or self._feed_epoch is None:
            self._feed_epoch = next(self._epochs)
        self._feed_healthy = True

    def feed_down(self) -> None:
        """The feed stopped (ChangeSink): the short TTL applies again, and the kernel forgets the long timeouts."""
        self._feed_healthy = False
        self._kernel_fallback()

    def feed_reset(self) -> None:
        """Changes may have been missed (ChangeSink): nothing cached is trusted; the epoch ends."""
        self._feed_healthy = False
        self._feed_epoch = None
        self.counters["feed_invalidations"] += len(self._listings) + len(self._negative)
        self._listings.clear()
        self._negative.clear()
        for node in self._nodes.values():
            _expire(node)
        self._touch_everything()
        self._kernel_fallback()

    def _kernel_fallback(self) -> None:
        """Invalidate every long timeout handed to the kernel: dentries and attributes of ``kernel_long`` nodes and
        the recorded long negatives."""
        for node in self._nodes.values():
            if node.kernel_long:
                node.kernel_long = False
                self._kernel_forget(node)
        for parent, name in self._kernel_negatives:
            self._note(EntryNote(parent, name))
        self._kernel_negatives.clear()

    @property
    def feed_trusted(self) -> bool:
        """Whether answers are being trusted long now (the feed is up)."""
        return self._feed_healthy

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


def _shown(entry: Entry) -> tuple[bool, int, int, str]:
    """What the kernel shows of an entry (stat) and caches with it."""
    return entry.is_dir, entry.size, entry.mtime_ns, entry.version


def _below(path: str, folder: str) -> bool:
    """Whether ``path`` lies inside ``folder`` (the root ``""`` holds everything but itself)."""
    return path.startswith(folder + "/") if folder else path != ""


def _expire(node: _Node) -> None:
    """Ask the store again before ``node`` answers anything."""
    node.expires_at = 0.0
    node.epoch = None


__all__ = [
    "BLKSIZE_BYTES",
    "FILEID_XATTR",
    "ROOT_INODE",
    "Absent",
    "AttrNote",
    "Attributes",
    "EntryNote",
    "FileReader",
    "FileSystem",
    "KernelInvalidation",
    "OpenAnswer",
    "ReadEngineLike",
    "StatFs",
    "VfsSettings",
]
