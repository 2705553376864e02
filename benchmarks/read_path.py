"""CPU cost of the read path on a warm cache: what ``FileReader.read`` costs per FUSE READ, without FUSE.

``python -m benchmarks.read_path``: reads an in-memory file through a ``ReadEngine`` whose cache already holds every
block, in 128 KiB and 1 MiB pieces (the kernel's READ sizes with the default and the raised ``read_ahead_kb``),
block-aligned and shifted by 4 KiB (so that some reads span two blocks and take the join path), for 4 MiB blocks
(CTERA fixed-size) and 512 KiB blocks (CTERA dedup average). Prints microseconds of CPU per read and the implied
ceiling in GB/s of our code alone (pyfuse3 and the kernel cost extra: ~60-80 us per request, docs/testbed.md §3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import trio

from directfs.engine.reader import ReadEngine, ReadSettings
from directfs.sources.base import BlockLayout

KiB = 1024
MiB = 1024 * KiB


class MemoryFile:
    """An ``OpenFile`` over one bytes object (all blocks are views of it; copied once when fetched)."""

    def __init__(self, size: int, block_size: int) -> None:
        self.layout = BlockLayout.fixed("v1", size, block_size)
        self.data = os.urandom(size)

    async def fetch_block(self, index: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.data[self.layout.offsets[index] : self.layout.offsets[index + 1]]

    async def aclose(self) -> None:
        pass


async def measure(
    file_size: int, block_size: int, read_size: int, shift: int, reads: int, runs: int
) -> dict[str, float]:
    file = MemoryFile(file_size, block_size)
    async with trio.open_nursery() as nursery:
        engine = ReadEngine(ReadSettings(cache_size_bytes=2 * file_size, prefetch_budget_bytes=file_size), nursery)
        reader = engine.open(file, identity="bench")
        for offset in range(0, file_size, block_size):  # warm the cache
            await reader.read(offset, block_size)
        offsets = [(shift + i * read_size) % (file_size - read_size) for i in range(reads)]
        cpu_us = []
        for _ in range(runs):
            start = time.process_time()
            for offset in offsets:
                await reader.read(offset, read_size)
            cpu_us.append((time.process_time() - start) / reads * 1e6)
        spanning = sum(1 for o in offsets if file.layout.block_at(o) != file.layout.block_at(o + read_size - 1)) / len(
            offsets
        )
        stats = engine.statistics()
        assert stats.cache.fetches_started == file.layout.block_count, "the timed reads must all be hits"
        await reader.aclose()
        nursery.cancel_scope.cancel()
    per_read = statistics.median(cpu_us)
    return {"us_per_read": per_read, "gb_per_s": read_size / per_read / 1e3, "spanning": spanning}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{'block':>8} {'read':>8} {'shift':>6} {'spanning':>9} {'us/read':>9} {'GB/s':>7}  (median of {args.runs})")
    for block_size in (4 * MiB, 512 * KiB):
        for read_size in (128 * KiB, 1 * MiB):
            for shift in (0, 4 * KiB):
                result = trio.run(measure, 64 * MiB, block_size, read_size, shift, args.reads, args.runs)
                print(
                    f"{block_size // KiB:>6}Ki {read_size // KiB:>6}Ki {shift // KiB:>4}Ki "
                    f"{result['spanning']:>9.0%} {result['us_per_read']:>9.1f} {result['gb_per_s']:>7.1f}"
                )


if __name__ == "__main__":
    main()
