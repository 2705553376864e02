"""Cheap first fetch: non-sequential reads on range-capable stores fetch small aligned ranges, not whole blocks.

Reader level with a fake ``RangeReadable`` file that counts every byte it hands out (exact bytes, bounded
amplification, single-flight, never mixing ranges with blocks); ``fetch_range`` strictness of ``RangeFile`` (scripted
replies via ``httpx.MockTransport``) and of the local source. Against the real HTTP file server:
tests/component/test_range_reads_http.py; through a real mount: tests/mount/test_range_reads_mount.py.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio

from directfs.engine.cache import BlockKey
from directfs.engine.reader import MAX_RANGES_PER_READ, ReadEngine, ReadSettings
from directfs.errors import (
    BlockValidationError,
    DownloadError,
    InvalidArgumentError,
    StaleFileError,
)
from directfs.http import RetryPolicy
from directfs.sources.base import BlockLayout, RangeReadable, SourceOptions
from directfs.sources.httprange import RangeFile
from directfs.sources.registry import create_source

KiB = 1024
BLOCK = 64 * KiB
GRANULE = 4 * KiB  # ranges of the engine under test: 16 per block


class RangeFakeFile:
    """A ``RangeReadable`` open file over random bytes with fixed blocks; counts fetched bytes per kind."""

    def __init__(self, size: int, *, block_size: int = BLOCK, seed: int = 0) -> None:
        self.layout = BlockLayout.fixed("v1", size, block_size)
        self.data = random.Random(seed).randbytes(size)
        self.block_calls: Counter[int] = Counter()
        self.range_calls: Counter[tuple[int, int]] = Counter()
        self.fetched_bytes = 0
        self.short_ranges = False
        self.release: trio.Event | None = None  # when set to an Event, range fetches wait for it

    async def fetch_block(self, index: int) -> bytes:
        self.block_calls[index] += 1
        await trio.lowlevel.checkpoint()
        start, end = self.layout.offsets[index], self.layout.offsets[index + 1]
        self.fetched_bytes += end - start
        return self.data[start:end]

    async def fetch_range(self, start: int, length: int) -> bytes:
        assert start >= 0 and length > 0 and start + length <= self.layout.size
        self.range_calls[(start, length)] += 1
        if self.release is not None:
            await self.release.wait()
        else:
            await trio.lowlevel.checkpoint()
        self.fetched_bytes += length
        return self.data[start : start + length - (1 if self.short_ranges else 0)]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.fixture
async def engine_nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


def make_engine(nursery: trio.Nursery, **overrides: object) -> ReadEngine:
    settings: dict[str, object] = {"random_read_bytes": GRANULE, "sequential_backward_tolerance_bytes": 8 * KiB}
    settings.update(overrides)
    return ReadEngine(ReadSettings(**settings), nursery)  # type: ignore[arg-type]


async def test_random_reads_are_exact_and_fetch_only_small_ranges(engine_nursery: trio.Nursery) -> None:
    size = 40 * BLOCK + 777  # the last range and the last block are short
    file = RangeFakeFile(size)
    # No backward tolerance: a random read then only looks sequential when it starts exactly where one of the last
    # few ended (never, with this seed), so every read here must take the range path.
    engine = make_engine(engine_nursery, sequential_backward_tolerance_bytes=0)
    reader = engine.open(file, identity="f")
    rng = random.Random(7)
    served = 0
    for _ in range(300):
        offset = rng.randrange(1, size)
        length = rng.choice([1, 100, GRANULE - 1, GRANULE, GRANULE + 1, 2 * GRANULE + 3])
        got = bytes(await reader.read(offset, length))
        assert got == file.data[offset : offset + length], (offset, length)
        served += len(got)
    assert not file.block_calls  # no random read took a whole block
    # Each read fetches at most the aligned ranges it touches: ceil(length / granule) + 1 of them.
    assert file.fetched_bytes <= 300 * 4 * GRANULE
    assert all(length <= GRANULE for _, length in file.range_calls)
    assert all(start % GRANULE == 0 for start, _ in file.range_calls)
    assert max(file.range_calls.values()) == 1  # a range is fetched once, then served from the cache
    await reader.aclose()


async def test_short_last_range_at_end_of_file(engine_nursery: trio.Nursery) -> None:
    size = 3 * BLOCK + 10
    file = RangeFakeFile(size)
    reader = make_engine(engine_nursery).open(file, identity="f")
    assert bytes(await reader.read(size - 5, 100)) == file.data[size - 5 :]
    assert list(file.range_calls) == [(size - 10, 10)]
    await reader.aclose()


async def test_sequential_reads_keep_whole_blocks_and_read_ahead(engine_nursery: trio.Nursery) -> None:
    file = RangeFakeFile(8 * BLOCK)
    reader = make_engine(engine_nursery).open(file, identity="f")
    got = bytearray()
    while chunk := await reader.read(len(got), 5000):
        got += chunk
    assert got == file.data
    assert not file.range_calls
    assert set(file.block_calls) == set(range(8)) and max(file.block_calls.values()) == 1
    await reader.aclose()


async def test_a_random_start_turns_sequential_on_the_next_contiguous_read(engine_nursery: trio.Nursery) -> None:
    file = RangeFakeFile(8 * BLOCK)
    reader = make_engine(engine_nursery).open(file, identity="f")
    offset = 3 * BLOCK + 100
    assert bytes(await reader.read(offset, 1000)) == file.data[offset : offset + 1000]
    assert len(file.range_calls) == 1 and not file.block_calls
    assert bytes(await reader.read(offset + 1000, 1000)) == file.data[offset + 1000 : offset + 2000]
    assert file.block_calls[3] == 1  # now sequential: whole blocks (and read-ahead) as before
    await reader.aclose()


async def test_far_jumps_within_the_forward_tolerance_stay_random(engine_nursery: trio.Nursery) -> None:
    # A strided reader (4 KiB every 3 blocks) lands within the 16 MiB forward tolerance of its cursor each time, but
    # never continues it closely: it must not be promoted to whole blocks and read-ahead.
    file = RangeFakeFile(64 * BLOCK)
    reader = make_engine(engine_nursery).open(file, identity="f")
    for index in range(1, 64, 3):
        offset = index * BLOCK + 123
        assert bytes(await reader.read(offset, 100)) == file.data[offset : offset + 100]
    assert not file.block_calls
    assert file.fetched_bytes == len(range(1, 64, 3)) * GRANULE
    await reader.aclose()


async def test_a_cached_block_serves_random_reads_without_ranges(engine_nursery: trio.Nursery) -> None:
    file = RangeFakeFile(8 * BLOCK)
    engine = make_engine(engine_nursery)
    reader = engine.open(file, identity="f")
    await reader.read(0, BLOCK)  # sequential from 0: block 0 (and read-ahead of block 1)
    ranges_before = sum(file.range_calls.values())
    assert bytes(await reader.read(5000, 10)) == file.data[5000:5010]  # back into block 0: but not sequential...
    assert bytes(await reader.read(BLOCK // 2, 10)) == file.data[BLOCK // 2 : BLOCK // 2 + 10]
    assert sum(file.range_calls.values()) == ranges_before == 0  # ...block 0 is cached, so no range fetch
    await reader.aclose()


async def test_ranges_and_blocks_never_share_a_key(engine_nursery: trio.Nursery) -> None:
    file = RangeFakeFile(4 * BLOCK)
    engine = make_engine(engine_nursery)
    reader = engine.open(file, identity="f")
    offset = 2 * BLOCK + 5
    await reader.read(offset, 10)  # caches range (2 * BLOCK) // GRANULE only
    assert (
        BlockKey("f", "v1", 2) not in engine.cache and BlockKey("f", "v1", (2 * BLOCK) // GRANULE) not in engine.cache
    )
    assert BlockKey("f", "v1", (2 * BLOCK) // GRANULE, GRANULE) in engine.cache
    # A sequential reader of the same file gets whole blocks, never a range in place of a block.
    other = engine.open(file, identity="f")
    got = bytearray()
    while chunk := await other.read(len(got), BLOCK):
        got += chunk
    assert got == file.data
    await reader.aclose()
    await other.aclose()


async def test_concurrent_random_reads_of_one_range_fetch_it_once(engine_nursery: trio.Nursery) -> None:
    file = RangeFakeFile(8 * BLOCK)
    file.release = trio.Event()
    engine = make_engine(engine_nursery)
    readers = [engine.open(file, identity="f") for _ in range(5)]
    base = 5 * BLOCK + GRANULE
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = bytes(await readers[i].read(base + 100 * i, 50))

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        file.release.set()
    assert results == {i: file.data[base + 100 * i : base + 100 * i + 50] for i in range(5)}
    assert file.range_calls == Counter({(base, GRANULE): 1})
    for reader in readers:
        await reader.aclose()


async def test_a_wrong_length_range_is_an_error_not_wrong_bytes(engine_nursery: trio.Nursery) -> None:
    file = RangeFakeFile(8 * BLOCK)
    file.short_ranges = True
    reader = make_engine(engine_nursery).open(file, identity="f")
    with pytest.raises(BlockValidationError):
        await reader.read(3 * BLOCK + 7, 10)
    await reader.aclose()


@pytest.mark.parametrize("overrides", [{"random_read_bytes": 0}, {}])
async def test_ranges_off_or_a_big_read_take_whole_blocks(
    engine_nursery: trio.Nursery, overrides: dict[str, object]
) -> None:
    file = RangeFakeFile(8 * BLOCK)
    reader = make_engine(engine_nursery, **overrides).open(file, identity="f")
    # random_read_bytes=0: ranges off. Otherwise: a read needing more than MAX_RANGES_PER_READ ranges.
    length = 10 if overrides else (MAX_RANGES_PER_READ + 1) * GRANULE
    offset = 3 * BLOCK + GRANULE // 2
    assert bytes(await reader.read(offset, length)) == file.data[offset : offset + length]
    assert not file.range_calls and file.block_calls
    await reader.aclose()


def test_negative_random_read_bytes_is_refused() -> None:
    from directfs.errors import ConfigError

    with pytest.raises(ConfigError):
        ReadSettings(random_read_bytes=-1)


# --- fetch_range strictness of the sources ----------------------------------------------------------------------

SIZE = 100_000
DATA = random.Random(3).randbytes(SIZE)

Handler = Callable[[httpx.Request, int, int], httpx.Response]


def range_file(handler: Handler, *, etag: str | None = '"e1"') -> RangeFile:
    def respond(request: httpx.Request) -> httpx.Response:
        first, _, last = request.headers["range"].removeprefix("bytes=").partition("-")
        return handler(request, int(first), int(last))

    client = httpx.AsyncClient(transport=httpx.MockTransport(respond))
    layout = BlockLayout.fixed("v1", SIZE, 32 * KiB)
    return RangeFile(
        client, "http://store.test/f?secret=1", layout, name="f", etag=etag, policy=RetryPolicy(max_attempts=1)
    )


def honest(request: httpx.Request, first: int, last: int) -> httpx.Response:
    assert request.headers["if-match"] == '"e1"'
    return reply(206, DATA[first : last + 1], f"bytes {first}-{last}/{SIZE}")


async def test_range_file_fetch_range_exact_bytes() -> None:
    file = range_file(honest)
    assert isinstance(file, RangeReadable)
    assert await file.fetch_range(40_000, 5000) == DATA[40_000:45_000]
    assert await file.fetch_range(SIZE - 1, 1) == DATA[-1:]


class OneChunk(httpx.AsyncByteStream):
    """A body of one chunk that a reader may leave early without an async generator left for the GC to finalise
    (``httpx.ByteStream`` is one, which warns when a strict reader stops reading an overlong body)."""

    def __init__(self, body: bytes) -> None:
        self._chunks = [body]

    def __aiter__(self) -> OneChunk:
        return self

    async def __anext__(self) -> bytes:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop()


def reply(status: int, body: bytes = b"", content_range: str | None = None) -> httpx.Response:
    headers = {"content-range": content_range} if content_range is not None else {}
    return httpx.Response(status, headers=headers, stream=OneChunk(body))


@pytest.mark.parametrize(
    ("name", "handler", "error"),
    [
        (
            "other range",
            lambda r, f, z: reply(206, DATA[f + 1 : z + 2], f"bytes {f + 1}-{z + 1}/{SIZE}"),
            DownloadError,
        ),
        ("no content-range", lambda r, f, z: reply(206, DATA[f : z + 1]), DownloadError),
        ("garbled content-range", lambda r, f, z: reply(206, DATA[f : z + 1], f"{f}-{z}/{SIZE}"), DownloadError),
        ("ignored range", lambda r, f, z: reply(200, DATA), DownloadError),
        ("short body", lambda r, f, z: reply(206, DATA[f:z], f"bytes {f}-{z}/{SIZE}"), DownloadError),
        ("object resized", lambda r, f, z: reply(206, DATA[f : z + 1], f"bytes {f}-{z}/{SIZE + 1}"), StaleFileError),
        ("etag changed", lambda r, f, z: reply(412), StaleFileError),
    ],
)
async def test_range_file_fetch_range_is_strict(name: str, handler: Handler, error: type[Exception]) -> None:
    file = range_file(handler)
    with pytest.raises(error) as caught:
        await file.fetch_range(40_000, 5000)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(("start", "length"), [(-1, 10), (0, 0), (SIZE - 10, 11), (SIZE, 1)])
async def test_range_file_fetch_range_refuses_ranges_outside_the_file(start: int, length: int) -> None:
    def never(request: httpx.Request, first: int, last: int) -> httpx.Response:
        raise AssertionError("no request for an invalid range")

    with pytest.raises(InvalidArgumentError):
        await range_file(never).fetch_range(start, length)


async def test_local_fetch_range_exact_and_stale(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(DATA)
    source = create_source(f"file://{tmp_path}?block_size_bytes=4096", SourceOptions())
    file = await source.open("f.bin", await source.stat("f.bin"))
    try:
        assert isinstance(file, RangeReadable)
        assert await file.fetch_range(12_345, 6789) == DATA[12_345 : 12_345 + 6789]
        with pytest.raises(InvalidArgumentError):
            await file.fetch_range(SIZE - 1, 2)
        with (tmp_path / "f.bin").open("ab") as grow:
            grow.write(b"more")
        with pytest.raises(StaleFileError):
            await file.fetch_range(0, 10)
    finally:
        await file.aclose()
        await source.aclose()
