"""BlockCache: byte bound, LRU order, single-flight, cancellation, error delivery and failure memory."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directfs.engine.cache import BlockCache, BlockData, BlockKey, FetchOutcome
from directfs.errors import (
    BlockInfo,
    DirectFSError,
    DownloadError,
    DownloadTimeout,
    RangeNotSupportedError,
    unwrap_error,
)


def key(index: int, version: str = "v1") -> BlockKey:
    return BlockKey("file", version, index)


class Fetcher:
    """A scripted fetch: counts calls, can be held on an event, can fail, records cancellation."""

    def __init__(self, data: bytes = b"x" * 10, *, error: BaseException | None = None) -> None:
        self.data = data
        self.error = error
        self.calls = 0
        self.cancelled = 0
        self.release = trio.Event()
        self.hold = False

    async def __call__(self) -> BlockData:
        self.calls += 1
        try:
            if self.hold:
                await self.release.wait()
            else:
                await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return self.data


async def test_hit_and_miss_counting() -> None:
    cache = BlockCache(100)
    fetch = Fetcher(b"abc")
    assert cache.lookup(key(0)) is None  # a lookup miss is not counted (documented)
    assert await cache.get_or_fetch(key(0), fetch) == b"abc"
    assert await cache.get_or_fetch(key(0), fetch) == b"abc"
    assert cache.lookup(key(0)) == b"abc"
    stats = cache.statistics()
    assert (stats.hits, stats.misses, fetch.calls) == (2, 1, 1)
    assert (stats.size_bytes, stats.entries, stats.fetched_bytes, stats.inflight_fetches) == (3, 1, 3, 0)
    assert key(0) in cache and key(1) not in cache


async def test_versions_are_separate_blocks() -> None:
    cache = BlockCache(100)
    assert await cache.get_or_fetch(key(0, "v1"), Fetcher(b"old")) == b"old"
    assert await cache.get_or_fetch(key(0, "v2"), Fetcher(b"new")) == b"new"


async def test_lru_evicts_least_recently_used() -> None:
    cache = BlockCache(30)
    for i in range(3):
        await cache.get_or_fetch(key(i), Fetcher(bytes([i]) * 10))
    assert cache.lookup(key(0)) is not None  # key 0 becomes most recently used, so key 1 is the oldest
    await cache.get_or_fetch(key(3), Fetcher(b"3" * 10))
    assert key(1) not in cache
    assert all(k in cache for k in (key(0), key(2), key(3)))
    assert cache.statistics().evictions == 1


async def test_block_larger_than_capacity_is_served_not_cached() -> None:
    cache = BlockCache(10)
    await cache.get_or_fetch(key(0), Fetcher(b"a" * 10))
    big = b"b" * 11
    assert await cache.get_or_fetch(key(1), Fetcher(big)) == big
    stats = cache.statistics()
    assert key(1) not in cache and key(0) in cache  # the small block was not evicted for nothing
    assert (stats.uncacheable_blocks, stats.size_bytes, stats.evictions) == (1, 10, 0)


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(0, 64),
    ops=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 80), st.booleans()), max_size=60),
)
def test_byte_bound_never_exceeded(capacity: int, ops: list[tuple[int, int, bool]]) -> None:
    async def main() -> None:
        cache = BlockCache(capacity)
        sizes: dict[int, int] = {}
        for index, size, probe in ops:
            if probe:
                cache.lookup(key(index))
            else:
                data = await cache.get_or_fetch(key(index), Fetcher(bytes(sizes.setdefault(index, size))))
                assert len(data) == sizes[index]
            stats = cache.statistics()
            cached = [i for i in sizes if key(i) in cache]
            assert stats.size_bytes <= capacity
            assert stats.size_bytes == sum(sizes[i] for i in cached)
            assert stats.entries == len(cached)

    trio.run(main)


async def test_single_flight_one_fetch_for_many_waiters() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
        fetch = Fetcher(b"shared")
        fetch.hold = True
        results: list[BlockData] = []

        async def reader() -> None:
            results.append(await cache.get_or_fetch(key(0), fetch))

        async with trio.open_nursery() as readers:
            for _ in range(10):
                readers.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert cache.statistics().inflight_fetches == 1
            fetch.release.set()
    assert results == [b"shared"] * 10
    stats = cache.statistics()
    assert (fetch.calls, stats.fetches_started, stats.misses, stats.joined_misses) == (1, 1, 10, 9)


async def test_outcomes() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
        fetch = Fetcher(b"d")
        fetch.hold = True
        outcomes: dict[str, FetchOutcome] = {}

        async def reader(name: str) -> None:
            outcomes[name] = (await cache.get_or_fetch_outcome(key(0), fetch))[1]

        async with trio.open_nursery() as readers:
            readers.start_soon(reader, "first")
            await trio.testing.wait_all_tasks_blocked()
            readers.start_soon(reader, "second")
            await trio.testing.wait_all_tasks_blocked()
            fetch.release.set()  # both wake in an order trio chooses at random
        await reader("third")
    assert outcomes == {"first": FetchOutcome.FETCHED, "second": FetchOutcome.JOINED, "third": FetchOutcome.HIT}


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
        fetch = Fetcher(b"data")
        fetch.hold = True
        got: list[BlockData] = []
        first_scope = trio.CancelScope()

        async def first() -> None:  # starts the fetch, then is interrupted
            with first_scope:
                await cache.get_or_fetch(key(0), fetch)
            assert first_scope.cancelled_caught

        async def second() -> None:
            got.append(await cache.get_or_fetch(key(0), fetch))

        async with trio.open_nursery() as readers:
            readers.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            readers.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            first_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert fetch.cancelled == 0 and cache.statistics().inflight_fetches == 1
            fetch.release.set()
    assert got == [b"data"] and fetch.calls == 1


async def test_fetch_outlives_its_only_waiter_and_is_cached() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
        fetch = Fetcher(b"data")
        fetch.hold = True
        with trio.move_on_after(0):
            await cache.get_or_fetch(key(0), fetch)
        await trio.testing.wait_all_tasks_blocked()
        fetch.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert key(0) in cache  # the kernel's retry of an interrupted read will hit
        assert await cache.get_or_fetch(key(0), fetch) == b"data"
    assert fetch.calls == 1


async def test_without_nursery_a_cancelled_fetcher_hands_over() -> None:
    cache = BlockCache(100)
    first = Fetcher(b"data")
    first.hold = True
    second = Fetcher(b"data")
    got: list[BlockData] = []
    scope = trio.CancelScope()

    async def leader() -> None:
        with scope:
            await cache.get_or_fetch(key(0), first)

    async def follower() -> None:
        got.append(await cache.get_or_fetch(key(0), second))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert got == [b"data"]
    assert (first.calls, first.cancelled, second.calls) == (1, 1, 1)


async def test_error_delivered_to_all_waiters_not_cached_and_remembered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery, failed_block_memory_seconds=5.0)
        info = BlockInfo("fid", 1, 0, 10)
        fetch = Fetcher(error=DownloadTimeout("storage timed out", block=info))
        fetch.hold = True
        errors: list[BaseException] = []

        async def reader() -> None:
            try:
                await cache.get_or_fetch(key(0), fetch)
            except DirectFSError as exc:
                errors.append(exc)

        async with trio.open_nursery() as readers:
            for _ in range(3):
                readers.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            fetch.release.set()
        assert fetch.calls == 1 and len(errors) == 3
        assert all(type(e) is DownloadTimeout and e.errno == errno.ETIMEDOUT for e in errors)
        assert all(isinstance(e, DownloadTimeout) and e.block == info for e in errors)
        assert len({id(e) for e in errors}) == 3  # each waiter raises its own object
        assert key(0) not in cache

        # The kernel's immediate retry fails fast, without a new fetch...
        await trio.sleep(4.9)
        with pytest.raises(DownloadTimeout) as caught:
            await cache.get_or_fetch(key(0), fetch)
        assert str(caught.value) == str(errors[0])
        assert fetch.calls == 1 and cache.statistics().fast_failures == 1
        # ... and once the memory period is over, the block is fetched again.
        await trio.sleep(0.2)
        fetch.error = None
        assert await cache.get_or_fetch(key(0), fetch) == fetch.data
        assert fetch.calls == 2
        stats = cache.statistics()
        assert (stats.failed_fetches, stats.fetches_started) == (1, 2)


async def test_a_no_range_refusal_is_not_remembered(autojump_clock: trio.testing.MockClock) -> None:
    """EOPNOTSUPP depends on where a no-range stream is, not on the block: the next read tries again at once."""
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery, failed_block_memory_seconds=5.0)
        fetch = Fetcher(error=RangeNotSupportedError("too far ahead of the stream"))
        with pytest.raises(RangeNotSupportedError):
            await cache.get_or_fetch(key(0), fetch)
        fetch.error = None
        assert await cache.get_or_fetch(key(0), fetch) == fetch.data
        assert fetch.calls == 2 and cache.statistics().fast_failures == 0


async def test_failure_memory_disabled_by_default() -> None:
    cache = BlockCache(100)
    fetch = Fetcher(error=DownloadError("boom"))
    for _ in range(2):
        with pytest.raises(DownloadError):
            await cache.get_or_fetch(key(0), fetch)
    assert fetch.calls == 2


async def test_exception_group_is_unwrapped() -> None:
    cache = BlockCache(100)
    fetch = Fetcher(error=ExceptionGroup("nursery", [ExceptionGroup("inner", [DownloadTimeout("slow")])]))
    with pytest.raises(DownloadTimeout, match="slow"):
        await cache.get_or_fetch(key(0), fetch)


async def test_unexpected_error_becomes_eio_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
        with caplog.at_level(logging.ERROR, logger="directfs.errors"), pytest.raises(DirectFSError) as caught:
            await cache.get_or_fetch(key(0), Fetcher(error=ZeroDivisionError("bug")))
    assert type(caught.value) is DirectFSError and caught.value.errno == errno.EIO
    assert isinstance(caught.value.__cause__, DirectFSError)  # the replayed copy chains to the original...
    assert isinstance(caught.value.__cause__.__cause__, ZeroDivisionError)  # ...which chains to the bug
    assert [r.levelno for r in caplog.records] == [logging.ERROR]


def test_unwrap_mixed_group_is_a_bug(caplog: pytest.LogCaptureFixture) -> None:
    group = ExceptionGroup("g", [DownloadError("a"), KeyError("b")])
    with caplog.at_level(logging.CRITICAL):
        error = unwrap_error(group, context="testing")
    assert type(error) is DirectFSError and error.__cause__ is group


async def test_fetch_returning_wrong_type_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    cache = BlockCache(100)

    async def bad() -> BlockData:
        return "text"  # type: ignore[return-value]

    with caplog.at_level(logging.CRITICAL), pytest.raises(DirectFSError):
        await cache.get_or_fetch(key(0), bad)


async def test_prefetch_cancel_stops_a_fetch_nobody_waits_for() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
        fetch = Fetcher()
        fetch.hold = True
        ticket = cache.start_prefetch(key(0), fetch)
        assert ticket is not None
        assert cache.start_prefetch(key(0), fetch) is None  # already in flight
        await trio.testing.wait_all_tasks_blocked()
        assert ticket.cancel() is True
        assert ticket.cancel() is False  # idempotent
        assert not cache.is_pending(key(0))  # a new read starts a fresh fetch at once
        await ticket.wait()
        assert fetch.cancelled == 1 and not ticket.succeeded
        assert cache.statistics().cancelled_fetches == 1


async def test_prefetch_joined_by_a_reader_survives_cancel() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
        fetch = Fetcher(b"data")
        fetch.hold = True
        ticket = cache.start_prefetch(key(0), fetch)
        assert ticket is not None
        got: list[BlockData] = []

        async def reader() -> None:
            got.append(await cache.get_or_fetch(key(0), Fetcher(b"never called")))

        async with trio.open_nursery() as readers:
            readers.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert ticket.cancel() is False
            fetch.release.set()
        assert got == [b"data"] and fetch.cancelled == 0 and ticket.succeeded


async def test_failed_prefetch_nobody_waited_for_is_not_remembered() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery, failed_block_memory_seconds=60)
        ticket = cache.start_prefetch(key(0), Fetcher(error=DownloadError("gone")))
        assert ticket is not None
        await ticket.wait()
        fetch = Fetcher(b"ok")
        assert await cache.get_or_fetch(key(0), fetch) == b"ok"  # the real read gets its own attempt
        assert cache.start_prefetch(key(0), fetch) is None  # cached now


async def test_no_prefetch_without_nursery() -> None:
    assert BlockCache(100).start_prefetch(key(0), Fetcher()) is None


async def test_closed_nursery_refuses_cleanly() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
    with pytest.raises(DirectFSError, match="shut down"):
        await cache.get_or_fetch(key(0), Fetcher())
    assert cache.start_prefetch(key(0), Fetcher()) is None
    assert cache.statistics().inflight_fetches == 0


async def test_engine_shutdown_fails_waiters_cleanly() -> None:
    cache_box: list[BlockCache] = []
    errors: list[BaseException] = []
    fetch = Fetcher()
    fetch.hold = True

    async def reader() -> None:
        try:
            await cache_box[0].get_or_fetch(key(0), fetch)
        except DirectFSError as exc:
            errors.append(exc)

    async with trio.open_nursery() as readers, trio.open_nursery() as engine_nursery:
        cache_box.append(BlockCache(100, nursery=engine_nursery))
        readers.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        engine_nursery.cancel_scope.cancel()
    assert len(errors) == 1 and "shutting down" in str(errors[0])


@pytest.mark.parametrize("make", [lambda: DownloadError("x", block=BlockInfo("f", 2, 5, 5)), lambda: DirectFSError()])
async def test_replayed_errors_keep_class_message_and_block(make: Callable[[], DirectFSError]) -> None:
    cache = BlockCache(100, failed_block_memory_seconds=60)
    original = make()
    with pytest.raises(DirectFSError) as first:
        await cache.get_or_fetch(key(0), Fetcher(error=original))
    with pytest.raises(DirectFSError) as second:
        await cache.get_or_fetch(key(0), Fetcher())
    for caught in (first.value, second.value):
        assert type(caught) is type(original) and str(caught) == str(original)
        assert caught.__cause__ is original


async def test_discard_drops_a_cached_block_but_never_a_fetch_in_flight() -> None:
    async with trio.open_nursery() as nursery:
        cache = BlockCache(100, nursery=nursery)
        await cache.get_or_fetch(key(0), Fetcher(b"abc"))
        assert cache.discard(key(0)) is True
        assert key(0) not in cache and cache.discard(key(0)) is False  # idempotent
        held = Fetcher(b"def")
        held.hold = True
        ticket = cache.start_prefetch(key(1), held)
        assert ticket is not None
        await trio.testing.wait_all_tasks_blocked()
        assert cache.discard(key(1)) is False  # in flight: not cached yet, and the fetch goes on
        held.release.set()
        await ticket.wait()
        assert cache.lookup(key(1)) == b"def" and held.cancelled == 0
        stats = cache.statistics()
        assert (stats.dropped_behind, stats.evictions, stats.size_bytes, stats.entries) == (1, 0, 3, 1)
        refetch = Fetcher(b"abc")  # a dropped block is fetched anew
        assert await cache.get_or_fetch(key(0), refetch) == b"abc" and refetch.calls == 1
        nursery.cancel_scope.cancel()


async def test_a_stream_fetch_is_cancelled_when_its_last_waiter_leaves() -> None:
    # Rule 2b: cancel_unwanted fetches stop when nobody waits for them any more; ordinary demand fetches go on.
    async with trio.open_nursery() as nursery:
        cache = BlockCache(1 << 20, nursery=nursery)
        held = Fetcher()
        held.hold = True
        with trio.move_on_after(0.05):
            await cache.get_or_fetch(key(0), held, cancel_unwanted=True)
        await trio.testing.wait_all_tasks_blocked()
        assert held.cancelled == 1 and cache.statistics().inflight_fetches == 0
        ordinary = Fetcher()
        ordinary.hold = True
        with trio.move_on_after(0.05):
            await cache.get_or_fetch(key(1), ordinary)
        await trio.testing.wait_all_tasks_blocked()
        assert ordinary.cancelled == 0 and cache.statistics().inflight_fetches == 1
        nursery.cancel_scope.cancel()
