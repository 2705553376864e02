"""An ``OpenFile`` over HTTP ``Range`` GETs: fixed-size blocks of one remote object, checked strictly.

Used wherever a store serves plain bytes: the CTERA Portal's WebDAV GET (the fallback when a file is not in Direct
mode, as Cyberduck does), and the plain WebDAV / HTTP / S3 stores.

Strictness, because a wrong byte is worse than an error (``docs/design-notes.md`` §5, "servers that ignore Range"):
a ranged GET must answer 206 with a ``Content-Range`` naming exactly the asked range and a body of exactly that
length; a 200 is accepted only when it is the whole object and the whole object was asked for. ``If-Match`` with the
version's ETag (when the store gave one) turns a replaced object into 412, reported as ``StaleFileError``.

Nearline stores: with a ``staging`` policy, a "not online yet" answer (503 + Retry-After, S3 InvalidObjectState)
makes the read wait and ask again until the staging deadline, then ``DataNotOnlineError`` (see ``nearline``).

Servers that ignore Range (python's ``http.server``, some CDNs and appliances), for the stores that ask for it
(``RangeFile.stream_when_range_ignored``: the ``http(s)://`` source). The first 200 to a ranged GET is seen from its
status line, before any body byte is read (the body is not wanted and the connection is dropped), and from then on
that open file is read as one plain GET from byte 0 (``_NoRangeReads``), never again as ranges. Ranged GETs already
in flight then get their own 200, dropped unread alike; once a source has seen one such file, a later file's first
fetch goes alone (``probe_first``), so a burst of first reads (read-ahead, ``cp``) costs one ranged GET per file.

* A *stream* (``_Stream``) is one such GET, run by a task of its own. It fills the file's blocks in order, and a read
  of ``[start, end)`` waits until the stream has passed ``end``: a sequential reader gets its bytes as they arrive,
  and the engine's read-ahead (``fetch_block`` of the next blocks) makes the blocks reach the cache in order.
* The stream reads only while some read waits for bytes past its position, else it pauses (it stops reading the
  socket; TCP holds the server back), so memory stays bounded by the blocks reads wait for, what it keeps behind
  it (``STREAM_KEPT_BYTES``) and the block being filled, whatever the size of the file; a reader that stops early
  costs little more than it read. Blocks are handed to the engine as they are (no copy when a whole block is asked).
* A read ahead of the stream waits for it when it adds at most ``no_range_max_size_bytes`` (``--no-range-max-size``,
  at least one block) to what the stream has to read anyway: beyond its position, or beyond the furthest read
  already waiting for it (so a sequential reader's read-ahead, a block further each time, is never refused whatever
  the bound). Further, it fails at once with ``RangeNotSupportedError`` (EOPNOTSUPP), whose message (the one line
  the FUSE layer logs) says why and what to do, instead of a read that waits for gigabytes. (The engine remembers
  that failure like any other for its failed-block memory, 5 s: within it, the same block fails again even for a
  reader the stream could now serve.)
* A read behind the stream whose block is no longer held (the engine evicted it; the stream has moved on) starts a
  new stream from byte 0 when its end is within that same bound, else EOPNOTSUPP. Why: a user expects a file they
  could read once to read again (``cat`` twice, a reader that seeks back to a header), and the bound keeps the price
  of that re-read the same as any other read's; failing every re-read would break ordinary tools, restarting without
  bound would silently turn a 4 KiB read into a read of gigabytes. At most ``MAX_STREAMS_PER_FILE`` streams run for
  one open file, so a re-read does not stop a sequential reader's stream; a new one replaces an idle one.
* Never wrong bytes: the reply must be 200 with an identity body; a ``Content-Length`` other than the file's size
  or a body longer than it is ``StaleFileError``, a shorter one ``DownloadError``; ``If-Match`` as for ranges.

Ownership and states of a stream (all changed on the trio thread; reads only look at them between awaits):

``starting``
    its task sends the GET, with the store's retries and their total budget, and the auth refresh after a 401/403.
``reading``
    body bytes arrive, each socket read bounded by the client's read timeout; every read whose ``end`` is passed is
    woken.
``paused``
    no read waits for bytes past the position; the task waits for one (no network call is in progress).
``done``
    every byte arrived; the blocks still held serve reads until the stream is dropped.
``failed``
    the GET or the body failed; every waiting read gets the error (a fresh copy each); the next read starts a new
    stream (within the bound) after the engine's failed-block memory.
``closed``
    cancelled: the open file was closed (``RangeFile.aclose`` cancels every stream and waits for their tasks), or an
    idle stream was replaced. Its blocks are dropped; a read still waiting looks again.

The task runs as a trio system task (``trio.lowlevel.spawn_system_task``): no nursery of the source layer outlives an
open file, and the engine's nursery belongs to the engine. The open file owns it: its cancel scope and its
``finished`` event, so ``aclose`` ends it and waits for it; anything it raises is kept for the reads, never let out
(a system task that raises would crash the run). A file that is never closed keeps a paused stream (and its
connection) until the trio run ends, which cancels it.
"""

from __future__ import annotations

import collections
import collections.abc
import enum
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
    DirectFSError,
    DownloadError,
    EntryNotFoundError,
    InvalidArgumentError,
    PermissionDeniedError,
    RangeNotSupportedError,
    StaleFileError,
    replay_error,
)
from ..http import (
    BadBody,
    BodyPieces,
    BodyTooLarge,
    RetryPolicy,
    open_stream,
    read_body,
    redact_url,
    send_with_retries,
    transport_error,
)
from ..transfer import BlockingGetter
from ..units import format_size
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
        self._no_range_max_bytes: int | None = None  # set by stream_when_range_ignored
        self._no_range: _NoRangeReads | None = None  # once the server was seen to ignore Range
        self._on_range_ignored: Callable[[], None] | None = None
        # Probe first (stream_when_range_ignored): the first fetch goes alone, the others wait for its status here.
        self._probe_first = False
        self._probe: trio.Event | None = None

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    def stream_when_range_ignored(
        self, max_size_bytes: int, *, probe_first: bool = False, on_detected: Callable[[], None] | None = None
    ) -> None:
        """Read this file as one stream from byte 0 once the server answers a ranged GET with 200 (module
        docstring); reads further than ``max_size_bytes`` (at least one block) from the stream fail with EOPNOTSUPP.
        Without it such a 200 is a ``DownloadError``. ``probe_first`` (the store has seen a server that ignores
        Range): the first fetch goes alone and the others wait for its answer, so a burst of first reads (read-ahead,
        ``cp``'s 8 blocks in flight) does not send ranged GETs that are all dropped. ``on_detected`` is called once
        when this file turns out to be such a file."""
        self._no_range_max_bytes = max_size_bytes
        self._probe_first = probe_first
        self._on_range_ignored = on_detected

    async def aclose(self) -> None:
        """Ends the streams of a server that ignores Range (and waits for their tasks); the client belongs to the
        source."""
        if self._no_range is not None:
            await self._no_range.aclose()
        else:
            await trio.lowlevel.checkpoint()

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
        if self._probe_first and self._no_range is None:
            if self._probe is None:  # this fetch is the probe: its status line tells the others
                self._probe = trio.Event()
                try:
                    return await self._fetch_ranged(start, length, info)
                finally:
                    self._probe_first = False
                    self._probe.set()
            await self._probe.wait()
        if self._no_range is not None:
            return await self._no_range.read(start, length, info)
        return await self._fetch_ranged(start, length, info)

    async def _fetch_ranged(self, start: int, length: int, info: BlockInfo) -> bytes | bytearray:
        if self._no_range is not None:
            return await self._no_range.read(start, length, info)
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
                # The server ignored Range: serving this body at our offset would be wrong bytes. Its body was not
                # read (decided from the status line); from now on this file is read as a stream, if allowed.
                if self._no_range_max_bytes is not None:
                    return await self._streamed(start, length, info)
                raise DownloadError("the server ignored the Range header (200 instead of 206)", block=info)
        else:
            raise self._refusal(status, info)
        if len(reply.content) != length:
            raise DownloadError(f"body of {len(reply.content)} bytes, expected {length}", block=info)
        return reply.content

    def _refusal(self, status: int, info: BlockInfo) -> DirectFSError:
        """The error for a status that carries no data (neither 206 nor 200)."""
        if status in (412, 416):
            return StaleFileError("the file changed on the server since it was opened", filename=self._name)
        if status == 404:
            return EntryNotFoundError("the file is gone from the server", filename=self._name)
        if status in (401, 403):
            return PermissionDeniedError(f"HTTP {status} reading the file", filename=self._name)
        return DownloadError(f"HTTP {status} from {redact_url(self._url)}", block=info)

    async def _streamed(self, start: int, length: int, info: BlockInfo) -> bytes | bytearray:
        """The first 200 to a ranged GET of this file: switch to streams (once; concurrent first reads share it)."""
        if self._no_range is None:
            assert self._no_range_max_bytes is not None
            self._no_range = _NoRangeReads(self, self._no_range_max_bytes)
            if self._on_range_ignored is not None:
                self._on_range_ignored()
            log.info(
                "%s: the server ignores Range (200 to a ranged GET): reading it as one stream from byte 0; a read "
                "more than %s from the stream fails with EOPNOTSUPP (--no-range-max-size)",
                self._name,
                format_size(self._no_range.bound_bytes),
            )
        return await self._no_range.read(start, length, info)

    async def _open_stream(self, info: BlockInfo) -> httpx.Response:
        """The GET of the whole object for a stream, with retries (within the policy's budget) and one auth refresh:
        a 200 whose body is not read yet (the caller closes it), or the tree's error. Nothing of another status's
        body is read."""

        async def attempt() -> httpx.Response:
            headers = dict(await self._headers()) if self._headers is not None else {}
            headers["Accept-Encoding"] = "identity"  # byte offsets are of the stored bytes
            if self._etag:
                headers["If-Match"] = self._etag
            response = await self._client.send(
                self._client.build_request("GET", self._url, headers=headers), stream=True
            )
            if response.status_code != 200:
                await response.aclose()
            return response

        what = f"GET {redact_url(self._url)}"
        try:
            response = await send_with_retries(attempt, policy=self._policy, what=what)
            if (
                response.status_code in (401, 403)
                and self._on_unauthorized is not None
                and await self._on_unauthorized()
            ):
                response = await send_with_retries(attempt, policy=self._policy, what=what)
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject="block", what=what, block=info) from exc
        status = response.status_code
        if status != 200:
            raise (
                self._refusal(status, info)
                if status != 206
                else DownloadError("the server answered 206 to a GET without Range", block=info)
            )
        try:
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise DownloadError(
                    f"the server sent the file {encoding[:40]}-encoded (identity was asked)", block=info
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.strip() != str(self._layout.size):
                raise StaleFileError(
                    f"the object is now {declared.strip()[:40]} bytes, not {self._layout.size}", filename=self._name
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await response.aclose()
            raise
        return response

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


# --- servers that ignore Range (module docstring) ---------------------------------------------------------------

# What a stream keeps of the blocks it passed besides those a read waits for: the blocks ending in the last
# STREAM_KEPT_BYTES, and at least the last STREAM_KEPT_BLOCKS. A reader just behind the stream (the kernel's
# reordered READs, read-ahead that asked a moment late: one body piece from the socket may complete several small
# blocks before the reads of the next ones run) is then served without a new stream from byte 0. 16 MiB, 2 blocks:
# about two of the default 8 MiB blocks, a small fraction of the default 256 MiB cache.
STREAM_KEPT_BYTES: Final = 16 * 1024 * 1024
STREAM_KEPT_BLOCKS: Final = 2
# Streams of one open file at once: a re-read from the start (a second pass, a reader going back to a header) gets
# its own instead of stopping the sequential reader's; each holds a connection, so few.
MAX_STREAMS_PER_FILE: Final = 2
# Closing a stream's reply when it ends: a socket close, bounded even when the stream was cancelled.
STREAM_CLOSE_SECONDS: Final = 5.0
# A stream's body is bounded by the file's size in ``_Stream._take`` (more is ESTALE), not by BodyPieces.
_UNBOUNDED: Final = 2**63 - 1
# Scheduling rounds a read that would be refused as too far ahead waits for the reads started with it to say where
# they wait (``_NoRangeReads.read``); each is one trio checkpoint, the fetches of one burst take one round.
_REFUSAL_CHECKPOINTS: Final = 2
# A read that found its stream replaced looks for another this many times (a stream is replaced only when no read
# waits for it, so more than once means a bug, reported as EIO rather than a loop).
_MAX_LOOKS: Final = 4

BlockBytes = bytes | bytearray


class _State(enum.Enum):
    STARTING = "starting"
    READING = "reading"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CLOSED = "closed"


_ALIVE: Final = frozenset({_State.STARTING, _State.READING, _State.PAUSED})


@dataclass(eq=False)
class _Waiter:
    end: int  # woken once the stream's position reaches this (or the stream ends)
    event: trio.Event


class _Stream:
    """One GET of the whole object, read in order into the file's blocks (states: the module docstring)."""

    def __init__(self, file: RangeFile, number: int) -> None:
        self._file = file
        self._layout = file.layout
        self.number = number  # 1, 2, ... per open file (logs)
        self.state = _State.STARTING
        self.position = 0  # bytes received
        self.index = 0  # the block being filled; block_count once every byte arrived
        self._current = bytearray()  # the bytes of block ``index`` received so far
        self.blocks: dict[int, BlockBytes] = {}  # complete blocks held: pinned ones, the kept ones
        self._pins: collections.Counter[int] = collections.Counter()
        self._waiters: list[_Waiter] = []
        self._demand = trio.Event()  # set when a read wants bytes past the position (wakes a paused stream)
        self.error: DirectFSError | None = None
        self.scope = trio.CancelScope()
        self.finished = trio.Event()

    @property
    def alive(self) -> bool:
        return self.state in _ALIVE

    @property
    def busy(self) -> bool:
        return bool(self._waiters)

    @property
    def target(self) -> int:
        """Where the stream is going: its position, or the end of the furthest read waiting for it. A new read
        costs what it adds beyond this (a sequential reader's read-ahead adds a block at a time)."""
        return max([self.position, *(waiter.end for waiter in self._waiters)])

    def _block_end(self, index: int) -> int:
        return self._layout.block_start(index) + self._layout.block_length(index)

    def _needed(self, start: int, end: int) -> range:
        return range(self._layout.block_at(start), self._layout.block_at(end - 1) + 1)

    def holds(self, start: int, end: int) -> bool:
        """Whether every byte of ``[start, end)`` is in memory now."""
        for index in self._needed(start, end):
            if index in self.blocks:
                continue
            if index == self.index and self.position >= min(end, self._block_end(index)):
                continue
            return False
        return True

    def reachable(self, start: int, end: int) -> bool:
        """Whether this stream, still running, will have ``[start, end)``: no needed block was dropped."""
        return self.alive and all(index in self.blocks or index >= self.index for index in self._needed(start, end))

    def copy(self, start: int, end: int) -> BlockBytes:
        """``[start, end)`` (``holds`` is true): a held block itself when it is asked whole, else a copy."""
        pieces: list[memoryview] = []
        for index in self._needed(start, end):
            data = self.blocks.get(index, self._current)
            base = self._layout.block_start(index)
            if data is not self._current and start == base and end == base + len(data):
                return data  # a whole block: no copy (the engine never mutates what it is given)
            pieces.append(memoryview(data)[max(start, base) - base : min(end, base + len(data)) - base])
        return b"".join(pieces)

    async def read(self, start: int, end: int) -> BlockBytes | None:
        """Wait until ``[start, end)`` has arrived and return it; the stream's error if it failed first; None if it
        was closed (the caller looks again). The needed blocks are pinned meanwhile, so they are kept."""
        needed = self._needed(start, end)
        for index in needed:
            self._pins[index] += 1
        waiter = _Waiter(end, trio.Event())
        self._waiters.append(waiter)
        self._demand.set()
        try:
            await waiter.event.wait()
            if self.holds(start, end):
                return self.copy(start, end)
            if self.state is _State.FAILED and self.error is not None:
                raise replay_error(self.error)
            return None
        finally:
            self._waiters.remove(waiter)
            for index in needed:
                self._pins[index] -= 1
                if not self._pins[index]:
                    del self._pins[index]
            self._prune()

    def close(self) -> None:
        self.scope.cancel()

    def _prune(self) -> None:
        floor = self.index - STREAM_KEPT_BLOCKS
        start = self.position - STREAM_KEPT_BYTES
        for index in [i for i in self.blocks if i < floor and i not in self._pins and self._block_end(i) <= start]:
            del self.blocks[index]

    def _info(self) -> BlockInfo:
        index = min(self.index, self._layout.block_count - 1)
        start = self._layout.block_start(index)
        return BlockInfo(self._file._name, index + 1, start, self._layout.block_length(index))

    def _take(self, chunk: bytes) -> None:
        """Append a piece of the body: complete blocks, wake the reads it satisfies."""
        layout = self._layout
        view = memoryview(chunk)
        while view:
            if self.index >= layout.block_count:
                raise StaleFileError(
                    f"the server sent more than the {layout.size} bytes the file had", filename=self._file._name
                )
            room = self._block_end(self.index) - self.position
            piece = view[:room]
            self._current += piece
            self.position += len(piece)
            view = view[len(piece) :]
            if self.position == self._block_end(self.index):
                self.blocks[self.index] = self._current
                self._current = bytearray()
                self.index += 1
                self._prune()
        for waiter in self._waiters:
            if waiter.end <= self.position:
                waiter.event.set()

    def _wanted(self) -> bool:
        return any(waiter.end > self.position for waiter in self._waiters)

    async def run(self) -> None:
        """The stream's task (a system task: it raises nothing but trio's own cancellation)."""
        try:
            with self.scope:
                await self._transfer()
        except Exception as exc:
            if isinstance(exc, DirectFSError):
                self.error = exc
            else:  # a bug: keep it for the reads as EIO, with its traceback in the log once
                log.error("stream %d of %s failed unexpectedly", self.number, self._file._name, exc_info=exc)
                self.error = DownloadError(f"unexpected {type(exc).__name__} reading the stream", block=self._info())
            self.state = _State.FAILED
            log.debug("stream %d of %s failed at byte %d: %s", self.number, self._file._name, self.position, exc)
        finally:
            if self.state in _ALIVE:
                self.state = _State.CLOSED
            if self.state is _State.CLOSED:
                self.blocks.clear()
                self._current = bytearray()
            for waiter in self._waiters:
                waiter.event.set()
            self.finished.set()

    async def _transfer(self) -> None:
        file = self._file
        size = self._layout.size
        response = await file._open_stream(self._info())
        pieces = BodyPieces(response, _UNBOUNDED)  # _take checks the length against the file's size
        try:
            self.state = _State.READING
            while (chunk := await pieces.next()) is not None:
                self._take(chunk)
                while self.position < size and not self._wanted():
                    self.state = _State.PAUSED
                    self._demand = trio.Event()
                    await self._demand.wait()
                    self.state = _State.READING
        except httpx.HTTPError as exc:
            what = f"GET {redact_url(file._url)} (streamed, at byte {self.position})"
            raise transport_error(exc, subject="block", what=what, block=self._info()) from exc
        finally:
            try:
                await pieces.aclose()
            finally:
                with trio.move_on_after(STREAM_CLOSE_SECONDS, shield=True):
                    await response.aclose()
        if self.position < size:
            raise DownloadError(f"the body ended after {self.position} of {size} bytes", block=self._info())
        self.state = _State.DONE
        log.debug("stream %d of %s: all %d bytes arrived", self.number, file._name, size)


class _NoRangeReads:
    """The reads of one open file whose server ignores Range: served from its streams (module docstring)."""

    def __init__(self, file: RangeFile, max_size_bytes: int) -> None:
        self._file = file
        layout = file.layout
        largest_block = max((layout.block_length(i) for i in range(layout.block_count)), default=0)
        # At least one block: a block from a fresh stream is always within reach.
        self.bound_bytes = max(max_size_bytes, largest_block)
        self._streams: list[_Stream] = []  # the ones reads may use
        self._tasks: list[_Stream] = []  # every stream whose task has not finished (aclose waits for them)
        self._started = 0
        self._closed = False

    async def read(self, start: int, length: int, info: BlockInfo) -> BlockBytes:
        end = start + length
        patience = _REFUSAL_CHECKPOINTS
        for _ in range(_MAX_LOOKS + _REFUSAL_CHECKPOINTS):
            if self._closed:
                raise DownloadError("read of a closed file", block=info)
            for stream in self._streams:
                if stream.holds(start, end):
                    data = stream.copy(start, end)  # before the checkpoint: the stream may move on in it
                    await trio.lowlevel.checkpoint()
                    return data
            reachable = [stream for stream in self._streams if stream.reachable(start, end)]
            if reachable:
                # The cheapest: the one whose reading this read extends least (then the one furthest on).
                stream = min(reachable, key=lambda s: (max(0, end - s.target), -s.position))
                if end - stream.target > self.bound_bytes:
                    if patience:
                        # Read-ahead comes as a burst of block fetches that trio starts in any order: the later
                        # blocks must not be refused because they ran before the earlier ones had said they wait.
                        patience -= 1
                        await trio.lowlevel.checkpoint()
                        continue
                    raise RangeNotSupportedError(
                        f"the server ignores Range, and this read is {format_size(end - stream.target)} ahead of "
                        f"the stream, more than --no-range-max-size ({format_size(self.bound_bytes)}); read the "
                        "file in order (cp, cat) or raise --no-range-max-size",
                        block=info,
                    )
            else:
                if end > self.bound_bytes:
                    if patience:  # as above: the burst's first block may be about to start a stream
                        patience -= 1
                        await trio.lowlevel.checkpoint()
                        continue
                    raise RangeNotSupportedError(
                        f"the server ignores Range, and reading this far ({format_size(end)}) means streaming the "
                        f"file from its start, more than --no-range-max-size ({format_size(self.bound_bytes)}); "
                        "read the file in order (cp, cat) or raise --no-range-max-size",
                        block=info,
                    )
                stream = self._start(info)
            got = await stream.read(start, end)
            if got is not None:
                return got
        raise DownloadError("the stream of this file kept closing under the read", block=info)

    def _start(self, info: BlockInfo) -> _Stream:
        self._streams = [stream for stream in self._streams if stream.alive]  # done, failed: their blocks go
        self._tasks = [stream for stream in self._tasks if not stream.finished.is_set()]
        if len(self._streams) >= MAX_STREAMS_PER_FILE:
            idle = [stream for stream in self._streams if not stream.busy]
            if not idle:
                raise RangeNotSupportedError(
                    f"the server ignores Range, and the {MAX_STREAMS_PER_FILE} streams of this file are all in use "
                    "by other reads further on",
                    block=info,
                )
            victim = min(idle, key=lambda s: s.position)
            victim.close()
            self._streams.remove(victim)
        self._started += 1
        stream = _Stream(self._file, self._started)
        self._streams.append(stream)
        self._tasks.append(stream)
        trio.lowlevel.spawn_system_task(stream.run, name=f"directfs stream {self._started} of {self._file._name}")
        log.debug("%s: stream %d from byte 0", self._file._name, self._started)
        return stream

    async def aclose(self) -> None:
        self._closed = True
        self._streams = []
        for stream in self._tasks:
            stream.close()
        for stream in self._tasks:
            await stream.finished.wait()
        self._tasks = []
        await trio.lowlevel.checkpoint()
