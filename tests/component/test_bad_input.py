"""Hostile or broken input: a clear error, bounded memory, no crash, no hang.

* A 2 GB JSON body from a real streaming server (declared with Content-Length, and chunked without one): refused
  after at most the configured limit, the server sees the client stop early.
* A huge listing in a PROPFIND reply: parsed within a measured memory bound (no server; here for its run time, more
  than the unit tier's budget).

Wrong JSON types and values, a JSON nesting bomb, XML entity attacks and invalid names, without a server:
tests/unit/test_bad_input_offline.py.
"""

from __future__ import annotations

import errno
import socket
import threading
import tracemalloc
from collections.abc import Iterator

import pytest

from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import MalformedMetadataError
from directfs.sources import davxml
from tests.support.blockserver import FAST_RETRY, SECRET

MiB = 1024 * 1024
LIMIT_BYTES = 4 * MiB  # the client's max_metadata_bytes in these tests (default 64 MiB; same code path)


class EndlessServer:
    """Answers every request with a 200 whose body would be 2 GiB of JSON-ish bytes; counts what it sent."""

    def __init__(self, *, chunked: bool) -> None:
        self.chunked = chunked
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> EndlessServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.listener.close()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            total = 2 * 1024 * MiB
            if self.chunked:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            else:
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {total}\r\n\r\n".encode()
            piece = b'{"chunks": [' + b" " * (MiB - 12)
            try:
                conn.sendall(head)
                while self.sent < total:
                    data = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if self.chunked else piece
                    conn.sendall(data)
                    self.sent += len(piece)
            except OSError:
                return


# Cutting a chunked body short leaves httpx's inner async generators to trio's GC hook, which warns (see
# directfs.sources.ctera.client._read_limited); the same mark as
# tests/unit/test_directio_mock.py::test_chunked_overlong_bodies_are_cut_off.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_2_gb_json_body_is_refused_without_reading_it(chunked: bool) -> None:
    with EndlessServer(chunked=chunked) as server:
        settings = DirectIOSettings(retry=FAST_RETRY, max_metadata_bytes=LIMIT_BYTES)
        async with DirectIO(f"http://127.0.0.1:{server.port}", "AKID", SECRET, settings=settings) as dio:
            with pytest.raises(MalformedMetadataError, match="larger than") as info:
                await dio.metadata(1)
    assert info.value.errno == errno.EIO
    # Stopped early: at most the limit plus what sat in socket buffers, nowhere near 2 GiB.
    assert server.sent < LIMIT_BYTES + 64 * MiB, server.sent


def listing(count: int) -> Iterator[bytes]:
    yield b'<?xml version="1.0"?><D:multistatus xmlns:D="DAV:" xmlns:C="http://www.ctera.com/ns">'
    for i in range(count):
        yield (
            f"<D:response><D:href>/ServicesPortal/webdav/big/f{i:07d}.bin</D:href><D:propstat><D:prop>"
            f"<D:resourcetype/><D:getcontentlength>{i}</D:getcontentlength><C:fileid>{i + 1}</C:fileid>"
            f"</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
        ).encode()
    yield b"</D:multistatus>"


def test_a_folder_of_100k_entries_parses_within_a_measured_memory_bound() -> None:
    """Peak Python heap while parsing a 100k-entry Depth-1 reply (~25 MB of XML), body included. The figure scales
    linearly: the README quotes it per entry (a million entries need ~10x; the body limit caps the reply at 512 MiB)."""
    body = b"".join(listing(100_000))
    tracemalloc.start()
    try:
        names = [name for name, _ in davxml.Children("/ServicesPortal/webdav/big").take(davxml.parse_multistatus(body))]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(names) == 100_000 and len(set(names)) == 100_000
    per_entry = peak / 100_000
    print(f"\n100k-entry listing: body {len(body) / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB ({per_entry:.0f} B/entry)")
    assert peak < 400 * MiB
