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
* ``corrupt``: forward, flipping one byte ``corrupt_body_offset`` bytes after the end of the first answer's headers.

Setting ``mode`` to ``refuse`` or ``hang`` also cuts or freezes connections already open (keep-alive connections of
the client's pool must not dodge an outage).

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
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.script: list[Mode] = []
        self.cut_after_bytes = 64 * 1024
        self.corrupt_body_offset = 100
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
            mode = self.script.pop(0) if self.script else self.mode
            self.modes_used.append(mode)
            if mode == "refuse":
                _reset(client)
                continue
            self._track(client)
            threading.Thread(target=self._connection, args=(client, mode), daemon=True).start()

    def _connection(self, client: socket.socket, mode: Mode) -> None:
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
        self._pump_down(upstream, client, mode)

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

    def _pump_down(self, upstream: socket.socket, client: socket.socket, mode: Mode) -> None:
        sent = 0
        header_end: int | None = None
        seen = bytearray()  # the first answer's bytes until its header end is found
        try:
            while True:
                if self.mode == "refuse":
                    break  # the outage cuts connections that are already open too
                while self.mode == "hang" and not self._closed.is_set():
                    self._closed.wait(0.05)
                data = upstream.recv(PUMP_BYTES)
                if not data:
                    with contextlib.suppress(OSError):
                        client.shutdown(socket.SHUT_WR)
                    return
                if mode == "corrupt":
                    if header_end is None:
                        seen += data
                        found = seen.find(b"\r\n\r\n")
                        if found >= 0:
                            header_end = found + 4
                    if header_end is not None:
                        target = header_end + self.corrupt_body_offset - sent
                        if 0 <= target < len(data):
                            damaged = bytearray(data)
                            damaged[target] ^= 0x01
                            data = bytes(damaged)
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
