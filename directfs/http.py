"""The one place that builds HTTP clients: TLS, deadlines, pool limits, retries with backoff, URL redaction.

Every network call of directfs goes through a client made by :func:`build_client` and, when it may be retried,
through :func:`send_with_retries`. Nothing here knows about CTERA: callers map statuses and transport errors to
the exception tree in ``directfs.errors``.

Concurrency: clients are shared by all tasks of one trio run (httpx's pool is task-safe). The retry helper only
uses trio time (``trio.current_time``/``trio.sleep``), so tests drive it with trio's autojump clock.

Redaction: presigned URLs are bearer-equivalent until they expire and a Portal URL may carry userinfo, so every log
line and exception message about a URL uses :func:`redact_url` (scheme, host, port and path only).
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import ipaddress
import logging
import random
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, Protocol, TypeVar

import httpx
import trio

from .errors import (
    BlockError,
    BlockInfo,
    BlockListConnectionError,
    BlockListTimeout,
    ConfigError,
    DirectFSError,
    DownloadConnectionError,
    DownloadError,
    DownloadTimeout,
    EntryExistsError,
    EntryNotFoundError,
    InvalidRequest,
    NamespaceConnectionError,
    NamespaceError,
    NamespaceTimeout,
    NoSpaceError,
    PermissionDeniedError,
    QuotaExceededError,
    UploadError,
    UploadTimeout,
    WriteAccessError,
)
from .values import parse_decimal

log = logging.getLogger(__name__)

# h11 hands httpcore what one recv() returns, 64 KiB by default. 1 MiB cuts per-chunk overhead (h11 buffer, httpcore
# events, trio scheduling) and measured 3x the single-stream throughput (docs/testbed.md §5: ~280 -> ~800 MB/s).
READ_NUM_BYTES: Final = 1 << 20

# Statuses worth asking again: the server said "not now" (429) or failed on its side (5xx).
RETRY_STATUSES: Final[frozenset[int]] = frozenset({429, *range(500, 600)})


@dataclass(frozen=True)
class HTTPSettings:
    """How to talk to one kind of server (the Portal, or object storage)."""

    connect_timeout_seconds: float = 5.0  # loopback/LAN connects take ms; 5 s tolerates a congested WAN (as cterasdk)
    read_timeout_seconds: float = 10.0  # per socket read, not per body: a slow but moving body never times out
    write_timeout_seconds: float = 10.0  # our requests are bodiless GETs/PROPFINDs; a stuck send is a dead peer
    # Waiting for a free pooled connection: callers bound their own concurrency below max_connections, so a long
    # wait means connections are stuck; the per-operation budget of RetryPolicy bounds it as well.
    pool_timeout_seconds: float = 20.0
    verify_tls: bool = True  # on by default: an untrusted certificate is refused unless the user says otherwise
    ca_file: str | None = None  # extra trust anchors (PEM), e.g. a private CA in front of the Portal
    client_cert: str | None = None  # PEM path of a client certificate (mutual TLS proxies)
    client_key: str | None = None
    trust_env: bool = False  # proxies/CA from the environment only when asked: a daemon should not inherit them
    # One connection per concurrent block fetch: 16 is twice the default max_workers of a stream (8), leaving room
    # for a second reader and metadata refreshes without queueing on the pool.
    max_connections: int = 16
    # Idle connections kept for reuse; as many as we may use at once, so a stream never reconnects between blocks.
    max_keepalive_connections: int = 16
    keepalive_expiry_seconds: float = 30.0  # S3 front ends close idle connections after ~20-60 s

    def __post_init__(self) -> None:
        for name in ("connect_timeout_seconds", "read_timeout_seconds", "write_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_connections < 1 or self.max_keepalive_connections < 0:
            raise ConfigError("connection limits must be positive")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and in total time per operation.

    Defaults keep one block read (every attempt, timeout and sleep included) under ~25 s: the kernel retries a failed
    FUSE READ once, so a user waits about twice this before seeing EIO (docs/design-notes.md §5).
    """

    max_attempts: int = 4  # 1 try + 3 retries: rides out a restarting server or a dropped connection
    base_delay_seconds: float = 0.25  # first retry soon: most transient failures (reset connection) clear at once
    max_delay_seconds: float = 4.0  # never sleep longer than this between attempts (unless Retry-After asks)
    total_budget_seconds: float = 20.0  # hard deadline for all attempts of one operation; see the class docstring

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if self.base_delay_seconds < 0 or self.max_delay_seconds < 0 or not self.total_budget_seconds > 0:
            raise ConfigError("delays must be >= 0 and the budget > 0")

    def backoff_seconds(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(max_delay, base * 2**(retry_number-1))] (AWS architecture blog)."""
        ceiling = min(self.max_delay_seconds, self.base_delay_seconds * (2 ** max(0, retry_number - 1)))
        return (rng or _RNG).uniform(0.0, ceiling)


NO_RETRIES: Final = RetryPolicy(max_attempts=1)

_RNG = random.Random()  # noqa: S311 - jitter, not cryptography


@dataclass
class HTTPStatistics:
    """Process-wide counts of what ``send_with_retries`` did, for metrics. Written only by trio tasks; readers in
    other threads (the metrics endpoint) see plain ints, whose reads and writes are atomic under the GIL."""

    attempts: int = 0  # every attempt, the first included
    retries: int = 0  # attempts after the first: timeouts, resets, 5xx, 429
    gave_up: int = 0  # operations that ended on a retryable failure (attempts or budget exhausted)


STATISTICS: Final = HTTPStatistics()


class RetryBudgetExceeded(httpx.TimeoutException):
    """All attempts of one operation together ran past ``RetryPolicy.total_budget_seconds``.

    Internal, like every ``httpx`` exception: it stays an ``httpx.TimeoutException`` so that each caller of
    :func:`send_with_retries` maps it with the other timeouts (to ``BlockListTimeout``, ``DownloadTimeout`` or
    ``NamespaceTimeout``), and it never leaves the package."""


def _raise_read_size() -> None:
    """Make httpcore read up to READ_NUM_BYTES per recv (private API: httpcore is pinned; a test asserts that
    the attribute still exists so an upgrade cannot silently drop the 3x)."""
    from httpcore._async.http11 import AsyncHTTP11Connection

    if AsyncHTTP11Connection.READ_NUM_BYTES < READ_NUM_BYTES:
        AsyncHTTP11Connection.READ_NUM_BYTES = READ_NUM_BYTES


class _RedactURLs(logging.Filter):
    """httpx logs every request's full URL at INFO; presigned queries must not reach any log, whatever level the
    application enables. Rewrites URL arguments of httpx's records in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(redact_url(a) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


_URL_FILTER: Final = _RedactURLs()


def _install_log_redaction() -> None:
    logger = logging.getLogger("httpx")
    if _URL_FILTER not in logger.filters:
        logger.addFilter(_URL_FILTER)


def ssl_context(settings: HTTPSettings) -> ssl.SSLContext:
    """The TLS context for ``settings``: the system roots plus ``ca_file`` (an addition, never a replacement: issue 13
    M4), or no verification when switched off.

    Shared by every client with the same TLS settings (an ``SSLContext`` may serve many connections and threads):
    loading the system CA bundle costs ~25-50 ms of CPU here, and a mount's first open used to load it four times."""
    return _ssl_context(settings.verify_tls, settings.ca_file, settings.client_cert, settings.client_key)


@functools.lru_cache(maxsize=16)  # a few distinct TLS settings per process (Portal, storage, a test's CA files)
def _ssl_context(
    verify_tls: bool, ca_file: str | None, client_cert: str | None, client_key: str | None
) -> ssl.SSLContext:
    settings = HTTPSettings(verify_tls=verify_tls, ca_file=ca_file, client_cert=client_cert, client_key=client_key)
    # The system roots as OpenSSL finds them (SSL_CERT_FILE / SSL_CERT_DIR honoured). create_default_context(cafile=)
    # would load the file *instead* of them, so the file is added after.
    context = ssl.create_default_context()
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif settings.ca_file:
        context.load_verify_locations(cafile=settings.ca_file)
    if settings.client_cert:
        context.load_cert_chain(settings.client_cert, settings.client_key)
    return context


def build_client(
    settings: HTTPSettings,
    *,
    headers: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An HTTP/1.1-only client with our deadlines, limits and TLS (h2 measured 2-3x slower here: docs/testbed.md §5).

    Redirects are not followed: a presigned URL or the Portal API redirecting elsewhere is unexpected, and following
    it could carry the Authorization header to another host. Every request asks for ``Accept-Encoding: identity``:
    blocks are compressed already and ranges are of the stored bytes, and a metadata reply is bounded by what it
    costs to hold (``read_body``), not by what a compressed bomb expands to. ``transport`` replaces the network
    (tests use ``httpx.MockTransport`` for scripted edge cases); TLS and pool limits then belong to that transport.
    """
    _raise_read_size()
    _install_log_redaction()
    return httpx.AsyncClient(
        http1=True,
        http2=False,
        verify=ssl_context(settings),
        trust_env=settings.trust_env,
        follow_redirects=False,
        headers={"Accept-Encoding": "identity", **(headers or {})},
        transport=transport,
        timeout=httpx.Timeout(
            connect=settings.connect_timeout_seconds,
            read=settings.read_timeout_seconds,
            write=settings.write_timeout_seconds,
            pool=settings.pool_timeout_seconds,
        ),
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive_connections,
            keepalive_expiry=settings.keepalive_expiry_seconds,
        ),
    )


def redact_url(url: str | httpx.URL) -> str:
    """``url`` without userinfo, query and fragment: safe for logs and exception messages."""
    if isinstance(url, str) and "@" not in url and "[" not in url:
        # Fast path, once per block GET: parsing a long presigned URL with httpx.URL cost ~0.35 ms of the trio thread.
        # Without "@" there is no userinfo to remove, and without "[" no IPv6 literal to validate: cut query + fragment.
        head = url.partition("?")[0].partition("#")[0]
        scheme, sep, rest = head.partition("://")
        if sep and rest and scheme.isascii() and scheme.isalpha():
            return head
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "<unparseable URL>"


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is this machine (plain HTTP is only acceptable there)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    seconds = parse_decimal(value)
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error (certificate verification, handshake) behind a transport error, if that is what it was."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe_transport_error(exc: BaseException) -> str:
    """A short, secret-free description of a transport failure for error messages (names the TLS cause)."""
    tls = tls_failure(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verification failed: the server's certificate is not trusted ({tls.verify_message}); "
            "add its CA with --ca-file, or --no-verify-tls"
        )
    if tls is not None:
        return f"TLS failure ({type(tls).__name__})"
    return type(exc).__name__


# The one table from httpx's exceptions to the error tree, by what was being fetched: (timeout, connection failure,
# anything else httpx raises). Every source maps transport failures through ``transport_error``.
Subject = Literal["namespace", "block list", "block", "write"]
_TRANSPORT_ERRORS: Final[dict[str, tuple[type[DirectFSError], type[DirectFSError], type[DirectFSError]]]] = {
    "namespace": (NamespaceTimeout, NamespaceConnectionError, NamespaceError),
    "block list": (BlockListTimeout, BlockListConnectionError, InvalidRequest),
    "block": (DownloadTimeout, DownloadConnectionError, DownloadError),
    # a write whose connection broke may or may not have landed: EIO (the caller's close() sees it), not ENETRESET
    "write": (UploadTimeout, UploadError, UploadError),
}


def transport_error(
    exc: httpx.HTTPError, *, subject: Subject, what: str, filename: str | None = None, block: BlockInfo | None = None
) -> DirectFSError:
    """The tree's error for an httpx failure while fetching ``subject``; ``what`` (already redacted) names the
    request. Timeouts (the retry budget included) are ETIMEDOUT, transport failures ENETRESET with the TLS cause
    named, anything else EIO. Raise it ``from exc``."""
    timeout, connection, other = _TRANSPORT_ERRORS[subject]
    if isinstance(exc, httpx.TimeoutException):
        cls, message = timeout, f"{what}: timed out"
    elif isinstance(exc, httpx.TransportError):
        cls, message = connection, f"{what}: {describe_transport_error(exc)}"
    else:
        cls, message = other, f"{what}: {type(exc).__name__}"
    if issubclass(cls, BlockError):
        return cls(message, filename=filename, block=block)
    return cls(message, filename=filename)


def namespace_status_error(
    status: int, *, what: str, filename: str, hint: str = "check the credentials", code: str | None = None
) -> DirectFSError:
    """The one status table of metadata requests (listings, stats): 404 ENOENT, 401/403 EACCES with ``hint``, anything
    else EIO. ``what`` names the request (redacted); ``code`` is the store's own error code, shown after the status
    (S3's ``NoSuchKey``/``NoSuchBucket`` also mean ENOENT)."""
    detail = f"{what}: HTTP {status}" + (f" {code}" if code else "")
    if status == 404 or code in ("NoSuchBucket", "NoSuchKey"):
        return EntryNotFoundError(detail if code else None, filename=filename)
    if status in (401, 403):
        return PermissionDeniedError(f"{detail} ({hint})", filename=filename)
    return NamespaceError(detail, filename=filename)


def write_status_error(
    status: int, *, what: str, filename: str, hint: str = "check the credentials", code: str | None = None
) -> DirectFSError:
    """The one status table of writes (PUT, MKCOL, DELETE, MOVE, PROPPATCH, S3 uploads): what a writer's ``close()``
    or ``mkdir`` sees. 401/403 EACCES with ``hint``; 507 and S3's ``EntityTooLarge`` ENOSPC (WebDAV's "insufficient
    storage", as dCache and Nextcloud answer a full pool or quota); quota codes EDQUOT; 404 and 409 (the parent
    folder is missing, RFC 4918 §9.7.1) ENOENT; 412 (a name that exists where it must not) EEXIST; anything else EIO.
    ``code`` is the store's own error code (S3), shown after the status."""
    detail = f"{what}: HTTP {status}" + (f" {code}" if code else "")
    if status in (401, 403):
        return WriteAccessError(f"{detail} ({hint})", filename=filename)
    if code in ("QuotaExceeded", "QuotaExceededException", "XMinioAdminBucketQuotaExceeded"):
        return QuotaExceededError(detail, filename=filename)
    if status == 507 or code == "EntityTooLarge":
        return NoSpaceError(detail, filename=filename)
    if status in (404, 409) or code in ("NoSuchBucket", "NoSuchKey"):
        return EntryNotFoundError(detail, filename=filename)
    if status == 412:
        return EntryExistsError(detail, filename=filename)
    return UploadError(detail, filename=filename)


class StatusReply(Protocol):
    """What the retry helper needs of an attempt's result (an ``httpx.Response`` fits)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> httpx.Headers: ...


R = TypeVar("R", bound=StatusReply)

# Transport failures worth another attempt: the request may not have reached the server, or its answer was lost.
# Not retried: httpx.UnsupportedProtocol / LocalProtocolError / InvalidURL (our bug or a bad URL: same next time).
RETRYABLE_ERRORS: Final = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)


async def send_with_retries(
    attempt: Callable[[], Awaitable[R]],
    *,
    policy: RetryPolicy,
    what: str,
    retry_statuses: Collection[int] = RETRY_STATUSES,
    rng: random.Random | None = None,
) -> R:
    """Run ``attempt`` until it returns a status not in ``retry_statuses``, attempts run out, or the budget does.

    Returns the last reply (the caller maps its status) or raises the last transport error (an ``httpx``
    exception; the caller maps it). The whole operation runs under one deadline of ``policy.total_budget_seconds``;
    running past it raises :class:`RetryBudgetExceeded` (an ``httpx.TimeoutException``). A ``Retry-After`` longer
    than the remaining budget ends the retries at once: sleeping it would only turn a clear answer into a timeout.
    ``what`` names the operation in logs and must already be redacted.
    """
    deadline = trio.current_time() + policy.total_budget_seconds
    attempt_number = 0
    while True:
        attempt_number += 1
        STATISTICS.attempts += 1
        if attempt_number > 1:
            STATISTICS.retries += 1
        reply: R | None = None
        error: Exception | None = None
        with trio.move_on_at(deadline) as scope:
            try:
                reply = await attempt()
            except RETRYABLE_ERRORS as exc:
                if tls_failure(exc) is not None:
                    raise  # a refused certificate or handshake is refused again: fail at once
                error = exc
        if scope.cancelled_caught:
            STATISTICS.gave_up += 1
            raise RetryBudgetExceeded(f"{what}: no answer within {policy.total_budget_seconds:g} s")
        retry_after: float | None = None
        if reply is not None:
            if reply.status_code not in retry_statuses:
                return reply
            retry_after = parse_retry_after(reply.headers.get("retry-after"))
            outcome = f"HTTP {reply.status_code}"
        else:
            outcome = type(error).__name__
        remaining = deadline - trio.current_time()
        delay = retry_after if retry_after is not None else policy.backoff_seconds(attempt_number, rng)
        if attempt_number >= policy.max_attempts or delay >= remaining:
            STATISTICS.gave_up += 1
            log.debug("%s: %s, giving up after %d attempt(s)", what, outcome, attempt_number)
            if reply is not None:
                return reply
            assert error is not None
            raise error
        log.debug("%s: %s, retry %d in %.2f s", what, outcome, attempt_number, delay)
        await trio.sleep(delay)


# --- bodies ---------------------------------------------------------------------------------------------------------
#
# One way to send a request body and one way to read a reply body, for every source. Bodies are read *raw* and
# bounded on the wire and after decoding (issue 13 M1): httpx's own decoders inflate a whole network chunk at once,
# so 255 KiB of gzip became one 268 MiB allocation against a 64 MiB cap. Every client asks for ``identity`` (see
# ``build_client``); a server that compresses anyway is decoded here, a bounded piece at a time.

# zlib window bits per Content-Encoding: 16+ = gzip header, + 32 = zlib or gzip (auto), - = raw deflate.
_DECODERS: Final = {"gzip": 16 + 15, "x-gzip": 16 + 15, "deflate": 32 + 15}
_DECODE_STEP_BYTES: Final = 1024 * 1024  # inflate output per step: bounds a bomb's cost before the limit trips
# Pieces a body already buffered that ``BodyPieces.aclose`` may still be given before its cancellation lands
# (httpcore reads 64 KiB at a time, so one or two).
_END_BODY_PIECES: Final = 64


class BadBody(Exception):
    """A reply body we refuse (internal: each caller maps it to its own class of the tree, with ``what``)."""


class BodyTooLarge(BadBody):
    """The reply declared, or sent, more than ``limit_bytes``; ``size`` is the declared size or a lower bound."""

    def __init__(self, size: int) -> None:
        super().__init__(f"body of {size}+ bytes is over the limit")
        self.size = size


class _RequestBody(httpx.AsyncByteStream):
    """A request body of known bytes whose iterator is a plain object, not an async generator. httpx's own
    ``ByteStream.__aiter__`` is one: a send cut off mid-body (a hung or refusing Portal) leaves it suspended, and
    trio's async-generator hook warns (``ResourceWarning``) when the garbage collector finds it."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _OnePiece:
        return _OnePiece(self._data)


class _OnePiece:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _OnePiece:
        return self

    async def __anext__(self) -> bytes:
        data, self._data = self._data, None
        if data is None:
            raise StopAsyncIteration
        return data


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
) -> AsyncIterator[httpx.Response]:
    """``client.stream(...)`` for every request of directfs; a ``content`` body is sent by ``_RequestBody``."""
    request = client.build_request(method, url, headers=headers, content=content)  # sets Content-Length
    if content is not None:
        request.stream = _RequestBody(content)
    response = await client.send(request, stream=True)
    try:
        yield response
    finally:
        await response.aclose()


class _Decoder:
    """Content decoding with a bound on the output: ``feed`` returns at most ``limit - produced + 1`` bytes per
    call, so the caller sees the limit crossed before a bomb is inflated."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        self._inflater: zlib._Decompress | None = None
        if encoding not in ("", "identity"):
            if encoding not in _DECODERS:
                raise BadBody(f"unsupported Content-Encoding {encoding[:40]!r} (identity was asked for)")
            self._inflater = zlib.decompressobj(_DECODERS[encoding])

    def feed(self, raw: bytes, room: int) -> Iterator[bytes]:
        if self._inflater is None:
            yield raw
            return
        data = raw
        try:
            while True:
                step = min(room + 1, _DECODE_STEP_BYTES)
                piece = self._inflater.decompress(data, step)
                room -= len(piece)
                yield piece
                data = self._inflater.unconsumed_tail
                if room < 0 or (not data and len(piece) < step):  # over the limit, or input and output drained
                    return
        except zlib.error as exc:
            raise BadBody(f"content decoding failed: {exc}") from None

    def close(self) -> None:
        if self._inflater is not None and not self._inflater.eof:
            raise BadBody("the compressed body ended early")


class BodyPieces:
    """A reply body as it arrives, decoded and bounded as ``read_body`` reads it: ``await next()`` gives the next
    piece, or None at the end. For parsers that hand on what each piece completes (a listing streamed to its reader)
    instead of waiting for the whole body. ``BodyTooLarge`` past ``limit_bytes``, ``BadBody`` for an encoding we cannot
    decode; transport failures are httpx's, for the caller's edge to translate."""

    def __init__(self, response: httpx.Response, limit_bytes: int) -> None:
        self._response = response
        encoding = response.headers.get("content-encoding", "")
        declared = parse_decimal(response.headers.get("content-length", ""))
        if not encoding and declared is not None and declared > limit_bytes:
            raise BodyTooLarge(declared)
        self._decoder = _Decoder(encoding)
        self._raw = response.aiter_raw()
        self._limit_bytes = limit_bytes
        self.produced_bytes = 0
        self._pending: Iterator[bytes] = iter(())
        self._ended = False

    async def next(self) -> bytes | None:
        while True:
            for piece in self._pending:
                self.produced_bytes += len(piece)
                if self.produced_bytes > self._limit_bytes:
                    raise BodyTooLarge(self.produced_bytes)
                return piece
            if self._ended:
                return None
            try:
                raw = await anext(self._raw)
            except StopAsyncIteration:
                self._ended = True
                self._decoder.close()
                return None
            self._pending = self._decoder.feed(raw, self._limit_bytes - self.produced_bytes)

    async def aclose(self) -> None:
        """Stop reading a body left part-way, from the inside. httpx's body is a chain of async generators
        (``aiter_raw`` down to httpcore's connection); closing the outer one leaves the inner ones suspended, and trio
        warns (ResourceWarning) when the garbage collector finds them. So the iteration is resumed once more under a
        cancelled scope: the cancellation lands at the innermost socket read and unwinds every generator through its
        own cleanup (httpcore closes the connection). Bounded: a few pieces already buffered may come first. The
        caller's ``open_stream`` still closes the response."""
        if self._ended:
            return
        self._ended = True
        with trio.CancelScope() as scope:
            scope.cancel()
            for _ in range(_END_BODY_PIECES):
                try:
                    await anext(self._raw)
                except StopAsyncIteration:
                    return
                except Exception:  # the body's own failure: it is being dropped anyway
                    return


async def read_body(
    response: httpx.Response,
    limit_bytes: int,
    *,
    feed: Callable[[bytes], object] | None = None,
    prefix: bool = False,
) -> bytearray:
    """The body of ``response``, decoded, at most ``limit_bytes`` (``BodyTooLarge`` past it; ``BadBody`` for an
    encoding we cannot decode). A declared Content-Length over the limit is refused unread; past the limit reading
    stops (the caller's ``open_stream`` closes the connection). With ``prefix`` a longer body is not an error: its
    first ``limit_bytes`` are the result (error bodies: enough to recognise one). With ``feed`` the pieces go to it as
    they arrive and nothing is kept (streaming parsers); the result is then empty. A reply already read
    (``httpx.MockTransport``) is taken as it is."""
    try:
        content = response.content
    except httpx.ResponseNotRead:
        pass
    else:
        if prefix:
            content = content[:limit_bytes]
        if len(content) > limit_bytes:
            raise BodyTooLarge(len(content))
        if feed is not None:
            feed(content)
            return bytearray()
        return bytearray(content)
    # A body cut off here (too large) leaves httpx's nested async generators suspended; trio's GC hook closes them
    # and warns (ResourceWarning). Closing only the outer one would not reach the inner ones, so tests that cut a
    # body off say so with a filterwarnings mark.
    pieces = BodyPieces(response, limit_bytes if not prefix else 2**63 - 1)
    body = bytearray()
    while (piece := await pieces.next()) is not None:
        if prefix and pieces.produced_bytes > limit_bytes:
            body += piece[: len(piece) - (pieces.produced_bytes - limit_bytes)]
            return body
        if feed is not None:
            feed(piece)
        else:
            body += piece
    return body


__all__ = [
    "NO_RETRIES",
    "READ_NUM_BYTES",
    "RETRYABLE_ERRORS",
    "RETRY_STATUSES",
    "STATISTICS",
    "BadBody",
    "BodyPieces",
    "BodyTooLarge",
    "HTTPSettings",
    "HTTPStatistics",
    "RetryBudgetExceeded",
    "RetryPolicy",
    "StatusReply",
    "build_client",
    "describe_transport_error",
    "is_loopback_host",
    "namespace_status_error",
    "open_stream",
    "parse_retry_after",
    "read_body",
    "redact_url",
    "send_with_retries",
    "ssl_context",
    "tls_failure",
    "transport_error",
]
