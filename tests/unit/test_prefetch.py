"""Read-ahead: window growth and reset, several cursors, kernel reordering, global limits, cancellation."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from directfs.engine.prefetch import PrefetchGate
from directfs.engine.reader import FileReader, ReadEngine, ReadSettings
from tests.support.fakefile import BLOCK, FakeFile

# Tight tolerances so that small test files can hold streams that are "far apart".
TIGHT = {"sequential_forward_tolerance_bytes": 2 * BLOCK, "sequential_backward_tolerance_bytes": BLOCK}


@pytest.fixture
async def engine_nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


def make_engine(nursery: trio.Nursery, **overrides: int | float) -> ReadEngine:
    base: dict[str, int | float] = {
        "cache_size_bytes": 256 * BLOCK,
        "prefetch_budget_bytes": 64 * BLOCK,
        "read_ahead_max_bytes": 4 * BLOCK,
        "prefetch_concurrency": 16,
    }
    base.update(overrides)
    return ReadEngine(ReadSettings(**base), nursery)  # type: ignore[arg-type]


async def read_block(reader: FileReader, file: FakeFile, index: int) -> None:
    """Read one whole block, check it, and let every started fetch finish."""
    got = await reader.read(index * BLOCK, BLOCK)
    assert bytes(got) == file.data[index * BLOCK : (index + 1) * BLOCK]
    await trio.testing.wait_all_tasks_blocked()


async def test_window_starts_at_one_block_and_doubles_to_the_maximum(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(64 * BLOCK)
    engine = make_engine(engine_nursery)
    reader = engine.open(file, identity="f")
    furthest = []
    reserved = []
    for index in range(10):
        await read_block(reader, file, index)
        furthest.append(max(file.calls))
        reserved.append(engine.statistics().gate.reserved_bytes // BLOCK)
    # windows (blocks): 1, 2, 2, 4, 4, ... (doubling once a whole window was read), capped at 4 blocks
    assert furthest == [1, 3, 4, 7, 8, 9, 10, 11, 12, 13]
    assert reserved == [1, 2, 2, 4, 4, 4, 4, 4, 4, 4]  # prefetched and not yet read
    assert all(count == 1 for count in file.calls.values())
    stats = engine.statistics()
    assert stats.cache.misses == 1  # only the very first block was waited for
    assert stats.prefetch_used == 9 and stats.prefetch_wasted == 0


async def test_random_read_fetches_only_what_it_needs(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(64 * BLOCK)
    engine = make_engine(engine_nursery)
    reader = engine.open(file, identity="f")
    got = await reader.read(10 * BLOCK + 5, 2 * BLOCK)
    assert bytes(got) == file.data[10 * BLOCK + 5 : 12 * BLOCK + 5]
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(file.calls) == [10, 11, 12] and engine.statistics().prefetch_issued == 0
    # Continuing from there proves the pattern sequential: one block of read-ahead, then doubling.
    await reader.read(12 * BLOCK + 5, BLOCK - 5)
    await trio.testing.wait_all_tasks_blocked()
    assert max(file.calls) == 13
    await read_block(reader, file, 13)
    assert max(file.calls) == 15


async def test_random_access_resets_the_window_and_cancels_its_prefetch(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(64 * BLOCK)
    engine = make_engine(engine_nursery, cursors_per_file=1, **TIGHT)
    reader = engine.open(file, identity="f")
    for index in range(4):
        await read_block(reader, file, index)  # window is now 4 blocks, prefetched through block 7
    file.hold = set(range(8, 64)) - {40}
    await read_block(reader, file, 4)  # issues block 8, which hangs
    assert file.active == 1 and engine.statistics().gate.inflight == 1
    await read_block(reader, file, 40)  # random: the old cursor is recycled
    assert file.cancelled == [8]
    stats = engine.statistics()
    assert stats.window_resets == 1 and stats.prefetch_cancelled == 1
    assert stats.gate.inflight == 0 and stats.gate.reserved_bytes == 0  # blocks 5-7 abandoned as well
    assert max(file.calls) == 40 and 41 not in file.calls  # nothing beyond what the random read needs
    assert stats.prefetch_issued == stats.prefetch_used + stats.prefetch_wasted
    assert stats.prefetch_wasted == 4  # blocks 5, 6, 7 (fetched, never read) and 8 (cancelled)


async def test_two_interleaved_sequential_streams_both_get_read_ahead(engine_nursery: trio.Nursery) -> None:
    async def run(cursors: int) -> tuple[int, int, int]:
        file = FakeFile.fixed(64 * BLOCK)
        engine = make_engine(engine_nursery, cursors_per_file=cursors, **TIGHT)
        reader = engine.open(file, identity=f"f{cursors}")
        for step in range(24):  # audio at block 0.., video at block 32..
            await read_block(reader, file, step)
            await read_block(reader, file, 32 + step)
        await reader.aclose()
        stats = engine.statistics()
        assert stats.prefetch_issued == stats.prefetch_used + stats.prefetch_wasted
        return stats.cache.misses, stats.window_resets, stats.prefetch_wasted

    # Two cursors: misses only for block 0, block 32 (a random read: no read-ahead) and block 33 (the read that
    # proved stream B sequential); then every read hits. The last window of each stream (4 blocks) is left unread.
    assert await run(cursors=2) == (3, 0, 8)
    # One cursor: every switch looks random and resets the window, so every read but the first waits for a fetch.
    assert await run(cursors=1) == (47, 47, 1)


async def test_kernel_reordering_stays_sequential(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(64 * BLOCK)
    engine = make_engine(engine_nursery, cursors_per_file=1, **TIGHT)
    reader = engine.open(file, identity="f")
    half = BLOCK // 2
    order = []
    for pair in range(0, 96, 2):  # half-block reads, each pair swapped, as async readahead delivers them
        order += [pair + 1, pair]
    for piece in order:
        got = await reader.read(piece * half, half)
        assert bytes(got) == file.data[piece * half : (piece + 1) * half]
        await trio.testing.wait_all_tasks_blocked()
    stats = engine.statistics()
    assert stats.window_resets == 0 and stats.prefetch_wasted == 0
    assert stats.cache.misses == 1 and stats.prefetch_used >= 44


async def test_forward_jump_over_prefetched_blocks_counts_them_wasted(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(64 * BLOCK)
    engine = make_engine(
        engine_nursery, sequential_forward_tolerance_bytes=8 * BLOCK, sequential_backward_tolerance_bytes=BLOCK
    )
    reader = engine.open(file, identity="f")
    for index in range(4):
        await read_block(reader, file, index)  # prefetched through block 7
    await read_block(reader, file, 8)  # a tar reader skipping a member: still the same stream
    stats = engine.statistics()
    assert stats.window_resets == 0
    assert stats.prefetch_wasted == 4  # blocks 4-7 were skipped: they end before the backward tolerance
    assert stats.prefetch_issued == stats.prefetch_used + stats.prefetch_wasted + stats.prefetch_outstanding


async def test_prefetched_block_evicted_before_use_counts_wasted(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(8 * BLOCK)
    other = FakeFile.fixed(8 * BLOCK, seed=1)
    engine = make_engine(
        engine_nursery, cache_size_bytes=2 * BLOCK, prefetch_budget_bytes=BLOCK, read_ahead_max_bytes=BLOCK
    )
    reader = engine.open(file, identity="f")
    await read_block(reader, file, 0)  # prefetches block 1
    other_reader = engine.open(other, identity="other")
    await read_block(other_reader, other, 5)
    await read_block(other_reader, other, 3)  # two random reads push file's blocks out
    await read_block(reader, file, 1)
    stats = engine.statistics()
    assert file.calls[1] == 2 and stats.prefetch_wasted == 1 and stats.prefetch_used == 0
    assert stats.cache.size_bytes <= 2 * BLOCK


async def test_global_concurrency_and_budget_are_never_exceeded(
    engine_nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    concurrency, budget = 3, 5 * BLOCK
    engine = make_engine(
        engine_nursery, prefetch_concurrency=concurrency, prefetch_budget_bytes=budget, read_ahead_max_bytes=8 * BLOCK
    )
    files = [FakeFile.fixed(40 * BLOCK + 17, seed=n, delay_seconds=0.01) for n in range(6)]
    readers = [engine.open(file, identity=n) for n, file in enumerate(files)]
    peaks: list[tuple[int, int]] = []

    async def stream(reader: FileReader, file: FakeFile, piece: int) -> None:
        for offset in range(0, file.layout.size, piece):
            got = await reader.read(offset, piece)
            assert bytes(got) == file.data[offset : offset + piece]
            gate = engine.statistics().gate
            peaks.append((gate.inflight, gate.reserved_bytes))
            await trio.sleep(0.001)  # the application's own work between reads (virtual time)

    async with trio.open_nursery() as nursery:
        for n, (reader, file) in enumerate(zip(readers, files, strict=True)):
            nursery.start_soon(stream, reader, file, [1000, BLOCK, 3 * BLOCK][n % 3])
    for reader in readers:
        await reader.aclose()
    gate = engine.statistics().gate
    assert max(p[0] for p in peaks) <= concurrency and max(p[1] for p in peaks) <= budget
    assert gate.peak_inflight == concurrency  # the limit was reached, so the bound was really tested
    assert budget - BLOCK < gate.peak_reserved_bytes <= budget
    assert gate.refused > 0
    # prefetch slots + the reader's own demand fetches (a 3-block read spans up to 4 blocks)
    assert max(file.max_active for file in files) <= concurrency + 4
    assert gate.inflight == 0 and gate.reserved_bytes == 0  # everything settled after close
    stats = engine.statistics()
    assert stats.prefetch_outstanding == 0
    assert stats.prefetch_issued == stats.prefetch_used + stats.prefetch_wasted


async def test_aclose_cancels_outstanding_prefetch(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(64 * BLOCK)
    engine = make_engine(engine_nursery)
    reader = engine.open(file, identity="f")
    for index in range(3):
        await read_block(reader, file, index)
    file.hold = set(range(5, 64))
    await read_block(reader, file, 3)  # issues blocks 5, 6, 7, which hang
    assert sorted(file.hold & set(file.calls)) == [5, 6, 7]
    await reader.aclose()  # returns only once the cancelled fetches have unwound
    assert sorted(file.cancelled) == [5, 6, 7]
    stats = engine.statistics()
    assert stats.prefetch_cancelled == 3 and stats.prefetch_outstanding == 0
    assert stats.gate.inflight == 0 and stats.gate.reserved_bytes == 0
    assert stats.cache.inflight_fetches == 0
    await reader.aclose()  # idempotent


async def test_aclose_keeps_a_prefetch_another_handle_is_reading(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(8 * BLOCK)
    file.hold = {1}
    engine = make_engine(engine_nursery)
    first, second = engine.open(file, identity="f"), engine.open(file, identity="f")
    await first.read(0, 10)  # prefetches block 1, which hangs
    await trio.testing.wait_all_tasks_blocked()
    got: list[bytes] = []

    async def second_read() -> None:
        got.append(bytes(await second.read(BLOCK, 10)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second_read)
        await trio.testing.wait_all_tasks_blocked()
        closed = trio.Event()

        async def close_first() -> None:
            await first.aclose()
            closed.set()

        nursery.start_soon(close_first)
        await trio.testing.wait_all_tasks_blocked()
        # Not cancelled (the second handle waits for it), and aclose waits for it: the fetch uses first's OpenFile,
        # which the caller closes right after aclose.
        assert file.active == 1 and file.cancelled == [] and not closed.is_set()
        file.release.set()
    assert got == [file.data[BLOCK : BLOCK + 10]] and file.cancelled == [] and file.calls[1] == 1
    stats = engine.statistics()
    assert stats.prefetch_wasted == 1 and stats.gate.reserved_bytes == 0  # first handle's prefetch: abandoned


def test_gate_reservation_releases_once_in_either_order() -> None:
    gate = PrefetchGate(concurrency=2, budget_bytes=10)
    first = gate.try_reserve(6)
    assert first is not None and gate.try_reserve(5) is None  # over budget
    second = gate.try_reserve(4)
    assert second is not None and gate.try_reserve(0) is None  # no slot
    first.release()
    assert (gate.inflight, gate.reserved_bytes) == (2, 10)  # fetch still running: bytes still reserved
    first.fetch_ended()
    first.fetch_ended()
    assert (gate.inflight, gate.reserved_bytes) == (1, 4)
    second.fetch_ended()
    assert (gate.inflight, gate.reserved_bytes) == (0, 4)  # fetched, not yet read
    second.release()
    second.release()
    assert (gate.inflight, gate.reserved_bytes, gate.refused) == (0, 0, 2)
    assert (gate.peak_inflight, gate.peak_reserved_bytes) == (2, 10)


async def test_random_workload_settles_and_adds_up(engine_nursery: trio.Nursery) -> None:
    rng = random.Random(99)
    file = FakeFile([rng.choice([0, 1, BLOCK // 2, BLOCK, 3 * BLOCK]) for _ in range(60)], seed=3)
    engine = make_engine(engine_nursery, cache_size_bytes=12 * BLOCK, prefetch_budget_bytes=6 * BLOCK)
    readers = [engine.open(file, identity="f") for _ in range(2)]
    for _ in range(300):
        reader = rng.choice(readers)
        offset = rng.choice([rng.randrange(file.layout.size + 10), 0])
        got = await reader.read(offset, rng.choice([100, BLOCK, 2 * BLOCK]))
        assert bytes(got) == file.data[offset : offset + len(got)]
        if rng.random() < 0.5:
            await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics()
        assert stats.cache.size_bytes <= 12 * BLOCK and stats.gate.reserved_bytes <= 6 * BLOCK
        assert stats.prefetch_issued == stats.prefetch_used + stats.prefetch_wasted + stats.prefetch_outstanding
    for reader in readers:
        await reader.aclose()
    stats = engine.statistics()
    assert stats.prefetch_outstanding == 0 and stats.gate.reserved_bytes == 0 and stats.gate.inflight == 0


async def test_drop_behind_frees_what_a_sequential_reader_passed(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(32 * BLOCK)
    engine = make_engine(engine_nursery, drop_behind=True, **TIGHT)
    reader = engine.open(file, identity="f")
    for index in range(32):
        await read_block(reader, file, index)
        stats = engine.statistics()
        # The cache holds the blocks ahead (read-ahead: at most 4) and those within the backward tolerance
        # (1 block): never the whole file.
        assert stats.cache.entries <= 4 + 1 + 1, (index, stats.cache.entries)
    stats = engine.statistics()
    assert stats.cache.dropped_behind >= 32 - 2
    assert all(count == 1 for count in file.calls.values()) and len(file.calls) == 32  # no block fetched twice
    assert stats.bytes_fetched == stats.bytes_served == file.layout.size
    await reader.aclose()


async def test_without_drop_behind_the_cache_keeps_what_was_read(engine_nursery: trio.Nursery) -> None:
    file = FakeFile.fixed(32 * BLOCK)
    engine = make_engine(engine_nursery, **TIGHT)
    reader = engine.open(file, identity="f")
    for index in range(32):
        await read_block(reader, file, index)
    stats = engine.statistics()
    assert (stats.cache.entries, stats.cache.dropped_behind) == (32, 0)
    await reader.aclose()


async def test_drop_behind_tolerates_kernel_reordering(engine_nursery: trio.Nursery) -> None:
    # READs of half a block, pairs swapped across every block edge (the kernel's async readahead READ may overtake
    # the sync one): each late READ of a block's end still finds its block, so nothing is fetched twice.
    file = FakeFile.fixed(24 * BLOCK)
    engine = make_engine(engine_nursery, drop_behind=True, **TIGHT)
    reader = engine.open(file, identity="f")
    half = BLOCK // 2
    offsets = list(range(0, file.layout.size, half))
    for i in range(1, len(offsets) - 1, 2):
        offsets[i], offsets[i + 1] = offsets[i + 1], offsets[i]
    for offset in offsets:
        got = await reader.read(offset, half)
        assert bytes(got) == file.data[offset : offset + half]
        await trio.testing.wait_all_tasks_blocked()
    assert all(count == 1 for count in file.calls.values()) and len(file.calls) == 24
    assert engine.statistics().cache.dropped_behind > 0
    await reader.aclose()


async def test_drop_behind_spares_skipped_and_random_blocks_and_the_current_read(
    engine_nursery: trio.Nursery,
) -> None:
    file = FakeFile([BLOCK // 4] * 64)  # small blocks: one read spans many of them
    quarter = BLOCK // 4
    engine = make_engine(engine_nursery, drop_behind=True, **TIGHT)
    random_reader = engine.open(file, identity="f")
    for index in (40, 50, 60):  # random reads: cached, never dropped
        await random_reader.read(index * quarter, quarter)
    reader = engine.open(file, identity="f")
    # One read over 12 blocks (3 KiB more than the 1-block backward tolerance): all of it is served, none refetched.
    got = await reader.read(0, 12 * quarter)
    assert bytes(got) == file.data[: 12 * quarter]
    await trio.testing.wait_all_tasks_blocked()
    assert all(count == 1 for count in file.calls.values())
    # Sequential on, with a forward jump over blocks 13..19 (within the forward tolerance).
    await reader.read(12 * quarter, quarter)
    await trio.testing.wait_all_tasks_blocked()
    key = reader._key  # the cache key of a block of this file
    cache = engine.cache
    skipped_cached = [index for index in range(13, 20) if key(index) in cache]  # read-ahead fetched them
    await reader.read(20 * quarter, 4 * quarter)
    await reader.read(24 * quarter, 8 * quarter)
    await trio.testing.wait_all_tasks_blocked()
    assert all(key(index) not in cache for index in (*range(0, 13), *range(20, 24)))  # read whole and passed
    assert all(key(index) in cache for index in skipped_cached)  # never read by this cursor: kept
    assert all(key(index) in cache for index in (40, 50, 60))  # the random reader's blocks stay
    assert all(count == 1 for count in file.calls.values())
    await reader.aclose()
    await random_reader.aclose()


async def test_drop_behind_keeps_blocks_a_cursor_read_only_in_part(engine_nursery: trio.Nursery) -> None:
    # 100 bytes from every block: each read lies within the cursor's forward tolerance, so one cursor follows them
    # with a window, but no block was read whole, so none is dropped (a strided reader may come back for the rest).
    file = FakeFile.fixed(16 * BLOCK)
    engine = make_engine(engine_nursery, drop_behind=True, **TIGHT)
    reader = engine.open(file, identity="f")
    for index in range(16):
        got = await reader.read(index * BLOCK + 50, 100)
        assert bytes(got) == file.data[index * BLOCK + 50 : index * BLOCK + 150]
        await trio.testing.wait_all_tasks_blocked()
    stats = engine.statistics()
    assert stats.cache.dropped_behind == 0 and stats.window_resets == 0
    assert all(count == 1 for count in file.calls.values())
    await reader.aclose()
