"""A loopback TCP fault proxy: put it between a client and a real server and make the network misbehave.

    with FaultProxy(upstream_port) as proxy:
        url = proxy.url                     # http://127.0.0.1:<port>
        proxy.mode = "hang"                 # every new connection from now on
        proxy.script = ["reset_mid_body"]   # the next connection only, then ``mode``

Modes (per connection, decided when it is accepted; ``script`` entries are used first, one per connection):

* ``pass``: forward both ways.
* ``refuse``: accept and reset at once (RST: SO_LINGER 0), as a host whose service is down.
* ``hang``: accept, read the request, never answer (a server that accepts and never answers).
* ``reset_mid_body``: forward the answer until ``cut_after_bytes`` bytes, then reset the connection.
* ``truncate``: forward the answer until ``cut_after_bytes`` bytes, then close cleanly (FIN): a truncated body.
* ``corrupt``: forward, flipping the byte at ``corrupt_body_offset`` of each answer's body (``corrupt_every_answer``
  False: the first answer of the connection only).

Connections opened under ``mode`` follow later changes of ``mode`` (keep-alive connections of the client's pool must
neither dodge an outage nor stay damaged after it heals); connections opened from ``script`` keep their mode.

Threads: one acceptor plus two pumps per connection, all daemon threads; ``close()`` stops them. The test thread
only assigns ``mode``/``script`` and reads counters (atomic under the GIL).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Literal

Mode = Literal["pass", "refuse", "hang", "reset_mid_body", "truncate", "corrupt"]
PUMP_BYTES = 256 * 1024


def _reset(sock: socket.socket) -> None:
    """Close with RST. SHUT_RD first wakes a pump thread blocked in recv on this socket: until that recv returns the
    kernel keeps the socket alive and the close (and its RST) would not happen."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.script: list[Mode] = []
        self.cut_after_bytes = 64 * 1024
        self.corrupt_body_offset = 100
        self.corrupt_every_answer = True  # False: only the first answer of each connection is damaged
        self.connections = 0  # accepted so far
        self.modes_used: list[Mode] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _reset(sock)
        self._thread.join(5)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            scripted = bool(self.script)
            mode = self.script.pop(0) if scripted else self.mode
            self.modes_used.append(mode)
            if mode == "refuse":
                _reset(client)
                continue
            self._track(client)
            threading.Thread(target=self._connection, args=(client, mode, scripted), daemon=True).start()

    def _connection(self, client: socket.socket, mode: Mode, scripted: bool) -> None:
        if mode == "hang":
            self._hang(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        self._track(upstream)
        threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
        self._pump_down(upstream, client, mode, scripted)

    def _hang(self, client: socket.socket) -> None:
        """Read whatever comes, answer nothing, until the proxy closes (or the client gives up)."""
        client.settimeout(0.2)
        while not self._closed.is_set():
            try:
                if not client.recv(PUMP_BYTES):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        _reset(client)

    def _pump_up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                data = client.recv(PUMP_BYTES)
                if not data:
                    break
                upstream.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _pump_down(self, upstream: socket.socket, client: socket.socket, mode: Mode, scripted: bool) -> None:
        """A scripted connection keeps its mode; the others follow ``self.mode`` as it changes, so healing the
        proxy heals the client's pooled keep-alive connections too."""
        sent = 0
        answers = _AnswerTracker()
        try:
            while True:
                data = upstream.recv(PUMP_BYTES)
                # Checked after the wait too: an outage also hits connections already open (the client's pool).
                while self.mode == "hang" and not self._closed.is_set():
                    self._closed.wait(0.05)
                if self.mode == "refuse" or self._closed.is_set():
                    break
                if not data:
                    with contextlib.suppress(OSError):
                        client.shutdown(socket.SHUT_WR)
                    return
                if not scripted:
                    mode = self.mode
                if mode == "corrupt":
                    data = answers.corrupt(data, self.corrupt_body_offset, every=self.corrupt_every_answer)
                if mode in ("reset_mid_body", "truncate") and sent + len(data) > self.cut_after_bytes:
                    client.sendall(data[: max(0, self.cut_after_bytes - sent)])
                    if mode == "truncate":
                        with contextlib.suppress(OSError):
                            client.shutdown(socket.SHUT_RDWR)
                        client.close()
                        _reset(upstream)
                        return
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        _reset(client)
        _reset(upstream)


class _AnswerTracker:
    """Finds body bytes in a stream of HTTP/1.1 answers framed by Content-Length (what the portal sends), so
    ``corrupt`` can damage the body of every answer on a keep-alive connection, not only the first."""

    def __init__(self) -> None:
        self.head = bytearray()  # header bytes of the current answer, until its blank line
        self.body_left = 0  # body bytes of the current answer still to come
        self.body_seen = 0
        self.answers = 0

    def corrupt(self, data: bytes, offset: int, *, every: bool) -> bytes:
        out = bytearray(data)
        position = 0
        while position < len(out):
            if self.body_left == 0:
                self.head += out[position:]
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return bytes(out)
                consumed = end + 4 - (len(self.head) - (len(out) - position))
                length = 0
                for line in bytes(self.head[:end]).split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                self.head.clear()
                position += consumed
                self.body_left, self.body_seen = length, 0
                self.answers += 1
                continue
            take = min(self.body_left, len(out) - position)
            target = offset - self.body_seen
            if 0 <= target < take and (every or self.answers == 1):
                out[position + target] ^= 0x01
            self.body_seen += take
            self.body_left -= take
            position += take
        return bytes(out)


def ctera_env(portal: object) -> dict[str, str]:
    """The environment a ``directfs mount ctera+...`` of a test portal needs (secrets go by environment, never
    argv). ``portal`` is a ``tests.support.portal.Portal``."""
    return {
        "DIRECTFS_ACCESS_KEY_ID": portal.access_key_id,  # type: ignore[attr-defined]
        "DIRECTFS_SECRET_ACCESS_KEY": portal.secret_access_key,  # type: ignore[attr-defined]
        "DIRECTFS_USERNAME": portal.username,  # type: ignore[attr-defined]
        "DIRECTFS_PASSWORD": portal.password,  # type: ignore[attr-defined]
    }
