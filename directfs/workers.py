"""Where CPU-heavy codec work runs: worker threads, through one process-wide ``trio.CapacityLimiter``.

AES (OpenSSL), snappy (cramjam) and zlib release the GIL, so two threads decode about twice as fast as one on our
2-core machines (testbed section 4). Small jobs run inline: a thread hop costs ~50-100 us, more than decoding a
64 KiB block.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final, TypeVar

import trio
import trio.lowlevel

T = TypeVar("T")

# Below this many input bytes the work runs on the trio thread: the hop to a worker costs more than the job.
INLINE_THRESHOLD_BYTES: Final = 64 * 1024

# One limiter per trio run (a RunVar), sized to the cores: more threads than cores only adds contention.
_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("directfs_codec_limiter")


def codec_limiter() -> trio.CapacityLimiter:
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(max(1, os.cpu_count() or 1))
        _LIMITER.set(limiter)
        return limiter


async def run_codec(work: Callable[[], T], *, input_bytes: int) -> T:
    """Run ``work`` inline when small, else in a worker thread under the shared limiter. Always a checkpoint."""
    if input_bytes < INLINE_THRESHOLD_BYTES:
        await trio.lowlevel.checkpoint()
        return work()
    return await trio.to_thread.run_sync(work, limiter=codec_limiter())
