"""ReadEngine / FileReader: exact bytes over awkward layouts, zero-copy slices, errors, statistics."""

from __future__ import annotations

import errno
import random
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from directfs.engine.reader import FileReader, ReadEngine, ReadSettings
from directfs.errors import (
    BlockValidationError,
    ConfigError,
    DirectFSError,
    DownloadError,
    InvalidArgumentError,
)
from tests.support.fakefile import BLOCK, FakeFile


@pytest.fixture
async def engine_nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


def make_engine(nursery: trio.Nursery, **overrides: int | float) -> ReadEngine:
    return ReadEngine(ReadSettings(**overrides), nursery)  # type: ignore[arg-type]


AWKWARD = {
    "empty": [],
    "one-byte": [1],
    "block-1": [BLOCK - 1],
    "block": [BLOCK],
    "block+1": [BLOCK, 1],
    "many": [BLOCK] * 37 + [123],
    "variable": [1, 0, 5000, 3, 0, 0, 8192, 17, 4096, 0],
    "zero-blocks-only": [0, 0],
}


async def check_random_reads(reader: FileReader, reference: bytes, rng: random.Random, count: int) -> None:
    size = len(reference)
    for _ in range(count):
        offset = rng.randrange(0, size + 2 * BLOCK + 2)
        length = rng.choice([0, 1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, rng.randrange(0, 5 * BLOCK)])
        got = await reader.read(offset, length)
        assert bytes(got) == reference[offset : offset + length], (offset, length)


@pytest.mark.parametrize("name", sorted(AWKWARD))
@pytest.mark.parametrize("cache_size", [0, 3 * BLOCK, 1 << 20])
async def test_random_reads_match_reference(engine_nursery: trio.Nursery, name: str, cache_size: int) -> None:
    file = FakeFile(AWKWARD[name], seed=len(name))
    engine = make_engine(
        engine_nursery, cache_size_bytes=cache_size, prefetch_budget_bytes=cache_size // 2, read_ahead_max_bytes=BLOCK
    )
    reader = engine.open(file, identity=name)
    await check_random_reads(reader, file.data, random.Random(1234), 150)
    # a sequential pass in kernel-sized pieces, read-ahead included
    pos = 0
    while pos <= file.layout.size:
        got = await reader.read(pos, 1000)
        assert bytes(got) == file.data[pos : pos + 1000]
        pos += 1000
    await reader.aclose()
    assert engine.statistics().cache.size_bytes <= cache_size


async def test_concurrent_readers_and_handles_match_reference(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK] * 20 + [BLOCK // 3, 0, 7], seed=7)
    engine = make_engine(engine_nursery, cache_size_bytes=6 * BLOCK, prefetch_budget_bytes=3 * BLOCK)
    readers = [engine.open(file, identity="f") for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for n, reader in enumerate(readers * 2):
            nursery.start_soon(check_random_reads, reader, file.data, random.Random(n), 60)
    for reader in readers:
        await reader.aclose()
    stats = engine.statistics()
    assert stats.cache.size_bytes <= 6 * BLOCK
    assert stats.gate.inflight == 0 and stats.gate.reserved_bytes == 0


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 3 * BLOCK), max_size=8),
    reads=st.lists(st.tuples(st.integers(0, 30_000), st.integers(0, 20_000)), min_size=1, max_size=12),
    cache_blocks=st.integers(0, 4),
)
def test_hypothesis_reads_match_reference(lengths: list[int], reads: list[tuple[int, int]], cache_blocks: int) -> None:
    async def main() -> None:
        file = FakeFile(lengths, seed=len(lengths))
        async with trio.open_nursery() as nursery:
            cache_size = cache_blocks * BLOCK
            engine = make_engine(nursery, cache_size_bytes=cache_size, prefetch_budget_bytes=cache_size)
            reader = engine.open(file, identity="h")
            for offset, length in reads:
                assert bytes(await reader.read(offset, length)) == file.data[offset : offset + length]
                assert engine.statistics().cache.size_bytes <= cache_size
            await reader.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


async def test_read_within_one_block_is_a_zero_copy_view(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK, BLOCK])
    reader = make_engine(engine_nursery).open(file, identity="f")
    inside = await reader.read(10, 100)
    assert isinstance(inside, memoryview) and inside.readonly
    assert bytes(inside) == file.data[10:110]
    whole = await reader.read(0, BLOCK)
    assert type(whole) is bytes and whole == file.data[:BLOCK]  # a whole block: the cached object itself
    spanning = await reader.read(BLOCK - 5, 10)
    assert type(spanning) is bytes and spanning == file.data[BLOCK - 5 : BLOCK + 5]


async def test_eviction_does_not_disturb_a_view_still_in_use(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK] * 3)
    engine = make_engine(engine_nursery, cache_size_bytes=BLOCK, prefetch_budget_bytes=0)
    reader = engine.open(file, identity="f")
    view = await reader.read(100, 200)  # a view into cached block 0
    for index in (1, 2):
        await reader.read(index * BLOCK, 10)
    assert engine.statistics().cache.evictions == 2 and engine.statistics().cache.size_bytes == BLOCK
    assert bytes(view) == file.data[100:300]  # the view keeps its block alive and unchanged


async def test_bytearray_blocks_are_never_handed_out_writable(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK])
    file.bytearrays = True
    reader = make_engine(engine_nursery).open(file, identity="f")
    whole = await reader.read(0, BLOCK)
    assert isinstance(whole, memoryview) and whole.readonly and bytes(whole) == file.data


async def test_spanning_read_fetches_missing_blocks_concurrently(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK] * 4)
    file.hold = {0, 1, 2, 3}
    reader = make_engine(engine_nursery).open(file, identity="f")
    got: list[bytes | memoryview] = []

    async def read() -> None:
        got.append(await reader.read(1, 4 * BLOCK - 2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert file.active == 4  # all four blocks requested at once
        file.release.set()
    assert bytes(got[0]) == file.data[1 : 4 * BLOCK - 1]


async def test_eof_and_bad_arguments(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([10])
    reader = make_engine(engine_nursery).open(file, identity="f")
    assert await reader.read(10, 5) == b""
    assert await reader.read(11, 5) == b""
    assert await reader.read(3, 0) == b""
    assert bytes(await reader.read(8, 100)) == file.data[8:]
    with pytest.raises(InvalidArgumentError) as caught:
        await reader.read(-1, 5)
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(InvalidArgumentError):
        await reader.read(0, -1)
    await reader.aclose()
    await reader.aclose()  # idempotent
    with pytest.raises(DirectFSError, match="closed"):
        await reader.read(0, 1)


async def test_wrong_length_from_source_is_an_error_and_not_cached(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK, BLOCK])
    file.short = {1}
    engine = make_engine(engine_nursery, failed_block_memory_seconds=0)
    reader = engine.open(file, identity="f")
    with pytest.raises(BlockValidationError, match="4095 bytes for block 1"):
        await reader.read(BLOCK, 10)
    assert engine.statistics().cache.entries == 0
    file.short.clear()
    assert bytes(await reader.read(BLOCK, 10)) == file.data[BLOCK : BLOCK + 10]


async def test_failing_block_in_a_spanning_read_raises_our_error(
    engine_nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    file = FakeFile([BLOCK] * 3)
    file.failures[1] = DownloadError("storage said 503")
    engine = make_engine(engine_nursery, failed_block_memory_seconds=5)
    reader = engine.open(file, identity="f")
    with pytest.raises(DownloadError, match="503"):  # not an ExceptionGroup
        await reader.read(10, 3 * BLOCK - 20)
    with pytest.raises(DownloadError, match="503"):  # the kernel's retry: fails fast from memory
        await reader.read(BLOCK, 10)
    assert file.calls[1] == 1
    await trio.sleep(5)
    del file.failures[1]
    assert bytes(await reader.read(BLOCK, 10)) == file.data[BLOCK : BLOCK + 10]


async def test_cancelled_read_does_not_cancel_the_fetch_another_handle_waits_for(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK] * 2)
    file.hold = {1}
    engine = make_engine(engine_nursery)
    first, second = engine.open(file, identity="f"), engine.open(file, identity="f")
    got: list[bytes | memoryview] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.read, BLOCK + 1, 10)
            await trio.testing.wait_all_tasks_blocked()

            async def second_read() -> None:
                got.append(await second.read(BLOCK + 5, 10))

            nursery.start_soon(second_read)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught and not got
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second_read)
        await trio.testing.wait_all_tasks_blocked()
        file.release.set()
    assert bytes(got[0]) == file.data[BLOCK + 5 : BLOCK + 15]
    assert file.calls[1] == 1 and file.cancelled == []


async def test_statistics_add_up(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK] * 16)
    engine = make_engine(engine_nursery, cache_size_bytes=64 * BLOCK, prefetch_budget_bytes=8 * BLOCK)
    reader = engine.open(file, identity="f")
    served = 0
    for offset in [*range(0, 16 * BLOCK, 1000), 5, 9 * BLOCK, 3]:
        served += len(await reader.read(offset, 1000))
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics()
        assert stats.prefetch_issued == stats.prefetch_used + stats.prefetch_wasted + stats.prefetch_outstanding
    stats = engine.statistics()
    assert stats.bytes_served == served and stats.reads == 16 * BLOCK // 1000 + 1 + 3
    assert stats.bytes_fetched == sum(file.calls[i] * BLOCK for i in file.calls) == 16 * BLOCK
    assert stats.prefetch_issued > 0 and stats.prefetch_wasted == 0
    assert stats.cache.misses + stats.cache.hits >= stats.reads
    assert stats.cache.fetches_started == sum(file.calls.values())
    assert 0 < stats.read_amplification < 1  # every block fetched once, some bytes read twice
    assert stats.open_readers == 1
    await reader.aclose()
    stats = engine.statistics()
    assert stats.open_readers == 0 and stats.prefetch_outstanding == 0


def test_settings_are_validated() -> None:
    ReadSettings()  # the defaults are consistent
    with pytest.raises(ConfigError):
        ReadSettings(cache_size_bytes=-1)
    with pytest.raises(ConfigError):
        ReadSettings(prefetch_concurrency=0)
    with pytest.raises(ConfigError):
        ReadSettings(cursors_per_file=0)
    with pytest.raises(ConfigError):
        ReadSettings(failed_block_memory_seconds=-1)
    assert ReadSettings().effective_prefetch_budget_bytes == ReadSettings().prefetch_budget_bytes
    assert ReadSettings(cache_size_bytes=64 << 20).effective_prefetch_budget_bytes == 32 << 20


async def test_read_ahead_zero_disables_prefetch(engine_nursery: trio.Nursery) -> None:
    file = FakeFile([BLOCK] * 8)
    engine = make_engine(engine_nursery, read_ahead_max_bytes=0)
    reader = engine.open(file, identity="f")
    for offset in range(0, 8 * BLOCK, 1000):
        assert bytes(await reader.read(offset, 1000)) == file.data[offset : offset + 1000]
        await trio.testing.wait_all_tasks_blocked()
    assert engine.statistics().prefetch_issued == 0 and sum(file.calls.values()) == 8
