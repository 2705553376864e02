"""Read-ahead: per-handle cursors with doubling windows, under one global concurrency limit and memory budget.

How it works (read this before the code)
========================================

Each open file handle (:class:`FilePrefetcher`, one per :class:`~directfs.engine.reader.FileReader`) keeps a few
*cursors*. A cursor remembers where its stream is (``next_offset``: the furthest end of the reads it has seen) and how
far ahead to fetch (``window_bytes``). Several cursors per handle serve files read as several interleaved streams at
once: video players (audio + video), tar/zip readers, mmap'd model loaders (``docs/design-notes.md`` §1; rclone#7719).

For every read ``[start, end)`` the prefetcher (synchronously, before the read waits for its own blocks):

1. **Matches a cursor.** A cursor matches when ``start`` lies within ``[next_offset - backward_tolerance,
   next_offset + forward_tolerance]``; the nearest one wins. The tolerances absorb the kernel's reordering of its
   own readahead READs (mountpoint-s3 uses 1 MiB back and 16 MiB forward for the same reason), so a strict
   ``start == next_offset`` test does not misfire. A backward step never moves ``next_offset`` back.
2. **Grows the window.** On the first sequential read of a cursor the window becomes *one block* (the block after
   the read). Afterwards, each time the cursor has read as many bytes as its window since the window last grew, the
   window doubles, up to ``read_ahead_max_bytes`` (JuiceFS's rule: grow once the reader has proved it consumes what
   we fetch). A new cursor at offset 0 starts with a one-block window at once: ``cat``, checksums and media probes
   read from the start, and one block is a small bet for the random readers that also start there.
3. **Resets on random access.** A read no cursor matches takes a fresh cursor with *no* window (a random read
   fetches only the blocks it needs), recycling the least recently used cursor when all are taken; the recycled
   cursor's outstanding prefetches are abandoned (cancelled if nobody waits for them). Such a cursor gets its first
   window only from a read that continues it closely (within the backward tolerance); a farther jump within the
   forward tolerance just moves it on, still without a window (3b). ``on_read`` tells the reader whether the read
   was sequential: the reader serves the other reads from small ranges where the store allows (``RangeReadable``).
4. **Tops the window up.** Every block that intersects ``[next_offset, next_offset + window)`` and lies after the
   read's own blocks is prefetched unless it is cached or already being fetched. Issuing never waits: if the global
   gate refuses (no concurrency slot or no budget), the cursor stops there and tries again on its next read, so a
   prefetch is never queued behind others and a reader is never delayed by read-ahead. ``frontier`` remembers the
   first block not yet considered, so a read costs O(new blocks), not O(window).
5. **Drops behind** (only with ``PrefetchPolicy.drop_behind``, which the mount turns on). Blocks a sequential cursor
   has read and left more than ``backward_tolerance`` behind are dropped from the block cache. Behind a FUSE mount
   the kernel's page cache already holds those bytes (``keep_cache``), so keeping a second copy only makes the cache
   grow into fresh memory, which on our VMs costs more per byte than fetching and decoding the block (~1.1 ms per
   MiB of first-touch page faults; ``.allocator``); dropped blocks are recycled by the next ones at memory
   speed. Measured on 256 MiB of 4 MiB blocks: 1 MiB sequential reads without FUSE ~335 -> ~440 MB/s (CPU
   0.96 -> 0.77 s); cold ``cat`` through the mount ~290 -> ~340 MB/s.
   Only blocks the cursor itself read *whole* are dropped (not ones a forward jump skipped or a strided reader
   touched in part, nor blocks random readers use), and a re-read after the page cache let them go costs one fetch
   per block again, as with mountpoint-s3.

Global gate (:class:`PrefetchGate`, one per engine): a prefetch takes one *slot* from issue until its fetch ends
(bounding concurrent prefetch fetches), and *reserves* its block length in the budget from issue until the fetch has
ended **and** the block was consumed or abandoned. So ``reserved_bytes`` = prefetched-but-unread + in-flight bytes,
which is what the budget bounds. Prefetched blocks live in the shared :class:`~.cache.BlockCache`, so they
also count against the cache capacity (the engine caps the budget at half the cache); a prefetched block evicted
before it was read costs a second fetch and counts as wasted.

Accounting: every issued prefetch ends exactly once as *used* (a read got it from the cache or joined its fetch) or
*wasted* (abandoned by reset/aclose, skipped over by a forward jump, failed, or evicted before the read came).

Concurrency rules
-----------------
- Everything here runs on the trio thread and is synchronous except :meth:`FilePrefetcher.aclose`; state changes
  are therefore atomic with respect to other tasks. The fetches themselves run in the engine's nursery (via
  ``BlockCache.start_prefetch``), never in a reader's task.
- Budget and slot releases are idempotent per prefetch (:class:`_Reservation`), so a fetch that ends after its
  record was abandoned (or the reverse) frees each resource exactly once.
- A prefetch fetch is only cancelled when nobody else waits for it (``PrefetchTicket.cancel``): another handle's
  read that joined it keeps it alive.
- An idle handle keeps at most one window per cursor reserved until it reads on or is closed; the global budget
  keeps the total bounded, and other handles then simply read without read-ahead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError
from ..sources.base import BlockLayout
from .cache import BlockCache, BlockFetch, BlockKey, FetchOutcome, PrefetchTicket


@dataclass(frozen=True, slots=True)
class PrefetchPolicy:
    """Per-handle read-ahead tunables (the engine builds it from ``ReadSettings``, where the defaults are argued)."""

    read_ahead_max_bytes: int
    cursors_per_file: int
    forward_tolerance_bytes: int
    backward_tolerance_bytes: int
    drop_behind: bool = False


@dataclass(frozen=True, slots=True)
class GateStatistics:
    inflight: int  # prefetch fetches running now
    reserved_bytes: int  # prefetched-but-unread + in-flight bytes
    peak_inflight: int  # the most ever at once (never above the concurrency limit)
    peak_reserved_bytes: int  # the most ever reserved (never above the budget)
    refused: int  # prefetches not issued for want of a slot or budget
    concurrency: int
    budget_bytes: int


class PrefetchGate:
    """The one global bound on prefetching: ``concurrency`` fetches at once and ``budget_bytes`` reserved.

    Synchronous and non-blocking on purpose: a prefetch that does not fit is not issued (see module docstring)."""

    def __init__(self, concurrency: int, budget_bytes: int) -> None:
        if concurrency < 1 or budget_bytes < 0:
            raise InvalidArgumentError("prefetch concurrency must be >= 1 and budget >= 0")
        self.concurrency = concurrency
        self.budget_bytes = budget_bytes
        self.inflight = 0
        self.reserved_bytes = 0
        self.peak_inflight = 0
        self.peak_reserved_bytes = 0
        self.refused = 0

    def try_reserve(self, nbytes: int) -> _Reservation | None:
        if self.inflight >= self.concurrency or self.reserved_bytes + nbytes > self.budget_bytes:
            self.refused += 1
            return None
        self.inflight += 1
        self.reserved_bytes += nbytes
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return _Reservation(self, nbytes)

    def statistics(self) -> GateStatistics:
        return GateStatistics(
            inflight=self.inflight,
            reserved_bytes=self.reserved_bytes,
            peak_inflight=self.peak_inflight,
            peak_reserved_bytes=self.peak_reserved_bytes,
            refused=self.refused,
            concurrency=self.concurrency,
            budget_bytes=self.budget_bytes,
        )


class _Reservation:
    """One prefetch's slot and bytes. The slot frees when the fetch ends; the bytes when the fetch has ended *and*
    the block was consumed or abandoned. Each release happens once, whatever the order."""

    __slots__ = ("_fetch_ended", "_gate", "_released", "nbytes")

    def __init__(self, gate: PrefetchGate, nbytes: int) -> None:
        self._gate = gate
        self.nbytes = nbytes
        self._fetch_ended = False
        self._released = False  # consumed or abandoned by the handle

    def fetch_ended(self) -> None:
        if self._fetch_ended:
            return
        self._fetch_ended = True
        self._gate.inflight -= 1
        if self._released:
            self._gate.reserved_bytes -= self.nbytes

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._fetch_ended:
            self._gate.reserved_bytes -= self.nbytes


@dataclass(slots=True)
class PrefetchCounters:
    """Engine-wide prefetch counters; every issued prefetch ends as exactly one of used or wasted."""

    issued: int = 0
    used: int = 0
    wasted: int = 0
    cancelled: int = 0  # wasted ones whose fetch was still running and got cancelled
    window_resets: int = 0  # cursors recycled by a random read


@dataclass(slots=True)
class _Cursor:
    next_offset: int
    window_bytes: int = 0  # 0: not sequential (yet): no read-ahead
    run_bytes: int = 0  # bytes read sequentially since the window last grew
    frontier: int = 0  # first block index not yet considered for prefetch
    last_used: int = 0  # handle-local read counter, for LRU recycling
    blocks: set[int] = field(default_factory=set)  # blocks this cursor prefetched and nobody read yet
    # Drop-behind (step 5): bytes this cursor read of each block not yet passed, and the first block not yet passed.
    read_bytes: dict[int, int] = field(default_factory=dict)
    behind: int = 0


@dataclass(slots=True)
class _Issued:
    ticket: PrefetchTicket
    reservation: _Reservation
    cursor: _Cursor


class FilePrefetcher:
    """Read-ahead for one open handle. ``key_of(i)`` names block ``i`` in the cache, ``fetch_of(i)`` fetches it."""

    def __init__(
        self,
        *,
        layout: BlockLayout,
        cache: BlockCache,
        gate: PrefetchGate,
        policy: PrefetchPolicy,
        counters: PrefetchCounters,
        key_of: Callable[[int], BlockKey],
        fetch_of: Callable[[int], BlockFetch],
    ) -> None:
        self._layout = layout
        self._offsets = layout.offsets
        self._cache = cache
        self._gate = gate
        self._policy = policy
        self._counters = counters
        self._key_of = key_of
        self._fetch_of = fetch_of
        self._cursors: list[_Cursor] = []
        self._issued: dict[int, _Issued] = {}
        self._reads = 0
        self._closed = False

    # --- the read path hooks (synchronous) -------------------------------------------------------------------

    def on_read(self, start: int, end: int, first_block: int, last_block: int) -> bool:
        """Observe a read of ``[start, end)`` (blocks ``first_block..last_block``) and top up read-ahead. Returns
        whether the read counts as sequential (its cursor has, or now gets, a window); a read that does not may be
        served from a small range instead of whole blocks (``.reader``, step 3 of the module docstring)."""
        # no await: synchronous by design (cursor matching, window growth, _top_up)
        if self._closed:
            return True
        self._reads += 1
        cursor = self._match(start)
        if cursor is None:
            cursor = self._fresh_cursor(end)
            cursor.behind = first_block
            if self._policy.drop_behind:
                self._count_read(cursor, start, end, first_block, last_block)
            if start != 0:
                cursor.frontier = last_block + 1
                return False  # random access: fetch only what the read needs
            cursor.window_bytes = self._one_block_after(last_block)
        elif cursor.window_bytes == 0 and start - cursor.next_offset > self._policy.backward_tolerance_bytes:
            # Step 3b: a cursor not yet proven sequential is only promoted by a read that continues it closely (within
            # the backward tolerance, which already exceeds the kernel's reordering). A forward jump within the wide
            # forward tolerance is random access by another name: a random reader's next read lands within 16 MiB
            # of one of its cursors about a quarter of the time on a 256 MiB file, and each of those would fetch a
            # whole block and prefetch the next. The cursor follows the jump, still without a window.
            cursor.next_offset = max(cursor.next_offset, end)
            cursor.last_used = self._reads
            cursor.frontier = max(cursor.frontier, last_block + 1)
            return False
        else:
            if self._policy.drop_behind:
                self._count_read(cursor, start, end, first_block, last_block)
            cursor.run_bytes += end - start
            cursor.next_offset = max(cursor.next_offset, end)
            if cursor.window_bytes == 0:
                cursor.window_bytes = self._one_block_after(last_block)
                cursor.run_bytes = 0
            elif cursor.run_bytes >= cursor.window_bytes:
                cursor.window_bytes = min(cursor.window_bytes * 2, self._policy.read_ahead_max_bytes)
                cursor.run_bytes = 0
        cursor.last_used = self._reads
        self._drop_passed(cursor)
        if self._policy.drop_behind:
            self._drop_behind(cursor, first_block)
        if self._policy.read_ahead_max_bytes > 0:  # 0: read-ahead switched off
            self._top_up(cursor, last_block)
        return True

    def on_served(self, block: int, outcome: FetchOutcome) -> None:
        """A read obtained ``block``: settle the prefetch of it, if there was one."""
        issued = self._issued.pop(block, None)
        if issued is None:
            return
        issued.cursor.blocks.discard(block)
        issued.reservation.release()
        if outcome is FetchOutcome.FETCHED:  # the prefetch failed or was evicted before this read came
            self._counters.wasted += 1
        else:
            self._counters.used += 1

    async def aclose(self) -> None:
        """Abandon every outstanding prefetch of this handle and wait until the fetches it cancelled have unwound
        (prompt: they are cancelled), so the caller may close the source afterwards. A fetch another handle's read
        joined is not cancelled and not waited for: that handle shares the source (see ``directfs.engine.reader``).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        cancelled = [ticket for block in list(self._issued) if (ticket := self._abandon(block)) is not None]
        self._cursors.clear()
        for ticket in cancelled:
            await ticket.wait()

    # --- window policy ---------------------------------------------------------------------------------------

    def _match(self, start: int) -> _Cursor | None:
        best: _Cursor | None = None
        best_distance = 0
        for cursor in self._cursors:
            delta = start - cursor.next_offset
            if -self._policy.backward_tolerance_bytes <= delta <= self._policy.forward_tolerance_bytes:
                distance = abs(delta)
                if best is None or distance < best_distance:
                    best, best_distance = cursor, distance
        return best

    def _fresh_cursor(self, end: int) -> _Cursor:
        if len(self._cursors) >= self._policy.cursors_per_file:
            victim = min(self._cursors, key=lambda c: c.last_used)
            self._cursors.remove(victim)
            self._counters.window_resets += 1
            for block in list(victim.blocks):
                self._abandon(block)
        cursor = _Cursor(next_offset=end, last_used=self._reads)
        self._cursors.append(cursor)
        return cursor

    def _one_block_after(self, last_block: int) -> int:
        nxt = last_block + 1
        if nxt >= self._layout.block_count:
            return 1  # at the end: any positive window, there is nothing left to fetch
        return max(1, self._layout.block_length(nxt))

    def _drop_passed(self, cursor: _Cursor) -> None:
        """Abandon prefetched blocks the stream has moved beyond (a forward jump skipped them)."""
        if not cursor.blocks:
            return
        limit = cursor.next_offset - self._policy.backward_tolerance_bytes
        for block in [b for b in cursor.blocks if self._offsets[b + 1] <= limit]:
            self._abandon(block)

    def _count_read(self, cursor: _Cursor, start: int, end: int, first_block: int, last_block: int) -> None:
        offsets = self._offsets
        read_bytes = cursor.read_bytes
        for index in range(max(first_block, cursor.behind), last_block + 1):
            overlap = min(end, offsets[index + 1]) - max(start, offsets[index])
            read_bytes[index] = read_bytes.get(index, 0) + overlap

    def _drop_behind(self, cursor: _Cursor, first_block: int) -> None:
        """Drop from the cache the blocks this cursor has read whole and left more than the backward tolerance behind
        (step 5 of the module docstring). Never a block of this read itself (a read over many small blocks reaches
        back further than the limit); never one the cursor read only in part (a forward jump skipped it, or random
        reads happened to fall within the cursor's tolerance): those stay and age out of the LRU as before.
        Amortised O(1) per block: ``behind`` only moves forward."""
        limit = cursor.next_offset - self._policy.backward_tolerance_bytes
        offsets = self._offsets
        read_bytes = cursor.read_bytes
        index = cursor.behind
        while index < first_block and offsets[index + 1] <= limit:
            whole = read_bytes.pop(index, 0) >= offsets[index + 1] - offsets[index]
            if whole and index not in self._issued:
                self._cache.discard(self._key_of(index))
            index += 1
        cursor.behind = index

    def _top_up(self, cursor: _Cursor, last_block: int) -> None:
        # no await: reservation and start_prefetch per block; what does not fit now is not issued, never waited for
        offsets = self._offsets
        block_count = len(offsets) - 1
        window_end = cursor.next_offset + cursor.window_bytes
        index = max(cursor.frontier, last_block + 1)
        capacity = self._cache.capacity_bytes
        while index < block_count and offsets[index] < window_end:
            length = offsets[index + 1] - offsets[index]
            key = self._key_of(index)
            if length == 0 or length > capacity or index in self._issued or self._cache.is_pending(key):
                index += 1  # nothing to fetch, would not stay cached, or someone already fetches it
                continue
            reservation = self._gate.try_reserve(length)
            if reservation is None:
                break  # no slot or no budget now: retry from here on this cursor's next read
            ticket = self._cache.start_prefetch(key, _releasing(self._fetch_of(index), reservation))
            if ticket is None:  # recently failed, or the engine is shutting down
                reservation.fetch_ended()
                reservation.release()
                index += 1
                continue
            self._counters.issued += 1
            self._issued[index] = _Issued(ticket, reservation, cursor)
            cursor.blocks.add(index)
            index += 1
        cursor.frontier = index

    def _abandon(self, block: int) -> PrefetchTicket | None:
        """Give up the prefetch of ``block``; returns its ticket if that cancelled a running fetch."""
        issued = self._issued.pop(block)
        issued.cursor.blocks.discard(block)
        issued.reservation.release()
        self._counters.wasted += 1
        if issued.ticket.cancel():
            self._counters.cancelled += 1
            return issued.ticket
        return None


def _releasing(fetch: BlockFetch, reservation: _Reservation) -> BlockFetch:
    """Wrap a prefetch fetch so its concurrency slot frees the moment it ends, however it ends."""

    async def fetch_and_release() -> bytes | bytearray:
        try:
            return await fetch()
        finally:
            reservation.fetch_ended()

    return fetch_and_release
