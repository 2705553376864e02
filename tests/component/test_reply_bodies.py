"""Reply bodies through the one reader (``directfs.http.read_body``), against real servers on loopback.

* Every request asks for ``Accept-Encoding: identity``; a server that compresses anyway is decoded, and a
  compression bomb is refused at the limit with memory bounded by the limit, not by what the bomb expands to
  (issue 13 M1: 255 KiB of gzip used to become a 268 MiB allocation).
* A server that ignores ``Range`` is refused from its status line: the body of the whole object is not read
  (issue 13 M2: 192 MiB were held for one 8 MiB block).
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import tracemalloc
import zlib

import pytest

from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import DownloadError, MalformedListingError, MalformedMetadataError
from directfs.http import HTTPSettings, build_client
from directfs.sources import davxml, webdav
from directfs.sources.base import BlockLayout, Credentials, SourceOptions
from directfs.sources.ctera import CteraSource
from directfs.sources.httprange import RangeFile
from directfs.transfer import BlockingGetter
from tests.support.blockserver import FAST_RETRY, SECRET, mock_file, payload

MiB = 1024 * 1024
LIMIT_BYTES = 4 * MiB
MULTISTATUS_HEAD = b'<?xml version="1.0"?><D:multistatus xmlns:D="DAV:">'


class CannedServer:
    """Answers every request on one connection at a time with the same head and body; records request heads and
    counts the body bytes it managed to send (a client that stops reading makes ``sendall`` fail)."""

    def __init__(self, head: bytes, body: bytes | None = None, *, endless_chunk: bytes | None = None) -> None:
        self.head = head
        self.body = body or b""
        self.endless_chunk = endless_chunk  # chunked body repeating this until the client goes away
        self.requests: list[bytes] = []
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> CannedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.listener.close()
        self.thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        received = b""
        try:
            while True:
                while b"\r\n\r\n" not in received:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    received += piece
                head, _, received = received.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(received) < length:
                    received += conn.recv(65536)
                received = received[length:]
                self.requests.append(head)
                conn.sendall(self.head)
                if self.endless_chunk is None:
                    conn.sendall(self.body)
                    self.sent += len(self.body)
                    continue
                framed = f"{len(self.endless_chunk):x}\r\n".encode() + self.endless_chunk + b"\r\n"
                while self.sent < 4096 * MiB:
                    conn.sendall(framed)
                    self.sent += len(self.endless_chunk)
        except OSError:
            return


def reply_head(status: str, body: bytes, **headers: str) -> bytes:
    fields = {"Content-Length": str(len(body)), **{k.replace("_", "-"): v for k, v in headers.items()}}
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode()


def gzip_bomb(prefix: bytes, expanded_bytes: int) -> bytes:
    """``prefix`` then ``expanded_bytes`` of spaces, gzip'd: ~1000:1, valid XML/JSON whitespace all the way."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + 15)
    out = [compressor.compress(prefix)]
    block = b" " * MiB
    for _ in range(expanded_bytes // MiB):
        out.append(compressor.compress(block))
    out.append(compressor.flush())
    return b"".join(out)


def metadata_json() -> bytes:
    body, _ = mock_file(payload(2 * 65536), [65536, 65536])
    return json.dumps(body).encode()


def ctera_source(url: str) -> CteraSource:
    credentials = Credentials(access_key_id="AKID", secret_access_key=SECRET, username="u", password="p")
    return CteraSource("ctera+" + url, SourceOptions(credentials=credentials))


async def test_requests_ask_for_identity_and_a_gzipped_reply_still_reads() -> None:
    """A Portal that compresses JSON whatever was asked (nginx ``gzip on`` for application/json) still works."""
    body = gzip.compress(metadata_json())
    head = reply_head("200 OK", body, Content_Type="application/json", Content_Encoding="gzip")
    with CannedServer(head, body) as server:
        async with DirectIO(server.url, "AKID", SECRET, settings=DirectIOSettings(retry=FAST_RETRY)) as dio:
            metadata = await dio.metadata(1)
    assert metadata.size == 2 * 65536
    assert server.requests and all(b"\r\naccept-encoding: identity" in r.lower() for r in server.requests)


async def test_an_unknown_content_encoding_is_a_clear_error() -> None:
    body = b"\x1b\x00\x00 not brotli really"
    head = reply_head("200 OK", body, Content_Type="application/json", Content_Encoding="br")
    with CannedServer(head, body) as server:
        async with DirectIO(server.url, "AKID", SECRET, settings=DirectIOSettings(retry=FAST_RETRY)) as dio:
            with pytest.raises(MalformedMetadataError, match="Content-Encoding 'br'"):
                await dio.metadata(1)


def peak_of(run: object) -> int:
    import trio

    tracemalloc.start()
    try:
        trio.run(run)  # type: ignore[arg-type]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Cutting a body off leaves httpx's nested async generators to trio's GC hook, which warns (directfs.http.read_body).
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
@pytest.mark.parametrize("reader", ["directio-json", "ctera-propfind", "webdav-propfind"])
def test_a_compression_bomb_is_refused_at_the_limit_within_bounded_memory(
    reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 MiB of whitespace in ~64 KiB of gzip against a 4 MiB limit: refused, and the peak heap stays near the
    limit (before: httpx inflated each network read whole, 64 MiB at once)."""
    monkeypatch.setattr(davxml, "MAX_PROPFIND_BODY_BYTES", LIMIT_BYTES)
    if reader == "directio-json":
        body, status, error = gzip_bomb(b'{"chunks": [', 64 * MiB), "200 OK", MalformedMetadataError
    else:
        body, status, error = gzip_bomb(MULTISTATUS_HEAD, 64 * MiB), "207 Multi-Status", MalformedListingError
    head = reply_head(status, body, Content_Encoding="gzip", Content_Type="application/xml")
    caught: list[BaseException] = []

    async def run() -> None:
        try:
            if reader == "directio-json":
                settings = DirectIOSettings(retry=FAST_RETRY, max_metadata_bytes=LIMIT_BYTES)
                async with DirectIO(server.url, "AKID", SECRET, settings=settings) as dio:
                    await dio.metadata(1)
            elif reader == "ctera-propfind":
                source = ctera_source(server.url)
                try:
                    await source.stat("")
                finally:
                    await source.aclose()
            else:
                store = webdav.create(f"webdav://127.0.0.1:{server.port}/", SourceOptions())
                try:
                    await store.stat("")
                finally:
                    await store.aclose()
        except Exception as exc:
            caught.append(exc)

    with CannedServer(head, body) as server:
        peak = peak_of(run)
    assert len(caught) == 1 and isinstance(caught[0], error), caught
    assert "limit" in str(caught[0]) or "larger than" in str(caught[0])
    assert peak < LIMIT_BYTES + 8 * MiB, f"peak heap {peak / MiB:.1f} MiB for a {LIMIT_BYTES / MiB:.0f} MiB limit"


@pytest.mark.parametrize("engine", ["httpx", "curl"])
async def test_a_server_ignoring_range_is_refused_from_the_status_line(engine: str) -> None:
    """A part of a 192 MiB object asked with Range, answered 200 with the whole object (chunked, endless): refused
    as "ignored the Range header" after reading at most a few KiB past the headers (before: up to the object's
    size on httpx, the block's size on libcurl)."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    block_bytes = 8 * MiB
    with CannedServer(head, endless_chunk=b"x" * (256 * 1024)) as server:
        settings = HTTPSettings()
        client = build_client(settings)
        getter = BlockingGetter(settings) if engine == "curl" else None
        try:
            opened = RangeFile(
                client,
                server.url + "/big.bin",
                BlockLayout.fixed("v1", 192 * MiB, block_bytes),
                name="big.bin",
                etag=None,
                policy=FAST_RETRY,
                getter=getter,
            )
            with pytest.raises(DownloadError, match="ignored the Range header"):
                await opened.fetch_block(1)
        finally:
            await client.aclose()
            if getter is not None:
                getter.close()
    # What sat in socket buffers (a few MiB on loopback) is sent anyway; the body itself was not read.
    assert server.sent < block_bytes // 2, f"{server.sent / MiB:.1f} MiB sent"
