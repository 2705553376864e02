"""The portal's HTTP surfaces (aiohttp): WebDAV, Direct IO, signed block GETs and the Notification Service.

Concurrency: handlers run on one asyncio loop. They read the immutable ``Index.snapshot`` (replaced whole by each
scan), so a listing or block list is always consistent with one scan. Notification reads go through the index's
reader connection. Scans run in a worker thread, one at a time (``Portal.scan_lock``); after each scan
``Portal.changed`` wakes the long-polls. Block objects of the local store are sent with ``FileResponse``, which
uses ``sendfile``: the benchmark reads 512 MiB files through here and Python never touches those bytes. A WebDAV GET
sends a file of DIR from a descriptor the index opened and checked (:func:`_send_indexed_file`), also with sendfile.

Logging never shows a signature or a secret: the access log writes the path without its query string. Whatever a
client sent is logged through :func:`log_safe` (control characters escaped), so a request cannot forge log lines.

Writes (``--writable``, issue 14; docs/serve-writes.md): PUT, MKCOL, DELETE, MOVE and PROPPATCH on the WebDAV
paths, behind the same login as the reads. The handlers check what they can before a body is read (``100
Continue`` is sent only then, :func:`_send_continue`), stream a PUT body to its temp file in worker threads, and hand
each change of DIR and the index to :meth:`Portal.mutate`: one at a time with the scans, shielded, so a client that
goes away mid-change never leaves DIR and the index disagreeing. Without ``--writable`` each of these methods answers
405 with the read-only ``Allow``.

The Notification Service (docs/serve-feed.md): ``list`` answers from the index's reader connection on the loop (a
page of 2000 events is a few milliseconds: their stored JSON texts are joined, never parsed again); a parked
``longpoll`` is a coroutine waiting on ``Portal.changed``, not a thread, so thousands of them cost only memory.

Authentication (issue 13, H1/L8): WebDAV and the Notification Service take HTTP Basic or ``Bearer <token>``, Direct
IO takes ``Bearer <access key id>``; a credential that is not configured is refused, never defaulted. A rejected
login is answered after ``failed_auth_delay_seconds`` (an ``asyncio.sleep`` of that request only); a request without
credentials (the first leg of a challenge) is answered at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import cachetools
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import EntryNotFoundError, StaleFileError
from .config import ServeConfig
from .index import CursorProblem, Index, Node, ScanStats
from .store import BlockStore, LocalBlockStore
from .webdav import (
    LASTMODIFIED,
    MAX_PROPFIND_BODY_BYTES,
    MAX_PROPPATCH_BODY_BYTES,
    PROPERTIES,
    WEBDAV_ROOT,
    BadPropfind,
    BadProppatch,
    ResponseCache,
    finite_depth_error,
    href_for_path,
    multistatus_chunks,
    parse_http_date,
    parse_propfind,
    parse_proppatch,
    proppatch_multistatus,
)
from .writes import PutConditions, Upload, Writer, WriteRefused, check_relpath, folder_allow, status_for

log = logging.getLogger("directfs.server")

NOTIFY_BASE: Final = "/ServicesPortal/v2/api/metadata"
# The SDK asks for 2000 per page; a cap keeps one reply bounded in memory and time.
DEFAULT_MAX_RESULTS: Final = 2000
MAX_RESULTS_CAP: Final = 10000
# The Portal rejects long folder_id lists with "size must be between ..." (TooManyVolumesRequestedError,
# docs/ctera-direct-io.md §8.3).
MAX_FOLDER_IDS: Final = 100
# Long-poll: the SDK sends timeout=10000 (ms). A cap keeps a misbehaving client from parking a request for hours.
DEFAULT_LONGPOLL_MS: Final = 10000
MAX_LONGPOLL_MS: Final = 60000
# --fault-feed-down-file: how often a parked long-poll looks for the file, so a feed "killed" mid-poll cuts it within
# about this long (only with that test knob: otherwise a parked long-poll only wakes for a change).
FEED_FAULT_POLL_SECONDS: Final = 0.1
# --count-requests (tests only): the counts, behind the portal login. Not under /ServicesPortal, where a real Portal
# has its own paths.
COUNTS_PATH: Final = "/directfs/test/requests"
# MD5s of served objects, keyed by (path, inode, mtime, size) so a re-written object is hashed again. 64k entries
# (~10 MiB) cover every object of a large test tree; a miss costs one read of the object (page-cached by then).
MD5_CACHE_ENTRIES: Final = 65536
# Hash small objects on the event loop; bigger ones in a thread (MD5 runs ~700 MB/s: 4 MiB is ~6 ms).
MD5_INLINE_BYTES: Final = 64 * 1024
# A PROPFIND reply of up to this many properties (nodes times names asked) is rendered on the event loop: ~70 files
# with every property, about 5 ms on a busy 2-core box; a bigger one is rendered piece by piece in a worker thread.
PROPFIND_INLINE_PROPERTIES: Final = 1024
_OBJECT_KEY_RE: Final = re.compile(r"^blocks/[0-9a-f]{2}/[0-9a-f]{64}$")
_DIGITS_RE: Final = re.compile(r"^[0-9]{1,18}$")
# What a signed block URL carries (store.UrlSigner): ASCII digits for the expiry, lowercase hex SHA-256 for the
# signature. Anything else is refused before it reaches int() or hmac.compare_digest (both raise on odd input).
_EXPIRES_RE: Final = re.compile(r"[0-9]{1,18}")
_SIG_RE: Final = re.compile(r"[0-9a-f]{64}")
# A PUT body is written to its temp file in a worker thread once this much has come in: ~40 thread hops for a 40 MiB
# upload, and about this much memory per upload (plus aiohttp's own read buffer of a few 64 KiB).
UPLOAD_WRITE_BYTES: Final = 1024 * 1024
# --fault-put-drop reads half of a body before dropping the connection; of a chunked one (no length), this much.
FAULT_DROP_UNKNOWN_LENGTH_BYTES: Final = 64 * 1024
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Every method a writable portal answers on its WebDAV paths (OPTIONS says so).
_WRITABLE_ALLOW: Final = "OPTIONS, GET, HEAD, PROPFIND, PROPPATCH, PUT, MKCOL, DELETE, MOVE"
T = TypeVar("T")


@dataclass
class Portal:
    config: ServeConfig
    index: Index
    store: BlockStore
    base_url: str = ""
    scan_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    rng: random.Random = field(default_factory=random.Random)
    last_scan: ScanStats | None = None
    stopping: bool = False  # set on SIGTERM: parked long-polls answer at once so shutdown does not wait for them
    md5s: cachetools.LRUCache[tuple[str, int, int, int], str] = field(
        default_factory=lambda: cachetools.LRUCache(maxsize=MD5_CACHE_ENTRIES)
    )
    put_faults_used: int = 0  # PUTs --fault-put-status/--fault-put-drop hit so far (for --fault-put-count)
    # Writes running in the background (Portal.mutate): referenced here so none is collected while it runs.
    writes: set[asyncio.Task[Any]] = field(default_factory=set)
    # PROPFIND responses once rendered (webdav.ResponseCache): a folder listed again costs a join, not a render.
    dav_responses: ResponseCache = field(default_factory=ResponseCache)
    # --count-requests: requests received by (method, decoded path), whatever their answer.
    request_counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def take_put_fault(self) -> bool:
        """Whether this PUT gets the configured upload fault (the first --fault-put-count ones, or all)."""
        faults = self.config.faults
        if not faults.put_faults or (faults.put_count and self.put_faults_used >= faults.put_count):
            return False
        self.put_faults_used += 1
        return True

    async def mutate(self, change: Callable[[], T]) -> T:
        """Run ``change`` (a write into DIR and its index update, server/writes.py) in a worker thread, one at a time
        with the scans, then wake the long-polls. Shielded: once started it runs to its end even when the client
        goes away and the handler is cancelled, so DIR and the index never disagree because a connection dropped
        (what it raises then is logged)."""
        task = asyncio.ensure_future(self._mutate(change))
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_orphaned_write)
            raise

    async def _mutate(self, change: Callable[[], T]) -> T:
        try:
            async with self.scan_lock:
                return await asyncio.to_thread(change)
        finally:
            async with self.changed:
                self.changed.notify_all()

    async def reset_feed(self) -> None:
        """End the change feed (SIGUSR2): every cursor handed out so far answers 410; parked long-polls wake."""
        feed_id = await self.mutate(self.index.reset_feed)
        log.info("change feed reset: every earlier cursor now answers 410; the new feed is %s", feed_id)

    async def stop(self) -> None:
        self.stopping = True
        async with self.changed:
            self.changed.notify_all()

    async def rescan(self) -> ScanStats:
        async with self.scan_lock:
            started = time.monotonic()
            stats = await asyncio.to_thread(self.index.scan)
            self.last_scan = stats
            log.info(
                "scan: %d added, %d changed, %d deleted, %d skipped, %d folder times, %.1f MiB encoded, "
                "%d objects written, %d collected in %.2f s",
                stats.added,
                stats.changed,
                stats.deleted,
                stats.skipped,
                stats.folders_touched,
                stats.encoded_bytes / 2**20,
                stats.objects_written,
                stats.objects_deleted,
                time.monotonic() - started,
            )
        async with self.changed:
            self.changed.notify_all()
        return stats


PORTAL_KEY: Final = web.AppKey("portal", Portal)


def _log_orphaned_write(task: asyncio.Task[Any]) -> None:
    """The result of a write whose client went away: nobody else will see it."""
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, WriteRefused):
        log.info("a write whose client went away was refused: %d %s", exc.status, exc.message)
    elif exc is not None:
        log.warning("a write whose client went away failed: %s", log_safe(exc))


def log_safe(text: object) -> str:
    """``text`` as one printable log field: every non-printable character (C0/C1 controls, DEL, line and paragraph
    separators, bidi overrides and other format characters) becomes ``\\xNN``/``\\uNNNN``, and ``\\`` and ``"`` are
    escaped, so a client cannot end a log line, forge the next one, or recolour a terminal."""
    value = str(text)
    if value.isprintable() and "\\" not in value and '"' not in value:
        return value
    out = []
    for ch in value:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class RedactingAccessLogger(AbstractAccessLogger):
    """``METHOD /path STATUS bytes seconds``: never the query (signatures) nor headers (credentials); what the client
    sent is escaped (:func:`log_safe`)."""

    def log(self, request: Any, response: Any, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.3fs',
            log_safe(request.remote),
            log_safe(request.method),
            log_safe(request.rel_url.path),
            response.status,
            response.body_length,
            time,
        )


# --- helpers ---------------------------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message, "status": status}, status)


def _unauthorized(message: str = "authentication required") -> web.Response:
    response = _error(401, message)
    response.headers["WWW-Authenticate"] = 'Basic realm="directfs", charset="UTF-8"'
    return response


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _portal_user_ok(request: web.Request, portal: Portal) -> bool:
    """HTTP Basic with the portal user, or ``Bearer <token>``: each only if configured (never a default)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    creds = portal.config.credentials
    if scheme.lower() == "bearer":
        return creds.token is not None and _same(value.strip(), creds.token)
    if scheme.lower() == "basic":
        if creds.username is None or creds.password is None:
            return False
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return _same(user, creds.username) & _same(password, creds.password)
    return False


def _challenges(portal: Portal) -> list[str]:
    """One ``WWW-Authenticate`` per accepted scheme, so a client is never invited to use one that is refused."""
    creds = portal.config.credentials
    found = []
    if creds.basic:
        found.append('Basic realm="directfs", charset="UTF-8"')
    if creds.token is not None:
        found.append('Bearer realm="directfs"')
    return found


async def _rejected_login(request: web.Request, portal: Portal, response: web.Response) -> web.Response:
    """``response`` (a 401), after the failed-login delay when credentials were presented. The sleep holds only this
    request (handler cancellation ends it if the client goes away)."""
    if "Authorization" in request.headers:
        log.info("rejected credentials from %s for %s", log_safe(request.remote), log_safe(request.rel_url.path))
        if portal.config.failed_auth_delay_seconds > 0:
            await asyncio.sleep(portal.config.failed_auth_delay_seconds)
    return response


@web.middleware
async def portal_user_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The login check of every WebDAV and Notification Service handler, with the challenge and the failed-login
    delay (the handlers check again: the middleware only adds the delay in front)."""
    if request.match_info.handler not in _PORTAL_USER_HANDLERS:
        return await handler(request)
    portal = request.app[PORTAL_KEY]
    if _portal_user_ok(request, portal):
        return await handler(request)
    response = _error(401, "authentication required")
    for challenge in _challenges(portal):
        response.headers.add("WWW-Authenticate", challenge)
    return await _rejected_login(request, portal, response)


def _dav_parts(raw: str) -> list[str] | None:
    """The decoded components of a raw (percent-encoded) WebDAV path, or None when it is not one: outside the
    prefix, not UTF-8, or with a ``.`` or ``..`` component. Empty components (``a//b``, a trailing ``/``) drop out."""
    if not raw.startswith(WEBDAV_ROOT):
        return None
    rest = raw[len(WEBDAV_ROOT) :]
    if rest and not rest.startswith("/"):
        return None
    try:
        parts = [urllib.parse.unquote(p, errors="strict") for p in rest.split("/") if p]
    except UnicodeDecodeError:
        return None
    if any(p in (".", "..") for p in parts):
        return None
    return parts


def _resolve(portal: Portal, request: web.Request) -> Node | None:
    parts = _dav_parts(request.rel_url.raw_path)
    return None if parts is None else portal.index.snapshot.nodes.get("/".join(parts))


# --- faults (test only) ------------------------------------------------------------------------------------------


@web.middleware
async def fault_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    portal = request.app[PORTAL_KEY]
    faults = portal.config.faults
    target = "blocks" if request.rel_url.path.startswith("/blocks/") else "portal"
    if faults.active and target in faults.targets:
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.error_rate and portal.rng.random() < faults.error_rate:
            log.info("fault: answering %s with %d", request.rel_url.path, faults.status)
            return _error(faults.status, "injected fault")
    return await handler(request)


# --- WebDAV ----------------------------------------------------------------------------------------------------


async def webdav_options(request: web.Request) -> web.StreamResponse:
    writable = request.app[PORTAL_KEY].config.writable
    allow = _WRITABLE_ALLOW if writable else folder_allow(False)
    return web.Response(headers={"DAV": "1", "Allow": allow, "MS-Author-Via": "DAV"})


async def webdav_propfind(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    depth = request.headers.get("Depth", "infinity").strip().lower()
    if depth not in ("0", "1"):
        # Like Apache (DavDepthInfinity off) and nginx: a whole-tree walk is refused; a missing Depth means infinity.
        return web.Response(status=403, body=finite_depth_error(), content_type="application/xml", charset="utf-8")
    body = await _read_at_most(request, MAX_PROPFIND_BODY_BYTES)
    if body is None:
        return web.Response(status=413, text=f"a PROPFIND body is at most {MAX_PROPFIND_BODY_BYTES} bytes")
    try:
        mode, names = parse_propfind(body)
    except BadPropfind as exc:
        return web.Response(status=400, text=str(exc))
    node = _resolve(portal, request)
    if node is None:
        return web.Response(status=404, text="not found")
    nodes = [node]
    if depth == "1" and node.is_dir:
        nodes.extend(portal.index.snapshot.children.get(node.path, ()))
    # Rendered a piece at a time (issue 13 M6): a big reply's pieces in a worker thread, so the loop only ever waits
    # for a write; the writes wait for the client (backpressure), so memory holds a piece or two, never the reply.
    pieces = multistatus_chunks(nodes, mode, names, writable=portal.config.writable, cache=portal.dav_responses)
    offload = len(nodes) * max(len(names), len(PROPERTIES)) > PROPFIND_INLINE_PROPERTIES

    async def next_piece() -> bytes | None:
        return await asyncio.to_thread(next, pieces, None) if offload else next(pieces, None)

    first, second = await next_piece(), await next_piece()
    if second is None:  # one piece: a plain reply with a Content-Length
        return web.Response(status=207, body=first or b"", content_type="application/xml", charset="utf-8")
    response = web.StreamResponse(status=207)
    response.content_type = "application/xml"
    response.charset = "utf-8"
    await response.prepare(request)
    await response.write(first or b"")
    piece: bytes | None = second
    while piece is not None:
        await response.write(piece)
        piece = await next_piece()
    await response.write_eof()
    return response


async def _read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None when it is longer than ``limit`` bytes (read no further than that)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    while piece := await request.content.read(limit + 1 - len(body)):
        body += piece
        if len(body) > limit:
            return None
    return bytes(body)


async def webdav_get(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    node = _resolve(portal, request)
    if node is None:
        return web.Response(status=404, text="not found")
    if node.is_dir:
        return web.Response(status=405, text="GET of a folder: use PROPFIND", headers={"Allow": "OPTIONS, PROPFIND"})
    return await _send_indexed_file(request, portal.index, node)


async def _send_indexed_file(request: web.Request, index: Index, node: Node) -> web.StreamResponse:
    """The bytes of the file the scan indexed as ``node``, and only those (issue 13 H2, L4).

    The index opens it beneath DIR without following symlinks and checks device, inode, size and mtime
    (``Index.open_node``); this sends from that descriptor. So a file or folder swapped for a symlink, another file
    renamed over it, a FIFO, or a ``NAME.gz`` next to it (aiohttp's ``FileResponse`` serves that to a client that
    accepts gzip) never answer in its place: 404 then. A file changed in place since the scan answers 409 (412 to a
    conditional GET) until the next scan indexes the new version. Preconditions and one ``Range`` (as aiohttp parses
    it) are evaluated against the indexed version, which is what the ETag names."""
    try:
        f = await asyncio.to_thread(index.open_node, node)
    except EntryNotFoundError:
        return web.Response(status=404, text="not found")
    except StaleFileError:
        if "If-Match" in request.headers or "If-Unmodified-Since" in request.headers:
            return web.Response(status=412, text="the file changed since it was listed")
        return web.Response(status=409, text="the file changed since the last scan; it is served after the next one")
    except PermissionError:
        return web.Response(status=403, text="the server may not read this file")
    with f:
        size = node.size
        mtime = node.mtime_ns / 1e9
        refused = _precondition_status(request, node)
        if refused is not None:
            answer = web.Response(status=refused)
            if refused == 304:
                answer.headers["ETag"] = node.etag
                answer.last_modified = mtime
            return answer
        start, count, status = 0, size, 200
        if _range_applies(request, node):
            try:
                rng = request.http_range  # one range; several, or a malformed one, raise ValueError
            except ValueError:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if rng.start is not None:
                if rng.start < 0:  # "bytes=-N": the last N bytes
                    start = max(0, size + rng.start)
                    count = size - start
                else:
                    start = rng.start
                    count = min(rng.stop if rng.stop is not None else size, size) - start
                if start >= size:
                    return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
                status = 206
        response = web.StreamResponse(
            status=status,
            headers={
                "ETag": node.etag,
                "Accept-Ranges": "bytes",
                # One type for every file, as PROPFIND lists it: never guessed from the name, so a .html or .svg in
                # DIR is not rendered by a browser that holds the portal's credentials.
                "Content-Type": "application/octet-stream",
                "X-Content-Type-Options": "nosniff",
            },
        )
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{start + count - 1}/{size}"
        response.content_length = count
        response.last_modified = mtime
        await response.prepare(request)
        if count and request.method != "HEAD":
            if request.transport is None:
                raise ConnectionResetError("the client went away")
            # sendfile(2) from our descriptor (asyncio falls back to reads for TLS): Python never holds the bytes.
            await asyncio.get_running_loop().sendfile(request.transport, f, start, count)
        await response.write_eof()
        return response


def _etag_matches(node: Node, header_etags: tuple[Any, ...], *, weak: bool) -> bool:
    """RFC 9110 comparison of the indexed ETag with an If-Match/If-None-Match list (aiohttp's parsed ``ETag``s)."""
    value = node.etag.strip('"')
    if len(header_etags) == 1 and header_etags[0].value == "*":
        return True
    return any(e.value == value for e in header_etags if weak or not e.is_weak)


def _precondition_status(request: web.Request, node: Node) -> int | None:
    """412 or 304 when the request's preconditions say so (RFC 9110 13.2.2 order), else None."""
    mtime = node.mtime_ns / 1e9
    if_match = request.if_match
    if if_match is not None:
        if not _etag_matches(node, if_match, weak=False):
            return 412
    elif (since := request.if_unmodified_since) is not None and mtime > since.timestamp():
        return 412
    if_none_match = request.if_none_match
    if if_none_match is not None:
        if _etag_matches(node, if_none_match, weak=True):
            return 304
    elif (since := request.if_modified_since) is not None and mtime <= since.timestamp():
        return 304
    return None


def _range_applies(request: web.Request, node: Node) -> bool:
    """Whether Range is honoured: no If-Range, or one naming the indexed version (its strong ETag, or exactly its
    Last-Modified date; RFC 9110 13.1.5). Otherwise the whole file is sent."""
    raw = request.headers.get("If-Range")
    if raw is None:
        return True
    raw = raw.strip()
    if raw.startswith(('"', "W/")):
        return raw == node.etag
    date = request.if_range
    return date is not None and int(date.timestamp()) == node.mtime_ns // 10**9


# --- WebDAV writes (--writable; docs/serve-writes.md) ------------------------------------------------------------


async def _expect_when_read(request: web.Request) -> web.StreamResponse | None:
    """Expect handler of the write routes. aiohttp's default sends ``100 Continue`` before the login is even
    checked; here the handler sends it (:func:`_send_continue`) once login, size and path are checked, so a client
    that waits is refused without sending its body."""
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() != "100-continue":
        return web.Response(status=417, text="only Expect: 100-continue is understood")
    return None


async def _send_continue(request: web.Request) -> None:
    """``100 Continue`` for a client that waits for it (``Expect: 100-continue``), now that its body is wanted."""
    if request.version >= HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # as aiohttp's own handler: the 100 is not part of the response's size


async def _close_if_body_unread(request: web.Request, response: web.StreamResponse) -> None:
    """A reply sent before the request's body was read (a refused upload): close the connection after it. A client
    that waited for ``100 Continue`` never sends that body, so bytes read next would be its next request parsed as
    this one's body; and one that does send it should not have to."""
    if request.body_exists and not request.content.is_eof():
        response.force_close()
        response.headers["Connection"] = "close"  # the headers are prepared before this hook runs


def _write_path(request: web.Request) -> str:
    parts = _dav_parts(request.rel_url.raw_path)
    if parts is None:
        raise WriteRefused(400, f"not a path under {WEBDAV_ROOT}/ (or a '.' or '..' in it)")
    return check_relpath(parts)


def _refused(exc: WriteRefused) -> web.Response:
    return web.Response(status=exc.status, text=exc.message, headers=exc.headers)


def _write_failed(request: web.Request, exc: OSError) -> web.Response:
    """The answer to a write the system refused (ENOSPC, EACCES...): its status, and a line in the log."""
    status = status_for(exc)
    what = f"{log_safe(request.method)} {log_safe(request.rel_url.path)}"
    if status == 507:
        log.warning("%s: %s (the disk of DIR or of the state dir is full)", what, exc.strerror or exc)
        return web.Response(status=507, text="insufficient storage")
    if status == 500:
        log.error("%s failed", what, exc_info=exc)
        return web.Response(status=500, text="internal error")
    log.info("%s refused: %s", what, log_safe(exc.strerror or exc))
    return web.Response(status=status, text=exc.strerror or "refused")


def _quiet(future: asyncio.Future[Any]) -> None:
    """Retrieve a background future's outcome, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


class _Receiving:
    """An :class:`Upload` fed from the event loop: its writes run in worker threads, and it is discarded only once no
    thread uses it (closing a descriptor under a writer could let the number name another file)."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self._busy: asyncio.Future[None] | None = None

    async def run(self, step: Callable[..., None], *args: Any) -> None:
        self._busy = asyncio.ensure_future(asyncio.to_thread(step, *args))
        await asyncio.shield(self._busy)

    def discard(self) -> None:
        busy = self._busy
        if busy is not None and not busy.done():

            def discard_when_done(done: asyncio.Future[None]) -> None:
                _quiet(done)
                self.upload.discard()

            busy.add_done_callback(discard_when_done)
        else:
            self.upload.discard()


async def _open_upload(writer: Writer, path: str) -> _Receiving:
    """:meth:`Writer.open_upload` in a thread; a temp file made for a handler cancelled meanwhile is removed."""
    opening = asyncio.ensure_future(asyncio.to_thread(writer.open_upload, path))
    try:
        return _Receiving(await asyncio.shield(opening))
    except asyncio.CancelledError:

        def discard(done: asyncio.Future[Upload]) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().discard()

        opening.add_done_callback(discard)
        raise


async def _receive(request: web.Request, upload: _Receiving, limit_bytes: int) -> None:
    """Stream the body into the temp file, at most ``limit_bytes`` (413 above), then fsync it. A body shorter than
    its Content-Length is a 400 (aiohttp raises for a connection that ends early; the handler is then cancelled)."""
    pending = bytearray()
    received = 0
    while piece := await request.content.read(UPLOAD_WRITE_BYTES):
        received += len(piece)
        if received > limit_bytes:
            raise WriteRefused(413, f"an upload is at most {limit_bytes} bytes (--max-upload-size)")
        pending += piece
        if len(pending) >= UPLOAD_WRITE_BYTES:
            await upload.run(upload.upload.write, pending)
            pending = bytearray()
    if pending:
        await upload.run(upload.upload.write, pending)
    expected = request.content_length
    if expected is not None and received != expected:
        raise WriteRefused(400, f"the body ended after {received} of {expected} bytes")
    await upload.run(upload.upload.finish)


def _put_conditions(request: web.Request) -> PutConditions:
    if_match = request.if_match
    if_none_match = request.if_none_match
    return PutConditions(
        # Strong comparison (RFC 9110 §13.1.1): a weak ETag never matches; "*" matches any existing file.
        if_match=None
        if if_match is None
        else tuple("*" if e.value == "*" else f'"{e.value}"' for e in if_match if not e.is_weak),
        if_none_match_any=if_none_match is not None and any(e.value == "*" for e in if_none_match),
    )


async def _faulty_put(request: web.Request, portal: Portal) -> web.StreamResponse:
    """--fault-put-drop / --fault-put-status: read half the body and drop the connection, or read it all and answer
    the status. Nothing is written either way."""
    faults = portal.config.faults
    what = log_safe(request.rel_url.path)
    await _send_continue(request)
    if faults.put_drop:
        length = request.content_length
        want = max(1, length // 2) if length else FAULT_DROP_UNKNOWN_LENGTH_BYTES
        got = 0
        while got < want and (piece := await request.content.read(want - got)):
            got += len(piece)
        log.info("fault: dropping the connection of PUT %s after %d bytes of its body", what, got)
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never sent: the connection is gone
    drained = 0
    while drained <= portal.config.max_upload_size_bytes and (piece := await request.content.read(UPLOAD_WRITE_BYTES)):
        drained += len(piece)
    status = faults.put_status or 500
    log.info("fault: answering PUT %s with %d after %d bytes of its body", what, status, drained)
    response = web.Response(status=status, text="injected fault")
    if status == 401:
        for challenge in _challenges(portal):
            response.headers.add("WWW-Authenticate", challenge)
    return response


async def webdav_put(request: web.Request) -> web.StreamResponse:
    """Create or replace a file: 201 new, 204 replaced (with the new version's ETag); the body goes to a temp file in
    the folder, is fsynced, encoded and renamed over the target (server/writes.py)."""
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    config = portal.config
    writer = Writer(portal.index)
    try:
        path = _write_path(request)
        if path and request.rel_url.raw_path.endswith("/"):
            raise WriteRefused(400, "a file's URL does not end with /")
        if "Content-Range" in request.headers:
            raise WriteRefused(400, "a PUT with Content-Range (a partial update) is not supported")
        if request.content_length is not None and request.content_length > config.max_upload_size_bytes:
            raise WriteRefused(413, f"an upload is at most {config.max_upload_size_bytes} bytes (--max-upload-size)")
        if portal.take_put_fault():
            return await _faulty_put(request, portal)
        conditions = _put_conditions(request)
        await asyncio.to_thread(writer.check_put, path, conditions)
        upload = await _open_upload(writer, path)
    except WriteRefused as exc:
        return _refused(exc)
    except OSError as exc:
        return _write_failed(request, exc)
    committing = False  # once the commit runs, it owns the temp file (and removes it if it fails)
    try:
        await _send_continue(request)
        await _receive(request, upload, config.max_upload_size_bytes)
        committing = True
        node, created = await portal.mutate(functools.partial(writer.commit_upload, upload.upload, conditions))
    except WriteRefused as exc:
        return _refused(exc)
    except HttpProcessingError as exc:  # the body was malformed or ended early (the client is usually gone)
        log.info("PUT %s: the body was cut short: %s", log_safe(request.rel_url.path), log_safe(exc.message))
        return web.Response(status=400, text="the body was cut short")
    except OSError as exc:
        return _write_failed(request, exc)
    finally:
        if not committing:
            upload.discard()
    log.info("PUT %s: %d bytes, file id %d", log_safe(request.rel_url.path), node.size, node.id)
    return web.Response(status=201 if created else 204, headers={"ETag": node.etag})


async def webdav_mkcol(request: web.Request) -> web.StreamResponse:
    """Create a folder: 201; 405 when something exists there, 409 when the parent is missing, 415 with a body."""
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    try:
        path = _write_path(request)
        if request.body_exists:
            if request.content_length:
                raise WriteRefused(415, "MKCOL with a body is not supported")
            await _send_continue(request)  # a chunked body, maybe empty: look
            if await request.content.read(1):
                raise WriteRefused(415, "MKCOL with a body is not supported")
        await portal.mutate(functools.partial(Writer(portal.index).mkcol, path))
    except WriteRefused as exc:
        return _refused(exc)
    except OSError as exc:
        return _write_failed(request, exc)
    return web.Response(status=201)


async def webdav_delete(request: web.Request) -> web.StreamResponse:
    """Remove a file, or a folder with everything in it: 204; 404 when it is not there."""
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    try:
        await portal.mutate(functools.partial(Writer(portal.index).delete, _write_path(request)))
    except WriteRefused as exc:
        return _refused(exc)
    except OSError as exc:
        return _write_failed(request, exc)
    return web.Response(status=204)


def _authority(scheme: str, netloc: str) -> tuple[str, int | None] | None:
    """(host, port) of an authority, the scheme's default port filled in; None when unparsable."""
    try:
        parsed = urllib.parse.urlsplit(f"{scheme}://{netloc}")
        port = parsed.port
    except ValueError:
        return None
    return (parsed.hostname or "", port or {"http": 80, "https": 443}.get(scheme.lower()))


def _destination(request: web.Request, portal: Portal) -> str:
    """The relative path a MOVE's ``Destination`` names: an absolute URL of this server or an absolute path, under
    the WebDAV prefix (RFC 4918 §10.3). 400 when missing or not a WebDAV path here, 502 for another server."""
    raw = request.headers.get("Destination", "").strip()
    if not raw:
        raise WriteRefused(400, "MOVE needs a Destination header")
    try:
        target = urllib.parse.urlsplit(raw)
    except ValueError:
        raise WriteRefused(400, "the Destination is not a URL") from None
    if target.scheme or target.netloc:
        if target.scheme.lower() not in ("http", "https"):
            raise WriteRefused(400, "the Destination is not an http(s) URL")
        ours = {_authority(request.scheme, request.host)}
        if portal.base_url:
            base = urllib.parse.urlsplit(portal.base_url)
            ours.add(_authority(base.scheme, base.netloc))
        if _authority(target.scheme, target.netloc) not in ours - {None}:
            raise WriteRefused(502, "the Destination is on another server")
    parts = _dav_parts(target.path)
    if parts is None:
        raise WriteRefused(400, f"the Destination is not a path under {WEBDAV_ROOT}/")
    return check_relpath(parts)


async def webdav_move(request: web.Request) -> web.StreamResponse:
    """Rename a file or folder (file ids stay): 201 to a new name, 204 over an existing one (``Overwrite: T``, the
    default); 412 with ``Overwrite: F`` when the destination exists; 409 when its parent is missing."""
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    try:
        src = _write_path(request)
        dst = _destination(request, portal)
        overwrite = request.headers.get("Overwrite", "T").strip().upper()
        if overwrite not in ("T", "F"):
            raise WriteRefused(400, "Overwrite is T or F")
        created = await portal.mutate(
            functools.partial(Writer(portal.index).move, src, dst, overwrite=overwrite == "T")
        )
    except WriteRefused as exc:
        return _refused(exc)
    except OSError as exc:
        return _write_failed(request, exc)
    return web.Response(status=201 if created else 204)


def _proppatch_plan(
    instructions: list[tuple[str, tuple[str, str], str | None]],
) -> tuple[list[tuple[tuple[str, str], int]], int | None]:
    """Each property's status and the mtime to set. Only ``DAV:getlastmodified`` can be set (200; 409 for a value
    that is not an HTTP date); anything else is 403. PROPPATCH is all or nothing (RFC 4918 §9.2): when one fails,
    the others get 424 and nothing is set."""
    results: list[tuple[tuple[str, str], int]] = []
    mtime_ns: int | None = None
    for action, name, value in instructions:
        if name == LASTMODIFIED and action == "set":
            parsed = parse_http_date(value or "")
            results.append((name, 200 if parsed is not None else 409))
            mtime_ns = parsed if parsed is not None else mtime_ns
        else:
            results.append((name, 403))
    if any(status != 200 for _, status in results):
        return [(name, 424 if status == 200 else status) for name, status in results], None
    return results, mtime_ns


async def webdav_proppatch(request: web.Request) -> web.StreamResponse:
    """Set ``DAV:getlastmodified`` (the mtime) of a file or folder: 207 with a status per property."""
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    try:
        path = _write_path(request)
        node = portal.index.snapshot.nodes.get(path)
        if node is None:
            raise WriteRefused(404, "not found")
        if request.content_length is not None and request.content_length > MAX_PROPPATCH_BODY_BYTES:
            raise WriteRefused(413, f"a PROPPATCH body is at most {MAX_PROPPATCH_BODY_BYTES} bytes")
        await _send_continue(request)
        body = await _read_at_most(request, MAX_PROPPATCH_BODY_BYTES)
        if body is None:
            raise WriteRefused(413, f"a PROPPATCH body is at most {MAX_PROPPATCH_BODY_BYTES} bytes")
        try:
            results, mtime_ns = _proppatch_plan(parse_proppatch(body))
        except BadProppatch as exc:
            raise WriteRefused(400, str(exc)) from None
        if mtime_ns is not None:
            await portal.mutate(functools.partial(Writer(portal.index).set_mtime, path, mtime_ns))
    except WriteRefused as exc:
        return _refused(exc)
    except OSError as exc:
        return _write_failed(request, exc)
    body = proppatch_multistatus(href_for_path(path, is_dir=node.is_dir), results)
    return web.Response(status=207, body=body, content_type="application/xml", charset="utf-8")


async def webdav_read_only(request: web.Request) -> web.StreamResponse:
    """Every write method without --writable: 405, as a read-only WebDAV server answers."""
    return web.Response(status=405, text="this portal is read-only", headers={"Allow": folder_allow(False)})


# --- Direct IO -------------------------------------------------------------------------------------------------


def _compression_type(node: Node) -> str:
    if node.native:
        return "NONE"
    return {"SNAPPY": "SNAPPY", "SNAPPY_RAW": "SNAPPY", "GZIP": "GZIP"}.get(node.compression.value, "NONE")


async def directio(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL_KEY]
    config = portal.config
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    access_key_id = config.credentials.access_key_id
    if access_key_id is None:  # no key pair configured: the surface is off, whatever is sent
        return await _rejected_login(request, portal, _error(401, "Direct IO is off on this portal"))
    if scheme.lower() != "bearer" or not _same(value.strip(), access_key_id):
        return await _rejected_login(request, portal, _error(401, "invalid access key"))
    file_id = request.match_info["file_id"]
    node = portal.index.snapshot.by_id.get(int(file_id)) if _DIGITS_RE.match(file_id) else None
    if node is None or node.is_dir:
        return _error(400, "file not found")
    if node.non_direct:
        return _error(422, "Not all blocks of the requested file are stored on a storage node set to Direct Mode")
    try:
        range_start = int(request.query.get("rangeStart", "0"))
        range_end = int(request.query["rangeEnd"]) if "rangeEnd" in request.query else None
    except ValueError:
        return _error(400, "rangeStart and rangeEnd must be integers")
    if range_start < 0 or (range_end is not None and range_end < range_start):
        return _error(400, "bad block range")
    try:
        return _json(_block_list(portal, node, range_start, range_end))
    except Exception:
        log.exception("directio %s failed", file_id)
        return _error(500, "internal error")


def _block_list(portal: Portal, node: Node, range_start: int, range_end: int | None) -> dict[str, Any]:
    """The v8.3+ reply. ``rangeEnd`` is an inclusive byte offset (as cterasdk's WIP sent it); the reply's
    ``actual_blocks_range.range`` is ``"<first block offset>-<end of last block>"``, end exclusive, so the chunks'
    ``len`` values always sum to ``end - start`` (as in Cyberduck's sample)."""
    config = portal.config
    ttl = config.faults.url_ttl_seconds if config.faults.url_ttl_seconds is not None else config.url_ttl_seconds
    limit = config.max_blocks_per_reply or len(node.blocks)
    chunks: list[dict[str, Any]] = []
    offset = 0
    first_offset: int | None = None
    for block in node.blocks:
        start, offset = offset, offset + block.length
        if block.length == 0:
            if config.empty_files == "empty-list":
                continue  # 0-byte files: "chunks": [] (cterasdk raises BlocksNotFoundError on it)
        elif offset <= range_start or (range_end is not None and start > range_end):
            continue
        if len(chunks) >= limit:
            break
        if first_offset is None:
            first_offset = start
        chunks.append(
            {"url": portal.store.url(block.object_key, base_url=portal.base_url, ttl_seconds=ttl), "len": block.length}
        )
    covered_start = first_offset if first_offset is not None else min(range_start, node.size)
    covered_end = covered_start + sum(c["len"] for c in chunks)
    encrypt_info: dict[str, Any] = {"data_encrypted": node.wrapped_key is not None}
    if node.wrapped_key is not None:
        encrypt_info["wrapped_key"] = node.wrapped_key
    return {
        "encrypt_info": encrypt_info,
        "compression_type": _compression_type(node),
        "chunks": chunks,
        "actual_blocks_range": {"file_size": node.size, "range": f"{covered_start}-{covered_end}"},
    }


# --- signed block objects (local store) -------------------------------------------------------------------------


async def block_get(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL_KEY]
    store = portal.store
    if not isinstance(store, LocalBlockStore):
        return web.Response(status=404, text="blocks are in object storage")
    raw_path = request.rel_url.raw_path
    expires, sig = request.query.get("expires", ""), request.query.get("sig", "")
    if _EXPIRES_RE.fullmatch(expires) and _SIG_RE.fullmatch(sig):
        reason = store.signer.check(raw_path, expires, sig)
    else:
        reason = "missing or malformed expires/sig"
    if reason is not None:
        log.info("refused block %s: %s", log_safe(request.rel_url.path), reason)
        return web.Response(status=403, text="Forbidden: the URL signature is invalid or expired")
    key = request.rel_url.path.lstrip("/")
    if not _OBJECT_KEY_RE.match(key):
        return web.Response(status=404, text="no such object")
    path = store.path(key)
    try:
        etag = await _object_etag(portal, path)
    except FileNotFoundError:
        return web.Response(status=404, text="no such object")
    faults = portal.config.faults
    if "blocks" in faults.targets and (faults.corrupt_blocks_rate or faults.drop_mid_body_rate):
        corrupt = faults.corrupt_blocks_rate and portal.rng.random() < faults.corrupt_blocks_rate
        drop = faults.drop_mid_body_rate and portal.rng.random() < faults.drop_mid_body_rate
        if corrupt or drop:
            data = path.read_bytes()
            return await _faulty_block(request, portal, data, etag, corrupt=bool(corrupt), drop=bool(drop))
    return _DigestFileResponse(path, etag)


class _DigestFileResponse(web.FileResponse):
    """``FileResponse`` (sendfile) whose ETag is the MD5 of the object, as S3 sends for single-part objects: clients
    verify the download against it. aiohttp sets its own mtime/size ETag while preparing, so ours goes on in
    ``on_response_prepare`` (``_set_storage_etag``), the last moment before the headers are sent."""

    def __init__(self, path: Path, etag: str) -> None:
        super().__init__(path, headers={"Content-Type": "application/octet-stream"})
        self.storage_etag = etag


async def _set_storage_etag(request: web.Request, response: web.StreamResponse) -> None:
    if isinstance(response, _DigestFileResponse):
        response.headers["ETag"] = response.storage_etag


async def _object_etag(portal: Portal, path: Path) -> str:
    """``"<md5 hex>"`` of the object at ``path`` (cached per inode/mtime/size). FileNotFoundError when missing."""
    st = os.stat(path)  # one syscall on a local file: cheaper than a thread hop
    cache_key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
    etag = portal.md5s.get(cache_key)
    if etag is None:

        def digest() -> str:
            return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()

        hexdigest = await asyncio.to_thread(digest) if st.st_size > MD5_INLINE_BYTES else digest()
        etag = f'"{hexdigest}"'
        portal.md5s[cache_key] = etag
    return etag


async def _faulty_block(
    request: web.Request, portal: Portal, data: bytes, etag: str, *, corrupt: bool, drop: bool
) -> web.StreamResponse:
    """Damage the bytes on the wire only: the stored object stays intact and the ETag still names its MD5, exactly
    what a flaky network or proxy does; a client that verifies the digest catches it."""
    if corrupt and data:
        buf = bytearray(data)
        pos = portal.rng.randrange(len(buf))
        buf[pos] ^= 0xFF
        data = bytes(buf)
        log.info("fault: corrupted byte %d of %s", pos, request.rel_url.path)
    if not drop:
        return web.Response(body=data, content_type="application/octet-stream", headers={"ETag": etag})
    log.info("fault: dropping the connection mid-body for %s", request.rel_url.path)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "ETag": etag})
    response.content_length = len(data)
    await response.prepare(request)
    await response.write(data[: len(data) // 2])
    if request.transport is not None:
        request.transport.abort()
    return response


# --- Notification Service ---------------------------------------------------------------------------------------


def _no_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Strict JSON: Python's json accepts NaN and Infinity, which no JSON client sends and no number check expects.
_strict_json_loads: Final = functools.partial(json.loads, parse_constant=_no_json_constant)


def longpoll_seconds(timeout_ms: object) -> float | None:
    """How long a long-poll may wait, for the body's ``timeout`` (milliseconds): None (a 400) unless it is a finite
    number >= 0 (a JSON boolean is not a number here). Longer than ``MAX_LONGPOLL_MS`` is clamped to it, not refused:
    the answer is then ``{"changes": false}`` and the client polls again, as against a Portal with a shorter cap."""
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float):
        return None
    if isinstance(timeout_ms, float) and not math.isfinite(timeout_ms):
        return None
    if timeout_ms < 0:
        return None
    return float(min(timeout_ms, MAX_LONGPOLL_MS)) / 1000  # min first: float() of a huge int overflows


def _cursor_refused(problem: CursorProblem) -> web.Response:
    """400/410 with ``{"error": ..., "status": ..., "code": ...}`` (docs/serve-feed.md): the client lists afresh."""
    return _json({"error": problem.message, "status": problem.status, "code": problem.code}, problem.status)


def _feed_fault(portal: Portal) -> int | None:
    """--fault-feed-down-file: None while the feed is up; else the status the file holds (400-599), or 0 for "close
    the connection" (an empty file, or anything else in it). A stat and a tiny read, on the loop: tests only."""
    path = portal.config.faults.feed_down_file
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            text = f.read(16).strip()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    status = int(text) if text.isdigit() and len(text) == 3 else 0
    return status if 400 <= status <= 599 else 0


def _feed_refused(request: web.Request, status: int) -> web.Response:
    if status:
        log.info("fault: the change feed is down: answering %s with %d", request.rel_url.path, status)
        return _json({"error": "the notification service is down (test fault)", "status": status}, status)
    log.info("fault: the change feed is down: closing the connection of %s", request.rel_url.path)
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=503)  # never sent: the connection is gone


async def _notify_args(request: web.Request) -> tuple[dict[str, Any], frozenset[int]] | web.Response:
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    try:
        body = await request.json(loads=_strict_json_loads)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "the body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    folder_ids = body.get("folder_ids") or []
    if not isinstance(folder_ids, list) or not all(isinstance(f, int) and not isinstance(f, bool) for f in folder_ids):
        return _error(400, "folder_ids must be a list of integers")
    if len(folder_ids) > MAX_FOLDER_IDS:
        return _error(400, f"folder_ids: size must be between 0 and {MAX_FOLDER_IDS}")
    return body, frozenset(folder_ids)


async def notify_list(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL_KEY]
    if (fault := _feed_fault(portal)) is not None:
        return _feed_refused(request, fault)
    parsed = await _notify_args(request)
    if isinstance(parsed, web.Response):
        return parsed
    body, folder_ids = parsed
    max_results = body.get("max_results", DEFAULT_MAX_RESULTS)
    if isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1:
        return _error(400, "max_results must be a positive integer")
    page = portal.index.read_feed(
        body.get("cursor"), limit=min(max_results, MAX_RESULTS_CAP), folder_ids=folder_ids or None
    )
    if isinstance(page, CursorProblem):
        return _cursor_refused(page)
    # The events are stored as JSON texts: joined as they are, not parsed and written again (a 2000-event page in
    # about a millisecond instead of tens).
    text = (
        '{"entries": ['
        + ", ".join(page.bodies)
        + f'], "cursor": {json.dumps(page.cursor)}, "has_more": {"true" if page.has_more else "false"}}}'
    )
    return web.Response(text=text, content_type="application/json")


async def notify_longpoll(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL_KEY]
    if (fault := _feed_fault(portal)) is not None:
        return _feed_refused(request, fault)
    parsed = await _notify_args(request)
    if isinstance(parsed, web.Response):
        return parsed
    body, folder_ids = parsed
    wait_seconds = longpoll_seconds(body.get("timeout", DEFAULT_LONGPOLL_MS))
    if wait_seconds is None:
        return _error(400, "timeout must be a finite, non-negative number of milliseconds")
    position = portal.index.check_cursor(body.get("cursor"))
    if isinstance(position, CursorProblem):
        return _cursor_refused(position)
    feed_id, seq = position
    deadline = time.monotonic() + wait_seconds
    # With the feed-down knob a parked poll looks at the file now and then; otherwise only a change wakes it.
    slice_seconds = FEED_FAULT_POLL_SECONDS if portal.config.faults.feed_down_file is not None else math.inf

    def pending() -> bool:
        return portal.index.changes_after(feed_id, seq, folder_ids or None)

    async with portal.changed:
        while not pending():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or portal.stopping:
                return _json({"changes": False})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(portal.changed.wait(), min(remaining, slice_seconds))
            if (fault := _feed_fault(portal)) is not None:
                return _feed_refused(request, fault)
    return _json({"changes": True})


# --- request counts (tests only: --count-requests) -------------------------------------------------------------


@web.middleware
async def count_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count the request as it arrives, before anything can refuse it: a client that has its answer finds it
    counted."""
    if request.rel_url.path != COUNTS_PATH:
        request.app[PORTAL_KEY].request_counts[(request.method, request.rel_url.path)] += 1
    return await handler(request)


async def request_counts(request: web.Request) -> web.StreamResponse:
    """``GET COUNTS_PATH?method=PROPFIND&prefix=/ServicesPortal/webdav/`` -> ``{"count": N}``: requests received so
    far with that method (any, if not given) whose decoded path starts with ``prefix`` (default: every path)."""
    portal = request.app[PORTAL_KEY]
    if not _portal_user_ok(request, portal):
        return _unauthorized()
    method = request.query.get("method")
    prefix = request.query.get("prefix", "")
    count = sum(
        n
        for (m, path), n in portal.request_counts.items()
        if (method is None or m == method) and path.startswith(prefix)
    )
    return _json({"count": count})


# --- the application -------------------------------------------------------------------------------------------


def make_app(portal: Portal) -> web.Application:
    # Faults first (outermost), as a flaky network would be; then the login check with its failed-login delay.
    # Counting outermost of all: every request that arrives is counted, whatever answers it.
    middlewares = [count_middleware] if portal.config.faults.count_requests else []
    if portal.config.faults.active:
        middlewares.append(fault_middleware)
    middlewares.append(portal_user_middleware)
    # client_max_size: PROPFIND and notification bodies are small; 1 MiB bounds a hostile one.
    # (PUT bodies are streamed, never read whole, so this does not bound uploads: --max-upload-size does.)
    app = web.Application(middlewares=middlewares, client_max_size=1024 * 1024)
    app[PORTAL_KEY] = portal
    app.on_response_prepare.append(_set_storage_etag)
    app.on_response_prepare.append(_close_if_body_unread)
    dav = WEBDAV_ROOT + "{tail:(/.*)?}"
    app.router.add_route("OPTIONS", dav, webdav_options)
    app.router.add_route("PROPFIND", dav, webdav_propfind)
    app.router.add_get(dav, webdav_get)  # allow_head: HEAD answers with the GET's headers
    writes = {
        "PUT": webdav_put,
        "MKCOL": webdav_mkcol,
        "DELETE": webdav_delete,
        "MOVE": webdav_move,
        "PROPPATCH": webdav_proppatch,
    }
    for method, handler in writes.items():
        app.router.add_route(
            method, dav, handler if portal.config.writable else webdav_read_only, expect_handler=_expect_when_read
        )
    app.router.add_route("GET", "/directio/{file_id}", directio)
    app.router.add_route("GET", "/blocks/{key:.+}", block_get)
    app.router.add_route("POST", NOTIFY_BASE + "/list", notify_list)
    app.router.add_route("POST", NOTIFY_BASE + "/longpoll", notify_longpoll)
    if portal.config.faults.count_requests:
        app.router.add_route("GET", COUNTS_PATH, request_counts)
    return app


# Handlers behind the portal login (Basic or Bearer token); OPTIONS, /directio and /blocks have their own rules.
_PORTAL_USER_HANDLERS: Final = frozenset(
    {
        webdav_propfind,
        webdav_get,
        webdav_put,
        webdav_mkcol,
        webdav_delete,
        webdav_move,
        webdav_proppatch,
        notify_list,
        notify_longpoll,
        request_counts,
    }
)
