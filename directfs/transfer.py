"""Blocking GETs of object bodies for worker threads, on libcurl (pycurl): the block plane's HTTP engine.

Block jobs (GET + digest + decrypt + decompress) run in ``trio.to_thread`` workers, so the GET must be blocking and
cost little CPU and GIL time. Measured with ``python -m benchmarks.http_engines --runs 7 --contention`` (2-core box
shared with other work, aiohttp on 127.0.0.1 in another process, keep-alive; CPU of the client process per GET, range
of two runs; 2026-12-01):

==================================  ===========  ===========  ===========  ===========
CPU ms per GET (wall MB/s)          256 KiB      512 KiB      1 MiB        4 MiB
==================================  ===========  ===========  ===========  ===========
httpx.AsyncClient, trio, aiter_raw  1.10-1.23    1.10-1.60    1.71         8.0-9.1
                                    (192-212)    (293-404)    (543-583)    (427-467)
urllib3 PoolManager, 1 thread       0.49-0.55    0.49-0.52    0.57-0.62    1.40-1.69
                                    (358-382)    (708-742)    (1237-1273)  (1593-1640)
pycurl (this module), 1 thread      0.22-0.24    0.25-0.30    0.38-0.42    1.29-1.37
                                    (586-600)    (1001-1040)  (1530-1684)  (1933-2369)
pycurl (this module), 2 threads     0.17-0.19    0.25-0.29    0.40-0.42    1.23-1.54
                                    (1028-1116)  (1344-1801)  (2024-2086)  (2125-2643)
==================================  ===========  ===========  ===========  ===========

So pycurl: ~1/4 of httpx's CPU per 512 KiB and ~1/2 of urllib3's. What was tried on top (same benchmark):

* ``CURLOPT_BUFFERSIZE`` 64 KiB (libcurl's default is 16 KiB): -20 to -45% CPU at 1 and 4 MiB (fewer recv/poll
  rounds), neutral below. 256 KiB and more cost *more* at small sizes (a 1 MiB buffer: 0.28-0.30 ms per 256 KiB
  GET against 0.22-0.24).
* The write callback: ``bytearray.extend`` (a C method, no Python frame), a Python ``+=`` callback and a Python copy
  into a bytearray preallocated from Content-Length measured the same within noise; ``extend`` is kept as the
  least work under the GIL. Preallocation does not pay.
* libcurl hands the body to Python in pieces of at most ``CURL_MAX_WRITE_SIZE`` (16 KiB) whatever the buffer size
  (33 callbacks per 512 KiB), and every piece takes the GIL: pycurl releases it around the transfer but each
  callback re-acquires it. The callbacks take little of the trio thread's time (a Python loop beside a fetching
  thread kept 90-100% of its speed), but while the trio thread is busy *all the time*, each re-acquisition waits up
  to the 5 ms switch interval: one fetching thread then got 7-12 MB/s (urllib3 33-38, libcurl through ctypes with no
  Python callback at all 51-61). With the trio thread busy half the time (1 ms slices) it got 509-525 MB/s (urllib3
  393-403). A saturated trio thread starves the block workers; it does not slow them otherwise.

Semantics follow :func:`directfs.http.build_client` (HTTP/1.1, keep-alive, no redirects, no content decoding, no
proxies from the environment unless ``trust_env``, TLS trust from ``ssl_context``) and failures are raised as the
``httpx`` exceptions that the httpx path raises, so :func:`directfs.http.send_with_retries`, ``tls_failure`` and
``describe_transport_error`` work unchanged. Differences, all from libcurl:

* The read timeout is libcurl's low-speed check (under 1 byte/s for ``read_timeout_seconds``, rounded up to whole
  seconds). A peer silent from the start times out on time; one that stalls after sending data is noticed up to ~6 s
  late (libcurl averages the speed over its last 5 s: measured 8 s for a 2 s timeout), and a body dripping slower
  than 1 byte/s times out although each read would be within the timeout. ``timeout_seconds`` bounds every call.
* ``pool_timeout_seconds`` and ``max_connections`` have no meaning: every thread owns one handle (one connection per
  host at a time; libcurl keeps up to 5 idle ones per handle). Idle connections are dropped after
  ``keepalive_expiry_seconds`` (``CURLOPT_MAXAGE_CONN``), or never kept when ``max_keepalive_connections`` is 0.
* Exceptions carry no ``request`` (it would hold the presigned URL); messages are libcurl's, never the URL's query.

Thread safety: one :class:`BlockingGetter` serves any number of threads, each with its own libcurl handle (and so its
own kept-alive connection), made on first use and freed with the thread or by :meth:`BlockingGetter.close`.
"""

from __future__ import annotations

import ipaddress
import math
import re
import ssl
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
import pycurl  # type: ignore[import-untyped]  # no stubs; the few calls used are wrapped in typed code here

from directfs.http import BodyTooLarge, HTTPSettings, ssl_context
from directfs.values import parse_decimal

# libcurl error codes (CURLcode) that pycurl does not name in every version.
_E_UNSUPPORTED_PROTOCOL: Final = 1
_E_URL_MALFORMAT: Final = 3
_E_COULDNT_RESOLVE_PROXY: Final = 5
_E_COULDNT_RESOLVE_HOST: Final = 6
_E_COULDNT_CONNECT: Final = 7
_E_WEIRD_SERVER_REPLY: Final = 8
_E_HTTP2: Final = 16
_E_PARTIAL_FILE: Final = 18
_E_WRITE_ERROR: Final = 23
_E_OUT_OF_MEMORY: Final = 27
_E_OPERATION_TIMEDOUT: Final = 28
_E_SSL_CONNECT_ERROR: Final = 35
_E_ABORTED_BY_CALLBACK: Final = 42
_E_INTERFACE_FAILED: Final = 45
_E_GOT_NOTHING: Final = 52
_E_SEND_ERROR: Final = 55
_E_RECV_ERROR: Final = 56
_E_PEER_FAILED_VERIFICATION: Final = 60
_E_BAD_CONTENT_ENCODING: Final = 61
_E_FILESIZE_EXCEEDED: Final = 63
_E_HTTP2_STREAM: Final = 92
_E_PROXY: Final = 97
_E_UNRECOVERABLE_POLL: Final = 99
_E_TOO_LARGE: Final = 100

# TLS failures other than certificate verification: local certificate/key (58), cipher (59), engine (53, 54, 66),
# CA file (77), shutdown (80), CRL file (82), issuer (83), pinned key (90), OCSP status (91), client cert (98).
_TLS_ERRORS: Final = frozenset({_E_SSL_CONNECT_ERROR, 53, 54, 58, 59, 64, 66, 77, 80, 82, 83, 90, 91, 98})

# The peer went away or broke the framing: retryable, as httpx's RemoteProtocolError is.
# (1 is an HTTP/0.9 or garbage reply here: the scheme was checked before; 100 is a header block over libcurl's limit.)
_PROTOCOL_ERRORS: Final = frozenset(
    {
        _E_UNSUPPORTED_PROTOCOL,
        _E_WEIRD_SERVER_REPLY,
        _E_HTTP2,
        _E_PARTIAL_FILE,
        _E_GOT_NOTHING,
        _E_HTTP2_STREAM,
        _E_TOO_LARGE,
    }
)

# Python's verify codes for a name mismatch (libcurl checks the name itself and reports no X509 code).
_X509_V_ERR_HOSTNAME_MISMATCH: Final = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH: Final = 64

# libcurl's receive buffer (default 16 KiB). Measured (benchmarks/http_engines.py): 64 KiB cuts CPU per GET by 20-45%
# at 1 and 4 MiB bodies (fewer recv/poll rounds) and is neutral at 256/512 KiB; 256 KiB and more cost more at small
# sizes (probably cache locality: the bytes are copied again, into Python, after each recv).
BUFFER_SIZE: Final = 64 * 1024

_NO_BODY_STATUSES: Final = frozenset({204, 304})
_BODY_STATUSES: Final = frozenset({200})  # statuses whose body get() reads, unless told otherwise

# An OpenSSL error in libcurl's text: "error:<code>:<library> routines:<function>:<reason>".
_OPENSSL_ERROR: Final = re.compile(r"error:[0-9A-Fa-f]+:([^:]*):[^:]*:(.+)$")

# OpenSSL's verify message inside libcurl's error text (without the " (20)" code libcurl appends).
_VERIFY_MESSAGE: Final = re.compile(r"SSL certificate (?:problem|OpenSSL verify result): (.+?)(?: \(\d+\))?$")


@dataclass(frozen=True, slots=True)
class RawReply:
    """One GET's answer: status and headers always; the body only for status 200 (error bodies are never read)."""

    status_code: int
    headers: httpx.Headers
    body: bytearray


class _Reply:
    """Per-handle parse state filled by libcurl's header callback; holds no reference to the handle (no cycle)."""

    __slots__ = ("body_statuses", "done", "error_prefix", "fields", "limit", "status", "stopped")

    def __init__(self) -> None:
        self.status = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self.done = False  # the final header block ended: later lines are chunked trailers (ignored, as by httpx)
        self.stopped = False  # we stopped the transfer before (or in) a body we do not want whole
        self.limit = 0
        self.body_statuses: frozenset[int] = _BODY_STATUSES
        self.error_prefix = 0  # bytes of another status's body to keep (0: stop before it)

    def reset(self, limit: int, body_statuses: frozenset[int], error_prefix: int) -> None:
        self.status = 0
        self.fields = []
        self.done = False
        self.stopped = False
        self.limit = limit
        self.body_statuses = body_statuses
        self.error_prefix = error_prefix

    def header(self, line: bytes) -> int | None:
        """libcurl's HEADERFUNCTION: one raw line each call (status line, fields, the blank line, trailers)."""
        if self.done:
            return None
        if line.startswith(b"HTTP/"):  # a new header block (after a 1xx, or the first)
            parts = line.split(None, 2)
            self.status = (parse_decimal(parts[1], max_digits=3) or 0) if len(parts) > 1 else 0
            self.fields = []
            return None
        if line in (b"\r\n", b"\n"):
            if 100 <= self.status < 200:
                return None  # an interim reply; the final one follows
            self.done = True
            if self.status not in self.body_statuses and not self.error_prefix and self._may_have_body():
                self.stopped = True
                return 0  # != len(line): libcurl aborts (CURLE_WRITE_ERROR) before reading the body
            return None
        if line[:1] in (b" ", b"\t") and self.fields:  # obsolete line folding
            name, value = self.fields[-1]
            self.fields[-1] = (name, value + b" " + line.strip())
            return None
        name, _, value = line.partition(b":")
        self.fields.append((name.strip(), value.strip()))
        return None

    def _may_have_body(self) -> bool:
        if self.status in _NO_BODY_STATUSES:
            return False
        return not any(name.lower() == b"content-length" and value == b"0" for name, value in self.fields)

    def declared_length(self) -> int | None:
        for name, value in self.fields:
            if name.lower() == b"content-length":
                return parse_decimal(value)
        return None


class _Handle:
    """One thread's libcurl easy handle (and so its kept-alive connections) with its parse state."""

    __slots__ = ("__weakref__", "busy", "curl", "reply")

    def __init__(self, options: list[tuple[int, Any]], unset: list[int]) -> None:
        self.reply = _Reply()
        self.busy = False
        self.curl: Any = pycurl.Curl()
        for option in unset:
            self.curl.unsetopt(option)
        for option, value in options:
            self.curl.setopt(option, value)
        self.curl.setopt(pycurl.HEADERFUNCTION, self.reply.header)

    def close(self) -> None:
        self.curl.close()


def _header_lines(headers: Mapping[str, str] | None) -> list[str]:
    merged = {"accept-encoding": ("Accept-Encoding", "identity")}
    for name, value in (headers or {}).items():
        if any(c in name + value for c in "\r\n\0") or ":" in name or not name.strip():
            raise ValueError(f"invalid header {name!r}")
        merged[name.lower()] = (name, value)
    # libcurl syntax: "Name;" sends an empty value ("Name:" would remove the header).
    return [f"{name}: {value}" if value else f"{name};" for name, value in merged.values()]


def _python_trusts_partial_chains() -> bool:
    """Whether Python's default TLS context accepts a non-root CA as an anchor: ``create_default_context`` sets
    ``VERIFY_X509_PARTIAL_CHAIN`` from Python 3.13 on. Told by the version, not by making a default context, which
    loads the system CA bundle (~45 ms of CPU here, on the path of a fresh mount's first open)."""
    return sys.version_info >= (3, 13)


def _ca_bundle(system_file: str | None, ca_file: str) -> bytes:
    """The system CA file (when there is one) and ``ca_file`` as one PEM bundle."""
    parts = []
    for path in (system_file, ca_file):
        if path:
            with open(path, "rb") as handle:
                parts.append(handle.read().strip())
    return b"\n".join(parts) + b"\n"


def _tls_options(settings: HTTPSettings) -> tuple[list[tuple[int, Any]], list[int]]:
    """libcurl's TLS options matching ``http.ssl_context(settings)``, and the options to clear.

    The trust store is always given explicitly, as Python finds it: the manylinux wheel's libcurl is built with a Red
    Hat default (``/etc/pki/tls/certs/ca-bundle.crt``, absent on Debian: pycurl 7.45.3 failed every handshake there
    with curl error 77), and pycurl 7.49 replaces it at handle creation with the first of a fixed list of paths
    (``/etc/ssl/certs/ca-certificates.crt``, ...), ignoring the ``SSL_CERT_FILE``/``SSL_CERT_DIR`` that Python's
    default context honours: OpenSSL's default file and directory as Python resolves them. A ``ca_file`` is trusted
    on top of them, as ``ssl_context`` does (issue 13 M4). libcurl takes one CA file, and setting ``CAINFO`` replaces
    the bundle, so the system file and ``ca_file`` go in as one in-memory bundle (``CAINFO_BLOB``, which overrides
    ``CAINFO``); the hashed directory (``CAPATH``) is still searched. The blob costs ~15-20 ms more per new TLS
    connection than the same 145 roots in a file (measured on loopback, 2026-12); connections are kept alive, so that
    is paid about once per worker thread and host, and only with a ``ca_file``.
    """
    options: list[tuple[int, Any]] = [(pycurl.SSLVERSION, pycurl.SSLVERSION_TLSv1_2)]  # Python's default minimum
    unset: list[int] = []
    if settings.verify_tls:
        options += [(pycurl.SSL_VERIFYPEER, 1), (pycurl.SSL_VERIFYHOST, 2)]
        paths = ssl.get_default_verify_paths()
        for option, path in ((pycurl.CAINFO, paths.cafile), (pycurl.CAPATH, paths.capath)):
            if path:
                options.append((option, path))
            else:
                unset.append(option)
        if settings.ca_file is not None:
            options.append((pycurl.CAINFO_BLOB, _ca_bundle(paths.cafile, settings.ca_file)))
        # libcurl trusts a non-root CA in the store as an anchor (X509_V_FLAG_PARTIAL_CHAIN); Python does only when its
        # default context says so (3.13+). Follow Python.
        if not _python_trusts_partial_chains():
            options.append((pycurl.SSL_OPTIONS, pycurl.SSLOPT_NO_PARTIALCHAIN))
    else:
        options += [(pycurl.SSL_VERIFYPEER, 0), (pycurl.SSL_VERIFYHOST, 0)]
    if settings.client_cert:
        options += [(pycurl.SSLCERT, settings.client_cert), (pycurl.SSLCERTTYPE, "PEM")]
        if settings.client_key:  # without it libcurl reads the key from the certificate file, as load_cert_chain
            options += [(pycurl.SSLKEY, settings.client_key), (pycurl.SSLKEYTYPE, "PEM")]
    return options, unset


class BlockingGetter:
    """Blocking GETs of object bodies for worker threads; thread-safe (one reusable handle per thread)."""

    def __init__(self, settings: HTTPSettings, *, headers: Mapping[str, str] | None = None) -> None:
        ssl_context(settings)  # refuse a missing CA file or client certificate now, with Python's error, as httpx does
        tls, unset = _tls_options(settings)
        options: list[tuple[int, Any]] = [
            (pycurl.NOSIGNAL, 1),  # threads: no SIGALRM for DNS timeouts (the wheel's resolver is threaded)
            (pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1),
            (pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS),  # never file://, ftp://, ... from a URL
            (pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS),
            (pycurl.FOLLOWLOCATION, 0),
            (pycurl.HTTP_CONTENT_DECODING, 0),  # raw bytes (chunked framing is still undone)
            (pycurl.TCP_NODELAY, 1),
            (pycurl.BUFFERSIZE, BUFFER_SIZE),
            (pycurl.HTTPHEADER, _header_lines(headers)),  # per call, get(headers=...) adds to these
            (pycurl.CONNECTTIMEOUT_MS, math.ceil(settings.connect_timeout_seconds * 1000)),
            (pycurl.LOW_SPEED_LIMIT, 1),
            (pycurl.LOW_SPEED_TIME, max(1, math.ceil(settings.read_timeout_seconds))),
            (pycurl.MAXAGE_CONN, max(1, math.ceil(settings.keepalive_expiry_seconds))),
            *tls,
        ]
        if settings.max_keepalive_connections == 0:
            options.append((pycurl.FORBID_REUSE, 1))
        if not settings.trust_env:
            options.append((pycurl.PROXY, ""))  # "" ignores http_proxy/https_proxy/all_proxy/no_proxy
        self._options = options
        self._unset = unset
        self._headers = dict(headers or {})
        self._header_lines = _header_lines(headers)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._handles: weakref.WeakSet[_Handle] = weakref.WeakSet()
        self._closed = False

    def _handle(self) -> _Handle:
        handle: _Handle | None = getattr(self._local, "handle", None)
        with self._lock:
            if self._closed:
                raise RuntimeError("BlockingGetter is closed")
            if handle is None:
                handle = self._local.handle = _Handle(self._options, self._unset)
                self._handles.add(handle)
            handle.busy = True
        return handle

    def _release(self, handle: _Handle) -> None:
        with self._lock:
            handle.busy = False
            if self._closed:
                handle.close()

    def get(
        self,
        url: str,
        *,
        limit_bytes: int,
        timeout_seconds: float,
        headers: Mapping[str, str] | None = None,
        body_statuses: frozenset[int] = _BODY_STATUSES,
        error_body_bytes: int = 0,
    ) -> RawReply:
        """GET ``url`` within ``timeout_seconds`` in all (connect, request, body).

        Returns status and headers, with the body for a status in ``body_statuses`` (200; ranged GETs add 206). Other
        statuses' bodies are not read (the connection is closed instead of drained), or only their first
        ``error_body_bytes`` (enough to recognise an S3 error code). ``headers`` are sent with this request on top of
        the getter's own (a signature, ``Range``, ``If-Match``). Raises :class:`BodyTooLarge` when a wanted body
        declares or sends more than ``limit_bytes`` (before reading it, when it is declared), and ``httpx`` transport
        exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``,
        ...) as the httpx path would; TLS failures are ``ConnectError`` caused by an ``ssl.SSLError``
        (``ssl.SSLCertVerificationError`` for a refused certificate).
        """
        scheme = url[:8].lower()
        if not (scheme.startswith("http://") or scheme.startswith("https://")):
            raise httpx.UnsupportedProtocol("Request URL has an unsupported protocol (only http:// and https://)")
        if limit_bytes < 1:
            raise ValueError("limit_bytes must be positive")  # libcurl reads 0 as "no limit"
        if not timeout_seconds > 0:
            raise httpx.ConnectTimeout("no time left for the request")
        if error_body_bytes < 0:
            raise ValueError("error_body_bytes must not be negative")
        request_headers = _header_lines({**self._headers, **headers}) if headers else None
        handle = self._handle()
        try:
            return self._perform(
                handle, url, limit_bytes, timeout_seconds, request_headers, body_statuses, error_body_bytes
            )
        finally:
            self._release(handle)

    def _perform(
        self,
        handle: _Handle,
        url: str,
        limit: int,
        timeout_seconds: float,
        request_headers: list[str] | None,
        body_statuses: frozenset[int],
        error_prefix: int,
    ) -> RawReply:
        curl = handle.curl
        reply = handle.reply
        reply.reset(limit, body_statuses, error_prefix)
        body = bytearray()
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.TIMEOUT_MS, max(1, math.ceil(timeout_seconds * 1000)))
        curl.setopt(pycurl.MAXFILESIZE_LARGE, limit)
        if request_headers is not None:
            curl.setopt(pycurl.HTTPHEADER, request_headers)
        if error_prefix:
            curl.setopt(pycurl.WRITEFUNCTION, _prefix_writer(body, reply))
        else:
            curl.setopt(pycurl.WRITEFUNCTION, body.extend)  # a C method: no Python frame per 16 KiB piece
        try:
            curl.perform()
        except pycurl.error as exc:
            code, message = _error_args(exc)
            if reply.stopped or (code == _E_FILESIZE_EXCEEDED and reply.status not in body_statuses):
                kept = body[:error_prefix] if reply.status not in body_statuses else bytearray()
                return RawReply(reply.status, httpx.Headers(reply.fields), kept)
            if code == _E_FILESIZE_EXCEEDED:
                declared = reply.declared_length()
                raise BodyTooLarge(declared if declared is not None else max(len(body), limit + 1)) from None
            error = _transport_error(code, _scrub(message, url), handle)
            raise error from (error.__cause__ or exc)
        finally:
            curl.setopt(pycurl.WRITEFUNCTION, _discard)  # drop the reference to this call's buffer
            if request_headers is not None:
                curl.setopt(pycurl.HTTPHEADER, self._header_lines)  # the getter's own again, for the next call
        status = int(curl.getinfo(pycurl.RESPONSE_CODE))
        if status not in body_statuses:
            return RawReply(status, httpx.Headers(reply.fields), body[:error_prefix])
        if len(body) > limit:  # libcurl before 8.4 let a body without Content-Length grow past MAXFILESIZE
            raise BodyTooLarge(len(body))
        return RawReply(status, httpx.Headers(reply.fields), body)

    def close(self) -> None:
        """Close every thread's handle and connections (a handle in use closes when its call returns)."""
        with self._lock:
            self._closed = True
            for handle in list(self._handles):
                if not handle.busy:
                    handle.close()

    def __enter__(self) -> BlockingGetter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _prefix_writer(body: bytearray, reply: _Reply) -> Callable[[bytes], int | None]:
    """A write callback that keeps a wanted body whole and only the first ``reply.error_prefix`` bytes of any other
    (then stops the transfer: a Python frame per 16 KiB piece, so used only when an error prefix is asked for)."""

    def write(data: bytes) -> int | None:
        if reply.status in reply.body_statuses:
            body.extend(data)
            return None
        room = reply.error_prefix - len(body)
        body.extend(data[:room])
        if len(data) < room:
            return None
        reply.stopped = True
        return 0  # != len(data): libcurl stops (CURLE_WRITE_ERROR) with the prefix in hand

    return write


def _discard(data: bytes) -> None:
    return None


def _error_args(exc: BaseException) -> tuple[int, str]:
    args = exc.args
    code = args[0] if args and isinstance(args[0], int) else 0
    message = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
    return code, message


def _scrub(message: str, url: str) -> str:
    """libcurl's messages name hosts and ports, not URLs; make sure a query (a presigned signature) never shows."""
    _, _, query = url.partition("?")
    query = query.partition("#")[0]
    if query and query in message:
        message = message.replace(query, "<redacted>")
    return message


def _transport_error(code: int, message: str, handle: _Handle) -> Exception:
    """The httpx exception the httpx path raises for libcurl's ``code`` (``message`` is already scrubbed)."""
    text = f"{message} (curl error {code})" if message else f"curl error {code}"
    if code == _E_OPERATION_TIMEDOUT:
        # No request bytes sent: no connection (TCP + TLS) was ready in time. (CONNECT_TIME and NUM_CONNECTS are 0 on
        # a reused connection too, and PRETRANSFER_TIME is set even when the connect timed out.)
        if int(handle.curl.getinfo(pycurl.REQUEST_SIZE)) == 0:
            return httpx.ConnectTimeout(text)
        return httpx.ReadTimeout(text)
    if code in (_E_COULDNT_CONNECT, _E_COULDNT_RESOLVE_HOST, _E_INTERFACE_FAILED):
        return httpx.ConnectError(text)
    if code == _E_PEER_FAILED_VERIFICATION:
        return _certificate_error(message, int(handle.curl.getinfo(pycurl.SSL_VERIFYRESULT)))
    if code in _TLS_ERRORS:
        if code == _E_SSL_CONNECT_ERROR and ("SSL_ERROR_SYSCALL" in message or "reset by peer" in message):
            return httpx.ConnectError(text)  # the peer hung up mid-handshake: a network failure (retryable)
        error = _ssl_error(message)
        result = httpx.ConnectError(text)
        result.__cause__ = error
        return result
    if code in _PROTOCOL_ERRORS:
        return httpx.RemoteProtocolError(text)
    if code == _E_RECV_ERROR:
        return httpx.ReadError(text)
    if code == _E_SEND_ERROR:
        return httpx.WriteError(text)
    if code in (_E_COULDNT_RESOLVE_PROXY, _E_PROXY):
        return httpx.ProxyError(text)
    if code == _E_UNRECOVERABLE_POLL:
        return httpx.NetworkError(text)
    if code == _E_BAD_CONTENT_ENCODING:
        return httpx.DecodingError(text)
    if code == _E_URL_MALFORMAT:
        return httpx.LocalProtocolError(text)
    if code == _E_OUT_OF_MEMORY:
        return MemoryError(text)
    if code in (_E_WRITE_ERROR, _E_ABORTED_BY_CALLBACK):
        return httpx.ReadError(text)  # not ours (ours are handled before): treat as a broken transfer
    return httpx.TransportError(text)


def _certificate_error(message: str, verify_code: int) -> httpx.ConnectError:
    """A ConnectError caused by the ``ssl.SSLCertVerificationError`` Python would have raised.

    libcurl says ``SSL certificate OpenSSL verify result: <OpenSSL's verify message> (<code>)`` (8.x; older:
    ``SSL certificate problem: <message>``), the code also in SSL_VERIFYRESULT; or, for a name mismatch that it
    checks itself, ``SSL: no alternative certificate subject name matches target host name 'h'`` with no X509 code:
    then the code and message are Python's for a hostname / IP address mismatch.
    """
    found = _VERIFY_MESSAGE.search(message)
    if found:
        verify_message = found.group(1)
    elif "subject name" in message and "target" in message:
        host = message.rsplit("'", 2)[-2] if message.count("'") >= 2 else ""
        if _is_ip(host):
            verify_code, verify_message = _X509_V_ERR_IP_ADDRESS_MISMATCH, "IP address mismatch"
        else:
            verify_code, verify_message = _X509_V_ERR_HOSTNAME_MISMATCH, "Hostname mismatch"
        verify_message += f", certificate is not valid for '{host}'."
    else:
        verify_message = message or "certificate verify failed"
    text = f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {verify_message}"
    error = ssl.SSLCertVerificationError(1, text)
    error.verify_code = verify_code or 1
    error.verify_message = verify_message
    error.library = "SSL"
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    result = httpx.ConnectError(text)
    result.__cause__ = error
    return result


def _ssl_error(message: str) -> ssl.SSLError:
    """An ``ssl.SSLError`` shaped like Python's from libcurl's text, e.g. ``TLS connect error:
    error:0A00010B:SSL routines::wrong version number`` -> ``[SSL: WRONG_VERSION_NUMBER] wrong version number``."""
    found = _OPENSSL_ERROR.search(message)
    if found is None:
        return ssl.SSLError(1, f"[SSL] {message}")
    library = found.group(1).removesuffix(" routines") or "SSL"
    reason = found.group(2).strip()
    error = ssl.SSLError(1, f"[{library}: {reason.upper().replace(' ', '_')}] {reason}")
    error.library = library
    error.reason = reason.upper().replace(" ", "_")
    return error


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


__all__ = ["BlockingGetter", "BodyTooLarge", "RawReply"]
