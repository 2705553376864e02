"""Blocks and Streamer APIs against the real block server: ranges, ordering, resume, concurrency, back-pressure."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel

from directfs import ByteRange, DirectIO
from directfs.errors import ConfigError, DownloadError, ObjectNotFoundError, StreamError
from tests.support.blockserver import SECRET, BlockServer, Fault, client, payload

# Awkward sizes: blocks of varying length, and a file that is not a multiple of any of them.
LENGTHS = [10_000, 1, 25_000, 10_000, 4_999, 30_000]
SIZE = sum(LENGTHS)
DATA = payload(SIZE, seed=7)


@pytest.fixture
def server() -> Iterator[BlockServer]:
    with BlockServer(SECRET) as s:
        s.add_file("1", DATA, LENGTHS)
        yield s


async def stream_bytes(dio: DirectIO, byte_range: ByteRange | None, max_workers: int = 4) -> bytes:
    async with dio.streamer("1", byte_range, max_workers=max_workers) as stream:
        return b"".join([bytes(fragment) async for fragment in stream])


RANGES = [
    (None, DATA),
    (ByteRange(), DATA),
    (ByteRange(0, 0), DATA[:1]),
    (ByteRange(0, 9_999), DATA[:10_000]),  # end inclusive, exactly one block
    (ByteRange(0, 10_000), DATA[:10_001]),  # ... and the 1-byte block after it
    (ByteRange(9_999, 10_001), DATA[9_999:10_002]),
    (ByteRange(10_000, 10_000), DATA[10_000:10_001]),  # just the 1-byte block
    (ByteRange(12_345, 50_000), DATA[12_345:50_001]),
    (ByteRange(SIZE - 1), DATA[-1:]),  # start = size - 1
    (ByteRange(SIZE - 1, SIZE - 1), DATA[-1:]),
    (ByteRange(SIZE), b""),  # start = size: nothing (cterasdk returns the whole file)
    (ByteRange(SIZE + 10), b""),  # start > size
    (ByteRange(SIZE + 10, SIZE + 20), b""),
    (ByteRange(100, SIZE * 3), DATA[100:]),  # end >= size clamps
    (ByteRange(40_000, SIZE - 1), DATA[40_000:]),
]


@pytest.mark.parametrize(("byte_range", "expected"), RANGES, ids=[str(r[0]) for r in RANGES])
async def test_streamer_ranges(server: BlockServer, byte_range: ByteRange | None, expected: bytes) -> None:
    async with client(server) as dio:
        assert await stream_bytes(dio, byte_range) == expected


async def test_streamer_random_ranges(server: BlockServer) -> None:
    rng = random.Random(11)
    async with client(server) as dio:
        for _ in range(25):
            start = rng.randrange(SIZE + 5)
            end = start + rng.randrange(SIZE)
            assert (
                await stream_bytes(dio, ByteRange(start, end), max_workers=rng.randint(1, 5)) == DATA[start : end + 1]
            )


async def test_streamer_past_eof_fetches_no_block(server: BlockServer) -> None:
    async with client(server) as dio:
        assert await stream_bytes(dio, ByteRange(SIZE)) == b""
    assert server.stats.started == 0


async def test_stream_exposes_its_span(server: BlockServer) -> None:
    async with client(server) as dio, dio.streamer("1", ByteRange(5, SIZE + 100)) as stream:
        assert (stream.start, stream.end_inclusive, stream.size) == (5, SIZE - 1, SIZE)
        async for _ in stream:
            pass
        assert stream.position == SIZE


@pytest.mark.parametrize("failing_block", [1, 3, 6])
async def test_resume_after_block_failure_reproduces_exact_bytes(server: BlockServer, failing_block: int) -> None:
    server.block_faults[("1", failing_block)] = [Fault(status=404)]  # not retried: the stream must stop
    byte_range = ByteRange(7, SIZE - 3)
    received = bytearray()
    async with client(server) as dio:
        with pytest.raises(StreamError) as info:
            async with dio.streamer("1", byte_range, max_workers=3) as stream:
                async for fragment in stream:
                    received += fragment
        block_start = sum(LENGTHS[: failing_block - 1])
        assert info.value.offset == max(block_start, byte_range.start)
        assert info.value.offset == byte_range.start + len(received)
        assert isinstance(info.value.__cause__, DownloadError)
        async with dio.streamer("1", ByteRange(info.value.offset, byte_range.end)) as stream:
            async for fragment in stream:
                received += fragment
    assert bytes(received) == DATA[7 : SIZE - 2]


async def test_open_errors_are_raised_as_they_are(server: BlockServer) -> None:
    async with client(server) as dio:
        with pytest.raises(ObjectNotFoundError):
            async with dio.streamer("404") as stream:
                async for _ in stream:
                    pass


async def test_consumer_exceptions_propagate_unwrapped(server: BlockServer) -> None:
    async with client(server) as dio:
        with pytest.raises(KeyError):
            async with dio.streamer("1", max_workers=2) as stream:
                async for _ in stream:
                    raise KeyError("consumer bug")
        with pytest.raises(KeyError):
            async with dio.blocks("1", max_workers=2) as blocks:
                async for _ in blocks:
                    raise KeyError("consumer bug")


async def test_leaving_early_cancels_outstanding_fetches(server: BlockServer) -> None:
    async with client(server) as dio:
        async with dio.streamer("1", max_workers=2) as stream:
            async for _ in stream:
                break
        # The client is still healthy afterwards.
        assert await stream_bytes(dio, ByteRange(0, 10)) == DATA[:11]


async def test_outer_cancellation_is_not_swallowed(server: BlockServer) -> None:
    async with client(server) as dio:
        with trio.CancelScope() as scope:
            async with dio.streamer("1", max_workers=2) as stream:
                async for _ in stream:
                    scope.cancel()
                    await trio.lowlevel.checkpoint()
                    pytest.fail("cancellation must reach the consumer")
        assert scope.cancelled_caught


async def test_blocks_api_delivers_every_block_once(server: BlockServer) -> None:
    async with client(server) as dio, dio.blocks("1", max_workers=3) as blocks:
        got = [block async for block in blocks]
    assert sorted(b.number for b in got) == list(range(1, len(LENGTHS) + 1))
    for block in got:
        assert block.length == LENGTHS[block.number - 1]
        assert bytes(block.data) == DATA[block.offset : block.offset + block.length]


async def test_blocks_api_selects_blocks_overlapping_the_range(server: BlockServer) -> None:
    async with client(server) as dio:
        async with dio.blocks("1", ByteRange(10_000, 10_001)) as blocks:
            assert sorted(b.number for b in [b async for b in blocks]) == [2, 3]  # whole, untrimmed blocks
        async with dio.blocks("1", ByteRange(SIZE)) as blocks:
            assert [b async for b in blocks] == []


async def test_blocks_api_raises_a_failed_block(server: BlockServer) -> None:
    server.block_faults[("1", 4)] = [Fault(status=404)]
    async with client(server) as dio:
        with pytest.raises(DownloadError) as info:
            async with dio.blocks("1") as blocks:
                async for _ in blocks:
                    pass
    assert info.value.block is not None and info.value.block.number == 4


@pytest.mark.parametrize("max_workers", [1, 3])
async def test_max_workers_bounds_concurrency_at_the_server(max_workers: int) -> None:
    data = payload(40 * 4096)
    with BlockServer(SECRET, block_delay_seconds=0.01) as server:
        server.add_file("2", data, block_size=4096)
        async with client(server) as dio:
            async with dio.blocks("2", max_workers=max_workers) as blocks:
                got = {b.number: b async for b in blocks}
            assert len(got) == 40
            async with dio.streamer("2", max_workers=max_workers) as stream:
                assert b"".join([bytes(f) async for f in stream]) == data
                assert stream.max_in_flight <= max_workers
    assert server.stats.max_in_flight <= max_workers
    if max_workers > 1:
        assert server.stats.max_in_flight > 1  # the bound is reached, not just respected by being serial


async def test_streamer_fetches_lower_offsets_first() -> None:
    data = payload(30 * 4096)
    with BlockServer(SECRET) as server:
        server.add_file("2", data, block_size=4096)
        async with client(server) as dio:
            assert await _stream_all(dio, "2", max_workers=4) == data
    order = server.stats.block_order
    # Requests start in file order; with 4 workers no request is more than 3 places early or late.
    assert sorted(order) == list(range(1, 31))
    assert all(abs(number - 1 - position) <= 3 for position, number in enumerate(order))


async def _stream_all(dio: DirectIO, file_id: str, max_workers: int) -> bytes:
    async with dio.streamer(file_id, max_workers=max_workers) as stream:
        return b"".join([bytes(f) async for f in stream])


@pytest.mark.parametrize("api", ["streamer", "blocks"])
async def test_slow_consumer_back_pressure(api: str) -> None:
    data = payload(60 * 4096)
    max_workers = 3
    with BlockServer(SECRET) as server:
        server.add_file("2", data, block_size=4096)
        async with client(server) as dio:
            manager = dio.streamer("2", max_workers=max_workers) if api == "streamer" else dio.blocks("2", None, 3)
            async with manager as stream:
                count = 0
                async for _ in stream:
                    count += 1
                    server.stats.consumed += 1
                    await trio.sleep(0.002)  # a slow consumer: fetching must wait for it, not run ahead
                assert stream.max_held <= max_workers
    assert count == 60
    # At any block request, fetched-but-unconsumed blocks (incl. in flight) never exceeded max_workers.
    assert server.stats.max_ahead <= max_workers
    assert server.stats.max_ahead >= 2  # and the window was used


async def test_bad_max_workers(server: BlockServer) -> None:
    async with client(server) as dio:
        for bad in (0, -1, 1.5):
            with pytest.raises(ConfigError):
                async with dio.streamer("1", max_workers=bad):  # type: ignore[arg-type]
                    pass


async def test_a_second_streamer_over_a_cached_range_makes_no_block_get(server: BlockServer) -> None:
    # The Python API reads through the engine: blocks the first stream fetched are cached, so the second stream over
    # the same range is served from memory (one Portal call for the block list, no storage GET).
    async with client(server) as dio:
        assert await stream_bytes(dio, ByteRange(5, 40_000)) == DATA[5:40_001]
        gets = server.stats.started
        assert gets == 4  # the blocks overlapping bytes 5..40,000: lengths 10,000 + 1 + 25,000 + 10,000
        assert await stream_bytes(dio, ByteRange(100, 39_000)) == DATA[100:39_001]
        async with dio.blocks("1", ByteRange(0, 40_000)) as blocks:
            assert sorted([block.number async for block in blocks]) == [1, 2, 3, 4]
        assert server.stats.started == gets
        assert dio.engine.statistics().cache.hits >= 8
        # A range beyond what was read fetches only the blocks not cached yet.
        assert await stream_bytes(dio, ByteRange(30_000)) == DATA[30_000:]
        assert server.stats.started == gets + 2


async def test_two_concurrent_streamers_fetch_each_block_once(server: BlockServer) -> None:
    async with client(server) as dio:
        async with trio.open_nursery() as nursery:
            results: list[bytes] = []

            async def one() -> None:
                results.append(await stream_bytes(dio, None))

            nursery.start_soon(one)
            nursery.start_soon(one)
        assert results == [DATA, DATA]
        assert sorted(server.stats.block_requests.values()) == [1] * len(LENGTHS)


async def test_leaving_a_stream_early_cancels_the_fetches_nobody_waits_for(server: BlockServer) -> None:
    for number in range(2, len(LENGTHS) + 1):
        server.block_faults[("1", number)].append(Fault(delay_seconds=1.5))  # only block 1 answers at once
    async with client(server) as dio:
        with trio.fail_after(1):  # not waiting out the slow GETs
            async with dio.streamer("1", max_workers=len(LENGTHS)) as stream:
                async for _fragment in stream:
                    break
        statistics = dio.engine.statistics()
        assert statistics.cache.inflight_fetches == 0
        assert statistics.cache.cancelled_fetches == len(LENGTHS) - 1  # the rest of the window: cancelled, not awaited


async def test_a_reader_of_the_api_reads_any_range_through_the_engine(server: BlockServer) -> None:
    async with client(server) as dio:
        opened = await dio.open("1")
        reader = dio.reader(opened)
        rng = random.Random(11)
        for _ in range(50):
            offset = rng.randrange(SIZE + 10)
            size = rng.randrange(1, 30_000)
            assert bytes(await reader.read(offset, size)) == DATA[offset : offset + size]
        await reader.aclose()
        await opened.aclose()
        assert server.stats.started == len(LENGTHS)  # every block fetched once, then served from the cache


async def test_api_blocks_and_fragments_are_read_only_views(server: BlockServer) -> None:
    async with client(server) as dio:
        async with dio.blocks("1") as blocks:
            async for block in blocks:
                assert isinstance(block.data, memoryview) and block.data.readonly
        async with dio.streamer("1") as stream:
            async for fragment in stream:
                assert isinstance(fragment, memoryview) and fragment.readonly
                with pytest.raises(TypeError):
                    fragment[:1] = b"x"
