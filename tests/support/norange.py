"""python's own ``http.server`` serving a folder on 127.0.0.1: a real server that ignores ``Range`` (it answers every
GET with 200 and the whole file, as some CDNs and appliances do), for the no-range stream of the http(s):// source.

``ThreadingHTTPServer`` (one thread per connection) with ``TCP_NODELAY`` on every accepted socket (the handler
writes headers and body in separate sends; without it Nagle and delayed ACKs add ~40 ms to each reply). ``requests``
records (method, path, Range header or None) of every request, appended by the server threads (a list append is
atomic under the GIL); ``bytes_sent`` counts body bytes of GETs; ``cut_after_bytes`` makes bodies stop part-way.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class NoRangeServer:
    url: str  # ends with "/"
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=lambda: [0])
    # When set, every body is cut after this many bytes: the server closes the connection mid-body (a crash).
    cut_after_bytes: int | None = None

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of ``path`` (None: a GET without Range), in order."""
        return [rng for method, p, rng in self.requests if method == "GET" and p == path]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops a reply it does not want (directfs does, after a 200 to a ranged GET) resets the
        # connection: normal here, not worth socketserver's traceback on stderr.
        return


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers: the client's pool and a dropped reply both matter
    state: NoRangeServer

    def send_head(self) -> Any:
        self.state.requests.append((self.command, self.path, self.headers.get("Range")))
        return super().send_head()

    def copyfile(self, source: Any, outputfile: Any) -> None:
        sent = 0
        cut = self.state.cut_after_bytes
        while chunk := source.read(64 * 1024):
            if cut is not None and sent + len(chunk) > cut:
                chunk = chunk[: cut - sent]
            try:
                outputfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client dropped the reply (it did not want the body): normal here
            sent += len(chunk)
            self.state.bytes_sent[0] += len(chunk)
            if cut is not None and sent >= cut:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read ``requests``
        return


@contextlib.contextmanager
def serve_no_range(root: Path) -> Iterator[NoRangeServer]:
    """Serve ``root`` with ``http.server`` on a free port of 127.0.0.1 until the block ends."""
    state = NoRangeServer(url="")
    handler = type("Handler", (_Handler,), {"state": state})
    server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
