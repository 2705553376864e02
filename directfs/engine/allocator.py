"""Keep freed block buffers in the process instead of returning them to the kernel (glibc ``mallopt``).

Why: on our VMs a page of *fresh* memory costs far more than anything we do with it. Touching newly mapped memory
runs at ~850 MB/s (1.2 ms per MiB: the kernel zeroes every page and the hypervisor maps it), slower than MD5
(~880 MB/s), AES-CBC decryption (~7 GB/s) or snappy (~3 GB/s) of the same bytes. Every block we fetch passes through
several multi-MiB buffers (the downloaded object, the decrypted payload, the decoded block), and glibc's default
policy hands those back to the kernel when they are freed (``mmap`` above a dynamic threshold, and heap trimming
above twice it), so the next block faults all its pages in again. Measured on the Direct IO Streamer, 256 MiB of
4 MiB snappy+AES blocks from the reference portal: ~330 MB/s with glibc's defaults, ~450 MB/s with the settings
below (same run, interleaved).

What: buffers up to :data:`MMAP_THRESHOLD_BYTES` come from malloc's heaps (not from one ``mmap`` each), and up to
:data:`TRIM_THRESHOLD_BYTES` of free memory at the top of a heap is kept for reuse. So the working set of in-flight
blocks is recycled at memory speed. Memory the block cache holds is bounded by its own capacity as before; what this
adds is at most the trim threshold of idle free memory per heap after a burst.

Process-wide and idempotent; a no-op on a C library other than glibc (musl, macOS) or when ``mallopt`` refuses.
Called by ``DirectIO`` on entry (unless ``DirectIOSettings.tune_allocator`` is off) and by the mount daemon.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from typing import Final

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024

# glibc's mallopt parameter numbers (malloc.h): stable ABI since glibc 2.0.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

# 32 MiB: glibc's own ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), so every CTERA block
# (4 MiB fixed, ~512 KiB dedup) and every download buffer comes from a heap and is reused; only exceptional buffers
# (custom 64 MiB blocks) still get their own mapping, returned to the kernel at once.
MMAP_THRESHOLD_BYTES: Final = 32 * MiB
# 128 MiB: about twice the transient memory of 8 concurrent 4 MiB block fetches (object + decrypted payload +
# decoded block each), so a stream at full speed never trims and refaults; an idle process keeps at most this much
# free memory per heap.
TRIM_THRESHOLD_BYTES: Final = 128 * MiB

_applied: bool | None = None  # None: not tried yet; else whether the settings are in force


def tune_allocator() -> bool:
    """Apply the thresholds above once per process; returns whether they are in force."""
    global _applied  # one process-wide fact, set once
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error; setting either threshold also turns off glibc's dynamic adjustment.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not _applied:
        log.debug("mallopt refused the block buffer thresholds; keeping glibc's defaults")
    return _applied


__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "tune_allocator"]
