"""Byte-bounded LRU of decrypted blocks, with single-flight fetches and a short memory of failed blocks.

How it works (read this before the code)
========================================

A block is named by a :data:`BlockKey` ``(file identity, version token, block index)``. Because the version token is
part of the key, a new version of a file can never be served an old block: old blocks simply age out of the LRU.

At any moment a key is in one of four states, and all transitions happen on the trio thread (no locks, no threads
touch this state; codec work runs in workers *inside* the fetch callable, which hands back finished bytes):

``cached``
    In the LRU (``cachetools.LRUCache`` with ``getsizeof=len``), so ``size_bytes`` is the exact sum of the block
    lengths and never exceeds ``capacity_bytes``. A hit moves the block to the most-recently-used end.
``in flight``
    A :class:`_Flight` exists in ``_flights``. The first miss creates it and starts the fetch; every later miss of
    the same key *joins* it (single-flight: N concurrent misses cause one fetch). When the fetch succeeds the block
    enters the LRU (unless it is larger than the whole capacity: then it is handed to the waiters and not cached) and
    the flight leaves ``_flights`` *in the same step*, so no reader can observe a gap between the two states.
``recently failed``
    A failed fetch is never cached. Its error is delivered to every waiter of the flight and, if a reader was
    waiting for it (``docs/design-notes.md`` §5: the kernel retries a failed READ at once), remembered for
    ``failed_block_memory_seconds`` so the retry fails fast instead of paying the whole per-read budget again. A
    failed *prefetch* nobody waited for is not remembered: the first real read deserves its own attempt.
``absent``
    Everything else.

Concurrency rules
-----------------
1. **Fetches run in the owner's nursery, never in a waiter's task** (when the cache was given a nursery, as the
   :class:`~directfs.engine.reader.ReadEngine` always does). A waiter only waits on the flight's ``trio.Event``; if the
   waiter is cancelled (the kernel interrupted a READ, a spanning read failed on a sibling block) it stops waiting and
   the fetch goes on for the others, and its result is still cached for the retry that usually follows.
2. **Only an explicit prefetch cancel stops a fetch**, and only when no reader waits for it: a
   :class:`PrefetchTicket` that is cancelled while ``demand_waiters == 0`` cancels the flight's own
   ``CancelScope`` and removes the flight from ``_flights`` at once, so a read arriving a moment later starts a fresh
   fetch instead of joining a dying one. A reader that joins a prefetch flight pins it: cancelling the ticket then
   only drops the prefetcher's interest.
   2b. A *stream's* fetch (``get_or_fetch(..., cancel_unwanted=True)``, the Blocks/Streamer APIs and ``cp``) is
   cancelled the same way when its last waiter leaves before it ended and no prefetch holds it: a consumer that
   leaves a stream early does not pay for the rest of its window. A mount reader never sets it (rule 1 holds).
3. Without a nursery (a bare ``BlockCache(capacity)``) the first missing reader runs the fetch in its own task. If it
   is cancelled, the flight ends without result and the other waiters start over (one of them becomes the next
   fetcher), so they still never see a ``Cancelled`` that was not theirs.
4. **Errors are always ``DirectFSError``**: an ``ExceptionGroup`` from a fetch that used a nursery is unwrapped to
   its first ``DirectFSError``; anything else is a bug, logged once with its traceback and delivered as a plain
   ``DirectFSError`` (EIO) chained to it. Each waiter gets its own exception object (chained to the original), so
   concurrent raises never share or grow one traceback.

Memory and eviction
-------------------
Eviction only drops the cache's reference. Blocks are ``bytes`` (or ``bytearray``) that the cache never mutates or
resizes, and a ``memoryview`` slice handed to a reader holds a reference to its block, so an evicted block that a
reader is still slicing (or that pyfuse3 is still copying into the reply) stays alive and intact until that slice is
released; it just no longer counts against ``capacity_bytes``. That transient overshoot is bounded by the blocks of
the reads in progress (at most ``max_tasks`` FUSE requests, each touching one or two blocks), which is why the cache
does not try to pin blocks. Readers must not mutate what they get; :mod:`.reader` hands out read-only views.
:meth:`BlockCache.discard` drops one cached block early (the prefetcher's drop-behind) under the same rule.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Final

import cachetools
import trio

from ..errors import DirectFSError, InvalidArgumentError, RangeNotSupportedError, replay_error, unwrap_error

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlockKey:
    """The name of one cached piece of a file version. Typed and frozen (hashable, immutable, cheap to compare).

    ``file`` says which file within one engine (the source path in a mount; ``("directio", file id)`` in the
    Python API); ``version`` is the layout's version token, so a new version of a file can never be served an old
    block; ``index`` is the block's index in the layout or, when ``granule_bytes`` is set, the index of the aligned
    range ``[index * granule_bytes, (index + 1) * granule_bytes)`` (the cheap first fetch of random reads on stores
    that serve byte ranges: ranges and whole blocks never share a key).
    """

    file: Hashable
    version: str
    index: int
    granule_bytes: int = 0  # 0: a whole block of the layout; > 0: an aligned range of this many bytes


BlockData = bytes | bytearray
BlockFetch = Callable[[], Awaitable[BlockData]]

# Remembered failures are few (one per block a reader just saw fail); this cap only guards against a pathological
# burst of distinct failing blocks keeping error objects (and their tracebacks) alive for the memory period.
MAX_REMEMBERED_FAILURES: Final = 4096


class FetchOutcome(enum.Enum):
    """How a block reached a reader; the prefetcher uses it to tell a useful prefetch from a wasted one."""

    HIT = "hit"  # it was in the cache
    JOINED = "joined"  # a fetch was already in flight (another reader's or a prefetch) and we waited for it
    FETCHED = "fetched"  # we started the fetch


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of the cache's counters (trio style ``statistics()``); counters only grow, sizes are current."""

    hits: int  # reads answered from the cache (``lookup`` hits included)
    misses: int  # reads that had to wait for a fetch (own or joined); ``lookup`` misses are not counted
    evictions: int  # blocks dropped to make room
    size_bytes: int  # bytes currently cached (always <= capacity_bytes)
    capacity_bytes: int
    inflight_fetches: int  # fetches running now (demand and prefetch)
    fetched_bytes: int  # plaintext bytes delivered by completed fetches (cached or not)
    entries: int = 0  # blocks currently cached
    fetches_started: int = 0  # fetches started (misses - joined_misses - retries after a cancelled flight)
    joined_misses: int = 0  # misses that joined a fetch already in flight: what single-flight saved
    failed_fetches: int = 0
    fast_failures: int = 0  # requests answered with a remembered failure instead of a new fetch
    uncacheable_blocks: int = 0  # blocks served but not cached because they exceed the whole capacity
    cancelled_fetches: int = 0  # prefetches cancelled before they finished
    dropped_behind: int = 0  # blocks dropped after a sequential reader passed them (ReadSettings.drop_behind)


class _Flight:
    """One fetch in progress and everyone interested in it. Mutated only on the trio thread."""

    __slots__ = (
        "cancel_unwanted",
        "demand_waiters",
        "done",
        "error",
        "key",
        "prefetch_held",
        "result",
        "retry_on_cancel",
        "scope",
    )

    def __init__(self, key: BlockKey, *, retry_on_cancel: bool) -> None:
        self.key = key
        self.done = trio.Event()
        self.result: BlockData | None = None
        self.error: DirectFSError | None = None
        self.demand_waiters = 0  # readers blocked in get_or_fetch on this flight
        self.prefetch_held = False  # a PrefetchTicket still wants the block
        # Set by a stream's read (``get_or_fetch(..., cancel_unwanted=True)``): when its last waiter leaves before the
        # fetch ends and no prefetch holds it, the fetch is cancelled (a consumer left a stream early; rule 2b).
        self.cancel_unwanted = False
        self.scope = trio.CancelScope()
        # True when the fetch runs in a reader's task (no nursery): its cancellation is that reader's, so the others
        # start over. False in nursery mode: an outside cancel there means the owner's nursery is shutting down.
        self.retry_on_cancel = retry_on_cancel


class PrefetchTicket:
    """The prefetcher's claim on one background fetch started by :meth:`BlockCache.start_prefetch`."""

    __slots__ = ("_active", "_cache", "_flight", "key")

    def __init__(self, cache: BlockCache, flight: _Flight) -> None:
        self._cache = cache
        self._flight = flight
        self._active = True
        self.key = flight.key

    @property
    def done(self) -> bool:
        """Whether the fetch has ended (successfully, with an error, or cancelled)."""
        return self._flight.done.is_set()

    @property
    def succeeded(self) -> bool:
        return self._flight.result is not None

    def cancel(self) -> bool:
        """Drop the prefetcher's interest (idempotent). Cancels the fetch if it is still running and no reader waits
        for it; returns whether it did. A block that already arrived stays cached: it costs nothing more to keep."""
        if not self._active:
            return False
        self._active = False
        flight = self._flight
        flight.prefetch_held = False
        if flight.done.is_set() or flight.demand_waiters > 0:
            return False
        return self._cache._cancel_flight(flight)

    async def wait(self) -> None:
        """Wait until the fetch has ended (used by ``aclose`` so a source is not closed under a running fetch)."""
        await self._flight.done.wait()


class _CountingLRU(cachetools.LRUCache[BlockKey, BlockData]):
    """``LRUCache`` that counts evictions: cachetools calls ``popitem`` only to make room."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(maxsize=capacity_bytes, getsizeof=len)
        self.evictions = 0

    def popitem(self) -> tuple[BlockKey, BlockData]:
        item = super().popitem()
        self.evictions += 1
        return item


class BlockCache:
    """Byte-bounded LRU of decrypted blocks with single-flight fetches. See the module docstring for the rules.

    ``nursery``: where shared fetches run (recommended; see rule 1). ``failed_block_memory_seconds``: how long a
    failure a reader saw is replayed to new requests of the same block (0 disables it).
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        nursery: trio.Nursery | None = None,
        failed_block_memory_seconds: float = 0.0,
    ) -> None:
        if capacity_bytes < 0:
            raise InvalidArgumentError("cache capacity must not be negative")
        if failed_block_memory_seconds < 0:
            raise InvalidArgumentError("failed block memory must not be negative")
        self._capacity_bytes = capacity_bytes
        self._lru = _CountingLRU(capacity_bytes)
        self._nursery = nursery
        self._failure_memory_seconds = failed_block_memory_seconds
        self._flights: dict[BlockKey, _Flight] = {}
        # key -> (expiry on trio's clock, error); insertion order is expiry order (one fixed memory period)
        self._failures: OrderedDict[BlockKey, tuple[float, DirectFSError]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._joined = 0
        self._fetches_started = 0
        self._fetched_bytes = 0
        self._failed = 0
        self._fast_failures = 0
        self._uncacheable = 0
        self._cancelled = 0
        self._dropped = 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    # --- reading ---------------------------------------------------------------------------------------------

    def lookup(self, key: BlockKey) -> BlockData | None:
        """The cached block, or None; never fetches and never waits. A found block counts as a hit and becomes most
        recently used. A miss is *not* counted: callers follow a miss with :meth:`get_or_fetch`, which counts it."""
        try:
            data = self._lru[key]
        except KeyError:
            return None
        self._hits += 1
        return data

    def discard(self, key: BlockKey) -> bool:
        """Drop the cached block of ``key`` now (not a fetch in flight); returns whether one was cached. Used for
        drop-behind: its memory is then recycled by the next block instead of the cache growing into fresh pages."""
        if self._lru.pop(key, None) is None:
            return False
        self._dropped += 1
        return True

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached; a pure probe (no statistics, no change of LRU order)."""
        return key in self._lru

    def is_pending(self, key: BlockKey) -> bool:
        """Whether ``key`` is cached or being fetched (the prefetcher skips such blocks). No statistics."""
        return key in self._lru or key in self._flights

    async def get_or_fetch(self, key: BlockKey, fetch: BlockFetch, *, cancel_unwanted: bool = False) -> BlockData:
        """The block for ``key``: from the cache, from a fetch already in flight, or by calling ``fetch`` once for all
        concurrent callers. Always a checkpoint. Raises only ``DirectFSError`` (see the module docstring).
        ``cancel_unwanted``: a fetch this call starts is cancelled if every waiter leaves before it ends (rule 2b)."""
        data, outcome = await self.get_or_fetch_outcome(key, fetch, cancel_unwanted=cancel_unwanted)
        if outcome is FetchOutcome.HIT:
            await trio.lowlevel.checkpoint()
        return data

    async def get_or_fetch_outcome(
        self, key: BlockKey, fetch: BlockFetch, *, cancel_unwanted: bool = False
    ) -> tuple[BlockData, FetchOutcome]:
        """Like :meth:`get_or_fetch`, also saying how the block came. A hit returns without a checkpoint, so a caller
        that assembles several blocks can checkpoint once per read instead of once per block."""
        while True:
            # no await: from the lookup to joining or creating the flight
            data = self.lookup(key)
            if data is not None:
                return data, FetchOutcome.HIT
            failure = self._remembered_failure(key)
            if failure is not None:
                self._fast_failures += 1
                raise replay_error(failure)
            self._misses += 1
            flight = self._flights.get(key)
            if flight is not None:
                self._joined += 1
                outcome = FetchOutcome.JOINED
                await self._wait(flight)
            else:
                outcome = FetchOutcome.FETCHED
                flight = self._new_flight(key)
                flight.cancel_unwanted = cancel_unwanted
                flight.demand_waiters += 1
                try:
                    if self._nursery is None:
                        await self._run_flight(flight, fetch)  # rule 3: this task is the fetcher
                    else:
                        self._spawn(flight, fetch)
                        await flight.done.wait()
                finally:
                    self._leave(flight)
            if flight.error is not None:
                raise replay_error(flight.error)
            if flight.result is not None:
                return flight.result, outcome
            if not flight.retry_on_cancel:
                raise DirectFSError("block fetch cancelled: the read engine is shutting down")
            # The reader that ran the fetch was cancelled (rule 3): start over, possibly as the new fetcher.

    async def _wait(self, flight: _Flight) -> None:
        flight.demand_waiters += 1
        try:
            await flight.done.wait()
        finally:
            self._leave(flight)

    def _leave(self, flight: _Flight) -> None:
        """A waiter stops waiting (done, or cancelled). Rule 2b: the last one out of an unwanted stream fetch
        cancels it."""
        # no await: the decision and the removal from _flights (_cancel_flight) happen together
        flight.demand_waiters -= 1
        if (
            flight.cancel_unwanted
            and flight.demand_waiters == 0
            and not flight.prefetch_held
            and not flight.done.is_set()
            and self._nursery is not None
        ):
            self._cancel_flight(flight)

    # --- prefetching -----------------------------------------------------------------------------------------

    def start_prefetch(self, key: BlockKey, fetch: BlockFetch) -> PrefetchTicket | None:
        """Start fetching ``key`` in the background and return a ticket, or None when there is nothing to do (cached,
        already in flight, failed a moment ago, or no nursery to run it in). Does not count as a hit or miss."""
        if self._nursery is None or self.is_pending(key) or self._remembered_failure(key) is not None:
            return None
        flight = self._new_flight(key)
        flight.prefetch_held = True
        try:
            self._spawn(flight, fetch)
        except DirectFSError:
            return None
        return PrefetchTicket(self, flight)

    # --- internals -------------------------------------------------------------------------------------------

    def _new_flight(self, key: BlockKey) -> _Flight:
        flight = _Flight(key, retry_on_cancel=self._nursery is None)
        self._flights[key] = flight
        return flight

    def _spawn(self, flight: _Flight, fetch: BlockFetch) -> None:
        assert self._nursery is not None
        try:
            self._nursery.start_soon(self._run_flight, flight, fetch)
        except RuntimeError as exc:  # "Nursery is closed to new arrivals": the owner is shutting down
            self._finish(flight)
            raise DirectFSError("block fetch refused: the read engine is shut down") from exc

    async def _run_flight(self, flight: _Flight, fetch: BlockFetch) -> None:
        """Run one fetch to its end and publish the outcome. Never raises ``Exception`` (it would kill the owner's
        nursery, i.e. the mount): failures are stored on the flight for the waiters."""
        self._fetches_started += 1
        try:
            with flight.scope:
                data = await fetch()
                # no await: from here to _finish (store, leave _flights, set done) in one step
                if not isinstance(data, bytes | bytearray):
                    raise TypeError(f"block fetch returned {type(data).__name__}, not bytes")
                flight.result = data
                self._fetched_bytes += len(data)
                self._store(flight.key, data)
            if flight.scope.cancelled_caught:
                self._cancelled += 1
        except Exception as exc:
            error = unwrap_error(exc, context=f"fetching block {flight.key.index}")
            flight.error = error
            self._failed += 1
            # Rule: remember only what a reader saw fail (the kernel's retry fails fast: docs/design-notes.md §5),
            # and only a failure of the block itself: a refusal for where a no-range stream is now (EOPNOTSUPP) says
            # nothing about the next read of that block, which the stream may serve.
            if flight.demand_waiters > 0 and not isinstance(error, RangeNotSupportedError):
                self._remember_failure(flight.key, error)
        finally:
            self._finish(flight)

    def _finish(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        flight.done.set()

    def _cancel_flight(self, flight: _Flight) -> bool:
        if flight.done.is_set():
            return False
        # Leave _flights now, so a read arriving before the task has unwound starts a fresh fetch (rule 2).
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        flight.scope.cancel()
        return True

    def _store(self, key: BlockKey, data: BlockData) -> None:
        size = len(data)
        if size == 0:
            return  # nothing to save, and zero-size entries would let the entry count grow without bound
        if size > self._capacity_bytes:
            self._uncacheable += 1  # served to the waiters, but caching it would have to evict everything
            return
        self._lru[key] = data
        self._failures.pop(key, None)

    def _remembered_failure(self, key: BlockKey) -> DirectFSError | None:
        entry = self._failures.get(key)
        if entry is None:
            return None
        expiry, error = entry
        if trio.current_time() >= expiry:
            del self._failures[key]
            return None
        return error

    def _remember_failure(self, key: BlockKey, error: DirectFSError) -> None:
        if self._failure_memory_seconds <= 0:
            return
        now = trio.current_time()
        self._failures.pop(key, None)
        self._failures[key] = (now + self._failure_memory_seconds, error)
        # Expiry order equals insertion order, so expired entries are always at the front.
        while self._failures:
            oldest_key, (expiry, _) = next(iter(self._failures.items()))
            if expiry > now and len(self._failures) <= MAX_REMEMBERED_FAILURES:
                break
            del self._failures[oldest_key]

    def forget_failures(self) -> None:
        """Drop every remembered failure (an operator's "retry now", or a test)."""
        self._failures.clear()

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            hits=self._hits,
            misses=self._misses,
            evictions=self._lru.evictions,
            size_bytes=int(self._lru.currsize),
            capacity_bytes=self._capacity_bytes,
            inflight_fetches=len(self._flights),
            fetched_bytes=self._fetched_bytes,
            entries=len(self._lru),
            fetches_started=self._fetches_started,
            joined_misses=self._joined,
            failed_fetches=self._failed,
            fast_failures=self._fast_failures,
            uncacheable_blocks=self._uncacheable,
            cancelled_fetches=self._cancelled,
            dropped_behind=self._dropped,
        )
