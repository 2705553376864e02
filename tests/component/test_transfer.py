"""directfs.transfer: blocking GETs on libcurl, against real servers on 127.0.0.1 (a raw socket server written here,
plain or TLS with a trustme CA), checking that they behave and fail as the httpx path does."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from directfs.http import (
    RETRYABLE_ERRORS,
    HTTPSettings,
    RetryPolicy,
    describe_transport_error,
    send_with_retries,
    tls_failure,
)
from directfs.transfer import BlockingGetter, BodyTooLarge, RawReply

SECRET = "X-Amz-Signature=0123456789abcdef-secret"
FAST = HTTPSettings(connect_timeout_seconds=2.0, read_timeout_seconds=1.0)


class Connection:
    """One accepted connection, as a server handler sees it."""

    def __init__(self, sock: socket.socket, server: Server) -> None:
        self.sock = sock
        self.server = server
        self._buffer = b""

    def read_request(self) -> bytes | None:
        """The next request head (GETs have no body), or None when the client closed."""
        while b"\r\n\r\n" not in self._buffer:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self._buffer += data
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        self.server.requests.append(head)
        return head

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0) instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


Handler = Callable[[Connection], None]


class Server:
    """A threaded TCP server on 127.0.0.1 running ``handler`` per connection; counts connections and requests."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.accepted = 0
        self.requests: list[bytes] = []
        self.stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    def url(self, path: str = "/object", *, query: str = SECRET) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}?{query}"

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(20)
            with self._lock:
                self.accepted += 1
                self._sockets.append(sock)
                thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket) -> None:
        try:
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    return  # the client refused our certificate (or we refused its)
                with self._lock:
                    self._sockets.append(sock)
            self.handler(Connection(sock, self))
        except OSError:
            pass  # the client went away, or we are closing
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.stopping.set()
        self._accept_thread.join(5)
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        for sock in sockets:
            sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(handler: Handler, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(handler, tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def getter() -> Iterator[Callable[..., BlockingGetter]]:
    getters: list[BlockingGetter] = []

    def make(settings: HTTPSettings = FAST, **kwargs: object) -> BlockingGetter:
        made = BlockingGetter(settings, **kwargs)  # type: ignore[arg-type]
        getters.append(made)
        return made

    yield make
    for made in getters:
        made.close()


def body_for(path: bytes, size: int = 300_000) -> bytes:
    """Deterministic content per path, so a reply delivered to the wrong thread shows."""
    seed = hashlib.sha256(path).digest()
    return (seed * (size // len(seed) + 1))[:size]


def path_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1].split(b"?", 1)[0]


def keep_alive(respond: Callable[[bytes], bytes]) -> Handler:
    """A handler answering every request of the connection with ``respond(head)``."""

    def handler(conn: Connection) -> None:
        while (head := conn.read_request()) is not None:
            conn.send(respond(head))

    return handler


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body


def serve_objects(head: bytes) -> bytes:
    return ok(body_for(path_of(head)), b'ETag: "abc"\r\n')


def assert_no_secret(exc: BaseException) -> None:
    seen: BaseException | None = exc
    while seen is not None:
        assert "0123456789abcdef" not in str(seen) and "secret" not in str(seen), repr(seen)
        seen = seen.__cause__ or seen.__context__


# --- replies ---


def test_200_body_exact(serve: Callable[..., Server], getter: Callable[..., BlockingGetter]) -> None:
    server = serve(keep_alive(serve_objects))
    reply = getter().get(server.url("/a"), limit_bytes=300_000, timeout_seconds=10)
    assert isinstance(reply, RawReply)
    assert reply.status_code == 200
    assert isinstance(reply.body, bytearray) and reply.body == body_for(b"/a")
    assert isinstance(reply.headers, httpx.Headers)
    assert reply.headers["etag"] == '"abc"' and reply.headers["Content-Length"] == "300000"
    head = server.requests[0].decode().lower()
    assert head.startswith("get /a?x-amz-signature=") and " http/1.1\r\n" in head
    assert "accept-encoding: identity" in head


def test_default_headers_sent_and_identity_overridable(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    server = serve(keep_alive(serve_objects))
    getter(headers={"X-Test": "1", "X-Empty": ""}).get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    head = server.requests[0].decode().lower()
    assert "x-test: 1\r\n" in head and "x-empty:" in head and "accept-encoding: identity" in head
    with pytest.raises(ValueError, match="invalid header"):
        BlockingGetter(FAST, headers={"X-Bad": "a\r\nInjected: 1"})


def test_chunked_body_and_interim_reply(serve: Callable[..., Server], getter: Callable[..., BlockingGetter]) -> None:
    data = body_for(b"/chunked", 100_000)

    def respond(head: bytes) -> bytes:
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(data[i : i + 7000]), data[i : i + 7000]) for i in range(0, 100_000, 7000)
        )
        return (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-MD5: x\r\n\r\n"
            + chunks
            + b"0\r\nX-Trailer: t\r\n\r\n"
        )

    server = serve(keep_alive(respond))
    made = getter()
    for _ in range(2):
        reply = made.get(server.url(), limit_bytes=100_000, timeout_seconds=10)  # exactly the limit: accepted
        assert reply.status_code == 200 and reply.body == data
        assert reply.headers["content-md5"] == "x" and "x-trailer" not in reply.headers
    assert server.accepted == 1


def test_403_returns_status_and_headers_with_empty_body(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    def respond(head: bytes) -> bytes:
        if path_of(head) == b"/denied":
            return b"HTTP/1.1 403 Forbidden\r\nContent-Length: 50000\r\nRetry-After: 7\r\n\r\n" + b"d" * 50000
        return serve_objects(head)

    server = serve(keep_alive(respond))
    made = getter()
    reply = made.get(server.url("/denied"), limit_bytes=1 << 20, timeout_seconds=10)
    assert reply.status_code == 403 and reply.body == bytearray() and reply.headers["retry-after"] == "7"
    # A huge declared error body is not an error either: only the status matters.
    reply = made.get(server.url("/denied"), limit_bytes=1000, timeout_seconds=10)
    assert reply.status_code == 403 and reply.body == bytearray() and reply.headers["retry-after"] == "7"
    assert made.get(server.url("/next"), limit_bytes=1 << 20, timeout_seconds=10).body == body_for(b"/next")


def test_empty_error_reply_keeps_the_connection(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    def respond(head: bytes) -> bytes:
        if path_of(head) == b"/gone":
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return serve_objects(head)

    server = serve(keep_alive(respond))
    made = getter()
    assert made.get(server.url("/gone"), limit_bytes=1000, timeout_seconds=10).status_code == 404
    assert made.get(server.url("/x"), limit_bytes=1 << 20, timeout_seconds=10).status_code == 200
    assert server.accepted == 1


def test_redirect_is_returned_not_followed(serve: Callable[..., Server], getter: Callable[..., BlockingGetter]) -> None:
    def respond(head: bytes) -> bytes:
        return b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 5\r\n\r\nmoved"

    server = serve(keep_alive(respond))
    reply = getter().get(server.url(), limit_bytes=1000, timeout_seconds=10)
    assert reply.status_code == 302 and reply.headers["location"] == "/elsewhere" and reply.body == bytearray()
    time.sleep(0.1)
    assert len(server.requests) == 1


# --- body limit ---


def test_declared_length_over_limit_is_refused_before_reading(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    def handler(conn: Connection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000)
        server.stopping.wait(10)  # the rest never comes: reading it would time out

    server = serve(handler)
    start = time.monotonic()
    with pytest.raises(BodyTooLarge) as info:
        getter().get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    assert info.value.size == 100_000_000
    assert time.monotonic() - start < 0.9  # well under the 1 s read timeout: nothing was waited for


def test_undeclared_body_past_limit_is_aborted(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    sent = [0]

    def handler(conn: Connection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (65536, b"y" * 65536)
        while sent[0] < 256 << 20 and not server.stopping.is_set():  # bounded: 256 MiB at most
            conn.send(piece)
            sent[0] += 65536

    server = serve(handler)
    with pytest.raises(BodyTooLarge) as info:
        getter().get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    assert info.value.size > 1 << 20
    assert sent[0] < 64 << 20  # stopped soon after the limit, not at the end


def test_body_without_length_until_close(serve: Callable[..., Server], getter: Callable[..., BlockingGetter]) -> None:
    def handler(conn: Connection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"z" * 5000)

    server = serve(handler)
    made = getter()
    assert made.get(server.url(), limit_bytes=5000, timeout_seconds=10).body == b"z" * 5000
    with pytest.raises(BodyTooLarge):
        made.get(server.url(), limit_bytes=4999, timeout_seconds=10)


# --- transport failures ---


def test_connection_refused_is_connect_error(getter: Callable[..., BlockingGetter]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(httpx.ConnectError) as info:
            getter().get(f"http://127.0.0.1:{port}/x?{SECRET}", limit_bytes=1000, timeout_seconds=10)
    assert isinstance(info.value, RETRYABLE_ERRORS) and tls_failure(info.value) is None
    assert_no_secret(info.value)


def test_unknown_host_is_connect_error(getter: Callable[..., BlockingGetter]) -> None:
    with pytest.raises(httpx.ConnectError):
        getter().get(f"http://no-such-host.invalid/x?{SECRET}", limit_bytes=1000, timeout_seconds=10)


def test_silent_server_times_out_after_read_timeout(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    def handler(conn: Connection) -> None:
        conn.read_request()
        server.stopping.wait(30)

    server = serve(handler)
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout) as info:
        getter().get(server.url(), limit_bytes=1000, timeout_seconds=30)
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 2.5, elapsed  # read_timeout_seconds=1
    assert_no_secret(info.value)


def test_connect_timeout(getter: Callable[..., BlockingGetter]) -> None:
    # A listener whose accept queue is full drops further SYNs (Linux), so connecting hangs.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.2)
        with socket.socket() as probe:
            probe.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                probe.connect(("127.0.0.1", port))
                pytest.skip("this kernel does not drop SYNs to a full accept queue")
        settings = HTTPSettings(connect_timeout_seconds=0.5, read_timeout_seconds=5)
        start = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout):
            getter(settings).get(f"http://127.0.0.1:{port}/x?{SECRET}", limit_bytes=1000, timeout_seconds=10)
        assert time.monotonic() - start < 2
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_deadline_caps_a_dripping_body(serve: Callable[..., Server], getter: Callable[..., BlockingGetter]) -> None:
    def handler(conn: Connection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):  # 10 bytes/s: never "no bytes for read_timeout", never done within the deadline
            if server.stopping.wait(0.1):
                return
            conn.send(b"d")

    server = serve(handler)
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        getter().get(server.url(), limit_bytes=1000, timeout_seconds=1.5)
    assert 1.4 < time.monotonic() - start < 2.5


def test_no_time_left_is_a_timeout(getter: Callable[..., BlockingGetter]) -> None:
    with pytest.raises(httpx.TimeoutException):
        getter().get(f"http://127.0.0.1:9/x?{SECRET}", limit_bytes=1000, timeout_seconds=0)
    with pytest.raises(ValueError, match="limit_bytes"):  # libcurl would read 0 as unlimited
        getter().get(f"http://127.0.0.1:9/x?{SECRET}", limit_bytes=0, timeout_seconds=1)


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_connection_closed_mid_body_is_retryable(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter], how: str
) -> None:
    def handler(conn: Connection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 30000)
        time.sleep(0.1)
        if how == "rst":
            conn.reset()

    server = serve(handler)
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)) as info:
        getter().get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    assert isinstance(info.value, RETRYABLE_ERRORS)
    assert_no_secret(info.value)


def test_empty_and_garbage_replies_are_protocol_errors(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    empty = serve(lambda conn: conn.read_request() and None)
    garbage = serve(lambda conn: conn.read_request() and conn.send(b"garbage\r\n\r\n"))
    made = getter()
    for server in (empty, garbage):
        with pytest.raises(httpx.RemoteProtocolError):
            made.get(server.url(), limit_bytes=1000, timeout_seconds=10)


def test_only_http_and_https(getter: Callable[..., BlockingGetter]) -> None:
    made = getter()
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/x", "/relative"):
        with pytest.raises(httpx.UnsupportedProtocol):
            made.get(url, limit_bytes=1000, timeout_seconds=10)


def test_reconnects_after_the_server_closed_an_idle_connection(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    def handler(conn: Connection) -> None:  # one request per connection, then close (as an idle timeout does)
        head = conn.read_request()
        if head is not None:
            conn.send(serve_objects(head))

    server = serve(handler)
    made = getter()
    for _ in range(3):
        assert made.get(server.url("/r"), limit_bytes=1 << 20, timeout_seconds=10).body == body_for(b"/r")
        time.sleep(0.05)
    assert server.accepted == 3


# --- connections and threads ---


def test_keep_alive_one_connection_per_thread(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    server = serve(keep_alive(serve_objects))
    made = getter()
    for i in range(50):
        path = f"/k{i % 5}"
        assert made.get(server.url(path), limit_bytes=1 << 20, timeout_seconds=10).body == body_for(path.encode())
    assert server.accepted == 1 and len(server.requests) == 50


def test_no_keepalive_when_switched_off(serve: Callable[..., Server], getter: Callable[..., BlockingGetter]) -> None:
    server = serve(keep_alive(serve_objects))
    made = getter(HTTPSettings(read_timeout_seconds=1, max_keepalive_connections=0))
    for _ in range(3):
        made.get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    assert server.accepted == 3


def test_threads_are_independent_and_exact(serve: Callable[..., Server], getter: Callable[..., BlockingGetter]) -> None:
    server = serve(keep_alive(serve_objects))
    made = getter()
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                path = f"/t{n}-{i}"
                reply = made.get(server.url(path), limit_bytes=1 << 20, timeout_seconds=20)
                assert reply.status_code == 200 and reply.body == body_for(path.encode()), path
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    assert len(server.requests) == 200 and server.accepted == 4


def test_closed_getter_refuses(serve: Callable[..., Server]) -> None:
    server = serve(keep_alive(serve_objects))
    with BlockingGetter(FAST) as made:
        assert made.get(server.url(), limit_bytes=1 << 20, timeout_seconds=10).status_code == 200
    with pytest.raises(RuntimeError, match="closed"):
        made.get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    made.close()  # twice is fine


# --- proxies from the environment ---


def test_proxy_environment_is_ignored_unless_trusted(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter], monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = serve(keep_alive(serve_objects))
    proxy = serve(keep_alive(lambda head: ok(b"via proxy")))
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy_url)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    reply = getter().get(origin.url("/direct"), limit_bytes=1 << 20, timeout_seconds=10)
    assert reply.body == body_for(b"/direct") and proxy.accepted == 0
    trusting = getter(HTTPSettings(read_timeout_seconds=1, trust_env=True))
    assert trusting.get(origin.url("/direct"), limit_bytes=1 << 20, timeout_seconds=10).body == b"via proxy"
    assert proxy.accepted == 1


# --- TLS ---


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *hosts: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(hosts or ("127.0.0.1", "localhost"))).configure_cert(context)
    return context


def test_untrusted_certificate_fails_fast_as_tls(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter], ca: trustme.CA
) -> None:
    server = serve(keep_alive(serve_objects), tls=server_context(ca))
    with pytest.raises(httpx.ConnectError) as info:
        getter().get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    cause = tls_failure(info.value)
    assert isinstance(cause, ssl.SSLCertVerificationError), repr(info.value)
    assert cause.verify_message and cause.verify_code
    # OpenSSL's wording and code, as Python's own ssl module reports them.
    assert (cause.verify_code, cause.verify_message) == (20, "unable to get local issuer certificate")
    assert describe_transport_error(info.value).startswith(
        f"TLS certificate verification failed: the server's certificate is not trusted ({cause.verify_message})"
    )
    assert_no_secret(info.value)


def test_hostname_mismatch_is_a_certificate_error(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter], ca: trustme.CA, ca_file: str
) -> None:
    server = serve(keep_alive(serve_objects), tls=server_context(ca, "storage.example"))
    with pytest.raises(httpx.ConnectError) as info:
        getter(HTTPSettings(ca_file=ca_file)).get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    cause = tls_failure(info.value)
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert cause.verify_message == "IP address mismatch, certificate is not valid for '127.0.0.1'."
    assert "certificate verification failed" in describe_transport_error(info.value)


def test_ca_file_is_trusted_on_top_of_system_roots(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter], ca: trustme.CA, ca_file: str
) -> None:
    server = serve(keep_alive(serve_objects), tls=server_context(ca))
    made = getter(HTTPSettings(read_timeout_seconds=1, ca_file=ca_file))
    for _ in range(3):
        assert made.get(server.url("/tls"), limit_bytes=1 << 20, timeout_seconds=10).body == body_for(b"/tls")
    assert server.accepted == 1
    # Another CA's file (added to the system roots): ours is still not trusted.
    other = trustme.CA()
    with other.cert_pem.tempfile() as other_file, pytest.raises(httpx.ConnectError) as info:
        getter(HTTPSettings(ca_file=other_file)).get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    assert isinstance(tls_failure(info.value), ssl.SSLCertVerificationError)


def test_system_trust_is_what_python_loads(
    serve: Callable[..., Server],
    getter: Callable[..., BlockingGetter],
    ca: trustme.CA,
    ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without ca_file, trust is OpenSSL's default store as Python's default context loads it, SSL_CERT_FILE included
    # (bare pycurl ignores it: its wheel probes a fixed list of paths, and libcurl's compiled default is Red Hat's).
    server = serve(keep_alive(serve_objects), tls=server_context(ca))
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    assert ssl.create_default_context().get_ca_certs()  # what the httpx path would trust
    reply = getter(HTTPSettings(read_timeout_seconds=1)).get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    assert reply.status_code == 200


def test_verification_off_accepts_any_certificate(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter], ca: trustme.CA
) -> None:
    server = serve(keep_alive(serve_objects), tls=server_context(ca, "storage.example"))
    reply = getter(HTTPSettings(read_timeout_seconds=1, verify_tls=False)).get(
        server.url("/v"), limit_bytes=1 << 20, timeout_seconds=10
    )
    assert reply.body == body_for(b"/v")


def test_plain_server_on_https_is_a_tls_failure(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    def handler(conn: Connection) -> None:  # answers the ClientHello as a plain HTTP server answers garbage
        conn.sock.recv(65536)
        conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    server = serve(handler)
    with pytest.raises(httpx.ConnectError) as info:
        getter().get(server.url().replace("http://", "https://"), limit_bytes=1 << 20, timeout_seconds=10)
    cause = tls_failure(info.value)
    assert cause is not None and cause.reason == "WRONG_VERSION_NUMBER"
    assert describe_transport_error(info.value) == "TLS failure (SSLError)"


def test_client_certificate(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter], ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    context = server_context(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)
    server = serve(keep_alive(serve_objects), tls=context)
    client = ca.issue_cert("client@example")
    both = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(both))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    for settings in (
        HTTPSettings(ca_file=ca_file, client_cert=str(both)),
        HTTPSettings(ca_file=ca_file, client_cert=str(cert), client_key=str(key)),
    ):
        assert getter(settings).get(server.url("/m"), limit_bytes=1 << 20, timeout_seconds=10).body == body_for(b"/m")
    with pytest.raises(httpx.TransportError):
        getter(HTTPSettings(ca_file=ca_file)).get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)


# --- with the retry helper, from worker threads ---


async def test_retry_helper_retries_resets_and_fails_fast_on_tls(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter], ca: trustme.CA
) -> None:
    calls = [0]

    def handler(conn: Connection) -> None:
        while (head := conn.read_request()) is not None:
            calls[0] += 1
            if calls[0] == 1:
                conn.reset()  # the first attempt dies; the retry gets the object
                return
            conn.send(serve_objects(head))

    server = serve(handler)
    made = getter()
    policy = RetryPolicy(max_attempts=3, base_delay_seconds=0.01, total_budget_seconds=10)

    def attempt_for(url: str) -> Callable[[], Awaitable[RawReply]]:
        async def attempt() -> RawReply:
            return await trio.to_thread.run_sync(lambda: made.get(url, limit_bytes=1 << 20, timeout_seconds=5))

        return attempt

    reply = await send_with_retries(attempt_for(server.url("/retry")), policy=policy, what="GET test")
    assert reply.body == body_for(b"/retry") and calls[0] == 2

    tls = serve(keep_alive(serve_objects), tls=server_context(ca))
    with pytest.raises(httpx.ConnectError):
        await send_with_retries(attempt_for(tls.url()), policy=policy, what="GET test")
    assert tls.accepted == 1  # not retried


# --- per-request headers, ranged replies, error-body prefixes (the plain stores' ranged GETs) ---


def test_per_request_headers_are_sent_once_and_do_not_stick(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    server = serve(keep_alive(serve_objects))
    made = getter(headers={"X-Base": "1"})
    made.get(server.url(), limit_bytes=1 << 20, timeout_seconds=10, headers={"Range": "bytes=0-9", "X-Base": "2"})
    made.get(server.url(), limit_bytes=1 << 20, timeout_seconds=10)
    first, second = (head.decode().lower().split("\r\n") for head in server.requests)
    assert "range: bytes=0-9" in first and "x-base: 2" in first and "x-base: 1" not in first
    assert not any(line.startswith("range:") for line in second)
    assert "x-base: 1" in second and "accept-encoding: identity" in second
    with pytest.raises(ValueError, match="invalid header"):
        made.get(server.url(), limit_bytes=10, timeout_seconds=10, headers={"Range": "a\nb"})


def test_a_206_body_is_read_when_asked_for(serve: Callable[..., Server], getter: Callable[..., BlockingGetter]) -> None:
    data = body_for(b"/r", 1000)

    def partial(head: bytes) -> bytes:
        return (
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-509/1000\r\nContent-Length: 500\r\n\r\n"
            + (data[10:510])
        )

    server = serve(keep_alive(partial))
    made = getter()
    assert made.get(server.url(), limit_bytes=500, timeout_seconds=10).body == b""  # 206 not asked for: no body
    reply = made.get(server.url(), limit_bytes=500, timeout_seconds=10, body_statuses=frozenset({200, 206}))
    assert reply.status_code == 206 and reply.body == data[10:510]
    # A server that ignores Range and sends the whole object is refused from its Content-Length, before the body.
    whole = serve(keep_alive(lambda head: ok(data)))
    with pytest.raises(BodyTooLarge) as caught:
        made.get(whole.url(), limit_bytes=500, timeout_seconds=10, body_statuses=frozenset({200, 206}))
    assert caught.value.size == 1000


def test_an_error_body_prefix_is_kept_only_when_asked(
    serve: Callable[..., Server], getter: Callable[..., BlockingGetter]
) -> None:
    error = b"<Error><Code>InvalidObjectState</Code></Error>" + b" " * 200_000

    def refuse(head: bytes) -> bytes:
        return b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(error) + error

    server = serve(keep_alive(refuse))
    made = getter()
    assert made.get(server.url(), limit_bytes=1 << 20, timeout_seconds=10).body == b""
    reply = made.get(server.url(), limit_bytes=1 << 20, timeout_seconds=10, error_body_bytes=64)
    assert reply.status_code == 403 and bytes(reply.body) == error[:64]
    ok_server = serve(keep_alive(serve_objects))  # a wanted body is still read whole with a prefix asked for
    reply = made.get(ok_server.url("/w"), limit_bytes=1 << 20, timeout_seconds=10, error_body_bytes=64)
    assert reply.status_code == 200 and reply.body == body_for(b"/w")
