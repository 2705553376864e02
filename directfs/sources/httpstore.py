"""What the plain HTTP stores share (``webdav``, ``http(s)``, ``s3``): credentials with rotating tokens, metadata
requests with retries and one re-read of a rotated token, the status table, and files read as strict ranged GETs
in worker threads (``plain_file``). The index-page source is ``directfs.sources.web``.

Credentials: ``Credentials.token_file`` (Bearer, re-read when the file changes), ``Credentials.token`` (Bearer),
``username``/``password`` (Basic), in that order; ``client_cert``/``client_key`` (X.509, mutual TLS). A 401 forces
one re-read of the token file and one retry. ``http://`` sends credentials in clear text, so ``check_url`` refuses it
with credentials unless the host is loopback or ``SourceOptions.allow_plain_http`` is set.

Writes (``DavStore``: the ``Writable`` side of ``webdav://`` and of the CTERA Portal's WebDAV): an upload is one PUT
at commit, streamed from the spool with ``os.pread`` in worker threads, ``UPLOAD_CHUNK_BYTES`` at a time, with
``Content-Length``. From ``EXPECT_CONTINUE_MIN_BYTES`` on it sends ``Expect: 100-continue`` and really waits for the
``100`` (``_ContinueGate``: httpx itself sends the body at once; measured, see the comment above it), so a refused
PUT costs no body and dCache's door can redirect it. 307/308 are followed with the same body, credentials only to
the source's own origin; every attempt starts again at the source URL with the current token, within the store's
retry budget plus the transfer time at 1 MiB/s. MKCOL, DELETE (after a PROPFIND check: never a recursive delete of
a non-empty folder), MOVE (``Overwrite: F`` first, never replacing what POSIX would not) and PROPPATCH of
``getlastmodified``. Statuses map through ``http.write_status_error``, transport failures through
``http.transport_error(subject="write")``; URLs in messages are redacted.

Concurrency: a store holds one httpx client (task-safe pool), one for uploads that wait for 100 Continue (no kept
connections: ``StoreClients._upload_http``) and one ``BlockingGetter``. ``TokenFile`` is only touched from the trio
thread; its check is one ``os.stat`` of a local file (microseconds), so it runs inline. ``DavStore``'s remembered
facts (origins that ignore Expect, a refused PROPPATCH, write marks) are plain attributes changed on the trio thread.
"""

from __future__ import annotations

import abc
import base64
import collections
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import h11
import httpcore
import httpx
import trio

from ..errors import (
    ConfigError,
    DirectFSError,
    DirectoryNotEmptyError,
    EntryExistsError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    MalformedListingError,
    NamespaceTimeout,
    NotADirectory,
    UploadError,
    WriteAccessError,
    WriteError,
)
from ..http import (
    RETRY_STATUSES,
    BadBody,
    BodyPieces,
    BodyTooLarge,
    HTTPSettings,
    RetryPolicy,
    Subject,
    build_client,
    is_loopback_host,
    namespace_status_error,
    open_stream,
    read_body,
    redact_url,
    send_with_retries,
    transport_error,
    write_status_error,
)
from ..transfer import BlockingGetter
from . import davxml
from .base import BlockLayout, Credentials, Entry, OpenFile, SourceOptions, Upload, WriteFeatures
from .httprange import RangeFile
from .nearline import StagingPolicy

log = logging.getLogger(__name__)

# A token file is a JWT or an opaque token: a few KiB. A bigger file is a wrong path, not a token.
MAX_TOKEN_BYTES: Final = 64 * 1024


# --- credentials --------------------------------------------------------------------------------------------------


class TokenFile:
    """A Bearer token in a file that another program rewrites (OIDC tokens rotate every few minutes).

    Before each request :meth:`current` compares (inode, size, mtime_ns) with the last read and re-reads on any
    change, so an atomic replace (new inode) and an in-place rewrite are both seen. An empty or unreadable file
    (a writer caught mid-rewrite) keeps the previous token and is read again next time.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._token: str | None = None
        self.reads = 0  # how often the file was actually read (statistics, tests)
        if self.current() is None:
            raise ConfigError(f"the token file {path} is missing, empty or unreadable")

    def _read(self, signature: tuple[int, int, int] | None) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            log.warning("cannot read the token file %s: %s; keeping the previous token", self.path, exc.strerror)
            return
        token = raw.decode("utf-8", "replace").strip()
        if not token or len(raw) > MAX_TOKEN_BYTES or any(c in token for c in "\r\n\x00"):
            log.warning("the token file %s holds no usable token; keeping the previous one", self.path)
            return
        self.reads += 1
        self._token = token
        self._signature = signature

    def current(self) -> str | None:
        try:
            st = os.stat(self.path)
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            signature = None
        if signature is None or signature != self._signature:
            self._read(signature)
        return self._token

    def force_reload(self) -> str | None:
        self._signature = None
        return self.current()


class HTTPAuth:
    """The ``Authorization`` header of one store, computed per request (a token file may have rotated)."""

    def __init__(self, credentials: Credentials) -> None:
        self._token_file = TokenFile(credentials.token_file) if credentials.token_file else None
        self._static: str | None = None
        if credentials.token:
            self._static = f"Bearer {credentials.token}"
        elif credentials.username is not None and credentials.password is not None:
            pair = f"{credentials.username}:{credentials.password}".encode()
            self._static = "Basic " + base64.b64encode(pair).decode("ascii")
        elif credentials.username is not None or credentials.password is not None:
            raise ConfigError("Basic auth needs both a user name and a password")

    @property
    def has_credentials(self) -> bool:
        return self._token_file is not None or self._static is not None

    async def headers(self) -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        if self._token_file is not None:
            token = self._token_file.current()
            return {"Authorization": f"Bearer {token}"} if token else {}
        return {"Authorization": self._static} if self._static else {}

    async def refresh(self) -> bool:
        """After a 401/403: re-read the token file; True when a retry may now succeed (a token file is in use)."""
        await trio.lowlevel.checkpoint()
        if self._token_file is None:
            return False
        self._token_file.force_reload()
        return True


def check_url(url: str, allowed: dict[str, str], options: SourceOptions, auth: HTTPAuth) -> tuple[str, str]:
    """Validate a store URL; return (origin over http(s), unquoted path). No credentials or query in the URL, and
    no clear-text credentials to another machine."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in allowed or not parts.hostname:
        raise ConfigError(f"not a {'/'.join(s + '://' for s in allowed)} URL: {redact_url(url)}")
    if parts.username or parts.password:
        raise ConfigError("put credentials in DIRECTFS_* variables or --*-file flags, not in the source URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"a {scheme}:// source URL takes no query or fragment")
    http_scheme = allowed[scheme]
    plain_remote = not (options.allow_plain_http or is_loopback_host(parts.hostname))
    if http_scheme == "http" and auth.has_credentials and plain_remote:
        raise ConfigError(f"{scheme}:// would send credentials in clear text; use the TLS scheme")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad port in {redact_url(url)}") from None
    origin = f"{http_scheme}://{host}" + (f":{port}" if port is not None else "")
    return origin, unquote(parts.path or "/")


# --- requests -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status_code: int
    headers: httpx.Headers
    body: bytes
    # An earlier attempt of this request may have taken effect: its answer was lost, or was a status worth retrying
    # (a 502 from a proxy whose server did the work). A 405 to a retried MKCOL may be our own folder.
    maybe_done_before: bool = False


async def request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    auth: HTTPAuth,
    policy: RetryPolicy,
    path: str,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    read_body_if: Callable[[int], bool] = lambda status: False,
    max_body_bytes: int = 0,
    sink: Callable[[], Callable[[bytes], object]] | None = None,
    subject: Subject = "namespace",
    retry_statuses: Collection[int] = RETRY_STATUSES,
) -> Reply:
    """One request with retries, auth per attempt and one re-read of a rotated token after 401/403. Transport
    failures become errors of ``subject`` (namespace errors, or with ``"write"`` upload errors) naming ``path``;
    statuses are the caller's to map. With ``sink``, a body that is read goes to a fresh ``sink()`` per attempt as it
    arrives (a streaming parser), not into ``body``."""
    what = f"{method} {redact_url(url)}"
    doubtful = False  # an attempt so far ended without a clear answer

    async def attempt() -> Reply:
        nonlocal doubtful
        earlier = doubtful
        all_headers = {**(await auth.headers()), **(headers or {})}
        doubtful = True  # until an answer comes
        async with open_stream(client, method, url, headers=all_headers, content=content) as response:
            doubtful = earlier or response.status_code in retry_statuses
            body = bytearray()
            if read_body_if(response.status_code):
                try:
                    body = await read_body(response, max_body_bytes, feed=sink() if sink is not None else None)
                except BodyTooLarge:
                    raise MalformedListingError(
                        f"{what}: reply larger than {max_body_bytes} bytes", filename=path
                    ) from None
                except BadBody as exc:
                    raise MalformedListingError(f"{what}: {exc}", filename=path) from None
            return Reply(response.status_code, response.headers, bytes(body), earlier)

    async def once() -> Reply:
        try:
            return await send_with_retries(attempt, policy=policy, what=what, retry_statuses=retry_statuses)
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject=subject, what=what, filename=path) from exc

    reply = await once()
    if reply.status_code in (401, 403) and await auth.refresh():
        reply = await once()
    return reply


class _Multistatus:
    """One attempt's PROPFIND reply, parsed as it arrives: a huge folder is never one body or one XML tree."""

    def __init__(self) -> None:
        self._parser = davxml.MultistatusParser()
        self.resources: list[davxml.DavResource] = []

    def feed(self, piece: bytes) -> None:
        self.resources += self._parser.feed(piece)

    def close(self) -> list[davxml.DavResource]:
        self.resources += self._parser.close()
        return self.resources


async def propfind(
    client: httpx.AsyncClient, url: str, *, depth: int, auth: HTTPAuth, policy: RetryPolicy, path: str
) -> tuple[Reply, list[davxml.DavResource]]:
    """A ``PROPFIND`` with our property list (``request``: retries, auth, one token re-read) and, for a 207, its
    resources, streamed through ``davxml.MultistatusParser`` within ``MAX_PROPFIND_BODY_BYTES``. Other statuses
    come back without resources, for the caller to map."""
    attempts: list[_Multistatus] = []

    def sink() -> Callable[[bytes], object]:
        attempts.append(_Multistatus())
        return attempts[-1].feed

    reply = await request(
        client,
        "PROPFIND",
        url,
        auth=auth,
        policy=policy,
        path=path,
        headers={"Depth": str(depth), "Content-Type": "application/xml; charset=utf-8"},
        content=davxml.PROPFIND_BODY,
        read_body_if=lambda status: status == 207,
        max_body_bytes=davxml.MAX_PROPFIND_BODY_BYTES,
        sink=sink,
    )
    return reply, attempts[-1].close() if reply.status_code == 207 else []


# A listing's body may take as long as it needs while it keeps coming: past the retry budget (which covers reaching
# the status line) it must average at least this. A Depth-1 PROPFIND of 1,000,000 entries is ~340 MB: 20 s at the
# 17 MB/s nginx gave here, 90 min at this floor (a link slower than 0.5 Mbit/s). A stall is cut sooner, by the
# per-read timeout (--read-timeout).
MIN_LISTING_BYTES_PER_SECOND: Final = 64 * 1024


@dataclass
class _Opened:
    """One attempt's response, its body not read yet, and what closes it."""

    status_code: int
    headers: httpx.Headers
    response: httpx.Response
    close: contextlib.AsyncExitStack


async def propfind_pages(
    client: httpx.AsyncClient,
    url: str,
    *,
    depth: int,
    auth: HTTPAuth,
    policy: RetryPolicy,
    path: str,
    hint: str = "check the credentials",
) -> AsyncGenerator[list[davxml.DavResource], None]:
    """A ``PROPFIND``'s resources as the 207 body arrives, a list per network piece that completed any: a folder of a
    million entries reaches its reader while the rest is still on the wire, and is never one body in memory.

    Attempts, auth and the one token re-read after 401/403 go as in ``request`` (``send_with_retries``), but the
    retry budget covers only reaching a status line that is not retried. The body then has no fixed deadline but a
    pace: ``MIN_LISTING_BYTES_PER_SECOND`` on average after the budget, and the per-read timeout between pieces. A
    failure in the body ends the listing (what was yielded cannot be taken back; the reader lists again). A status
    other than 207 is raised mapped (``http.namespace_status_error`` with ``hint``)."""
    what = f"PROPFIND {redact_url(url)}"
    headers = {"Depth": str(depth), "Content-Type": "application/xml; charset=utf-8"}

    async def attempt() -> _Opened:
        stack = contextlib.AsyncExitStack()
        try:
            all_headers = {**(await auth.headers()), **headers}
            stream = open_stream(client, "PROPFIND", url, headers=all_headers, content=davxml.PROPFIND_BODY)
            response = await stack.enter_async_context(stream)
            if response.status_code != 207:
                await stack.aclose()  # only a 207's body is read; a retried or mapped status needs none
        except BaseException:
            with trio.CancelScope(shield=True):
                await stack.aclose()
            raise
        return _Opened(response.status_code, response.headers, response, stack)

    async def once() -> _Opened:
        try:
            return await send_with_retries(attempt, policy=policy, what=what)
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject="namespace", what=what, filename=path) from exc

    started = trio.current_time()
    opened = await once()
    if opened.status_code in (401, 403) and await auth.refresh():
        opened = await once()
    async with opened.close:
        if opened.status_code != 207:
            raise namespace_status_error(opened.status_code, what=what, filename=path, hint=hint)
        parser = davxml.MultistatusParser()
        pieces: BodyPieces | None = None
        try:
            pieces = BodyPieces(opened.response, davxml.MAX_PROPFIND_BODY_BYTES)
            while (piece := await pieces.next()) is not None:
                allowed = policy.total_budget_seconds + pieces.produced_bytes / MIN_LISTING_BYTES_PER_SECOND
                if trio.current_time() - started > allowed:
                    raise NamespaceTimeout(
                        f"{what}: the reply came slower than {MIN_LISTING_BYTES_PER_SECOND // 1024} KiB/s",
                        filename=path,
                    )
                if resources := parser.feed(piece):
                    yield resources
            resources = parser.close()
        except BodyTooLarge:
            raise MalformedListingError(
                f"{what}: reply larger than {davxml.MAX_PROPFIND_BODY_BYTES} bytes", filename=path
            ) from None
        except BadBody as exc:
            raise MalformedListingError(f"{what}: {exc}", filename=path) from None
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject="namespace", what=what, filename=path) from exc
        finally:
            if pieces is not None:
                await pieces.aclose()  # a reply cut off (an error here, or the reader left): nothing left suspended
    if resources:
        yield resources


async def dav_children(
    client: httpx.AsyncClient,
    url: str,
    folder_path: str,
    *,
    auth: HTTPAuth,
    policy: RetryPolicy,
    path: str,
    hint: str = "check the credentials",
    empty_is_missing: bool = False,
) -> AsyncGenerator[list[tuple[str, davxml.DavResource]], None]:
    """The children of the folder at ``url`` (``folder_path``: its unquoted server path) as ``davxml.Children`` pages,
    streamed from ``propfind_pages``. NotADirectory when the reply describes a file (read to its end first: a body
    cut off warns); with ``empty_is_missing`` a reply of no resources at all is ENOENT (nginx)."""
    children = davxml.Children(folder_path)
    pages = propfind_pages(client, url, depth=1, auth=auth, policy=policy, path=path, hint=hint)
    async with contextlib.aclosing(pages):
        async for resources in pages:
            page = children.take(resources)
            if page and (children.itself is None or children.itself.is_collection):
                yield page
    if children.itself is not None and not children.itself.is_collection:
        raise NotADirectory(filename=path)  # Depth 1 on a file describes just the file
    if empty_is_missing and children.resources == 0:
        raise EntryNotFoundError(filename=path)


def raise_for_status(reply: Reply, what: str, path: str) -> None:
    """Map a failed metadata status to our tree (``http.namespace_status_error``)."""
    raise namespace_status_error(reply.status_code, what=what, filename=path)


def http_mtime_ns(value: str | None) -> int:
    """Seconds-resolution mtime from an HTTP date (``Last-Modified``); 0 when absent or unparseable."""
    if not value:
        return 0
    try:
        return int(parsedate_to_datetime(value).timestamp()) * 1_000_000_000
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0


class StoreClients:
    """The connections of one plain store: an httpx client for metadata, built on first use, and a
    ``BlockingGetter`` for file data (GETs in worker threads), built on the first open. A client someone put in place
    as ``_client`` (tests: ``httpx.MockTransport``) keeps file data on httpx as well."""

    def __init__(self, settings: HTTPSettings) -> None:
        self._settings = settings
        self._client: httpx.AsyncClient | None = None
        self._built_client: httpx.AsyncClient | None = None  # the client _http() made (not one a test put in place)
        self._getter: BlockingGetter | None = None
        self._upload_client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self._built_client = build_client(self._settings)
        return self._client

    def _upload_http(self) -> httpx.AsyncClient:
        """The client of uploads that wait for ``100 Continue`` (``_ContinueGate``): no kept-alive connections, so
        every such PUT opens its own connection, the only one whose stream the gate can see. A client a test put in
        place serves these too (and the gate then sends at once)."""
        if self._client is not None and self._client is not self._built_client:
            return self._client
        if self._upload_client is None:
            self._upload_client = build_client(dataclasses.replace(self._settings, max_keepalive_connections=0))
        return self._upload_client

    async def _data_getter(self) -> BlockingGetter | None:
        """The getter for file data (None: file data stays on the httpx client). Always a checkpoint."""
        if self._getter is None and self._client is self._built_client:
            self._getter = await trio.to_thread.run_sync(BlockingGetter, self._settings)  # TLS setup: a thread
        else:
            await trio.lowlevel.checkpoint()
        return self._getter

    async def aclose(self) -> None:
        getter, self._getter = self._getter, None
        if getter is not None:
            getter.close()
        if self._upload_client is not None:
            await self._upload_client.aclose()
            self._upload_client = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class PlainHTTPStore(StoreClients, abc.ABC):
    """What the HTTP and WebDAV sources share: credentials (rotating tokens included), one lazily built client, the
    retry and staging policies, and files read as strict ranged GETs (``plain_file``)."""

    def __init__(self, options: SourceOptions) -> None:
        if options.block_size_bytes <= 0:
            raise ConfigError(f"block size must be positive, not {options.block_size_bytes}")
        self._auth = HTTPAuth(options.credentials)
        super().__init__(options.http_settings())
        self._options = options
        self._retry = RetryPolicy()
        self._staging = StagingPolicy(deadline_seconds=options.staging_deadline_seconds)

    @abc.abstractmethod
    def _file_url(self, path: str) -> str:
        """The URL that a ranged GET of the file at ``path`` goes to."""

    async def open(self, path: str, entry: Entry) -> OpenFile:
        if entry.is_dir:
            await trio.lowlevel.checkpoint()
            raise IsADirectory(filename=path)
        getter = await self._data_getter()
        return plain_file(
            self._http(),
            self._file_url(path),
            entry,
            path=path,
            block_size_bytes=self._options.block_size_bytes,
            policy=self._retry,
            auth=self._auth,
            staging=self._staging,
            getter=getter,
        )


def plain_file(
    client: httpx.AsyncClient,
    url: str,
    entry: Entry,
    *,
    path: str,
    block_size_bytes: int,
    policy: RetryPolicy,
    auth: HTTPAuth | None,
    staging: StagingPolicy | None,
    headers: Callable[[], Awaitable[dict[str, str]]] | None = None,
    getter: BlockingGetter | None = None,
) -> RangeFile:
    """The ``OpenFile`` of a plain store: fixed blocks, strict ranged GETs, If-Match with the entry's ETag; with a
    ``getter``, the GETs run in worker threads on libcurl (``directfs.transfer``)."""
    etag = dict(entry.xattrs).get("user.etag")
    return RangeFile(
        client,
        url,
        BlockLayout.fixed(entry.version, entry.size, block_size_bytes),
        name=path,
        etag=etag.decode() if etag else None,
        policy=policy,
        headers=headers or (auth.headers if auth is not None else None),
        on_unauthorized=auth.refresh if auth is not None else None,
        staging=staging,
        getter=getter,
    )


# --- writes over WebDAV (webdav:// and the CTERA Portal) ------------------------------------------------------------
#
# Expect: 100-continue. httpx 0.28 / httpcore 1.0.9 send the body right after the headers and read nothing until it
# is out: measured against nginx on loopback, a 40 MiB PUT that nginx refused at once (401 without 100) still sent
# all 40 MiB, with or without the header; nginx discards it and answers afterwards. Over a WAN that is the whole
# file for nothing, twice when a rotated token is re-read and the PUT retried; a full store (507) the same. dCache
# redirects a PUT to a pool only when the client sent Expect and no body bytes have arrived yet (its
# ``webdav.proxy.on-impatient-write`` proxies the data through the door otherwise), so without waiting its 307 to a
# data node never happens. So a PUT of ``EXPECT_CONTINUE_MIN_BYTES`` or more runs on a connection of its own and
# its body waits (``_ContinueGate``) for ``100 Continue`` or a final answer, up to ``EXPECT_CONTINUE_WAIT_SECONDS``:
# measured, nginx answers 100 at once (the body then starts within a millisecond) and a refusal costs no body byte,
# over http and https alike. Smaller bodies go on the pooled connections without Expect: resending them costs
# less than a connection and a round trip of their own.

# Spool bytes per read (os.pread in a worker thread) and per send: h11 sends the bytes object as it is. A 256 MiB
# PUT to nginx on loopback (best of 3, shared 2-core box): 256 KiB 317 MB/s, 1 MiB 416, 4 MiB 314; an upload holds
# about one chunk in memory.
UPLOAD_CHUNK_BYTES: Final = 1024 * 1024
# Bodies from this size on wait for 100 Continue; below it the body is sent at once (libcurl's
# EXPECT_100_THRESHOLD is the same 1 MiB).
EXPECT_CONTINUE_MIN_BYTES: Final = 1024 * 1024
# How long a body waits for 100 Continue (RFC 9110 §10.1.1: not indefinitely) before it is sent anyway: libcurl's
# default. A server that lets it run out once is not waited for again (per origin), and gets no Expect.
EXPECT_CONTINUE_WAIT_SECONDS: Final = 1.0
# Answer heads read while waiting (a 100, or a redirect or refusal with its headers): a few hundred bytes.
MAX_EARLY_ANSWER_HEAD_BYTES: Final = 64 * 1024
# A door sends a PUT to a data node (dCache: one 307); a chain longer than this is a loop.
MAX_PUT_REDIRECTS: Final = 3
# One PUT's retry budget: the store's usual one plus one full transfer at the slowest rate we still call working
# (1 MiB/s, as the write-back layer's deadline of an upload); a stalled connection is cut sooner by the per-read and
# per-write timeouts.
UPLOAD_FLOOR_BYTES_PER_SECOND: Final = 1024 * 1024
# Write statuses worth another attempt: 507 (full) must not be repeated without a user's action (RFC 4918 §11.5),
# 501/505 are the same next time, 508 is a loop.
WRITE_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
# Write replies are empty, a small HTML page or a short multistatus; read (within this) so the connection is reused.
MAX_WRITE_REPLY_BYTES: Final = 1024 * 1024
# Paths whose write marks are kept (``DavStore.version_mark``): ~200 bytes each, so at most ~13 MiB.
MAX_WRITE_MARKS: Final = 65536
_PUT_DONE: Final = frozenset({200, 201, 204})
# Redirects that keep the method and body (RFC 9110 §15.4.8/9); after a 301/302/303 a client may send a GET instead.
_REDIRECTS: Final = frozenset({307, 308})


class _EarlyAnswer(Exception):
    """A final answer to a PUT before its body was sent (internal: raised by the body, caught by ``_put_hop``)."""

    def __init__(self, status_code: int, headers: httpx.Headers) -> None:
        super().__init__(status_code)
        self.status_code = status_code
        self.headers = headers


class _ContinueGate:
    """Holds a PUT's body back until the server answers ``100 Continue``, or answers finally, or the wait runs out.

    httpcore reports a new connection's stream through the request's ``trace`` extension (``connect_tcp`` and
    ``start_tls`` events), and nothing reads that stream while the body is being sent, so the gate may: a ``100``
    head is read and dropped (httpcore would skip it anyway), and a final answer (a redirect, 401, 507) is parsed
    with h11 and raised as ``_EarlyAnswer``, so the body is never sent and httpcore closes the connection (its
    request was never completed). Only used on connections that are not kept alive (``StoreClients._upload_http``):
    a reused one reports no stream, and then the body goes at once."""

    def __init__(self, wait_seconds: float) -> None:
        self._wait_seconds = wait_seconds
        self._stream: httpcore.AsyncNetworkStream | None = None
        self.timed_out = False

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            if isinstance(stream, httpcore.AsyncNetworkStream):
                self._stream = stream

    async def wait(self) -> None:
        stream = self._stream
        if stream is None:
            await trio.lowlevel.checkpoint()
            return
        parser = h11.Connection(h11.CLIENT)
        # h11 parses answers only after a request: this one stands for the PUT (its values do not matter).
        parser.send(h11.Request(method="PUT", target="/", headers=[("Host", "x"), ("Expect", "100-continue")]))
        pending = bytearray()
        with trio.move_on_after(self._wait_seconds):
            while True:
                data = await stream.read(MAX_EARLY_ANSWER_HEAD_BYTES)
                if not data:
                    raise httpx.RemoteProtocolError("the server closed the connection before answering the PUT")
                pending += data
                while (end := pending.find(b"\r\n\r\n")) >= 0:
                    head = bytes(pending[: end + 4])
                    del pending[: end + 4]
                    try:
                        parser.receive_data(head)
                        event = parser.next_event()
                    except h11.RemoteProtocolError as exc:
                        raise httpx.RemoteProtocolError(f"malformed answer to a PUT: {exc}") from None
                    if isinstance(event, h11.Response):
                        headers = httpx.Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers])
                        raise _EarlyAnswer(event.status_code, headers)
                    if isinstance(event, h11.InformationalResponse) and event.status_code == 100 and not pending:
                        return  # the server wants the body
                if len(pending) > MAX_EARLY_ANSWER_HEAD_BYTES:
                    raise httpx.RemoteProtocolError("the answer to a PUT has an oversized head")
        if pending:  # part of an answer read and not given back: httpcore could not parse the rest
            raise httpx.RemoteProtocolError("the answer to a PUT stopped in its head")
        self.timed_out = True


class _SpoolBody(httpx.AsyncByteStream):
    """A PUT body read from the spool with ``os.pread`` in worker threads, ``UPLOAD_CHUNK_BYTES`` at a time (never the
    whole file in memory); a new one per attempt and per redirect, so every send starts again at byte 0."""

    def __init__(self, fd: int, size: int, gate: _ContinueGate | None, path: str) -> None:
        self._fd = fd
        self._size = size
        self._gate = gate
        self._path = path

    def __aiter__(self) -> _SpoolChunks:  # a plain iterator object, not an async generator: see http._RequestBody
        return _SpoolChunks(self._fd, self._size, self._gate, self._path)


class _SpoolChunks:
    def __init__(self, fd: int, size: int, gate: _ContinueGate | None, path: str) -> None:
        self._fd = fd
        self._size = size
        self._gate = gate
        self._path = path
        self._offset = 0

    def __aiter__(self) -> _SpoolChunks:
        return self

    async def __anext__(self) -> bytes:
        gate, self._gate = self._gate, None
        if gate is not None:
            await gate.wait()
        if self._offset >= self._size:
            raise StopAsyncIteration
        length = min(UPLOAD_CHUNK_BYTES, self._size - self._offset)
        try:
            data = await trio.to_thread.run_sync(os.pread, self._fd, length, self._offset)
        except OSError as exc:
            raise UploadError(f"reading the spool failed: {exc.strerror}", filename=self._path) from None
        if len(data) != length:  # never send fewer bytes than Content-Length said (h11 would refuse them anyway)
            raise UploadError(
                f"the spool ends at {self._offset + len(data)} bytes, before the {self._size} to upload",
                filename=self._path,
            )
        self._offset += length
        return data


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """scheme, host and port (default ports made explicit) of ``url``: credentials go only where this is equal."""
    parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, parsed.host.lower(), port


def _strong_etag(etag: str | None) -> str | None:
    """``etag`` if it can make a precondition (``If-Match`` compares strongly: a weak ``W/"..."`` never matches)."""
    if etag and etag.startswith('"') and etag.endswith('"') and len(etag) >= 2:
        return etag
    return None


class _DavUpload:
    """One upload to a WebDAV store: nothing is sent before ``commit``, which is one PUT streamed from the spool."""

    def __init__(self, store: DavStore, path: str) -> None:
        self._store = store
        self._path = path

    async def part_ready(self, spool_fd: int, end: int) -> None:
        await trio.lowlevel.checkpoint()  # one PUT at commit: WebDAV has no parts

    async def commit(self, spool_fd: int, size: int, *, mtime_ns: int | None = None) -> Entry:
        return await self._store._upload(self._path, spool_fd, size, mtime_ns)

    async def abort(self) -> None:
        # Nothing was sent before commit, and a PUT cut short leaves nothing: the servers write to a temporary file
        # and rename it into place when the body is complete (nginx, Apache mod_dav, dCache, the Portal).
        await trio.lowlevel.checkpoint()


class DavStore(StoreClients, abc.ABC):
    """The ``Writable`` side of a WebDAV store, shared by ``webdav.WebDAVSource`` and ``ctera.CteraSource`` (the
    Portal's WebDAV). A subclass gives URLs, paths, PROPFIND and stat; it has ``_auth`` and ``_retry``.

    * Upload: one PUT streamed from the spool (``_SpoolBody``) with ``Content-Length``, from 1 MiB with
      ``Expect: 100-continue`` honoured (``_ContinueGate``); a 307/308 is followed with the same body, with the
      credentials only to the source's own origin (scheme, host, port), at most ``MAX_PUT_REDIRECTS`` times; every
      attempt starts at the source URL again with the current token. Then PROPFIND Depth 0: the new entry, as stat
      and listings give it (its size must be what was sent).
    * Folders: MKCOL (405: the name exists; 409: the parent is missing). Deletes: DELETE after a PROPFIND that
      checks the kind (a file for unlink) or emptiness (rmdir: WebDAV deletes a collection with everything in it);
      with a strong ETag the DELETE carries ``If-Match`` so a folder that gained an entry since is not deleted.
    * Rename: MOVE with ``Overwrite: F`` first, so the server never deletes what is at the destination; when that
      exists (412) it is checked (a file for a file; an empty folder for a folder, else ENOTEMPTY) and the MOVE is
      repeated with ``Overwrite: T``.
    * Times: PROPPATCH of ``DAV:getlastmodified``; a store that refuses it once (405/501, or 403/409 for the
      property, as Apache answers: it is protected in RFC 4918) is not asked again.
    * A request whose answer was lost may have taken effect: a retried MKCOL that finds the folder, a retried DELETE
      or MOVE that finds the source gone, count as done.
    """

    _auth: HTTPAuth
    _retry: RetryPolicy
    display_url: str
    _write_hint: str = "check the credentials"  # the hint of EACCES errors
    _keeps_mtime: bool = False  # WriteFeatures.keeps_mtime: whether this store is known to accept PROPPATCH
    _no_continue: frozenset[tuple[str, str, int | None]] = frozenset()  # origins that never answered 100 Continue
    _mtime_refused: bool = False  # PROPPATCH of getlastmodified was refused once: not asked again
    # Whether versions of resources without an ETag carry this source's write marks (``version_mark``).
    _marks_versions: bool = False
    _marks: collections.OrderedDict[str, int] | None = None
    _mark_count: int = 0

    @abc.abstractmethod
    def _url(self, path: str, *, collection: bool = False) -> str:
        """The absolute, percent-encoded URL of ``path`` (with a trailing slash for a collection)."""

    @abc.abstractmethod
    def _dav_path(self, path: str) -> str:
        """The unquoted absolute server path of ``path``, as ``davxml`` gives resource paths."""

    @abc.abstractmethod
    async def _propfind(self, path: str, depth: int) -> list[davxml.DavResource]:
        """PROPFIND of ``path`` (a 207's resources; namespace errors otherwise, ENOENT for 404)."""

    @abc.abstractmethod
    async def stat(self, path: str) -> Entry: ...

    # --- Writable --------------------------------------------------------------------------------------------------

    @property
    def write_features(self) -> WriteFeatures:
        return WriteFeatures(folder_rename=True, keeps_mtime=self._keeps_mtime, empty_folders=True)

    def begin_upload(self, path: str) -> Upload:
        if not path:
            raise InvalidArgumentError("the root is a folder, not a file to upload")
        return _DavUpload(self, path)

    async def make_dir(self, path: str) -> Entry:
        if not path:
            raise EntryExistsError(filename="/")
        url = self._url(path, collection=True)
        reply = await self._write("MKCOL", url, path)
        if reply.status_code == 405:  # the name exists (a folder or a file)
            if reply.maybe_done_before and await self._is_folder(path):
                return await self.stat(path)  # our earlier attempt made it; its answer was lost
            raise EntryExistsError(filename=path)
        if reply.status_code not in (200, 201):
            raise self._status_error(reply, f"MKCOL {redact_url(url)}", path)
        return await self.stat(path)

    async def remove_file(self, path: str) -> None:
        for check in range(2):
            resource = await self._resource(path)
            if resource.is_collection:
                raise IsADirectory(filename=path)
            etag = _strong_etag(resource.etag)
            reply = await self._delete(path, collection=False, etag=etag)
            if reply.status_code == 412 and check == 0:
                continue  # changed since the PROPFIND (replaced by a folder?): look again
            self._check_delete(reply, path, collection=False)
            return

    async def remove_dir(self, path: str) -> None:
        if not path:
            raise InvalidArgumentError("the root cannot be removed", filename="/")
        resource = await self._empty_folder(path)
        etag = _strong_etag(resource.etag)
        reply = await self._delete(path, collection=True, etag=etag)
        if reply.status_code == 412 and etag is not None:
            # The folder changed after the check. A new entry makes it non-empty; if it is still empty the server's
            # folder ETags do not work as preconditions, and the DELETE goes once more without one.
            await self._empty_folder(path)
            reply = await self._delete(path, collection=True, etag=None)
        self._check_delete(reply, path, collection=True)

    async def rename(self, old: str, new: str, *, is_dir: bool) -> None:
        if not old or not new:
            raise InvalidArgumentError("the root cannot be renamed", filename="/")
        if is_dir and new.startswith(old + "/"):
            # POSIX EINVAL. nginx answered such a MOVE with 201 and the folder was gone (measured, nginx 1.22).
            raise InvalidArgumentError("cannot move a folder into itself", filename=old)
        if old == new:
            await self._resource(old)  # rename(2) of a name onto itself: nothing to do if it exists
            return
        reply = await self._move(old, new, is_dir=is_dir, overwrite=False)
        done = await self._moved_already(reply, old, new)
        if not done and reply.status_code == 412:  # something is at the destination: replace it only if POSIX would
            target = await self._resource(new)
            if is_dir:
                if not target.is_collection:
                    raise NotADirectory(filename=new)
                await self._empty_folder(new)
            elif target.is_collection:
                raise IsADirectory(filename=new)
            reply = await self._move(old, new, is_dir=is_dir, overwrite=True)
            done = await self._moved_already(reply, old, new)
        if done or reply.status_code in (200, 201, 204):
            self._move_marks(old, new, is_dir=is_dir)
            return
        what = f"MOVE {redact_url(self._url(old, collection=is_dir))}"
        if reply.status_code in (409, 500):
            # 409: the destination's folder is missing (RFC 4918 §9.9.4), or (nginx) a file onto a folder name;
            # Apache answers 500 for a missing destination folder.
            existing = await self._resource_or_none(new)
            if existing is not None and existing.is_collection != is_dir:
                raise NotADirectory(filename=new) if is_dir else IsADirectory(filename=new)
            if await self._resource_or_none(_parent(new)) is None:
                raise EntryNotFoundError(f"{what}: the destination folder is missing", filename=new)
            if await self._resource_or_none(old) is None:
                raise EntryNotFoundError(filename=old)
        raise self._status_error(reply, what, old)

    async def set_mtime(self, path: str, mtime_ns: int) -> bool:
        if self._mtime_refused:
            await trio.lowlevel.checkpoint()
            return False
        try:
            date = formatdate(mtime_ns // 1_000_000_000, usegmt=True)
        except (OverflowError, OSError, ValueError):
            await trio.lowlevel.checkpoint()
            return False  # not a time an HTTP date can say
        body = davxml.proppatch_body(davxml.DAV, "getlastmodified", date)
        for collection in (False, True):
            url = self._url(path, collection=collection)
            reply = await self._write(
                "PROPPATCH",
                url,
                path,
                headers={"Content-Type": "application/xml; charset=utf-8"},
                content=body,
                read_body_if=lambda status: status == 207,
            )
            if reply.status_code not in (301, 302, 307, 308):
                break  # (a redirect: a folder asked without its slash, as Apache and others answer; asked once more)
        if reply.status_code == 207:
            status = davxml.propstat_status(reply.body, davxml.DAV, "getlastmodified")
            if status == 200:
                return True
            if status in (403, 409):  # a protected property (RFC 4918 §15.7): this store does not take times
                self._refuse_mtime(f"HTTP {status} for the property")
            return False
        if reply.status_code in (403, 405, 501):  # the method is refused
            self._refuse_mtime(f"HTTP {reply.status_code}")
            return False
        if reply.status_code == 404:
            raise EntryNotFoundError(filename=path)
        if reply.status_code == 401 or reply.status_code >= 500:  # credentials, or the store failed (after retries)
            raise self._status_error(reply, f"PROPPATCH {redact_url(url)}", path)
        return False  # any other answer: nothing says the time was kept

    # --- uploads ---------------------------------------------------------------------------------------------------

    async def _upload(self, path: str, fd: int, size: int, mtime_ns: int | None) -> Entry:
        url = self._url(path)
        what = f"PUT {redact_url(url)}"
        reply = await self._put(path, url, fd, size)
        if reply.status_code not in _PUT_DONE:
            if reply.status_code in _REDIRECTS:
                raise UploadError(f"{what}: HTTP {reply.status_code} without a usable Location, or too many redirects")
            if reply.status_code in (405, 409) and await self._is_folder(path):
                raise IsADirectory(filename=path)
            if reply.status_code == 405:  # PUT is not allowed here: a read-only share or location
                raise WriteAccessError(f"{what}: HTTP 405 (the store does not accept uploads here)", filename=path)
            raise self._status_error(reply, what, path)
        if mtime_ns is not None:
            try:
                await self.set_mtime(path, mtime_ns)
            except WriteError as exc:  # the bytes are stored: a time that could not be is no failed upload
                log.info("%s: uploaded; its modification time was not stored: %s", path, exc)
        self._new_mark(path)
        entry = await self.stat(path)
        if self._marks is not None and "user.etag" in dict(entry.xattrs):
            self._marks.pop(path, None)  # the store's ETag names the version: no mark needed
        if entry.is_dir or entry.size != size:
            # Another client replaced it at once, or the store kept other bytes than it was sent: not ours to claim.
            kind = "a folder" if entry.is_dir else f"{entry.size} bytes"
            raise UploadError(f"{what}: the store shows {kind} after an upload of {size} bytes", filename=path)
        return entry

    async def _put(self, path: str, url: str, fd: int, size: int) -> Reply:
        """The PUT with retries (each attempt from ``url`` again, with the current credentials) and one re-read of a
        rotated token after 401/403; transport failures raise ``UploadError``/``UploadTimeout``."""
        what = f"PUT {redact_url(url)}"
        home = _origin(url)
        budget = self._retry.total_budget_seconds + size / UPLOAD_FLOOR_BYTES_PER_SECOND
        policy = dataclasses.replace(self._retry, total_budget_seconds=budget)

        async def attempt() -> Reply:
            credentials = await self._auth.headers()  # per attempt: a token file may have rotated meanwhile
            target = httpx.URL(url)
            for hop in range(MAX_PUT_REDIRECTS + 1):
                origin = _origin(target)
                headers = {"Content-Length": str(size), **(credentials if origin == home else {})}
                gated = size >= EXPECT_CONTINUE_MIN_BYTES and origin not in self._no_continue
                reply = await self._put_hop(target, fd, size, headers, gated=gated, path=path)
                if reply.status_code == 417 and gated:  # the expectation itself refused: once more without it
                    self._no_continue |= {origin}
                    reply = await self._put_hop(target, fd, size, headers, gated=False, path=path)
                if reply.status_code == 500 and hop == 0 and await self._parent_missing(path):
                    return Reply(409, reply.headers, b"")  # nginx's answer to a PUT into a missing folder
                location = reply.headers.get("location")
                if reply.status_code not in _REDIRECTS or not location or hop == MAX_PUT_REDIRECTS:
                    return reply
                try:
                    target = target.join(location)
                except httpx.InvalidURL:
                    return reply
                if target.scheme not in ("http", "https"):
                    return reply
                same = "the same origin" if _origin(target) == home else "another origin, without credentials"
                log.debug("%s: HTTP %d to %s (%s)", what, reply.status_code, redact_url(target), same)
            raise AssertionError("unreachable")  # the loop returns at its last hop

        async def once() -> Reply:
            try:
                return await send_with_retries(attempt, policy=policy, what=what, retry_statuses=WRITE_RETRY_STATUSES)
            except httpx.HTTPError as exc:
                raise transport_error(exc, subject="write", what=what, filename=path) from exc

        reply = await once()
        if reply.status_code in (401, 403) and await self._auth.refresh():
            reply = await once()
        return reply

    async def _put_hop(
        self, url: httpx.URL, fd: int, size: int, headers: dict[str, str], *, gated: bool, path: str
    ) -> Reply:
        """One PUT to ``url``, no redirect followed; ``gated``: with Expect, on a connection of its own."""
        gate: _ContinueGate | None = None
        extensions: dict[str, Any] = {}
        if gated:
            gate = _ContinueGate(EXPECT_CONTINUE_WAIT_SECONDS)
            headers = {**headers, "Expect": "100-continue"}
            extensions["trace"] = gate.trace
        client = self._upload_http() if gated else self._http()
        request = client.build_request("PUT", url, headers=headers, extensions=extensions)
        request.stream = _SpoolBody(fd, size, gate, path)
        try:
            response = await client.send(request, stream=True)
        except _EarlyAnswer as answer:
            return Reply(answer.status_code, answer.headers, b"")
        finally:
            if gate is not None and gate.timed_out and (origin := _origin(url)) not in self._no_continue:
                self._no_continue |= {origin}
                log.info(
                    "%s: no answer to Expect: 100-continue within %g s; bodies go without waiting from now on",
                    redact_url(url.copy_with(path="/")),
                    EXPECT_CONTINUE_WAIT_SECONDS,
                )
        try:
            with contextlib.suppress(BadBody):  # the status is the answer; an odd body does not change it
                await read_body(response, MAX_WRITE_REPLY_BYTES, prefix=True)  # so the connection can be reused
            return Reply(response.status_code, response.headers, b"")
        finally:
            await response.aclose()

    # --- helpers ---------------------------------------------------------------------------------------------------

    async def _write(
        self,
        method: str,
        url: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        read_body_if: Callable[[int], bool] = lambda status: False,
    ) -> Reply:
        return await request(
            self._http(),
            method,
            url,
            auth=self._auth,
            policy=self._retry,
            path=path,
            headers=headers,
            content=content,
            read_body_if=read_body_if,
            max_body_bytes=MAX_WRITE_REPLY_BYTES,
            subject="write",
            retry_statuses=WRITE_RETRY_STATUSES,
        )

    def _status_error(self, reply: Reply, what: str, path: str) -> DirectFSError:
        return write_status_error(reply.status_code, what=what, filename=path, hint=self._write_hint)

    async def _resource(self, path: str) -> davxml.DavResource:
        """The resource of ``path`` itself (PROPFIND Depth 0); ``EntryNotFoundError`` when absent."""
        wanted = davxml.normalize_path(self._dav_path(path))
        for resource in await self._propfind(path, 0):
            if resource.path == wanted:
                return resource
        raise MalformedListingError(f"PROPFIND Depth 0 of {path or '/'!r} did not describe it", filename=path or "/")

    async def _resource_or_none(self, path: str) -> davxml.DavResource | None:
        try:
            return await self._resource(path)
        except EntryNotFoundError:
            return None

    async def _moved_already(self, reply: Reply, old: str, new: str) -> bool:
        """Whether a MOVE refused on retry was done by our earlier attempt, whose answer was lost: the retry finds
        the source gone (404) or, as nginx checks the destination first, the moved entry there (412)."""
        if not (reply.maybe_done_before and reply.status_code in (404, 412)):
            return False
        return await self._resource_or_none(old) is None and await self._resource_or_none(new) is not None

    async def _is_folder(self, path: str) -> bool:
        resource = await self._resource_or_none(path)
        return resource is not None and resource.is_collection

    async def _parent_missing(self, path: str) -> bool:
        """Whether the folder that would hold ``path`` is gone (any other failure of the check: we cannot tell)."""
        try:
            await self._resource(_parent(path))
        except EntryNotFoundError:
            return True
        except DirectFSError:
            return False
        return False

    async def _empty_folder(self, path: str) -> davxml.DavResource:
        """The resource of folder ``path`` after a PROPFIND Depth 1 found nothing in it; ``NotADirectory`` for a file,
        ``DirectoryNotEmptyError`` for any entry, one skipped in listings (an invalid name) included."""
        resources = await self._propfind(path, 1)
        wanted = davxml.normalize_path(self._dav_path(path))
        itself = next((r for r in resources if r.path == wanted), None)
        if itself is None:
            raise EntryNotFoundError(filename=path)
        if not itself.is_collection:
            raise NotADirectory(filename=path)
        if any(r.path != wanted for r in resources):
            raise DirectoryNotEmptyError(filename=path)
        return itself

    async def _delete(self, path: str, *, collection: bool, etag: str | None) -> Reply:
        headers = {"If-Match": etag} if etag is not None else None
        return await self._write("DELETE", self._url(path, collection=collection), path, headers=headers)

    def _check_delete(self, reply: Reply, path: str, *, collection: bool) -> None:
        if reply.status_code in (200, 204):
            return
        if reply.status_code == 404:
            if reply.maybe_done_before:
                return  # our earlier attempt deleted it; its answer was lost
            raise EntryNotFoundError(filename=path)
        what = f"DELETE {redact_url(self._url(path, collection=collection))}"
        if reply.status_code == 207:  # a multistatus: some members could not be deleted
            raise UploadError(f"{what}: the store deleted only part of it (HTTP 207)", filename=path)
        if reply.status_code == 412:
            raise UploadError(f"{what}: it changed while being removed (HTTP 412)", filename=path)
        raise self._status_error(reply, what, path)

    async def _move(self, old: str, new: str, *, is_dir: bool, overwrite: bool) -> Reply:
        headers = {"Destination": self._url(new, collection=is_dir), "Overwrite": "T" if overwrite else "F"}
        return await self._write("MOVE", self._url(old, collection=is_dir), old, headers=headers)

    # --- write marks -----------------------------------------------------------------------------------------------
    #
    # A store without ETags (nginx) gives versions of size and mtime in seconds: a file this mount replaced by one of
    # the same size within the same second would keep its version, and the block cache and the kernel's page cache
    # would go on serving the old bytes (measured through a mount of nginx: six same-size rewrites in one second, every
    # read after the first returned the first content). So every upload and rename by this source gives the path a
    # new mark, unique in this source, that ``version_mark`` adds to such versions (in stat, listings and the entry
    # of the upload alike). Bounded: the oldest marks are dropped past ``MAX_WRITE_MARKS``. Changes by other clients
    # within one second stay invisible, as on the read side.

    def version_mark(self, path: str) -> str:
        """What this source adds to the version of ``path`` when the store gives it no ETag ("" if nothing)."""
        mark = self._marks.get(path) if self._marks is not None else None
        return f":w{mark}" if mark is not None else ""

    def _new_mark(self, path: str) -> None:
        if not self._marks_versions:
            return
        if self._marks is None:
            self._marks = collections.OrderedDict()
        self._mark_count += 1
        self._marks[path] = self._mark_count
        self._marks.move_to_end(path)
        while len(self._marks) > MAX_WRITE_MARKS:
            self._marks.popitem(last=False)

    def _move_marks(self, old: str, new: str, *, is_dir: bool) -> None:
        """After a rename: the moved paths keep their marks under their new names, and a file gets a new one (it may
        have replaced a file of the same size and second, whose blocks are cached under the plain version)."""
        if self._marks is None:
            if not is_dir:
                self._new_mark(new)
            return
        if not is_dir:
            self._marks.pop(old, None)
            self._new_mark(new)
            return
        prefix = old + "/"
        for path in [p for p in self._marks if p.startswith(prefix)]:
            self._marks[new + path[len(old) :]] = self._marks.pop(path)

    def _refuse_mtime(self, why: str) -> None:
        if not self._mtime_refused:
            self._mtime_refused = True
            log.info(
                "%s does not keep modification times (PROPPATCH of getlastmodified: %s); files keep the upload time",
                self.display_url,
                why,
            )


def _parent(path: str) -> str:
    return path.rpartition("/")[0]
