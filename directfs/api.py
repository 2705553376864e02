"""The Direct IO Python API: CTERA files read straight from object storage, through the block engine.

::

    async with DirectIO(portal_url, access_key_id, secret_access_key) as dio:
        meta = await dio.metadata(file_id)                        # FileMetadata: chunks, size, flags
        f = await dio.open(file_id)                               # DirectIOFile: an OpenFile for the filesystem
        async with dio.blocks(file_id, max_workers=8) as blocks:  # whole blocks, as they complete
            async for block in blocks: ...
        async with dio.streamer(file_id, ByteRange(0, 99)) as stream:  # bytes in order, trimmed to the range
            async for fragment in stream: ...

``DirectIO`` is the CTERA client (:class:`~directfs.sources.ctera.client.DirectIOClient`: block lists, URL refresh,
block GETs and decoding) plus one :class:`~directfs.engine.reader.ReadEngine` of its own, so ``blocks()`` and
``streamer()`` read through the same cache, single-flight and length checks as a mount: a second stream over a range
that is still cached costs no block GET (one Portal call for the block list, unless it is cached too). Memory: up to
``ReadSettings.cache_size_bytes`` of decoded blocks stay cached while the ``DirectIO`` is open.

Concurrency: ``__aenter__`` opens the engine's nursery (where every block fetch runs) and ``__aexit__`` cancels and
closes it, in the same task, as ``async with`` guarantees. ``blocks()`` and ``streamer()`` are async context managers
that own a nursery for the stream's waiting tasks; the iterators never yield from inside it
(``directfs.engine.streams``).
Unless ``DirectIOSettings.tune_allocator`` is off, entering applies ``directfs.engine.allocator.tune_allocator``.

Disk cache: ``DirectIO(..., disk_cache=DiskCacheSettings(directory=...))`` gives the engine the same disk cache a
mount's ``--disk-cache`` does (``directfs.engine.diskcache``, docs/disk-cache.md): encrypted files are kept as the
ciphertext fetched, native ones sealed with the cache key. Blocks are named by the Portal's URL, the file id and
the version, so a second program (or run) on the same folder reads them without a GET. A mount names its blocks by
path and listing version instead, so the two do not share entries.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import httpx
import trio

from .engine.allocator import tune_allocator
from .engine.diskcache import DiskCacheSettings, DiskTier, open_disk_cache
from .engine.reader import FileReader, ReadEngine, ReadSettings
from .engine.streams import Block, BlockStream, ByteRange, FragmentStream, check_workers, select_blocks
from .errors import raise_single
from .sources.ctera.client import Chunk, DirectIOClient, DirectIOFile, DirectIOSettings, FileMetadata
from .sources.ctera.source import raw_capable

# The mount's read settings with two changes. A smaller cache, 64 MiB (prefetch budget half of it, as the mount's):
# caching is not free, every cached block is first-touch memory (~1.2 ms per MiB here, docs/testbed.md §9), and a
# Streamer of 256 MiB through a 256 MiB cache cost ~0.35 s more CPU and ~15% of its speed than through none; 64 MiB
# keeps ~128 dedup blocks (or 16 of 4 MiB) for the re-reads a program makes, while a long stream recycles its
# buffers (measured on 1 MiB blocks: 0 / 64M / 256M cache: 263 / 260 / 220 MiB/s, CPU 0.96 / 1.10 / 1.29 s). And a
# failed block is not remembered: that memory exists for the kernel's immediate retry of a failed READ, while a
# Python caller that resumes a stream (StreamError.offset) wants a real new attempt.
API_CACHE_BYTES: Final = 64 * 1024 * 1024
API_READ_SETTINGS: Final = ReadSettings(
    cache_size_bytes=API_CACHE_BYTES, prefetch_budget_bytes=API_CACHE_BYTES // 2, failed_block_memory_seconds=0.0
)


class DirectIO(DirectIOClient):
    """Async context manager: the Direct IO client of one account with its own read engine (see the module doc).

    ``read_settings`` sizes the engine's cache (default :data:`API_READ_SETTINGS`); ``disk_cache`` adds a disk cache
    under it (off unless its ``directory`` is set). ``portal_transport`` and ``storage_transport`` replace the network
    (``httpx.MockTransport`` in tests)."""

    def __init__(
        self,
        portal_url: str,
        access_key_id: str,
        secret_access_key: str,
        *,
        settings: DirectIOSettings | None = None,
        read_settings: ReadSettings | None = None,
        disk_cache: DiskCacheSettings | None = None,
        portal_transport: httpx.AsyncBaseTransport | None = None,
        storage_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            portal_url,
            access_key_id,
            secret_access_key,
            settings=settings,
            portal_transport=portal_transport,
            storage_transport=storage_transport,
        )
        self.read_settings = read_settings or API_READ_SETTINGS
        self.disk_cache = disk_cache
        self._engine: ReadEngine | None = None
        self._engine_nursery: trio.Nursery | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> DirectIO:
        if self.settings.tune_allocator:
            tune_allocator()
        await super().__aenter__()
        stack = contextlib.AsyncExitStack()
        disk = None
        try:
            if self.disk_cache is not None and self.disk_cache.directory is not None:
                disk = DiskTier(await open_disk_cache(self.disk_cache), f"directio:{self.portal_url}")
            self._engine_nursery = await stack.enter_async_context(trio.open_nursery())
        except BaseException:
            with trio.CancelScope(shield=True):
                await super().aclose()
            raise
        self._stack = stack
        self._engine = ReadEngine(self.read_settings, self._engine_nursery, disk=disk)
        return self

    async def aclose(self) -> None:
        stack, nursery = self._stack, self._engine_nursery
        self._stack = self._engine_nursery = self._engine = None
        try:
            if stack is not None and nursery is not None:
                nursery.cancel_scope.cancel()  # every fetch still running; nothing reads from them any more
                await stack.aclose()
        finally:
            await super().aclose()

    @property
    def engine(self) -> ReadEngine:
        """The read engine of this client (cache statistics: ``dio.engine.statistics()``)."""
        if self._engine is None:
            raise RuntimeError("use DirectIO as an async context manager (async with DirectIO(...) as dio)")
        return self._engine

    def reader(self, opened: DirectIOFile) -> FileReader:
        """A reader of an opened file through the engine (``read(offset, size)`` with read-ahead); close it with
        ``aclose`` before the file."""
        return self.engine.open(raw_capable(opened), ("directio", opened.metadata.file_id))

    @asynccontextmanager
    async def blocks(
        self, file_id: int | str, byte_range: ByteRange | None = None, max_workers: int = 8
    ) -> AsyncIterator[BlockStream]:
        """Whole blocks of the file (those overlapping ``byte_range``) fetched concurrently, at most
        ``max_workers`` in flight or waiting for the consumer, delivered as they complete (any order)."""
        check_workers(max_workers)
        opened = await self.open(file_id)
        reader = self.reader(opened)
        stream = BlockStream(reader, select_blocks(opened.layout, byte_range or ByteRange()), max_workers)
        async with self._running(stream, reader, opened):
            yield stream

    @asynccontextmanager
    async def streamer(
        self, file_id: int | str, byte_range: ByteRange | None = None, max_workers: int = 8
    ) -> AsyncIterator[FragmentStream]:
        """The bytes of ``byte_range`` in order, as fragments (whole blocks, the first and last trimmed). At most
        ``max_workers`` blocks are fetched or buffered at once, lower offsets first. A block failure raises
        ``StreamError`` whose ``offset`` is the first byte not delivered: ``ByteRange(offset, end)`` resumes."""
        check_workers(max_workers)
        opened = await self.open(file_id)
        reader = self.reader(opened)
        stream = FragmentStream(reader, byte_range or ByteRange(), max_workers, name=opened.metadata.file_id)
        async with self._running(stream, reader, opened):
            yield stream

    @asynccontextmanager
    async def _running(
        self, stream: BlockStream | FragmentStream, reader: FileReader, opened: DirectIOFile
    ) -> AsyncIterator[None]:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream._dispatch, nursery)
                yield
                nursery.cancel_scope.cancel()  # the consumer is done: stop waiting for blocks it will never read
        except BaseExceptionGroup as group:
            raise_single(group)
        finally:
            with trio.CancelScope(shield=True):  # cancelled fetches unwind promptly; then the file may close
                await reader.aclose()
                await opened.aclose()


__all__ = [
    "Block",
    "BlockStream",
    "ByteRange",
    "Chunk",
    "DirectIO",
    "DirectIOFile",
    "DirectIOSettings",
    "DiskCacheSettings",
    "FileMetadata",
    "FragmentStream",
]
