"""``http://`` and ``https://`` sources: folders from their HTML index pages, or one file (the plumbing the plain
stores share is ``directfs.sources.httpstore``).

URL forms:

* ``https://HOST[:PORT]/path/file.bin``: one file; the mount root is a folder holding just ``file.bin``.
* ``https://HOST[:PORT]/path/``: a folder, listed from its HTML index page (nginx ``autoindex``, Apache
  ``mod_autoindex``, ``python -m http.server`` and the like). A link is an entry when it points directly below the
  folder: links elsewhere, with a query (Apache's sort links), fragments and parent links are skipped. A link ending in
  ``/`` is a sub-folder. Sizes, mtimes and ETags come from ``HEAD``; when ``HEAD`` has no ``Content-Length``, from the
  ``Content-Range`` of a 1-byte ranged GET.
* Data: fixed-size blocks read with strict ranged GETs (``httprange.RangeFile``), ``If-Match`` with a strong ETag.
  A server that ignores ``Range`` (a 200 to a ranged GET, seen from the status line) has the file read as one
  stream from byte 0 instead, with reads further than ``SourceOptions.no_range_max_size_bytes`` from the stream
  failing with EOPNOTSUPP (``httprange``'s docstring: states, memory, re-reads).
* ``http://`` sends credentials in clear text, so it is refused with credentials unless the host is loopback or
  ``SourceOptions.allow_plain_http`` is set.

Credentials, the metadata requests and the ranged file reads are the plain stores' (``directfs.sources.httpstore``).

Concurrency: a folder listing HEADs its files concurrently, at most ``HEAD_CONCURRENCY`` at a time, in a nursery that
is closed before the first entry is yielded (a nursery must not stay open across a ``yield``).
"""

from __future__ import annotations

import functools
import html.parser
import logging
import posixpath
import re
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import quote, unquote, urljoin, urlsplit

import trio

from ..errors import (
    ConfigError,
    EntryNotFoundError,
    MalformedListingError,
    NamespaceError,
    NotADirectory,
    PermissionDeniedError,
)
from ..http import (
    redact_url,
)
from ..values import parse_decimal
from ..workers import run_codec
from .base import Entry, OpenFile, SourceOptions, valid_name
from .httprange import RangeFile
from .httpstore import PlainHTTPStore, Reply, check_url, http_mtime_ns, raise_for_status, request

log = logging.getLogger(__name__)

# An index page is HTML about names; 64 MiB is ~500,000 links, far beyond a sane folder, and bounds a hostile server.
MAX_INDEX_BYTES: Final = 64 * 1024 * 1024
# HEADs of one listing in flight: enough to hide a WAN round trip per file, below the client's 16 connections so
# block reads of other files still find a free connection.
HEAD_CONCURRENCY: Final = 8
# A link in an index page is a few hundred bytes. Pages are fed to HTMLParser in pieces, and one construct (a tag, a
# comment, a script) still open after this many characters is refused: the parser re-reads an open construct at every
# piece, and its start-tag regex holds ~265 bytes per character of the tag it matches (a 64 MiB tag: 17 GB).
MAX_INDEX_CONSTRUCT_CHARS: Final = 64 * 1024
_INDEX_PIECE_CHARS: Final = 64 * 1024

_CONTENT_RANGE_TOTAL = re.compile(r"^\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", re.IGNORECASE)


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
    Skipped: other hosts, query or fragment links, parents, deeper paths, unparseable hrefs, invalid names,
    duplicates. Markup the HTML parser cannot read is ``MalformedListingError``."""
    parser = _Links()
    try:
        for start in range(0, len(html_text), _INDEX_PIECE_CHARS):
            parser.feed(html_text[start : start + _INDEX_PIECE_CHARS])
            if len(parser.rawdata) > MAX_INDEX_CONSTRUCT_CHARS:  # what the parser holds back: the open construct
                raise MalformedListingError(
                    f"index of {redact_url(page_url)} has a tag or comment over {MAX_INDEX_CONSTRUCT_CHARS} characters"
                )
    except AssertionError as exc:  # what _markupbase raises for "<![" and other bad declarations
        raise MalformedListingError(f"index of {redact_url(page_url)} is not HTML we can read: {exc}") from None
    # No parser.close(): before Python 3.11.13 its end-of-data pass re-scans the rest of the page from every
    # unterminated tag or comment (CVE-2025-6069), quadratic: 40 KB of "<a b" took 15 s. feed() has handed over every
    # complete tag up to the first unterminated construct; fixed Pythons let that construct run to the end of the
    # page as well, so what is left unparsed here is what they ignore.
    base = urlsplit(page_url)
    folder = base.path
    seen: set[str] = set()
    out: list[tuple[str, bool]] = []
    for href in parser.hrefs:
        if "?" in href or href.startswith("#"):
            continue  # Apache's ?C=N;O=D sort links, anchors: not entries
        try:
            target = urlsplit(urljoin(page_url, href))
        except ValueError:  # an unclosed "[" (IPv6 literal), a netloc that NFKC normalisation changes
            log.warning("index of %s: skipping a link that is not a URL", redact_url(page_url))
            continue
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
        self._range_ignored_seen = False  # some file of this source answered a ranged GET with 200

    def _url(self, path: str, *, folder: bool = False) -> str:
        full = self._folder + path + ("/" if folder and path else "")
        return self._origin + quote(full, safe="/")

    def _file_url(self, path: str) -> str:
        return self._url(path)

    async def open(self, path: str, entry: Entry) -> OpenFile:
        file = await super().open(path, entry)
        if isinstance(file, RangeFile):  # plain_file's: a server that ignores Range is then read as a stream
            file.stream_when_range_ignored(
                self._options.no_range_max_size_bytes,
                # Once one file of this source was seen ignoring Range, a file's first fetch goes alone (each file is
                # still judged by its own first reply: a CDN may serve some objects with Range and some without).
                probe_first=self._range_ignored_seen,
                on_detected=self._saw_range_ignored,
            )
        return file

    def _saw_range_ignored(self) -> None:
        self._range_ignored_seen = True

    async def _head(self, url: str, path: str) -> Reply:
        return await request(self._http(), "HEAD", url, auth=self._auth, policy=self._retry, path=path)

    async def _file_entry(self, path: str, name: str) -> Entry:
        url = self._url(path)
        reply = await self._head(url, path)
        if reply.status_code != 200:
            raise_for_status(reply, f"HEAD {redact_url(url)}", path)
        length = parse_decimal(reply.headers.get("content-length", ""))
        size = length if length is not None else await self._size_from_range(url, path)
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
        # CPU-heavy for a big page (a 500,000-link index takes ~20 s): off the trio thread, which answers FUSE.
        links = await run_codec(functools.partial(index_links, url, text), input_bytes=len(text))
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


def create(url: str, options: SourceOptions) -> HTTPSource:
    return HTTPSource(url, options)
