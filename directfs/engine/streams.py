"""Block streams over the engine: the Blocks and Streamer APIs, and the whole-file fetch of ``cp`` and ``stage``.

All three read through a :class:`~directfs.engine.reader.FileReader`, so they share the engine's cache (a block that
is cached costs no GET), its single-flight (two streams over one file fetch each block once) and its length check.
What they add is a *window*: blocks are started in file order, each holding a token of a ``trio.Semaphore`` from
before its fetch starts until the consumer has taken it, so at most that many blocks are in flight or buffered
(back-pressure). The semaphore is the stream's own (``max_workers``) or shared by every file of a command (``cp
--max-workers``).

Each started block is a small task of the stream that waits for the block through the cache; the fetch itself runs
in the engine's nursery. Leaving a stream early cancels those tasks, and a fetch whose waiters all left is cancelled
too unless someone else (a mount reader, a prefetch) still wants it (``BlockCache`` rule 2b,
``docs/engine-concurrency.md``), so a consumer that stops after one block does not pay for the rest of the window.
Fetch errors travel as values to the consumer and are raised at the point of iteration; the streamer wraps them in
``StreamError`` with the exact offset to resume from.

The iterator objects never yield from inside a nursery: the nursery belongs to the ``async with`` that made the
stream (``directfs.api``), and the consumer iterates outside it.

Data handed out is the cached block itself, as a read-only ``memoryview`` (zero copy; ``bytes(x)`` makes a copy):
the cache never mutates a block, and a view keeps an evicted block alive only as long as the consumer holds it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

import trio

from ..errors import ConfigError, DirectFSError, StreamError, unwrap_error
from ..sources.base import BlockLayout
from .cache import BlockData
from .reader import FileReader


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``start`` to ``end`` of a file, **end inclusive** (as cterasdk); ``end=None`` runs to the end of file.

    Unlike cterasdk, a negative start is refused (not silently 0) and a start at or past the end of file selects
    nothing (cterasdk returns the whole file there).
    """

    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.start) or self.start < 0:
            raise ConfigError(f"byte range start must be an integer >= 0, not {self.start!r}")
        if self.end is not None and (not _is_int(self.end) or self.end < self.start):
            raise ConfigError(f"byte range end must be an integer >= start ({self.start}), not {self.end!r}")

    def clamp(self, size: int) -> tuple[int, int] | None:
        """``(start, stop)`` (stop exclusive) within a file of ``size`` bytes, or None when nothing is selected."""
        if self.start >= size:
            return None
        stop = size if self.end is None else min(self.end + 1, size)
        return self.start, stop


@dataclass(frozen=True, slots=True)
class Block:
    """One whole block of the Blocks API (not trimmed to the byte range); ``number`` is 1-based (as cterasdk)."""

    number: int
    offset: int
    length: int
    data: memoryview = field(repr=False)  # read-only view of the cached block


def check_workers(max_workers: int) -> None:
    if not _is_int(max_workers) or max_workers < 1:
        raise ConfigError(f"max_workers must be an integer >= 1, not {max_workers!r}")


def select_blocks(layout: BlockLayout, byte_range: ByteRange) -> range:
    """Indices of the blocks that overlap ``byte_range``."""
    span = byte_range.clamp(layout.size)
    if span is None:
        return range(0)
    start, stop = span
    return range(layout.block_at(start), layout.block_at(stop - 1) + 1)


Result = BlockData | DirectFSError


class _Window(abc.ABC):
    """Starts the blocks of ``indices`` in order under ``tokens``; subclasses hand results to their consumer.

    Counters for tests and stats: ``in_flight`` (fetches being waited for now), ``buffered`` (results not yet taken),
    ``max_in_flight`` and ``max_held`` (highest ``in_flight + buffered``: the back-pressure bound)."""

    def __init__(self, reader: FileReader, indices: Sequence[int], tokens: trio.Semaphore) -> None:
        self._reader = reader
        self._indices = indices
        self._tokens = tokens
        self.in_flight = 0
        self.max_in_flight = 0
        self.buffered = 0
        self.max_held = 0

    @property
    def reader(self) -> FileReader:
        return self._reader

    @property
    def layout(self) -> BlockLayout:
        return self._reader.layout

    @property
    def size(self) -> int:
        """File size in bytes."""
        return self._reader.size

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        for position, index in enumerate(self._indices):
            await self._tokens.acquire()
            nursery.start_soon(self._run, position, index)

    async def _fetch(self, position: int, index: int) -> Result:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.max_held = max(self.max_held, self.in_flight + self.buffered)
        try:
            return await self._reader.block(index, cancel_unwanted=True)
        except DirectFSError as exc:
            return exc
        finally:
            self.in_flight -= 1
            self.buffered += 1

    def _taken(self) -> None:
        self.buffered -= 1
        self._tokens.release()

    @abc.abstractmethod
    async def _run(self, position: int, index: int) -> None:
        """Wait for block ``index`` (the ``position``-th selected) and hand it to this window's consumer."""


class BlockStream(_Window):
    """Async iterator of :class:`Block` in completion order; fetch errors raise here, at iteration."""

    def __init__(self, reader: FileReader, indices: Sequence[int], max_workers: int) -> None:
        super().__init__(reader, indices, trio.Semaphore(max_workers))
        self._remaining = len(indices)
        # Unbounded is safe: the tokens admit at most max_workers results before the consumer takes one.
        self._send, self._receive = trio.open_memory_channel[tuple[int, Result]](math.inf)

    async def _run(self, position: int, index: int) -> None:
        result = await self._fetch(position, index)
        self._send.send_nowait((index, result))

    def __aiter__(self) -> BlockStream:
        return self

    async def __anext__(self) -> Block:
        if self._remaining == 0:
            raise StopAsyncIteration
        index, result = await self._receive.receive()
        self._remaining -= 1
        self._taken()
        if isinstance(result, DirectFSError):
            raise result
        layout = self.layout
        return Block(index + 1, layout.block_start(index), layout.block_length(index), memoryview(result).toreadonly())


class FragmentStream(_Window):
    """Async iterator of the range's bytes in order, as read-only ``memoryview`` fragments (whole blocks, the first and
    last trimmed). ``position`` is the next byte to be delivered."""

    def __init__(self, reader: FileReader, byte_range: ByteRange, max_workers: int, *, name: str) -> None:
        span = byte_range.clamp(reader.size)
        self.start, self.stop = span if span is not None else (byte_range.start, byte_range.start)
        super().__init__(reader, select_blocks(reader.layout, byte_range), trio.Semaphore(max_workers))
        self._name = name
        self.position = self.start
        self._next = 0
        self._results: dict[int, Result] = {}
        self._ready: dict[int, trio.Event] = {}

    @property
    def end_inclusive(self) -> int:
        """Last byte this stream delivers (``start - 1`` when it delivers nothing)."""
        return self.stop - 1

    def _event(self, position: int) -> trio.Event:
        return self._ready.setdefault(position, trio.Event())

    async def _run(self, position: int, index: int) -> None:
        self._results[position] = await self._fetch(position, index)
        self._event(position).set()

    def __aiter__(self) -> FragmentStream:
        return self

    async def __anext__(self) -> memoryview:
        if self._next >= len(self._indices):
            raise StopAsyncIteration
        position = self._next
        await self._event(position).wait()
        result = self._results.pop(position)
        del self._ready[position]
        self._taken()
        if isinstance(result, DirectFSError):
            self._next = len(self._indices)  # the stream is over: a new one resumes from self.position
            raise StreamError(
                f"Stream interrupted at byte {self.position}: {result}", filename=self._name, offset=self.position
            ) from result
        self._next += 1
        layout = self.layout
        index = self._indices[position]
        block_start = layout.block_start(index)
        lo = max(self.start, block_start) - block_start
        hi = min(self.stop, layout.offsets[index + 1]) - block_start
        self.position = block_start + hi
        view = memoryview(result).toreadonly()
        return view if (lo, hi) == (0, len(result)) else view[lo:hi]


async def fetch_all(
    reader: FileReader, tokens: trio.Semaphore, deliver: Callable[[int, memoryview], Awaitable[None]]
) -> None:
    """Every non-empty block of ``reader``'s file through the engine, ``deliver(offset, data)`` for each in any
    order; at most ``tokens`` blocks (shared with the caller's other files) are fetched or held at once. A failing
    block cancels this file's other fetches and nothing else. Raises one ``DirectFSError`` (never a group)."""
    layout = reader.layout
    indices = [index for index in range(layout.block_count) if layout.block_length(index) > 0]
    window = _DeliveringWindow(reader, indices, tokens, deliver)
    try:
        async with trio.open_nursery() as nursery:
            await window._dispatch(nursery)
    except BaseExceptionGroup as group:
        ours, rest = group.split(DirectFSError)
        if rest is not None or ours is None:
            raise  # cancelled from outside, or a bug: as it is
        raise unwrap_error(ours, context="fetching blocks") from None


class _DeliveringWindow(_Window):
    def __init__(
        self,
        reader: FileReader,
        indices: Sequence[int],
        tokens: trio.Semaphore,
        deliver: Callable[[int, memoryview], Awaitable[None]],
    ) -> None:
        super().__init__(reader, indices, tokens)
        self._deliver = deliver

    async def _run(self, position: int, index: int) -> None:
        try:
            result = await self._fetch(position, index)
            self.buffered -= 1
            if isinstance(result, DirectFSError):
                raise result
            await self._deliver(self.layout.block_start(index), memoryview(result).toreadonly())
        finally:
            self._tokens.release()


__all__ = [
    "Block",
    "BlockStream",
    "ByteRange",
    "FragmentStream",
    "check_workers",
    "fetch_all",
    "select_blocks",
]
