"""A small, scriptable Direct IO server for tests and benchmarks: ``/directio/{id}`` JSON plus block objects.

It runs a real aiohttp server on 127.0.0.1 in its own thread (its own asyncio loop), so trio clients talk to it over
real sockets. Block objects are made with ``directfs.sources.ctera.codec`` exactly as a Portal stores them. URLs carry a
"signature" naming the current URL generation; :meth:`BlockServer.expire_urls` makes every issued URL answer 403,
as an expired presigned URL does.

Failures are scripted per request with :class:`Fault` queues (``metadata_faults``, ``block_faults``); counters record
what the client did (requests per block, peak concurrency, how far fetching ran ahead of the consumer).

Thread-safety: the test thread only appends to the fault queues and reads counters; ``list.pop(0)`` and integer
updates happen on the server thread. Both are atomic under the GIL, which is all the sharing there is.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import threading
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from directfs.api import DirectIO, DirectIOSettings
from directfs.http import RetryPolicy
from directfs.sources.base import OpenFile
from directfs.sources.ctera import codec


@dataclass
class Fault:
    """One scripted misbehaviour for one request.

    ``status``: answer this status (with ``retry_after`` as the Retry-After header, ``body`` as the body);
    ``truncate``: declare the full length, send half, drop the connection; ``hang``: never answer;
    ``corrupt``: serve the object one byte short, with a matching Content-Length (a damaged object, not a transport
    error: a flipped byte is not reliably detectable, CTERA blocks carry no MAC);
    ``json``: answer 200 with this raw body (metadata); ``delay_seconds``: answer normally, this much later.
    """

    status: int | None = None
    retry_after: str | None = None
    body: bytes = b""
    truncate: bool = False
    hang: bool = False
    corrupt: bool = False
    json: bytes | None = None
    delay_seconds: float = 0.0


@dataclass
class ServedFile:
    file_id: str
    plain: bytes
    lengths: list[int]
    objects: list[bytes]
    key: bytes | None
    compression: codec.Compression
    page_bytes: int | None = None  # answer partial block lists of whole blocks up to about this many bytes
    range_end_exclusive: bool = False  # write actual_blocks_range.range end exclusive (Cyberduck's sample)


@dataclass
class Stats:
    metadata_requests: list[dict[str, str]] = field(default_factory=list)
    block_order: list[int] = field(default_factory=list)  # block numbers in the order requests arrived
    block_requests: defaultdict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    in_flight: int = 0
    max_in_flight: int = 0
    started: int = 0  # block requests started (2xx or not)
    consumed: int = 0  # incremented by the test's consumer: lets the server see how far fetching runs ahead
    max_ahead: int = 0  # max(started - consumed) seen when a block request starts
    authorization: list[str | None] = field(default_factory=list)


class BlockServer:
    """Serve files over a real HTTP server on 127.0.0.1. Use as a context manager (``with BlockServer() as s``)."""

    def __init__(
        self,
        secret_access_key: str,
        access_key_id: str = "AKID-test",
        block_delay_seconds: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,  # serve HTTPS (certificates from trustme in tests)
    ):
        self.ssl_context = ssl_context
        self.secret_access_key = secret_access_key
        self.access_key_id = access_key_id
        self.block_delay_seconds = block_delay_seconds  # real delay per block answer (concurrency measurements)
        self.files: dict[str, ServedFile] = {}
        self.metadata_faults: list[Fault] = []
        self.block_faults: defaultdict[tuple[str, int], list[Fault]] = defaultdict(list)
        self.generation = 0
        self.stats = Stats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # --- content ---

    def add_file(
        self,
        file_id: str,
        plain: bytes,
        lengths: list[int] | None = None,
        *,
        block_size: int = 64 * 1024,
        encrypted: bool = True,
        compression: codec.Compression = codec.Compression.SNAPPY,
        page_bytes: int | None = None,
        range_end_exclusive: bool = False,
    ) -> ServedFile:
        if lengths is None:
            lengths = [min(block_size, len(plain) - o) for o in range(0, len(plain), block_size)]
        assert sum(lengths) == len(plain)
        key = codec.new_file_key() if encrypted else None
        objects = []
        offset = 0
        for length in lengths:
            objects.append(codec.encode_block(plain[offset : offset + length], key=key, compression=compression))
            offset += length
        served = ServedFile(file_id, plain, lengths, objects, key, compression, page_bytes, range_end_exclusive)
        self.files[file_id] = served
        return served

    def expire_urls(self) -> None:
        """Every URL issued so far now answers 403 (as an expired presigned URL does)."""
        self.generation += 1

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    # --- handlers ---

    def _metadata_body(self, served: ServedFile, range_start: int | None, range_end: int | None) -> dict[str, Any]:
        offsets = [0]
        for length in served.lengths:
            offsets.append(offsets[-1] + length)
        numbers = list(range(len(served.lengths)))
        body: dict[str, Any] = {
            "encrypt_info": {"data_encrypted": served.key is not None},
            "compression_type": "NONE" if served.compression is codec.Compression.NONE else served.compression.value,
        }
        if served.compression is codec.Compression.SNAPPY_RAW:
            body["compression_type"] = "SNAPPY"
        if served.key is not None:
            body["encrypt_info"]["wrapped_key"] = codec.wrap_file_key(served.key, self.secret_access_key)
        if served.page_bytes is not None:
            start = range_start or 0
            first = next((i for i in numbers if offsets[i] >= start), len(numbers))
            selected, total = [], 0
            for i in numbers[first:]:
                if selected and total + served.lengths[i] > served.page_bytes:
                    break
                selected.append(i)
                total += served.lengths[i]
            numbers = selected
            begin = offsets[first] if first < len(served.lengths) else sum(served.lengths)
            end = begin + total - (0 if served.range_end_exclusive else 1)
            body["actual_blocks_range"] = {"file_size": len(served.plain), "range": f"{begin}-{end}"}
        host = f"127.0.0.1:{self.port}"
        body["chunks"] = [
            {
                "url": f"{self.scheme}://{host}/blocks/{served.file_id}/{i + 1}?X-Amz-Signature=sig{self.generation}"
                f"&X-Amz-Credential=SECRETCRED",
                "len": served.lengths[i],
            }
            for i in numbers
        ]
        return body

    async def _directio(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        self.stats.metadata_requests.append(dict(request.query))
        self.stats.authorization.append(request.headers.get("Authorization"))
        if self.metadata_faults:
            fault = self.metadata_faults.pop(0)
            answer = await self._fault(request, fault, b"")
            if isinstance(answer, web.StreamResponse):
                return answer
        if request.headers.get("Authorization") != f"Bearer {self.access_key_id}":
            return web.Response(status=401)
        served = self.files.get(file_id)
        if served is None:
            return web.Response(status=400)
        start = request.query.get("rangeStart")
        end = request.query.get("rangeEnd")
        body = self._metadata_body(served, int(start) if start else None, int(end) if end else None)
        return web.Response(body=json.dumps(body).encode(), content_type="application/json")

    async def _block(self, request: web.Request) -> web.StreamResponse:
        file_id, number = request.match_info["file_id"], int(request.match_info["number"])
        stats = self.stats
        stats.block_requests[(file_id, number)] += 1
        stats.block_order.append(number)
        stats.started += 1
        stats.max_ahead = max(stats.max_ahead, stats.started - stats.consumed)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if self.block_delay_seconds:
                await asyncio.sleep(self.block_delay_seconds)
            served = self.files[file_id]
            obj = served.objects[number - 1]
            queue = self.block_faults.get((file_id, number))
            if queue:
                answer = await self._fault(request, queue.pop(0), obj)
                if isinstance(answer, bytes):
                    obj = answer
                elif answer is not None:
                    return answer
            if request.query.get("X-Amz-Signature") != f"sig{self.generation}":
                return web.Response(status=403, text="<Error><Code>AccessDenied</Code>Request has expired</Error>")
            return web.Response(body=obj, content_type="application/octet-stream")
        finally:
            stats.in_flight -= 1

    async def _fault(self, request: web.Request, fault: Fault, obj: bytes) -> web.StreamResponse | bytes | None:
        """A response to send instead, a replacement object (``corrupt``), or None to answer normally."""
        if fault.hang:
            await asyncio.sleep(3600)
        if fault.delay_seconds:
            await asyncio.sleep(fault.delay_seconds)
        if fault.status is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            return web.Response(status=fault.status, body=fault.body, headers=headers)
        if fault.json is not None:
            return web.Response(body=fault.json, content_type="application/json")
        if fault.truncate:
            response = web.StreamResponse(headers={"Content-Length": str(len(obj))})
            await response.prepare(request)
            await response.write(obj[: len(obj) // 2])
            assert request.transport is not None
            request.transport.abort()
            return response
        if fault.corrupt:
            return obj[:-1]
        return None

    # --- lifecycle ---

    def __enter__(self) -> BlockServer:
        self._thread = threading.Thread(target=self._serve, name="blockserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("block server did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = self._loop
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application(client_max_size=1024)
        app.router.add_get("/directio/{file_id}", self._directio)
        app.router.add_get("/blocks/{file_id}/{number}", self._block)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        self._runner = runner
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        loop.run_until_complete(site.start())
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()


# --- helpers shared by the Direct IO tests (conftest.py belongs to the lead) ---

# Real secret-key shape: 40 base64 characters (30 bytes), as CTERA issues them.
SECRET = base64.b64encode(bytes(range(30))).decode()
# Retries without waiting: tests with the real server must not sleep for backoff.
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_seconds=0.0, max_delay_seconds=0.0, total_budget_seconds=20.0)


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, partly compressible bytes (so snappy/gzip actually compress)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        digest = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        out += digest + bytes(32) + str(counter).encode() * 4
        counter += 1
    return bytes(out[:size])


def client(server: BlockServer, settings: DirectIOSettings | None = None) -> DirectIO:
    return DirectIO(server.url, server.access_key_id, SECRET, settings=settings or DirectIOSettings(retry=FAST_RETRY))


async def read_all(dio: DirectIO, file_id: str, **kwargs: Any) -> bytes:
    """Every block of ``file_id``, fetched one after another through ``dio.open``, joined."""
    opened = await dio.open(file_id, **kwargs)
    assert isinstance(opened, OpenFile)
    parts = [await opened.fetch_block(i) for i in range(opened.layout.block_count)]
    await opened.aclose()
    return b"".join(parts)


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def mock_file(
    plain: bytes,
    lengths: list[int],
    *,
    host: str = "store.test",
    compression: codec.Compression = codec.Compression.SNAPPY,
    encrypted: bool = True,
    azure: bool = False,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A /directio body and its block objects by URL path, for httpx.MockTransport scripts."""
    key = codec.new_file_key() if encrypted else None
    objects: dict[str, bytes] = {}
    chunks = []
    offset = 0
    for number, length in enumerate(lengths, start=1):
        path = f"/blocks/{number}"
        objects[path] = codec.encode_block(
            plain[offset : offset + length], key=key, compression=compression, azure_md5_prefix=azure
        )
        chunks.append({"url": f"https://{host}{path}?X-Amz-Signature=SIGSECRET", "len": length})
        offset += length
    info: dict[str, Any] = {"data_encrypted": encrypted}
    if key is not None:
        info["wrapped_key"] = codec.wrap_file_key(key, SECRET)
    return {"encrypt_info": info, "compression_type": compression.value, "chunks": chunks}, objects


def json_response(body: object, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
