"""Where blocking work runs: worker threads, through the one process-wide ``trio.CapacityLimiter`` of a trio run.

Two kinds of job go there, both releasing the GIL for most of their time:

* **block jobs** (``directfs.sources.ctera.client``): one per block attempt, GET of the object with libcurl
  (``directfs.transfer``), the storage digest check (hashlib), decrypt (OpenSSL) and decompress (cramjam, zlib). The
  trio thread only schedules them and answers FUSE; doing the GET with httpx on the trio thread cost ~1 ms of GIL
  time per block, which at 512 KiB blocks was a third of the daemon's CPU (``docs/testbed.md`` §8).
* **codec jobs**: decoding alone, for bodies fetched by httpx (tests with ``httpx.MockTransport``).

The limiter is sized by what waits on the network, not by cores: a block job holds its thread for its whole GET,
which on a real object store is mostly waiting for bytes. Small codec jobs run inline: a thread hop costs ~50-100 us,
more than decoding a 64 KiB block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar

import trio
import trio.lowlevel

T = TypeVar("T")

# Below this many input bytes a codec job runs on the trio thread: the hop to a worker costs more than the job.
INLINE_THRESHOLD_BYTES: Final = 64 * 1024

# 16 threads: twice the engine's prefetch concurrency (8, ``ReadSettings.prefetch_concurrency``), so the demand reads
# of other handles never queue behind one full read-ahead window, and the Streamer's default max_workers (8) fits
# beside a mount's window in one process. More threads than cores is deliberate: most of a job's time is spent in
# the kernel's socket reads or with the GIL released; the codec part of 16 jobs at once only time-shares the cores.
WORKER_THREADS: Final = 16

# One limiter per trio run (a RunVar): a CapacityLimiter belongs to the run that made it.
_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("directfs_worker_limiter")


def worker_limiter() -> trio.CapacityLimiter:
    """The one limiter every worker-thread job of this trio run goes through."""
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(WORKER_THREADS)
        _LIMITER.set(limiter)
        return limiter


async def run_job(work: Callable[[], T]) -> T:
    """Run a blocking job (a block GET + decode) in a worker thread under the shared limiter.

    A cancelled caller returns at once (``abandon_on_cancel``): the thread runs on to its own deadline (every job
    has one, see ``directfs.transfer``) and still holds its limiter token until then, so abandoned jobs stay bounded;
    its result is dropped."""
    return await trio.to_thread.run_sync(work, limiter=worker_limiter(), abandon_on_cancel=True)


async def run_codec(work: Callable[[], T], *, input_bytes: int) -> T:
    """Run ``work`` inline when small, else in a worker thread under the shared limiter. Always a checkpoint."""
    if input_bytes < INLINE_THRESHOLD_BYTES:
        await trio.lowlevel.checkpoint()
        return work()
    return await trio.to_thread.run_sync(work, limiter=worker_limiter())
