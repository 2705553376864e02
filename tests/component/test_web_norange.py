"""The http(s):// source against python's ``http.server``, which ignores Range (tests/support/norange.py), through the
source and the read engine without FUSE: the file is read as one stream from byte 0 (directfs.sources.httprange,
"Servers that ignore Range"). Through a real mount: tests/mount/test_web_norange_mount.py."""

from __future__ import annotations

import errno
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from directfs.engine.reader import FileReader, ReadEngine, ReadSettings
from directfs.errors import BlockError, RangeNotSupportedError, StaleFileError
from directfs.sources.base import OpenFile, SourceOptions
from directfs.sources.httprange import STREAM_KEPT_BYTES, RangeFile
from directfs.sources.web import HTTPSource, create
from tests.support.norange import NoRangeServer, serve_no_range

BLOCK = 256 * 1024
DATA = random.Random(17).randbytes(3 * BLOCK)  # a file of 3 blocks
BIG = random.Random(18).randbytes(24 * BLOCK)  # 6 MiB, 24 blocks
HUGE = random.Random(19).randbytes(96 * BLOCK)  # 24 MiB: more than a stream keeps behind it (STREAM_KEPT_BYTES)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NoRangeServer]:
    (tmp_path / "three.bin").write_bytes(DATA)
    (tmp_path / "big.bin").write_bytes(BIG)
    (tmp_path / "huge.bin").write_bytes(HUGE)
    with serve_no_range(tmp_path) as served:
        yield served


def source_for(server: NoRangeServer, **kwargs: object) -> HTTPSource:
    return create(server.url, SourceOptions(block_size_bytes=BLOCK, **kwargs))  # type: ignore[arg-type]


@asynccontextmanager
async def reading(source: HTTPSource, path: str, **settings: object) -> AsyncIterator[tuple[FileReader, OpenFile]]:
    """A reader of ``path`` through a read engine of its own (so nothing is cached from an earlier test step)."""
    async with trio.open_nursery() as nursery:
        engine = ReadEngine(ReadSettings(**settings), nursery)  # type: ignore[arg-type]
        file = await source.open(path, await source.stat(path))
        reader = engine.open(file, path)
        try:
            yield reader, file
        finally:
            with trio.CancelScope(shield=True):
                await reader.aclose()
                await file.aclose()
            nursery.cancel_scope.cancel()


async def read_in_order(reader: FileReader, size: int, piece: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += await reader.read(len(out), piece)
    return bytes(out)


async def test_a_file_of_three_blocks_reads_exact_in_order_and_by_300_random_reads(server: NoRangeServer) -> None:
    source = source_for(server)
    try:
        # No read-ahead: one read at a time, so exactly one ranged GET is in flight when the 200 comes.
        async with reading(source, "three.bin", read_ahead_max_bytes=0) as (reader, _):
            assert await read_in_order(reader, len(DATA), 128 * 1024) == DATA
            assert await reader.read(len(DATA), 10) == b""
        # Detected once, from the status line: one ranged GET (its body not read), then one stream without Range.
        gets = server.gets("/three.bin")
        assert len(gets) == 2 and gets[0] == f"bytes=0-{128 * 1024 * 2 - 1}" and gets[1] is None, gets

        rng = random.Random(5)
        async with reading(source, "three.bin") as (reader, _):
            for _ in range(300):
                offset = rng.randrange(len(DATA))
                length = rng.choice([1, 100, 4096, 65536, 131072, BLOCK + 1])
                assert bytes(await reader.read(offset, length)) == DATA[offset : offset + length], (offset, length)
    finally:
        await source.aclose()


async def test_once_a_file_ignored_range_the_next_file_sends_one_probe_not_a_burst(server: NoRangeServer) -> None:
    source = source_for(server)
    try:
        async with reading(source, "three.bin") as (reader, _):
            assert await read_in_order(reader, len(DATA), BLOCK) == DATA  # read-ahead: a burst of first fetches
        async with reading(source, "big.bin") as (reader, _):
            assert await read_in_order(reader, len(BIG), BLOCK) == BIG
        gets = server.gets("/big.bin")
        assert len(gets) - gets.count(None) == 1, gets  # one ranged GET (the probe), then streams only
    finally:
        await source.aclose()


async def test_a_read_ahead_of_the_stream_waits_for_it_within_the_bound(server: NoRangeServer) -> None:
    source = source_for(server, no_range_max_size_bytes=8 * BLOCK)
    try:
        async with reading(source, "big.bin") as (reader, _):
            # Fresh: 7.5 blocks in, within 8 blocks of byte 0: the stream reads up to it.
            offset = 7 * BLOCK + BLOCK // 2
            assert bytes(await reader.read(offset, 1000)) == BIG[offset : offset + 1000]
            # Then 4 blocks further on: within the bound of where the stream now is.
            offset += 4 * BLOCK
            assert bytes(await reader.read(offset, 1000)) == BIG[offset : offset + 1000]
    finally:
        await source.aclose()


async def test_a_read_past_the_bound_is_eopnotsupp_and_says_why(server: NoRangeServer) -> None:
    source = source_for(server, no_range_max_size_bytes=4 * BLOCK)
    try:
        async with reading(source, "big.bin") as (reader, _):
            with pytest.raises(RangeNotSupportedError) as caught:
                await reader.read(20 * BLOCK, 4096)
            assert caught.value.errno == errno.EOPNOTSUPP
            message = str(caught.value)
            assert "ignores Range" in message and "--no-range-max-size (1M)" in message, message
            # A read in order from the start still works, past the bound, to the last byte.
            assert await read_in_order(reader, len(BIG), 1024 * 1024) == BIG
    finally:
        await source.aclose()


async def test_a_block_evicted_after_the_stream_passed_it_is_read_again_from_a_new_stream(
    server: NoRangeServer,
) -> None:
    assert len(HUGE) > STREAM_KEPT_BYTES + 16 * BLOCK
    source = source_for(server, no_range_max_size_bytes=4 * BLOCK)
    try:
        # A cache of 2 blocks: by the end of the file the first blocks are long gone, from the cache and the stream.
        async with reading(source, "huge.bin", cache_size_bytes=2 * BLOCK, read_ahead_max_bytes=BLOCK) as (reader, _):
            assert await read_in_order(reader, len(HUGE), BLOCK) == HUGE
            streams_before = server.gets("/huge.bin").count(None)
            # Within the bound of byte 0: a new stream from the start serves it.
            assert bytes(await reader.read(100, 5000)) == HUGE[100:5100]
            assert server.gets("/huge.bin").count(None) == streams_before + 1
            # Evicted and further than the bound from any stream: EOPNOTSUPP, not a silent re-read of the file.
            with pytest.raises(RangeNotSupportedError):
                await reader.read(12 * BLOCK, 100)
    finally:
        await source.aclose()


async def test_blocks_come_straight_from_the_stream_and_memory_stays_bounded(server: NoRangeServer) -> None:
    source = source_for(server)
    try:
        file = await source.open("huge.bin", await source.stat("huge.bin"))
        assert isinstance(file, RangeFile)
        try:
            for index in range(file.layout.block_count):
                assert bytes(await file.fetch_block(index)) == HUGE[index * BLOCK : (index + 1) * BLOCK]
                no_range = file._no_range
                assert no_range is not None
                # Never the whole object: the blocks a read waits for (none now) plus what the stream keeps.
                kept = sum(len(block) for stream in no_range._streams for block in stream.blocks.values())
                assert kept <= max(STREAM_KEPT_BYTES, 2 * BLOCK) + BLOCK
        finally:
            await file.aclose()
        assert server.gets("/huge.bin").count(None) == 1  # one stream for the whole file
    finally:
        await source.aclose()


async def test_closing_the_file_ends_a_paused_stream_at_once(server: NoRangeServer) -> None:
    # No filterwarnings mark: a stream closed part-way ends httpx's body generators from the inside, so trio has
    # none to warn about (pytest turns that ResourceWarning into an error).
    source = source_for(server)
    try:
        file = await source.open("huge.bin", await source.stat("huge.bin"))
        assert isinstance(file, RangeFile)
        assert bytes(await file.fetch_range(10, 10)) == HUGE[10:20]
        no_range = file._no_range
        assert no_range is not None
        (stream,) = no_range._streams
        with trio.fail_after(10):
            # The stream's own task changes the state, on the network's time: polled.
            while stream.state.value != "paused":  # noqa: ASYNC110 - nothing more is wanted: the stream stops
                await trio.sleep(0.01)
            await file.aclose()
        assert stream.finished.is_set() and stream.state.value == "closed" and not stream.blocks
        # It paused instead of reading the rest of the file: well under the 24 MiB went out (socket buffers, and the
        # refused ranged GET's first megabytes, are all that was sent).
        assert server.bytes_sent[0] < len(HUGE) // 2
    finally:
        await source.aclose()


async def test_a_file_that_changed_size_is_estale_not_wrong_bytes(server: NoRangeServer, tmp_path: Path) -> None:
    source = source_for(server)
    try:
        entry = await source.stat("three.bin")
        (tmp_path / "three.bin").write_bytes(DATA + b"more")  # replaced after the stat, before the stream
        file = await source.open("three.bin", entry)
        try:
            with pytest.raises(StaleFileError):
                await file.fetch_block(1)
        finally:
            await file.aclose()
    finally:
        await source.aclose()


async def test_a_server_that_dies_mid_body_fails_the_read_and_the_next_read_starts_over(server: NoRangeServer) -> None:
    source = source_for(server)
    try:
        file = await source.open("big.bin", await source.stat("big.bin"))
        try:
            server.cut_after_bytes = 5 * BLOCK + 100  # the stream dies in block 6
            assert bytes(await file.fetch_block(0)) == BIG[:BLOCK]
            with trio.fail_after(30), pytest.raises(BlockError) as caught:  # an error, not a hang or wrong bytes
                await file.fetch_block(7)
            assert caught.value.errno in (errno.EIO, errno.ENETRESET), caught.value
            server.cut_after_bytes = None
            # The failed stream is not used again: a new one from byte 0 (7 blocks: within the default bound).
            assert bytes(await file.fetch_block(7)) == BIG[7 * BLOCK : 8 * BLOCK]
        finally:
            await file.aclose()
    finally:
        await source.aclose()


async def test_concurrent_random_reads_of_one_handle_share_the_stream(server: NoRangeServer) -> None:
    # The kernel sends a handle's READs concurrently: 4 readers x 75 random reads, all byte-exact.
    source = source_for(server)
    try:
        async with reading(source, "big.bin") as (reader, _):

            async def reads(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(75):
                    offset = rng.randrange(len(BIG))
                    length = rng.choice([1, 4096, 131072, 3 * BLOCK])
                    assert bytes(await reader.read(offset, length)) == BIG[offset : offset + length], (offset, length)

            async with trio.open_nursery() as nursery:
                for seed in range(4):
                    nursery.start_soon(reads, seed)
        assert server.gets("/big.bin").count(None) <= 2  # MAX_STREAMS_PER_FILE at most, here one
    finally:
        await source.aclose()
