"""A small HTTP/1.1 server in front of a WebDAV store (nginx), for the write tests: a dCache-like door that redirects
PUTs to a data node, that data node, and scripted PUT faults. Paths are forwarded unchanged (so the store's hrefs
stay right), requests go upstream with httpx, one connection each.

    with DavFront(f"http://127.0.0.1:{nginx.port}") as door, DavFront(...) as pool:
        door.put_mode = "redirect"
        door.redirect_from, door.redirect_to = "/rw-bearer/", f"{pool.url}/rw/"
        source = webdav.create(f"webdav://127.0.0.1:{door.port}/rw-bearer/", ...)

PUT modes (``put_script`` entries first, one per PUT, then ``put_mode``):

* ``proxy``: answer ``100 Continue`` to an ``Expect``, read the body, forward it; the store's answer is the answer.
* ``proxy-no-100``: the same without ever answering ``100`` (a server or proxy that ignores ``Expect``).
* ``redirect``: as dCache's door (``webdav.redirect.on-write``, ``webdav.proxy.on-impatient-write``): a PUT with
  ``Expect: 100-continue`` whose body has not started within ``impatience_seconds`` gets ``redirect_status`` with
  ``Location: redirect_to + <path after redirect_from>?uuid=1``, and what of the body still comes is counted, not
  read; a PUT that sends its body at once (an "impatient" client) is proxied instead (``impatient`` counts them), as
  is one to a URL it redirected to (unless ``redirect_again``: a loop).
* ``status``: answer ``put_status``; with ``status_reads_body`` after reading the body (``100`` first), else at once
  (no ``100``), count what of the body still comes (``discarded_bytes``) and close the connection.
* ``reset``: ``100``, read ``reset_after_bytes`` of the body, then reset the connection (a body cut mid-way).

Other methods are forwarded; one named in ``lose_answer`` is forwarded and then its answer is lost (the connection
is reset): the store did it, the client cannot know. ``on_body(seen)`` is called in the server thread once
``hook_after_bytes`` body bytes of a PUT are in (a token that rotates during an upload). Every request is recorded in
``requests`` (method, path with query, Authorization, whether it had ``Expect``, body bytes read, answered before the
body). Threads: one per connection (``ThreadingHTTPServer``); the test thread sets the knobs between requests and
reads ``requests`` (list appends are atomic under the GIL).
"""

from __future__ import annotations

import contextlib
import http.server
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httpx

Mode = Literal["proxy", "proxy-no-100", "redirect", "status", "reset"]
_FORWARDED = ("authorization", "depth", "overwrite", "content-type", "if-match", "content-length")
_RETURNED = ("content-type", "etag", "location", "www-authenticate")
DRAIN_SECONDS = 10.0  # after an early answer, how long the rest of a body (sent anyway) is counted


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    expect: bool
    body_bytes: int = 0
    early: bool = False  # answered before any body byte was read
    discarded_bytes: int = 0  # body bytes that came after such an early answer
    mode: str = ""


class DavFront:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.put_mode: Mode = "proxy"
        self.put_script: list[Mode] = []
        self.redirect_from = "/"
        self.redirect_to = ""
        self.redirect_status = 307
        self.redirect_again = False  # a PUT to a redirected URL (with ``?uuid=``) is proxied, unless this is set
        self.impatience_seconds = 0.2  # a client whose body starts later than this waited for 100
        self.put_status = 500
        self.status_reads_body = True
        self.reset_after_bytes = 1024 * 1024
        self.hook_after_bytes = 0
        self.on_body: Callable[[Seen], None] | None = None
        self.lose_answer: list[str] = []  # methods (not PUT) whose next request is done upstream, then its answer lost
        self.requests: list[Seen] = []
        self.impatient = 0
        self.errors: list[BaseException] = []
        front = self

        class Handler(_Handler):
            owner = front

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="davfront", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def puts(self) -> list[Seen]:
        return [r for r in self.requests if r.method == "PUT"]

    def __enter__(self) -> DavFront:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: DavFront
    protocol_version = "HTTP/1.1"
    rbufsize = 0  # unbuffered: select() on the socket then tells whether body bytes have arrived

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def handle_expect_100(self) -> bool:
        return True  # each mode decides whether (and when) to answer 100

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_DELETE = do_MKCOL = do_MOVE = do_COPY = do_PROPFIND = do_PROPPATCH = do_OPTIONS = do_GET

    def _handle(self) -> None:
        owner = self.owner
        seen = Seen(
            self.command,
            self.path,
            self.headers.get("Authorization"),
            self.headers.get("Expect", "").lower() == "100-continue",
        )
        owner.requests.append(seen)
        try:
            if self.command == "PUT":
                self._put(seen)
            elif self.command in owner.lose_answer:
                owner.lose_answer.remove(self.command)
                self._forward(seen, self._read_body(seen), lose=True)
            else:
                self._forward(seen, self._read_body(seen))
        except (OSError, httpx.HTTPError) as exc:
            owner.errors.append(exc)
            self.close_connection = True

    # --- PUT ---

    def _put(self, seen: Seen) -> None:
        owner = self.owner
        mode = owner.put_script.pop(0) if owner.put_script else owner.put_mode
        seen.mode = mode
        redirected = "?uuid=" in self.path
        if (
            mode == "redirect"
            and self.path.startswith(owner.redirect_from)
            and (owner.redirect_again or not redirected)
        ):
            ready, _, _ = select.select([self.connection], [], [], owner.impatience_seconds)
            if seen.expect and not ready:
                rest = self.path[len(owner.redirect_from) :]
                self._answer_early(seen, owner.redirect_status, {"Location": f"{owner.redirect_to}{rest}?uuid=1"})
                return
            owner.impatient += 1
            mode = "proxy"
        if mode == "status":
            if not owner.status_reads_body:
                self._answer_early(seen, owner.put_status, {})
                return
            self._read_body(seen, continue_=True)
            self._answer(owner.put_status, {}, b"")
            return
        if mode == "reset":
            self._read_body(seen, continue_=True, limit=owner.reset_after_bytes)
            _reset(self.connection)
            self.close_connection = True
            return
        body = self._read_body(seen, continue_=mode == "proxy")
        self._forward(seen, body)

    def _answer_early(self, seen: Seen, status: int, headers: dict[str, str]) -> None:
        """Answer before reading the body, then count (and drop) what still comes until the client closes: a
        client that waited for 100 Continue sends nothing; one that did not sends its whole body for nothing."""
        seen.early = True
        self.close_connection = True
        self._answer(status, {**headers, "Connection": "close"}, b"")
        deadline = time.monotonic() + DRAIN_SECONDS
        with contextlib.suppress(OSError):
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.connection], [], [], left)
                if not ready:
                    break
                data = self.connection.recv(1024 * 1024)
                if not data:
                    break
                seen.discarded_bytes += len(data)
            self.connection.shutdown(socket.SHUT_WR)

    # --- plumbing ---

    def _read_body(self, seen: Seen, *, continue_: bool = False, limit: int | None = None) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if continue_ and seen.expect and length:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        want = length if limit is None else min(length, limit)
        parts: list[bytes] = []
        hooked = False
        while seen.body_bytes < want:
            data = self.rfile.read(min(1024 * 1024, want - seen.body_bytes))
            if not data:
                raise ConnectionError("the client stopped sending the body")
            parts.append(data)
            seen.body_bytes += len(data)
            hook = self.owner.on_body
            if hook is not None and not hooked and seen.body_bytes >= self.owner.hook_after_bytes:
                hooked = True
                hook(seen)
        return b"".join(parts)

    def _forward(self, seen: Seen, body: bytes, *, lose: bool = False) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED}
        destination = self.headers.get("Destination")
        if destination is not None:  # nginx wants its own host in Destination
            headers["Destination"] = self.owner.upstream + httpx.URL(destination).raw_path.decode("ascii")
        reply = httpx.request(self.command, self.owner.upstream + self.path, headers=headers, content=body, timeout=60)
        if lose:  # the store did it; the client never hears so
            _reset(self.connection)
            self.close_connection = True
            return
        returned = {k: v for k, v in reply.headers.items() if k.lower() in _RETURNED}
        self._answer(reply.status_code, returned, reply.content)

    def _answer(self, status: int, headers: dict[str, str], content: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)
        self.wfile.flush()
