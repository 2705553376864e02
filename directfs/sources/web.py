"""``http://`` and ``https://`` sources, and the HTTP plumbing the plain stores share (auth, requests, errors).

URL forms:

* ``https://HOST[:PORT]/path/file.bin``: one file; the mount root is a folder holding just ``file.bin``.
* ``https://HOST[:PORT]/path/``: a folder, listed from its HTML index page (nginx ``autoindex``, Apache
  ``mod_autoindex``, ``python -m http.server`` and the like). A link is an entry when it points directly below the
  folder: links elsewhere, with a query (Apache's sort links), fragments and parent links are skipped. A link ending in
  ``/`` is a sub-folder. Sizes, mtimes and ETags come from ``HEAD``; when ``HEAD`` has no ``Content-Length``, from the
  ``Content-Range`` of a 1-byte ranged GET.
* Data: fixed-size blocks read with strict ranged GETs (``httprange.RangeFile``), ``If-Match`` with a strong ETag.
* ``http://`` sends credentials in clear text, so it is refused with credentials unless the host is loopback or
  ``SourceOptions.allow_plain_http`` is set.

Credentials (shared with ``webdav``): ``Credentials.token_file`` (Bearer, re-read when the file changes),
``Credentials.token`` (Bearer), ``username``/``password`` (Basic), in that order; ``client_cert``/``client_key``
(X.509, mutual TLS). A 401 forces one re-read of the token file and one retry.

Concurrency: a source holds one httpx client (task-safe pool). ``TokenFile`` is only touched from the trio thread;
its check is one ``os.stat`` of a local file (microseconds), so it runs inline rather than paying a thread hop.
A folder listing HEADs its files concurrently, at most ``HEAD_CONCURRENCY`` at a time, in a nursery that is closed
before the first entry is yielded (a nursery must not stay open across a ``yield``).
"""

from __future__ import annotations

import abc
import base64
import html.parser
import logging
import os
import posixpath
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx
import trio

from ..errors import (
    ConfigError,
    EntryNotFoundError,
    IsADirectory,
    MalformedListingError,
    NamespaceError,
    NotADirectory,
    PermissionDeniedError,
)
from ..http import (
    RetryPolicy,
    build_client,
    is_loopback_host,
    namespace_status_error,
    redact_url,
    send_with_retries,
    transport_error,
)
from ..transfer import BlockingGetter
from .base import BlockLayout, Credentials, Entry, OpenFile, SourceOptions, valid_name
from .httprange import RangeFile
from .nearline import StagingPolicy

log = logging.getLogger(__name__)

# An index page is HTML about names; 64 MiB is ~500,000 links, far beyond a sane folder, and bounds a hostile server.
MAX_INDEX_BYTES: Final = 64 * 1024 * 1024
# HEADs of one listing in flight: enough to hide a WAN round trip per file, below the client's 16 connections so
# block reads of other files still find a free connection.
HEAD_CONCURRENCY: Final = 8
# A token file is a JWT or an opaque token: a few KiB. A bigger file is a wrong path, not a token.
MAX_TOKEN_BYTES: Final = 64 * 1024

_CONTENT_RANGE_TOTAL = re.compile(r"^\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", re.IGNORECASE)


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
) -> Reply:
    """One metadata request with retries, auth per attempt and one re-read of a rotated token after 401/403.
    Transport failures become namespace errors naming ``path``; statuses are the caller's to map."""
    what = f"{method} {redact_url(url)}"

    async def attempt() -> Reply:
        all_headers = {**(await auth.headers()), **(headers or {})}
        async with client.stream(method, url, headers=all_headers, content=content) as response:
            body = bytearray()
            if read_body_if(response.status_code):
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > max_body_bytes:
                        raise MalformedListingError(f"{what}: reply larger than {max_body_bytes} bytes", filename=path)
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


# --- index pages --------------------------------------------------------------------------------------------------


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for key, value in attrs:
                if key == "href" and value:
                    self.hrefs.append(value)


def index_links(page_url: str, html_text: str) -> list[tuple[str, bool]]:
    """(name, is_dir) of the links of an index page that point directly below ``page_url`` (which ends in ``/``).
    Skipped: other hosts, query or fragment links, parents, deeper paths, invalid names, duplicates."""
    parser = _Links()
    parser.feed(html_text)
    parser.close()
    base = urlsplit(page_url)
    folder = base.path
    seen: set[str] = set()
    out: list[tuple[str, bool]] = []
    for href in parser.hrefs:
        if "?" in href or href.startswith("#"):
            continue  # Apache's ?C=N;O=D sort links, anchors: not entries
        target = urlsplit(urljoin(page_url, href))
        if (target.scheme, target.netloc) != (base.scheme, base.netloc) or target.query:
            continue
        path = target.path
        if not path.startswith(folder) or path == folder:
            continue
        rest = path[len(folder) :]
        is_dir = rest.endswith("/")
        rest = rest.removesuffix("/")
        if "/" in rest:
            continue  # a deeper path, not a child
        try:
            name = unquote(rest, errors="strict")
        except UnicodeDecodeError:
            log.warning("index of %s: skipping a link that is not UTF-8 once unquoted", redact_url(page_url))
            continue
        if not valid_name(name):
            log.warning("index of %s: skipping invalid name %r", redact_url(page_url), name[:80])
            continue
        if name in seen:
            continue  # index pages often link a name twice (icon + text)
        seen.add(name)
        out.append((name, is_dir))
    return out


# --- the source ---------------------------------------------------------------------------------------------------


class PlainHTTPStore(abc.ABC):
    """What the HTTP and WebDAV sources share: credentials (rotating tokens included), one lazily built client, the
    retry and staging policies, and files read as strict ranged GETs (``plain_file``)."""

    def __init__(self, options: SourceOptions) -> None:
        if options.block_size_bytes <= 0:
            raise ConfigError(f"block size must be positive, not {options.block_size_bytes}")
        self._auth = HTTPAuth(options.credentials)
        self._options = options
        self._settings = options.http_settings()
        self._retry = RetryPolicy()
        self._staging = StagingPolicy(deadline_seconds=options.staging_deadline_seconds)
        self._client: httpx.AsyncClient | None = None
        self._built_client: httpx.AsyncClient | None = None  # the client _http() made (not one a test put in place)
        self._getter: BlockingGetter | None = None  # file data: GETs in worker threads (built on first open)

    @abc.abstractmethod
    def _file_url(self, path: str) -> str:
        """The URL that a ranged GET of the file at ``path`` goes to."""

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self._built_client = build_client(self._settings)
        return self._client

    async def aclose(self) -> None:
        getter, self._getter = self._getter, None
        if getter is not None:
            getter.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def open(self, path: str, entry: Entry) -> OpenFile:
        if entry.is_dir:
            await trio.lowlevel.checkpoint()
            raise IsADirectory(filename=path)
        if self._getter is None and self._client is self._built_client:
            # File data in worker threads on libcurl. A client someone put in place (tests: httpx.MockTransport)
            # keeps everything on httpx.
            self._getter = await trio.to_thread.run_sync(BlockingGetter, self._settings)  # TLS setup: a thread
        else:
            await trio.lowlevel.checkpoint()
        return plain_file(
            self._http(),
            self._file_url(path),
            entry,
            path=path,
            block_size_bytes=self._options.block_size_bytes,
            policy=self._retry,
            auth=self._auth,
            staging=self._staging,
            getter=self._getter,
        )


class HTTPSource(PlainHTTPStore):
    """A file or a folder tree served over plain HTTP(S). Create with :func:`create`."""

    def __init__(self, url: str, options: SourceOptions) -> None:
        super().__init__(options)
        self._origin, url_path = check_url(url, {"http": "http", "https": "https"}, options, self._auth)
        if url_path.endswith("/"):
            self._folder = url_path
            self._single: str | None = None
        else:
            parent, name = posixpath.split(url_path)
            if not valid_name(name):
                raise ConfigError(f"cannot name a file {name!r}")
            self._folder = parent.rstrip("/") + "/"
            self._single = name
        self.display_url = self._origin + quote(url_path)

    def _url(self, path: str, *, folder: bool = False) -> str:
        full = self._folder + path + ("/" if folder and path else "")
        return self._origin + quote(full, safe="/")

    def _file_url(self, path: str) -> str:
        return self._url(path)

    async def _head(self, url: str, path: str) -> Reply:
        return await request(self._http(), "HEAD", url, auth=self._auth, policy=self._retry, path=path)

    async def _file_entry(self, path: str, name: str) -> Entry:
        url = self._url(path)
        reply = await self._head(url, path)
        if reply.status_code != 200:
            raise_for_status(reply, f"HEAD {redact_url(url)}", path)
        length = reply.headers.get("content-length")
        if length is not None and length.strip().isdigit():
            size = int(length)
        else:
            size = await self._size_from_range(url, path)
        etag = reply.headers.get("etag")
        mtime_ns = http_mtime_ns(reply.headers.get("last-modified"))
        return Entry(
            name=name,
            is_dir=False,
            size=size,
            mtime_ns=mtime_ns,
            version=f"http:{etag or '-'}:{size}:{mtime_ns}",
            xattrs=(("user.etag", etag.encode()),) if etag else (),
        )

    async def _size_from_range(self, url: str, path: str) -> int:
        """Size from ``Content-Range: bytes 0-0/N`` (or ``bytes */0`` for an empty file) of a 1-byte ranged GET."""
        reply = await request(
            self._http(),
            "GET",
            url,
            auth=self._auth,
            policy=self._retry,
            path=path,
            headers={"Range": "bytes=0-0", "Accept-Encoding": "identity"},
        )
        if reply.status_code not in (206, 416):
            if reply.status_code == 200:
                raise NamespaceError("the server gives no size and ignores Range: cannot read it", filename=path)
            raise_for_status(reply, f"GET {redact_url(url)}", path)
        match = _CONTENT_RANGE_TOTAL.match(reply.headers.get("content-range", ""))
        if not match:
            raise NamespaceError("the server gives no size (no Content-Length, no Content-Range)", filename=path)
        return int(match.group(1))

    async def _is_folder(self, path: str) -> bool:
        reply = await self._head(self._url(path, folder=True), path or "/")
        if reply.status_code == 200:
            return "html" in reply.headers.get("content-type", "text/html").lower()
        if reply.status_code in (401, 403):
            raise_for_status(reply, f"HEAD {redact_url(self._url(path, folder=True))}", path or "/")
        return False

    async def stat(self, path: str) -> Entry:
        name = path.rpartition("/")[2]
        if self._single is not None:
            if path == "":
                await self._file_entry(self._single, self._single)  # fail early: TLS, auth, a wrong URL
                return Entry(name="", is_dir=True, size=0, mtime_ns=0, version="http:dir")
            if path != self._single:
                raise EntryNotFoundError(filename=path)
            return await self._file_entry(path, name)
        if path == "":
            url = self._url("")
            reply = await self._head(url, "/")
            if reply.status_code != 200:
                raise_for_status(reply, f"HEAD {redact_url(url)}", "/")
            return Entry(name="", is_dir=True, size=0, mtime_ns=0, version="http:dir")
        # "name/" answering 200 is a folder; otherwise HEAD "name" as a file (a server may answer 200 with an index
        # page for a folder asked without its slash, so the folder check comes first).
        if await self._is_folder(path):
            return Entry(name=name, is_dir=True, size=0, mtime_ns=0, version="http:dir")
        return await self._file_entry(path, name)

    async def list_dir(self, path: str) -> AsyncIterator[Entry]:
        if self._single is not None:
            if path != "":
                raise NotADirectory(filename=path) if path == self._single else EntryNotFoundError(filename=path)
            yield await self._file_entry(self._single, self._single)
            return
        url = self._url(path, folder=True)
        shown = path or "/"
        reply = await request(
            self._http(),
            "GET",
            url,
            auth=self._auth,
            policy=self._retry,
            path=shown,
            read_body_if=lambda status: status == 200,
            max_body_bytes=MAX_INDEX_BYTES,
        )
        if reply.status_code == 404 and path and (await self._head(self._url(path), shown)).status_code == 200:
            raise NotADirectory(filename=shown)  # "name/" is missing but "name" is there: a file
        if reply.status_code != 200:
            raise_for_status(reply, f"GET {redact_url(url)}", shown)
        if "html" not in reply.headers.get("content-type", "text/html").lower():
            raise NotADirectory(filename=shown)
        text = reply.body.decode("utf-8", "replace")  # names are UTF-8 percent-encoded in hrefs; markup is ASCII
        links = index_links(url, text)
        entries: list[Entry | None] = [None] * len(links)
        limiter = trio.CapacityLimiter(HEAD_CONCURRENCY)

        async def fill(i: int, name: str) -> None:
            async with limiter:
                child = f"{path}/{name}" if path else name
                try:
                    entries[i] = await self._file_entry(child, name)
                except (EntryNotFoundError, PermissionDeniedError) as exc:
                    log.warning("index of %s: skipping %r: %s", shown, name[:80], exc.strerror)

        async with trio.open_nursery() as nursery:
            for i, (name, is_dir) in enumerate(links):
                if is_dir:
                    entries[i] = Entry(name=name, is_dir=True, size=0, mtime_ns=0, version="http:dir")
                else:
                    nursery.start_soon(fill, i, name)
        for entry in entries:
            if entry is not None:
                yield entry


def plain_file(
    client: httpx.AsyncClient,
    url: str,
    entry: Entry,
    *,
    path: str,
    block_size_bytes: int,
    policy: RetryPolicy,
    auth: HTTPAuth | None,
    staging: StagingPolicy,
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


def create(url: str, options: SourceOptions) -> HTTPSource:
    return HTTPSource(url, options)
