"""A scripted ``OpenFile`` for the read-engine tests (no store, no network)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import trio
import trio.lowlevel

from directfs.errors import DirectFSError
from directfs.sources.base import BlockLayout

BLOCK = 4096


class FakeFile:
    """An ``OpenFile`` over a bytes object with a scripted block layout. Counts fetches and their concurrency,
    can hold fetches until released, fail chosen blocks, return wrong lengths, or take (virtual) time."""

    def __init__(self, lengths: Sequence[int], *, seed: int = 0, version: str = "v1", delay_seconds: float = 0.0):
        self.layout = BlockLayout.from_lengths(version, lengths)
        self.data = random.Random(seed).randbytes(self.layout.size)
        self.delay_seconds = delay_seconds
        self.calls: Counter[int] = Counter()
        self.order: list[int] = []
        self.active = 0
        self.max_active = 0
        self.cancelled: list[int] = []
        self.failures: dict[int, DirectFSError] = {}
        self.short: set[int] = set()
        self.hold: set[int] = set()  # blocks whose fetch waits for `release`
        self.release = trio.Event()
        self.bytearrays = False

    @classmethod
    def fixed(cls, size: int, block_size: int = BLOCK, **kwargs: object) -> FakeFile:
        layout = BlockLayout.fixed("v1", size, block_size)
        lengths = [layout.block_length(i) for i in range(layout.block_count)]
        return cls(lengths, **kwargs)  # type: ignore[arg-type]

    async def fetch_block(self, index: int) -> bytes | bytearray:
        self.calls[index] += 1
        self.order.append(index)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if index in self.hold:
                await self.release.wait()
            if self.delay_seconds:
                await trio.sleep(self.delay_seconds)
            else:
                await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            self.cancelled.append(index)
            raise
        finally:
            self.active -= 1
        if index in self.failures:
            raise self.failures[index]
        start, end = self.layout.offsets[index], self.layout.offsets[index + 1]
        if index in self.short:
            end -= 1
        chunk = self.data[start:end]
        return bytearray(chunk) if self.bytearrays else chunk

    async def aclose(self) -> None:
        pass
