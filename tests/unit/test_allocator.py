"""directfs.engine.allocator: glibc keeps freed block buffers for reuse; the mount's read engine drops blocks behind."""

from __future__ import annotations

import ctypes
import platform

import pytest
import trio

from directfs.engine import allocator
from directfs.mount import MountConfig, _read_engine

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_tune_allocator_applies_once_on_glibc() -> None:
    assert allocator.tune_allocator() is True
    assert allocator.tune_allocator() is True  # idempotent: the second call changes nothing
    # glibc now serves a block-sized buffer from a heap (no mmap of its own): malloc_usable_size of such a chunk is
    # its size rounded up to 16 bytes, while an mmapped chunk is rounded up to whole pages (3980 bytes more here).
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.malloc_usable_size.restype = ctypes.c_size_t
    libc.malloc_usable_size.argtypes = (ctypes.c_void_p,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 4 * 1024 * 1024 + 100  # a 4 MiB block plus a little: not a multiple of the page size
    pointer = libc.malloc(size)
    try:
        usable = libc.malloc_usable_size(pointer)
    finally:
        libc.free(pointer)
    assert 0 <= usable - size < 64


async def test_the_mount_drops_blocks_behind_and_keeps_the_cli_limits() -> None:
    async with trio.open_nursery() as nursery:
        config = MountConfig("file:///nowhere", "/mnt", cache_size_bytes=64 << 20, read_ahead_max_bytes=8 << 20)
        settings = _read_engine(nursery, config).settings
        assert settings.drop_behind is True
        assert (settings.cache_size_bytes, settings.prefetch_budget_bytes, settings.read_ahead_max_bytes) == (
            64 << 20,
            32 << 20,
            8 << 20,
        )
