"""The read engine: ``read(offset, size)`` on an open file version, through the block cache and read-ahead.

One :class:`ReadEngine` per mount (or per Python API user) owns the shared parts: the decrypted-block cache
(:mod:`.cache`), the global prefetch gate (:mod:`.prefetch`) and the nursery all background fetches run in. Each
open handle gets a :class:`FileReader` with its own read-ahead cursors.

A read ``[offset, offset + size)``:

1. is clipped to the file (``b""`` at or past EOF, never an error: POSIX ``pread`` semantics);
2. finds its first and last block by binary search on the block offsets (``BlockLayout.block_at``);
3. tells the handle's prefetcher (synchronously, so read-ahead starts before this read waits), which says whether
   the read is sequential. A read that is not, on a store that serves any byte range (``RangeReadable``: s3, WebDAV,
   HTTP, file://), needing a block that is neither cached nor in flight, is served from small aligned *ranges*
   (``ReadSettings.random_read_bytes``) instead of whole blocks: the cheap first fetch of ``docs/design-notes.md`` §1.
   Ranges are cached in the same byte-bounded cache under their own keys (``BlockKey.granule_bytes`` set), never
   mixed with whole blocks, with the same single-flight; a later whole-block read ignores them;
4. takes each block from the cache; the missing ones are fetched through the cache's single-flight, concurrently
   when the read spans several blocks (a spanning read at a block edge is the common case with variable blocks);
5. answers with a read-only ``memoryview`` slice when it lies in one block (zero copy: pyfuse3 takes any buffer and
   copies once into the reply) or joins the slices once when it spans blocks.

Every block is length-checked against the layout before it can enter the cache: a source that returns the wrong
number of bytes ends in ``BlockValidationError``, never in wrong bytes.

Concurrency rules: a ``FileReader`` may be read from many tasks at once (the kernel sends concurrent READs on one
handle); all shared state is in the cache and the prefetcher, which are only touched synchronously between awaits.
Cancelling a ``read`` (the kernel interrupted it) only stops that read's waiting, never a fetch others need.

Disk cache (``ReadEngine(..., disk=DiskTier)``, :mod:`.diskcache`): a second level under the memory cache. It lives
*inside* the fetch callable a flight runs (``_fetch_through_disk``), so single-flight, cancellation and the length
check cover it unchanged: the fetch first looks the block up on disk (a worker thread), and on a miss fetches it and
hands it to a background write (the reader never waits for the disk). ``RawBlocks`` files (encrypted CTERA) are
fetched raw, decoded in a codec job, and their object is what is written. Without a disk tier the fetch callable is
``_fetch_verified`` as before: no extra await, thread or call per block. Ranges (step 3) are not disk-cached; a
non-sequential read takes whole blocks when the disk holds them.

Ownership: the caller owns the ``OpenFile`` and closes it after ``FileReader.aclose``. Blocks are shared between
handles by ``identity`` (and the layout's version), so one handle's fetch may serve another handle's read; therefore
``aclose`` cancels this handle's prefetches that nobody waits for and then waits until no fetch that uses this
handle's ``OpenFile`` is still running (a fetch another handle joined runs to its end first). Closing the
``OpenFile`` after ``aclose`` can thus never fail a read of another handle.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass

import trio

from ..errors import BlockValidationError, ConfigError, DirectFSError, InvalidArgumentError, unwrap_error
from ..sources.base import BlockLayout, OpenFile, RangeReadable, RawBlocks
from ..workers import run_codec
from .cache import BlockCache, BlockData, BlockFetch, BlockKey, CacheStatistics, FetchOutcome
from .diskcache import KIND_RAW, KIND_SEALED, DiskStatistics, DiskTier, stable_identity
from .prefetch import FilePrefetcher, GateStatistics, PrefetchCounters, PrefetchGate, PrefetchPolicy

MiB = 1024 * 1024
# A non-sequential read needing more ranges than this takes whole blocks instead: 4 x 256 KiB covers the largest FUSE
# READ (1 MiB with max_pages=256) in at most 4 parallel requests; a bigger read amortises a block fetch well enough.
MAX_RANGES_PER_READ = 4


@dataclass(frozen=True)
class ReadSettings:
    """Tunables of the read path. Built once by the command layer (``--cache-size``, ``--read-ahead``)."""

    # 256 MiB: 64 CTERA fixed-size blocks (4 MiB) or ~500 dedup blocks (512 KiB average). It holds the whole prefetch
    # budget plus a working set for random readers, yet stays small next to the RAM of any machine that runs a
    # FUSE daemon for media or backups. Prefetched blocks live here too, so this is the one memory figure to tune.
    cache_size_bytes: int = 256 * MiB
    # 0 disables read-ahead; any positive value prefetches at least the next block once a stream is sequential.
    # 32 MiB: 8 blocks of 4 MiB, which is what prefetch_concurrency fetches at once; a window larger than what can be
    # in flight only holds memory. At ~1 GB/s per stream it covers ~30 ms of object-store first-byte latency.
    read_ahead_max_bytes: int = 32 * MiB
    # 8: 4-8 connections per host hide the RTT; more only add contention on 2 cores (docs/testbed.md §5).
    prefetch_concurrency: int = 8
    # 128 MiB: four cursors at a full window (e.g. two files with audio+video each), and half the cache, so
    # prefetched blocks are not evicted before they are read. The engine never uses more than half the cache
    # (effective_prefetch_budget_bytes), so a smaller --cache-size shrinks read-ahead instead of being refused.
    prefetch_budget_bytes: int = 128 * MiB
    # 5 s: the kernel retries a failed READ immediately (docs/design-notes.md §5), so a few seconds cover the retry and
    # an impatient user's second try, while a store that recovered is used again almost at once.
    failed_block_memory_seconds: float = 5.0
    # 4 cursors: at least two interleaved streams (audio + video, tar index + data) plus room for a stray random
    # read, which would otherwise recycle a live stream's cursor and reset its window.
    cursors_per_file: int = 4
    # 16 MiB forward / 1 MiB backward: mountpoint-s3's values, sized to absorb the kernel's reordering of its own
    # readahead READs (at most 256 KiB back, then 512 KiB forward) with a wide margin; a tar reader skipping a small
    # member also stays "sequential".
    sequential_forward_tolerance_bytes: int = 16 * MiB
    sequential_backward_tolerance_bytes: int = 1 * MiB
    # Drop blocks a sequential reader has passed (.prefetch, step 5). Off by default: a Python API reader has
    # no page cache in front, so its re-reads come from this cache. The mount turns it on, because the kernel's page
    # cache holds what was read and a second copy here only grows into fresh memory (cold cat ~0.8x the CPU).
    drop_behind: bool = False
    # Cheap first fetch (0 disables it): a non-sequential read on a range-capable store fetches the aligned ranges of
    # this size around what it needs, not the whole (8 MiB) block. 256 KiB: per-request cost dominates small GETs on
    # object stores (SourceOptions: a 1 MiB block takes 7.5 ms, an 8 MiB one 20 ms on SeaweedFS), so a range much
    # smaller saves little time but loses the neighbourhood a random reader often comes back to; 256 KiB covers a
    # 128 KiB FUSE READ at any alignment in at most two requests and is 1/32 of a block. Not tuned further yet.
    random_read_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        for name in (
            "cache_size_bytes",
            "read_ahead_max_bytes",
            "prefetch_budget_bytes",
            "sequential_forward_tolerance_bytes",
            "sequential_backward_tolerance_bytes",
            "random_read_bytes",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.prefetch_concurrency < 1:
            raise ConfigError("prefetch_concurrency must be at least 1")
        if self.cursors_per_file < 1:
            raise ConfigError("cursors_per_file must be at least 1")
        if self.failed_block_memory_seconds < 0:
            raise ConfigError("failed_block_memory_seconds must not be negative")

    @property
    def effective_prefetch_budget_bytes(self) -> int:
        """The budget the engine uses: prefetched blocks wait in the cache, and a budget above half of it would evict
        them (and the random readers' working set) before they are read."""
        return min(self.prefetch_budget_bytes, self.cache_size_bytes // 2)


@dataclass(frozen=True, slots=True)
class ReadStatistics:
    """Engine-wide counters for the metrics endpoint. ``prefetch_issued == used + wasted + outstanding``."""

    cache: CacheStatistics
    reads: int
    bytes_served: int  # bytes returned by read()
    bytes_fetched: int  # plaintext bytes fetched from the source (demand + prefetch)
    prefetch_issued: int
    prefetch_used: int
    prefetch_wasted: int
    prefetch_cancelled: int  # wasted prefetches whose fetch was cancelled while running
    prefetch_outstanding: int  # issued, not yet used or wasted
    window_resets: int
    gate: GateStatistics
    open_readers: int
    disk: DiskStatistics | None = None  # None: no disk cache (--disk-cache not given)

    @property
    def read_amplification(self) -> float:
        """Bytes fetched per byte served (1.0 = no waste; below 1 means the cache served re-reads)."""
        return self.bytes_fetched / self.bytes_served if self.bytes_served else 0.0


class ReadEngine:
    """Shared read machinery of one mount. Background fetches run in ``nursery``, which must outlive every reader:
    cancel it (after closing the readers) to stop all fetching."""

    def __init__(self, settings: ReadSettings, nursery: trio.Nursery, *, disk: DiskTier | None = None) -> None:
        self.settings = settings
        self.disk = disk
        self._nursery = nursery
        self._cache = BlockCache(
            settings.cache_size_bytes,
            nursery=nursery,
            failed_block_memory_seconds=settings.failed_block_memory_seconds,
        )
        self._gate = PrefetchGate(settings.prefetch_concurrency, settings.effective_prefetch_budget_bytes)
        self._policy = PrefetchPolicy(
            read_ahead_max_bytes=settings.read_ahead_max_bytes,
            cursors_per_file=settings.cursors_per_file,
            forward_tolerance_bytes=settings.sequential_forward_tolerance_bytes,
            backward_tolerance_bytes=settings.sequential_backward_tolerance_bytes,
            drop_behind=settings.drop_behind,
        )
        self._prefetch_counters = PrefetchCounters()
        self._reads = 0
        self._bytes_served = 0
        self._open_readers = 0

    @property
    def cache(self) -> BlockCache:
        return self._cache

    def open(self, file: OpenFile, identity: Hashable) -> FileReader:
        """A reader of ``file``; ``identity`` (e.g. the source path) and the layout's version key its cached blocks."""
        self._open_readers += 1
        return FileReader(self, file, identity)

    async def flush_disk_writes(self) -> None:
        """Wait until the disk cache's background writes have ended (none without a disk cache). For a command that
        closes its engine next (``cp``, ``stage``): cancelling the nursery would drop the writes still queued."""
        if self.disk is not None:
            await self.disk.cache.flush()
        else:
            await trio.lowlevel.checkpoint()

    def statistics(self) -> ReadStatistics:
        counters = self._prefetch_counters
        cache = self._cache.statistics()
        return ReadStatistics(
            cache=cache,
            reads=self._reads,
            bytes_served=self._bytes_served,
            bytes_fetched=cache.fetched_bytes,
            prefetch_issued=counters.issued,
            prefetch_used=counters.used,
            prefetch_wasted=counters.wasted,
            prefetch_cancelled=counters.cancelled,
            prefetch_outstanding=counters.issued - counters.used - counters.wasted,
            window_resets=counters.window_resets,
            gate=self._gate.statistics(),
            open_readers=self._open_readers,
            disk=self.disk.cache.statistics() if self.disk is not None else None,
        )


class FileReader:
    """Reads of one open handle. Made by :meth:`ReadEngine.open`; close with :meth:`aclose`."""

    def __init__(self, engine: ReadEngine, file: OpenFile, identity: Hashable) -> None:
        self._engine = engine
        self._file = file
        self._identity = identity
        layout = file.layout
        self._layout = layout
        self._offsets = layout.offsets
        self._version = layout.version
        self._cache = engine._cache
        self._closed = False
        self._fetching = 0  # fetches running with self._file (in the engine nursery, for any handle's readers)
        self._drained: trio.Event | None = None  # set when _fetching drops to 0 while aclose waits
        # The cheap first fetch (module docstring, step 3): only for stores that serve any byte range.
        self._range_bytes = engine.settings.random_read_bytes
        self._ranges: RangeReadable | None = file if self._range_bytes > 0 and isinstance(file, RangeReadable) else None
        # The fetch a flight runs: through the disk cache when there is one and this file has a stable identity.
        self._fetch_impl: Callable[[int], Awaitable[BlockData]] = self._fetch_verified
        self._disk = engine.disk
        self._disk_identity = stable_identity(identity) if self._disk is not None else None
        self._raw: RawBlocks | None = None
        if self._disk is not None and self._disk_identity is not None:
            self._raw = file if isinstance(file, RawBlocks) else None
            self._fetch_impl = self._fetch_through_disk
        self._prefetcher = FilePrefetcher(
            layout=layout,
            cache=engine._cache,
            gate=engine._gate,
            policy=engine._policy,
            counters=engine._prefetch_counters,
            key_of=self._key,
            fetch_of=self._fetcher,
        )

    @property
    def size(self) -> int:
        return self._layout.size

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    # --- whole blocks (the block streams of directfs.engine.streams) ---------------------------------------------

    async def block(self, index: int, *, cancel_unwanted: bool = False) -> BlockData:
        """Block ``index`` whole, length-checked, through the cache (joining a fetch in flight). Always a checkpoint.
        No read-ahead bookkeeping: a block stream is its own window. ``cancel_unwanted``: a fetch this starts is
        cancelled when every waiter has left before it ended (a stream left early; ``BlockCache`` rule 2b)."""
        if self._closed:
            raise DirectFSError("read on a closed file handle")
        if not 0 <= index < self._layout.block_count:
            raise InvalidArgumentError(f"block index {index} outside 0..{self._layout.block_count - 1}")
        if self._offsets[index + 1] == self._offsets[index]:
            await trio.lowlevel.checkpoint()
            return b""  # an empty block: nothing to fetch
        data = await self._cache.get_or_fetch(self._key(index), self._fetcher(index), cancel_unwanted=cancel_unwanted)
        self._engine._bytes_served += len(data)
        return data

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """Exactly ``size`` bytes from ``offset``, fewer only at EOF, ``b""`` at or past it. Always a checkpoint.
        Raises ``DirectFSError`` subclasses only (``InvalidArgumentError`` for a negative offset or size)."""
        if offset < 0 or size < 0:
            raise InvalidArgumentError(f"invalid read: offset {offset}, size {size}")
        if self._closed:
            raise DirectFSError("read on a closed file handle")
        engine = self._engine
        engine._reads += 1
        file_size = self._offsets[-1]
        if size == 0 or offset >= file_size:
            await trio.lowlevel.checkpoint()
            return b""
        end = min(offset + size, file_size)
        layout = self._layout
        first = layout.block_at(offset)
        last = layout.block_at(end - 1)
        # no await: read-ahead is issued (on_read) before this read starts waiting for its own blocks
        sequential = self._prefetcher.on_read(offset, end, first, last)
        if not sequential and self._ranges is not None and self._use_ranges(first, last, offset, end):
            result = await self._read_ranges(offset, end)
        elif first == last:
            result = await self._read_one(first, offset, end)
        else:
            result = await self._read_span(first, last, offset, end)
        engine._bytes_served += end - offset
        return result

    def _use_ranges(self, first: int, last: int, offset: int, end: int) -> bool:
        """Whether a non-sequential read goes to ranges: it needs at most ``MAX_RANGES_PER_READ`` of them and some
        block it touches is neither cached nor being fetched (otherwise the blocks serve it at no extra cost)."""
        if (end - 1) // self._range_bytes - offset // self._range_bytes >= MAX_RANGES_PER_READ:
            return False
        offsets = self._offsets
        disk = self._disk.cache if self._disk is not None and self._disk_identity is not None else None
        return any(
            offsets[index + 1] > offsets[index]
            and not self._cache.is_pending(self._key(index))
            and (disk is None or self._disk_name(index) not in disk)
            for index in range(first, last + 1)
        )

    async def _read_ranges(self, offset: int, end: int) -> bytes | memoryview:
        granule = self._range_bytes
        first = offset // granule
        last = (end - 1) // granule
        if first == last:
            data = await self._cache.get_or_fetch(self._range_key(first), self._range_fetcher(first))
            start = first * granule
            return memoryview(data)[offset - start : end - start].toreadonly()
        pieces: dict[int, BlockData] = {}

        async def fill(index: int) -> None:
            pieces[index] = await self._cache.get_or_fetch(self._range_key(index), self._range_fetcher(index))

        await self._gather(fill, range(first, last + 1), "reading ranges")
        parts: list[memoryview] = []
        for index in range(first, last + 1):
            start = index * granule
            parts.append(memoryview(pieces[index])[max(offset, start) - start : min(end, start + granule) - start])
        return b"".join(parts)

    def _range_key(self, index: int) -> BlockKey:
        return BlockKey(self._identity, self._version, index, self._range_bytes)

    def _range_fetcher(self, index: int) -> BlockFetch:
        return functools.partial(self._fetch_range_verified, index)

    async def _fetch_range_verified(self, index: int) -> BlockData:
        assert self._ranges is not None
        start = index * self._range_bytes
        expected = min(self._range_bytes, self._offsets[-1] - start)
        self._fetching += 1
        try:
            data = await self._ranges.fetch_range(start, expected)
        finally:
            self._fetching -= 1
            if self._fetching == 0 and self._drained is not None:
                self._drained.set()
        if len(data) != expected:
            raise BlockValidationError(f"source returned {len(data)} bytes for range {start}+{expected}")
        return data

    async def _read_one(self, index: int, offset: int, end: int) -> bytes | memoryview:
        data = self._cache.lookup(self._key(index))
        if data is None:
            data = await self._fetch(index)
        else:
            self._prefetcher.on_served(index, FetchOutcome.HIT)
            await trio.lowlevel.checkpoint()
        start = self._offsets[index]
        if type(data) is bytes and offset == start and end - start == len(data):
            return data  # the whole block: immutable already, no view needed
        return memoryview(data)[offset - start : end - start].toreadonly()

    async def _read_span(self, first: int, last: int, offset: int, end: int) -> bytes:
        offsets = self._offsets
        blocks: dict[int, BlockData] = {}
        missing: list[int] = []
        for index in range(first, last + 1):
            if offsets[index + 1] == offsets[index]:
                continue  # a zero-length block: nothing to fetch or copy
            data = self._cache.lookup(self._key(index))
            if data is None:
                missing.append(index)
            else:
                blocks[index] = data
                self._prefetcher.on_served(index, FetchOutcome.HIT)
        if not missing:
            await trio.lowlevel.checkpoint()
        elif len(missing) == 1:
            blocks[missing[0]] = await self._fetch(missing[0])
        else:
            await self._fetch_many(missing, blocks)
        parts: list[memoryview] = []
        for index in sorted(blocks):
            start = offsets[index]
            view = memoryview(blocks[index])
            parts.append(view[max(offset, start) - start : min(end, offsets[index + 1]) - start])
        return b"".join(parts)

    async def _fetch_many(self, missing: list[int], blocks: dict[int, BlockData]) -> None:
        async def fill(index: int) -> None:
            blocks[index] = await self._fetch(index)

        await self._gather(fill, missing, "reading blocks")

    @staticmethod
    async def _gather(fill: Callable[[int], Awaitable[None]], indices: Iterable[int], context: str) -> None:
        """Run ``fill(i)`` for every index concurrently; the first ``DirectFSError`` ends them all."""
        try:
            async with trio.open_nursery() as nursery:
                for index in indices:
                    nursery.start_soon(fill, index)
        except BaseExceptionGroup as group:
            # A failing block cancels its siblings' *waiting* (their shared fetches go on in the engine nursery).
            ours, rest = group.split(DirectFSError)
            if rest is not None or ours is None:
                raise  # Cancelled from outside (or a bug): let trio and the caller see it as it is
            raise unwrap_error(ours, context=context) from None

    async def _fetch(self, index: int) -> BlockData:
        data, outcome = await self._cache.get_or_fetch_outcome(self._key(index), self._fetcher(index))
        self._prefetcher.on_served(index, outcome)
        return data

    def _key(self, index: int) -> BlockKey:
        return BlockKey(self._identity, self._version, index)

    def _fetcher(self, index: int) -> BlockFetch:
        return functools.partial(self._fetch_impl, index)

    def _disk_name(self, index: int) -> bytes:
        assert self._disk is not None and self._disk_identity is not None
        return self._disk.cache.name_of(self._disk.scope, self._disk_identity, self._version, index)

    async def _fetch_through_disk(self, index: int) -> BlockData:
        """Block ``index`` from the disk cache, else fetched and written there in the background (module docstring).
        A damaged cache file is a miss (``DiskCache.load``): the reader never sees it."""
        assert self._disk is not None
        disk = self._disk.cache
        name = self._disk_name(index)
        expected = self._offsets[index + 1] - self._offsets[index]
        raw_file = self._raw
        self._fetching += 1
        try:
            decode = functools.partial(raw_file.decode_raw, index) if raw_file is not None else None
            data = await disk.load(name, expected, decode)
            if data is not None:
                return data
            if raw_file is None:
                data = await self._file.fetch_block(index)
                kind, payload = KIND_SEALED, data
            else:
                payload = await raw_file.fetch_raw(index)
                data = await run_codec(functools.partial(raw_file.decode_raw, index, payload), input_bytes=len(payload))
                kind = KIND_RAW
        finally:
            self._fetching -= 1
            if self._fetching == 0 and self._drained is not None:
                self._drained.set()
        if len(data) != expected:
            raise BlockValidationError(f"source returned {len(data)} bytes for block {index}, expected {expected}")
        await disk.save(self._engine._nursery, name, kind, expected, payload)
        return data

    async def _fetch_verified(self, index: int) -> BlockData:
        self._fetching += 1
        try:
            data = await self._file.fetch_block(index)
        finally:
            self._fetching -= 1
            if self._fetching == 0 and self._drained is not None:
                self._drained.set()
        expected = self._offsets[index + 1] - self._offsets[index]
        if len(data) != expected:
            raise BlockValidationError(f"source returned {len(data)} bytes for block {index}, expected {expected}")
        return data

    async def aclose(self) -> None:
        """Stop this handle's read-ahead (cancelling prefetches nobody else waits for), then wait until no fetch
        uses this handle's ``OpenFile`` any more (see the module docstring). Idempotent. Does not close the
        ``OpenFile``: the caller owns it and may close it once this returns. Call it shielded from cancellation
        (as a FUSE ``release`` does), or the wait is cut short."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._engine._open_readers -= 1
        await self._prefetcher.aclose()
        if self._fetching:
            self._drained = trio.Event()
            await self._drained.wait()
        else:
            await trio.lowlevel.checkpoint()
