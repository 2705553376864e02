"""What the plain HTTP stores share (``webdav``, ``http(s)``, ``s3``): credentials with rotating tokens, metadata
requests with retries and one re-read of a rotated token, the status table, and files read as strict ranged GETs
in worker threads (``plain_file``). The index-page source is ``directfs.sources.web``.

Credentials: ``Credentials.token_file`` (Bearer, re-read when the file changes), ``Credentials.token`` (Bearer),
``username``/``password`` (Basic), in that order; ``client_cert``/``client_key`` (X.509, mutual TLS). A 401 forces
one re-read of the token file and one retry. ``http://`` sends credentials in clear text, so ``check_url`` refuses it
with credentials unless the host is loopback or ``SourceOptions.allow_plain_http`` is set.

Concurrency: a store holds one httpx client (task-safe pool) and one ``BlockingGetter``. ``TokenFile`` is only
touched from the trio thread; its check is one ``os.stat`` of a local file (microseconds), so it runs inline.
"""

from __future__ import annotations

import abc
import base64
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import unquote, urlsplit

import httpx
import trio

from ..errors import (
    ConfigError,
    IsADirectory,
    MalformedListingError,
)
from ..http import (
    BadBody,
    BodyTooLarge,
    HTTPSettings,
    RetryPolicy,
    build_client,
    is_loopback_host,
    namespace_status_error,
    open_stream,
    read_body,
    redact_url,
    send_with_retries,
    transport_error,
)
from ..transfer import BlockingGetter
from . import davxml
from .base import BlockLayout, Credentials, Entry, OpenFile, SourceOptions
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
) -> Reply:
    """One metadata request with retries, auth per attempt and one re-read of a rotated token after 401/403.
    Transport failures become namespace errors naming ``path``; statuses are the caller's to map. With ``sink``, a
    body that is read goes to a fresh ``sink()`` per attempt as it arrives (a streaming parser), not into ``body``."""
    what = f"{method} {redact_url(url)}"

    async def attempt() -> Reply:
        all_headers = {**(await auth.headers()), **(headers or {})}
        async with open_stream(client, method, url, headers=all_headers, content=content) as response:
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
            return Reply(response.status_code, response.headers, bytes(body))

    async def once() -> Reply:
        try:
            return await send_with_retries(attempt, policy=policy, what=what)
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject="namespace", what=what, filename=path) from exc

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

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self._built_client = build_client(self._settings)
        return self._client

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
