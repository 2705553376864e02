"""A PROPFIND reply streamed to its reader: a folder whose reply takes longer than the retry budget lists, entries
reach the reader before the reply is complete, and a reply that comes slower than the floor, or stops, ends in
ETIMEDOUT. A real HTTP server on 127.0.0.1 that drips a generated multistatus (``Drip``), through ``webdav://``
and through the filesystem (``FileSystem._list`` moves its deadline on with each entry)."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from directfs.errors import NamespaceTimeout
from directfs.sources import httpstore
from directfs.sources.base import SourceOptions
from directfs.sources.webdav import WebDAVSource
from directfs.vfs import ROOT_INODE, FileSystem, VfsSettings

ENTRIES = 3000


def multistatus(folder: str, entries: int) -> bytes:
    head = (
        '<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:">\n'
        f"<D:response><D:href>{folder}</D:href><D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype>"
        "</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>\n"
    )
    rows = "".join(
        f"<D:response><D:href>{folder}f{i:05d}</D:href><D:propstat><D:prop><D:resourcetype/>"
        f"<D:getcontentlength>{i}</D:getcontentlength><D:getlastmodified>Tue, 01 Dec 2026 10:00:00 GMT"
        "</D:getlastmodified></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>\n"
        for i in range(entries)
    )
    return (head + rows + "</D:multistatus>\n").encode()


class Drip:
    """Answers a Depth-1 PROPFIND with ``multistatus("/big/", ENTRIES)`` in ``pieces`` chunks, ``gap_seconds``
    apart (chunked transfer; TCP_NODELAY); ``stop_after`` pieces then silence (a stalled server). Depth 0: the folder
    at once."""

    def __init__(self) -> None:
        self.body = multistatus("/big/", ENTRIES)
        self.pieces = 20
        self.gap_seconds = 0.1
        self.stop_after: int | None = None
        self.first_piece_sent_at = 0.0
        self.last_piece_sent_at = 0.0
        drip = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_PROPFIND(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up: these tests
                    self._propfind()

            def _propfind(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.headers.get("Depth") == "0":  # a stat of the folder: at once
                    body = multistatus("/big/", 0) if self.path.rstrip("/") == "/big" else multistatus("/", 0)
                    self.send_response(207)
                    self.send_header("Content-Type", 'application/xml; charset="utf-8"')
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(207)
                self.send_header("Content-Type", 'application/xml; charset="utf-8"')
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                size = -(-len(drip.body) // drip.pieces)
                for number, start in enumerate(range(0, len(drip.body), size)):
                    if drip.stop_after is not None and number >= drip.stop_after:
                        time.sleep(30)  # never ends (the client gives up first; the server thread is a daemon)
                        return
                    piece = drip.body[start : start + size]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    drip.last_piece_sent_at = time.monotonic()
                    if number == 0:
                        drip.first_piece_sent_at = drip.last_piece_sent_at
                    time.sleep(drip.gap_seconds)
                self.wfile.write(b"0\r\n\r\n")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"webdav://127.0.0.1:{self.server.server_address[1]}/"

    def __enter__(self) -> Drip:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def drip() -> Iterator[Drip]:
    with Drip() as server:
        yield server


def source_with_budget(drip: Drip, budget_seconds: float, read_timeout_seconds: float = 5.0) -> WebDAVSource:
    source = WebDAVSource(drip.url, SourceOptions(read_timeout_seconds=read_timeout_seconds))
    source._retry = dataclasses.replace(source._retry, total_budget_seconds=budget_seconds)
    return source


async def test_a_reply_longer_than_the_retry_budget_lists_and_streams(drip: Drip) -> None:
    source = source_with_budget(drip, budget_seconds=0.5)  # the reply takes ~2 s
    try:
        names = []
        first_at = 0.0
        async for entry in source.list_dir("big"):
            if not names:
                first_at = time.monotonic()
            names.append(entry.name)
        assert names == [f"f{i:05d}" for i in range(ENTRIES)]
        assert first_at < drip.last_piece_sent_at, "the first entries came before the reply was complete"
    finally:
        await source.aclose()


async def test_a_reply_slower_than_the_floor_is_etimedout(drip: Drip, monkeypatch: pytest.MonkeyPatch) -> None:
    # The drip sends half the body a second; the floor asks for all of it: behind the floor from ~1 s on.
    monkeypatch.setattr(httpstore, "MIN_LISTING_BYTES_PER_SECOND", len(drip.body))
    source = source_with_budget(drip, budget_seconds=0.5)
    try:
        started = trio.current_time()
        with pytest.raises(NamespaceTimeout, match="slower than"):
            async for _ in source.list_dir("big"):
                pass
        assert trio.current_time() - started < 1.9
    finally:
        await source.aclose()


async def test_a_reply_that_stops_is_etimedout_by_the_read_timeout(drip: Drip) -> None:
    drip.stop_after = 3
    source = source_with_budget(drip, budget_seconds=30, read_timeout_seconds=0.5)
    try:
        with pytest.raises(NamespaceTimeout):
            async for _ in source.list_dir("big"):
                pass
    finally:
        await source.aclose()


class NoEngine:
    def open(self, file: object, identity: object) -> Any:
        raise AssertionError("no reads here")


async def test_the_filesystem_lists_a_folder_that_takes_longer_than_its_deadline(drip: Drip) -> None:
    """The deadline is on progress: a listing that keeps coming for 2 s passes a 0.5 s deadline."""
    source = source_with_budget(drip, budget_seconds=0.5)
    fs = FileSystem(source, NoEngine(), VfsSettings(metadata_deadline_seconds=0.5))  # type: ignore[arg-type]
    await fs.start()
    try:
        node = await fs.lookup(ROOT_INODE, "big")
        handle = await fs.opendir(node.inode)
        names: list[str] = []
        fs.readdir(handle, 0, lambda name, attrs, next_id: names.append(name) or True)
        fs.releasedir(handle)
        assert len(names) == ENTRIES
    finally:
        await fs.aclose()
        await source.aclose()
