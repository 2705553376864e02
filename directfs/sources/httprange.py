"""An ``OpenFile`` over HTTP ``Range`` GETs: fixed-size blocks of one remote object, checked strictly.

Used wherever a store serves plain bytes: the CTERA Portal's WebDAV GET (the fallback when a file is not in Direct
mode, as Cyberduck does), and the plain WebDAV / HTTP / S3 stores.

Strictness, because a wrong byte is worse than an error (``docs/design-notes.md`` §5, "servers that ignore Range"):
a ranged GET must answer 206 with a ``Content-Range`` naming exactly the asked range and a body of exactly that
length; a 200 is accepted only when it is the whole object and the whole object was asked for. ``If-Match`` with the
version's ETag (when the store gave one) turns a replaced object into 412, reported as ``StaleFileError``.

Nearline stores: with a ``staging`` policy, a "not online yet" answer (503 + Retry-After, S3 InvalidObjectState)
makes the read wait and ask again until the staging deadline, then ``DataNotOnlineError`` (see ``nearline``).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import httpx
import trio

from ..errors import (
    BlockInfo,
    DataNotOnlineError,
    DownloadError,
    EntryNotFoundError,
    InvalidArgumentError,
    PermissionDeniedError,
    StaleFileError,
)
from ..http import (
    BadBody,
    BodyTooLarge,
    RetryPolicy,
    open_stream,
    read_body,
    redact_url,
    send_with_retries,
    transport_error,
)
from ..transfer import BlockingGetter
from ..workers import run_job
from .base import BlockLayout
from .nearline import ERROR_BODY_BYTES, StagingPolicy, StagingWait, not_online_hint

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)

# Build per-request headers (auth that may rotate, e.g. a re-read bearer token file) just before each attempt.
HeaderFactory = Callable[[], Awaitable[dict[str, str]]]


@dataclass(frozen=True)
class _Body:
    status_code: int
    headers: httpx.Headers
    content: bytes | bytearray


class RangeFile:
    """Blocks of one object at ``url``; ``layout`` fixes the block boundaries and the size."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        layout: BlockLayout,
        *,
        name: str,
        etag: str | None,
        policy: RetryPolicy,
        headers: HeaderFactory | None = None,
        on_unauthorized: Callable[[], Awaitable[bool]] | None = None,
        staging: StagingPolicy | None = None,
        getter: BlockingGetter | None = None,
    ) -> None:
        self._client = client
        self._getter = getter  # GETs in worker threads (libcurl); None: httpx on the trio thread
        self._url = url
        self._layout = layout
        self._name = name  # what errors and logs call this file (a path, never a URL with a query)
        # Weak validators cannot be used with If-Match (RFC 9110 13.1.1): send only strong ETags.
        self._etag = etag if etag and not etag.startswith("W/") else None
        self._policy = policy
        self._headers = headers
        self._on_unauthorized = on_unauthorized
        self._staging = staging

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    async def aclose(self) -> None:
        """Nothing to release: the client belongs to the source."""

    async def fetch_block(self, index: int) -> bytes | bytearray:
        start = self._layout.block_start(index)
        length = self._layout.block_length(index)
        if length == 0:
            return b""
        return await self._fetch(start, length, BlockInfo(self._name, index + 1, start, length))

    async def fetch_range(self, start: int, length: int) -> bytes | bytearray:
        """``length`` bytes from ``start`` (``RangeReadable``): the same strict GET as a block. Errors name the block
        holding ``start`` (its 1-based number) with the range's own offset and length."""
        size = self._layout.size
        if start < 0 or length <= 0 or start + length > size:
            raise InvalidArgumentError(f"range {start}+{length} outside a file of {size} bytes", filename=self._name)
        return await self._fetch(start, length, BlockInfo(self._name, self._layout.block_at(start) + 1, start, length))

    async def _fetch(self, start: int, length: int, info: BlockInfo) -> bytes | bytearray:
        """One strictly checked ranged GET of ``[start, start + length)`` (module docstring), ``length > 0``."""
        whole = start == 0 and length == self._layout.size
        reply = await self._get(start, length, info)
        if reply.status_code in (401, 403) and self._on_unauthorized is not None and await self._on_unauthorized():
            reply = await self._get(start, length, info)  # credentials were refreshed (e.g. a rotated token)
        if self._staging is not None:
            waiting: StagingWait | None = None
            while (hint := not_online_hint(reply.status_code, reply.headers, reply.content)) is not None:
                waiting = waiting or StagingWait(self._staging, self._name)
                if not await waiting.wait(hint):
                    raise DataNotOnlineError(block=info)
                reply = await self._get(start, length, info)
        status = reply.status_code
        if status == 206:
            match = _CONTENT_RANGE.match(reply.headers.get("content-range", ""))
            if not match or int(match.group(1)) != start or int(match.group(2)) != start + length - 1:
                raise DownloadError("the server answered a different range than asked", block=info)
            total = match.group(3)
            if total != "*" and int(total) != self._layout.size:
                raise StaleFileError(f"the object is now {total} bytes, not {self._layout.size}", filename=self._name)
        elif status == 200:
            if not whole:
                # The server ignored Range: serving this body at our offset would be wrong bytes.
                raise DownloadError("the server ignored the Range header (200 instead of 206)", block=info)
        elif status in (412, 416):
            raise StaleFileError("the file changed on the server since it was opened", filename=self._name)
        elif status == 404:
            raise EntryNotFoundError("the file is gone from the server", filename=self._name)
        elif status in (401, 403):
            raise PermissionDeniedError(f"HTTP {status} reading the file", filename=self._name)
        else:
            raise DownloadError(f"HTTP {status} from {redact_url(self._url)}", block=info)
        if len(reply.content) != length:
            raise DownloadError(f"body of {len(reply.content)} bytes, expected {length}", block=info)
        return reply.content

    async def _get(self, start: int, length: int, info: BlockInfo) -> _Body:
        getter = self._getter
        deadline = trio.current_time() + self._policy.total_budget_seconds
        # A 200 is the whole object: its body is wanted only when the whole object was asked for.
        wanted_statuses = _RANGE_STATUSES if start == 0 and length == self._layout.size else _PART_STATUSES

        async def attempt() -> _Body:
            headers = dict(await self._headers()) if self._headers is not None else {}
            headers["Range"] = f"bytes={start}-{start + length - 1}"
            headers["Accept-Encoding"] = "identity"  # byte offsets are of the stored bytes, not of a re-encoding
            if self._etag:
                headers["If-Match"] = self._etag
            if getter is not None:
                # One job in a worker thread; its own deadline is what is left of the operation's budget. The body
                # limit is the range: a server that ignores Range is refused from its Content-Length, unread.
                remaining = max(0.001, deadline - trio.current_time())
                get = functools.partial(_threaded_get, getter, self._url, headers, length, remaining, wanted_statuses)
                return await run_job(get)
            async with open_stream(self._client, "GET", self._url, headers=headers) as response:
                status = response.status_code
                if status not in wanted_statuses:
                    # Decided from the status line (issue 13 M2): a 200 for a part of the object is refused by
                    # ``_fetch`` without its body being read; of an error body a small prefix is enough to
                    # recognise S3's InvalidObjectState (nearline).
                    error_body = await read_body(response, ERROR_BODY_BYTES, prefix=True) if status != 200 else b""
                    return _Body(status, response.headers, bytes(error_body))
                return _Body(status, response.headers, await read_body(response, length))

        try:
            return await send_with_retries(attempt, policy=self._policy, what=f"GET {redact_url(self._url)}")
        except BodyTooLarge as exc:
            raise DownloadError(
                f"the server sent {exc.size}+ bytes for a range of {length} (it ignored the Range header?)", block=info
            ) from None
        except BadBody as exc:
            raise DownloadError(f"unreadable reply ({exc})", block=info) from None
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject="block", what=f"GET {redact_url(self._url)}", block=info) from exc


_RANGE_STATUSES: Final = frozenset({200, 206})
_PART_STATUSES: Final = frozenset({206})


def _threaded_get(
    getter: BlockingGetter,
    url: str,
    headers: dict[str, str],
    length: int,
    timeout: float,
    wanted_statuses: frozenset[int],
) -> _Body:
    """One ranged GET in a worker thread: the body of a wanted status (at most ``length`` bytes, else
    ``BodyTooLarge``), or a small prefix of any other body (enough to recognise S3's InvalidObjectState)."""
    reply = getter.get(
        url,
        limit_bytes=length,
        timeout_seconds=timeout,
        headers=headers,
        body_statuses=wanted_statuses,
        error_body_bytes=ERROR_BODY_BYTES,
    )
    content = reply.body if reply.status_code in wanted_statuses else bytes(reply.body)
    return _Body(reply.status_code, reply.headers, content)
