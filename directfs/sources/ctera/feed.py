"""The Portal's change feed, the Notification Service (docs/ctera-direct-io.md §8.3): its protocol client and the
service loop that keeps one mount's metadata caches honest while they are trusted for an hour.

Protocol (``PortalFeed.list_changes``, ``PortalFeed.wait_for_changes``)
    ``POST {portal}/ServicesPortal/v2/api/metadata/list`` with ``{"folder_ids", "cursor", "max_results"}`` answers
    ``{"entries": [...], "cursor": "...", "has_more": bool}``; ``POST .../longpoll`` with ``{"folder_ids", "cursor",
    "timeout"}`` (milliseconds) answers ``{"changes": bool}``. Requests carry the WebDAV credentials (Basic or Bearer:
    docs/ctera-direct-io.md §14) on an HTTP client of the feed's own, so a parked long-poll never holds a listing
    connection.
    Replies are untrusted: bodies are bounded, JSON is strict, every field is type-checked (``parse_event``). An entry
    that names neither a usable ``guid`` nor a ``parent_guid`` cannot be placed: the batch then resynchronises the
    caches (``ChangeSink.feed_reset``) instead of guessing.

Service loop (``PortalFeed.run``), cterasdk's loop with deadlines and a state machine::

    starting --list(cursor null) .. until has_more is false--> up        sink.feed_up(new_cursor=True)
    up --longpoll {"changes": true}--> list .. until has_more false --> up
    up --longpoll {"changes": false}--> longpoll again
    any --transport error, deadline, 5xx, 429, malformed reply--> down   sink.feed_down(); list(cursor) after backoff
    down --list(cursor) .. caught up--> up                            sink.feed_up(new_cursor=False): nothing missed
    any --the cursor refused (a 4xx but 401/403/405/429/501)--> reset    sink.feed_reset(); list(cursor null) at once
    starting --404/405/501, 401/403, a 400 to a null cursor--> unsupported: the loop ends; the short TTL stays

* The first ``list`` has a null cursor. docs/ctera-direct-io.md §8.3 has no way to start at the current end of the
  feed, so the Portal replays what it keeps (the reference portal: its last 100,000 events, ``--feed-retention``,
  ~450 bytes each) and the loop pages through it at ``max_results`` per call. The replay is history, not news: its
  events are counted and not applied. What the mount cached before the feed came up is trusted for the short TTL
  only (its stamps carry no epoch), exactly as without a feed, so a replayed event has nothing long-trusted to correct;
  applying it would only drop fresh answers, which then fail while the Portal is down (a listing made in the first
  second of a mount, tests/mount/test_faults_mount.py). The mount trusts nothing for long until the replay is done.
* Deadlines: a ``list`` call has ``list_deadline_seconds`` for all its attempts; a long-poll asks the Portal to wait
  ``longpoll_timeout_ms`` and is given that plus ``longpoll_margin_seconds`` (a Portal that stops answering is "down"
  within one long-poll deadline); resolving the cloud folder ids is one PROPFIND under the source's deadlines.
* Backoff after a failure: ``min(backoff_max, backoff_base * 2**(n-1))`` times a uniform jitter in [0.5, 1], n the
  failures since the feed was last up. A cycle that learnt nothing (``changes`` false, or a list of no entries) is
  followed by at least ``min_cycle_seconds`` before the next request, so a Portal answering long-polls at once cannot
  make us spin.

Concurrency: ``run`` is one trio task per mount, the only writer of this object's state and the only caller of the
sink (every sink method is synchronous, so each batch is applied between two FUSE handlers' awaits, never in the
middle of one). ``statistics`` is read by the metrics thread: plain numbers and one string, each read atomic under
the GIL; it never calls into trio.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import httpx
import trio

from ...errors import ConfigError, DirectFSError, MalformedListingError
from ...http import HTTPSettings, RetryPolicy, build_client, redact_url
from ..base import ChangeEvent, ChangeSink
from ..httpstore import HTTPAuth, request

log = logging.getLogger(__name__)

NOTIFY_PATH: Final = "/ServicesPortal/v2/api/metadata"
# A list reply of 10,000 entries (the reference portal's cap) is ~5 MB of JSON; 64 MiB bounds a hostile one.
MAX_REPLY_BYTES: Final = 64 * 1024 * 1024
MAX_GUID_CHARS: Final = 256  # real guids are 36 characters; anything much longer is not one
MAX_CURSOR_CHARS: Final = 4096
_DIGITS: Final = re.compile(r"[0-9]{1,19}")

State = Literal["starting", "up", "down", "unsupported", "stopped"]
# The states statistics() reports, in a fixed order (the metrics' label values).
STATES: Final[tuple[State, ...]] = ("starting", "up", "down", "unsupported", "stopped")


@dataclass(frozen=True)
class FeedSettings:
    # 10 s: what cterasdk sends and the reference portal's default. Longer saves requests, but a Portal that died
    # silently is noticed only after timeout + margin ("falls back within one long-poll deadline").
    longpoll_timeout_ms: int = 10_000
    # The answer's trip and a busy Portal: 5 s over the Portal's own timeout before we call it dead.
    longpoll_margin_seconds: float = 5.0
    # One list call, all its attempts: the metadata deadline of the filesystem (VfsSettings), for the same reason.
    list_deadline_seconds: float = 20.0
    # cterasdk's page size; the reference portal caps at 10,000 and a real Portal's cap is not documented.
    max_results: int = 2000
    # First retry after 0.25-0.5 s (a restarting Portal), then doubling up to 10 s: a feed that comes back is used
    # again within ~10 s, and a thousand mounts of a dead Portal cost it 100 requests/s, less than the PROPFINDs the
    # short TTL costs them meanwhile.
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 10.0
    min_cycle_seconds: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.longpoll_timeout_ms <= 3_600_000 or self.max_results < 1:
            raise ConfigError("the long-poll timeout must be 1 ms to 1 h and max_results at least 1")
        if self.longpoll_margin_seconds < 0 or self.list_deadline_seconds <= 0 or self.backoff_base_seconds <= 0:
            raise ConfigError("feed deadlines and delays must be positive")

    @property
    def longpoll_deadline_seconds(self) -> float:
        return self.longpoll_timeout_ms / 1000 + self.longpoll_margin_seconds

    def backoff_seconds(self, failures: int, rng: random.Random) -> float:
        ceiling = min(self.backoff_max_seconds, self.backoff_base_seconds * 2.0 ** max(0, failures - 1))
        return float(ceiling * rng.uniform(0.5, 1.0))


# --- parsing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeBatch:
    """One ``list`` reply: the usable events, how many entries could not be placed, the next cursor."""

    events: tuple[ChangeEvent, ...]
    unusable: int
    cursor: str
    has_more: bool


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedListingError(f"{what}: the reply is not JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise MalformedListingError(f"{what}: the reply is not a JSON object")
    return value


def _guid(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_GUID_CHARS and value.isprintable() and value.strip():
        return value
    return None


def _iso_ns(value: object) -> int | None:
    """An ISO-8601 time (``2026-01-02T03:04:05.123Z``) as nanoseconds since the epoch; None if absent or odd."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    try:
        return int(when.timestamp() * 1e9)
    except (OverflowError, OSError, ValueError):
        return None


def parse_event(raw: object) -> ChangeEvent | None:
    """One feed entry as a ``ChangeEvent``, or None when it can be placed nowhere (neither a usable ``guid`` nor a
    ``parent_guid``). Fields of the wrong type are dropped, never guessed: an odd ``size`` is None, an odd ``name``
    empty (the event then invalidates the parent's listing, not a name)."""
    if not isinstance(raw, dict):
        return None
    guid = _guid(raw.get("guid"))
    parent_guid = _guid(raw.get("parent_guid"))
    if guid is None and parent_guid is None:
        return None
    name = raw.get("name")
    deleted = raw.get("deleted", False)
    kind = raw.get("type")
    file_id = raw.get("id")
    size = raw.get("size")
    return ChangeEvent(
        guid=guid or "",
        parent_guid=parent_guid,
        name=name if isinstance(name, str) and len(name) <= 1024 else "",
        # A "deleted" that is not a boolean cannot be believed either way: treated as deleted, the safe reading
        # (the cached entry is dropped and asked for again).
        deleted=deleted if isinstance(deleted, bool) else True,
        is_dir=isinstance(kind, str) and kind.lower() in ("folder", "dir", "directory"),
        file_id=str(file_id)
        if isinstance(file_id, int) and not isinstance(file_id, bool) and file_id >= 0
        else (file_id if isinstance(file_id, str) and _DIGITS.fullmatch(file_id) else None),
        size=size if isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 2**63 else None,
        mtime_ns=_iso_ns(raw.get("file_timestamp")),
        changed_at_ns=_iso_ns(raw.get("portal_modified_date")) or _iso_ns(raw.get("modified")),
    )


def parse_list_reply(body: bytes) -> ChangeBatch:
    """A ``metadata/list`` reply; ``MalformedListingError`` when its shape is wrong (no cursor, no entries list...)."""
    reply = _json_object(body, "metadata/list")
    entries, cursor, has_more = reply.get("entries"), reply.get("cursor"), reply.get("has_more")
    if not isinstance(entries, list):
        raise MalformedListingError("metadata/list: the reply has no entries list")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR_CHARS or not cursor.isprintable():
        raise MalformedListingError("metadata/list: the reply has no usable cursor")
    if not isinstance(has_more, bool):
        raise MalformedListingError("metadata/list: has_more is not a boolean")
    events = []
    unusable = 0
    for raw in entries:
        event = parse_event(raw)
        if event is None:
            unusable += 1
        else:
            events.append(event)
    return ChangeBatch(tuple(events), unusable, cursor, has_more)


def parse_longpoll_reply(body: bytes) -> bool:
    changes = _json_object(body, "metadata/longpoll").get("changes")
    if not isinstance(changes, bool):
        raise MalformedListingError("metadata/longpoll: changes is not a boolean")
    return changes


# --- failures, as data: what the loop does next depends on the kind, not on an exception class ----------------------

Kind = Literal["transient", "unsupported", "cursor"]


@dataclass(frozen=True)
class FeedFailure:
    kind: Kind
    detail: str


def classify_status(status: int, *, cursor: str | None, ever_up: bool) -> Kind:
    """What a non-200 answer means. 429 and 5xx: try again later. 404/405/501: no feed here (unless it worked
    before: a Portal behind a restarting proxy); 401/403: not for these credentials (likewise). Any other 4xx to a
    cursor: the cursor is refused (expired); to a null cursor: a protocol we do not speak."""
    if status == 429 or (status >= 500 and status != 501):
        return "transient"
    if status in (401, 403, 404, 405, 501):
        if status == 404 and cursor is not None and ever_up:
            return "cursor"  # the Portal no longer knows the cursor
        return "transient" if ever_up else "unsupported"
    if cursor is not None:
        return "cursor"
    return "transient" if ever_up else "unsupported"


# --- the follower ----------------------------------------------------------------------------------------------


class PortalFeed:
    """The change-feed follower of one CTERA mount (``base.ChangeFollower``); ``CteraSource.change_follower``
    builds it. ``transport`` replaces the network (tests: ``httpx.MockTransport``)."""

    def __init__(
        self,
        origin: str,
        auth: HTTPAuth,
        http_settings: HTTPSettings,
        *,
        folder_ids: Callable[[], Awaitable[list[int]]] | None = None,
        settings: FeedSettings | None = None,
        display_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or FeedSettings()
        self._base = origin.rstrip("/") + NOTIFY_PATH
        self._auth = auth
        # The long-poll's socket read lasts its timeout: the client's read timeout must outlast it (the deadline of
        # each call still bounds it). Two connections: a list and a long-poll never run at once, one spare.
        self._http_settings = dataclasses.replace(
            http_settings,
            read_timeout_seconds=max(http_settings.read_timeout_seconds, self.settings.longpoll_deadline_seconds),
            max_connections=2,
            max_keepalive_connections=2,
        )
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._folder_ids_of = folder_ids
        self._display = display_url or redact_url(origin)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        # Written by run() only (see the module docstring); read by statistics() from any thread.
        self.state: State = "starting"
        self.cursor: str | None = None
        self.folder_ids: list[int] | None = None
        self.ever_up = False
        self.last_error = ""
        self._state_since = time.monotonic()
        self._last_reply = 0.0  # time.monotonic() of the last answer of the Portal; 0 = none yet
        self._lag_seconds = math.nan
        self._counts = {
            "events": 0,
            "replayed": 0,  # events of a replay from a null cursor: counted, not applied
            "invalidations": 0,
            "unusable": 0,
            "lists": 0,
            "longpolls": 0,
            "failures": 0,
            "resets": 0,
            "downs": 0,
        }

    # --- requests ---

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = build_client(self._http_settings, transport=self._transport)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _post(
        self, call: str, body: dict[str, Any], *, deadline: float, policy: RetryPolicy
    ) -> bytes | FeedFailure:
        """POST ``body`` to ``{base}/{call}`` within ``deadline`` seconds: the 200 body, or what went wrong."""
        what = f"{call} of {self._display}"
        content = json.dumps(body).encode()
        with trio.move_on_after(deadline) as scope:
            try:
                reply = await request(
                    self._http(),
                    "POST",
                    f"{self._base}/{call}",
                    auth=self._auth,
                    policy=policy,
                    path=f"metadata/{call}",
                    headers={"Content-Type": "application/json", "Accept": "application/json"},
                    content=content,
                    read_body_if=lambda status: status == 200,
                    max_body_bytes=MAX_REPLY_BYTES,
                )
            except DirectFSError as exc:  # transport failures and bodies too large, as namespace errors
                return FeedFailure("transient", f"{what}: {exc.strerror or exc}")
        if scope.cancelled_caught:
            return FeedFailure("transient", f"{what}: no answer within {deadline:g} s")
        self._last_reply = time.monotonic()
        if reply.status_code != 200:
            kind = classify_status(reply.status_code, cursor=body.get("cursor"), ever_up=self.ever_up)
            return FeedFailure(kind, f"{what}: HTTP {reply.status_code}")
        return reply.body

    async def list_changes(self, cursor: str | None) -> ChangeBatch | FeedFailure:
        """One ``metadata/list`` call (retried within ``list_deadline_seconds``)."""
        self._counts["lists"] += 1
        deadline = self.settings.list_deadline_seconds
        body = await self._post(
            "list",
            {"folder_ids": self.folder_ids or [], "cursor": cursor, "max_results": self.settings.max_results},
            deadline=deadline,
            policy=RetryPolicy(max_attempts=3, total_budget_seconds=deadline),
        )
        if isinstance(body, FeedFailure):
            return body
        try:
            return parse_list_reply(body)
        except MalformedListingError as exc:
            return FeedFailure("transient", str(exc))

    async def wait_for_changes(self, cursor: str) -> bool | FeedFailure:
        """One ``metadata/longpoll`` call: True when the Portal has changes after ``cursor``."""
        self._counts["longpolls"] += 1
        deadline = self.settings.longpoll_deadline_seconds
        body = await self._post(
            "longpoll",
            {"folder_ids": self.folder_ids or [], "cursor": cursor, "timeout": self.settings.longpoll_timeout_ms},
            deadline=deadline,
            policy=RetryPolicy(max_attempts=1, total_budget_seconds=deadline),
        )
        if isinstance(body, FeedFailure):
            return body
        try:
            return parse_longpoll_reply(body)
        except MalformedListingError as exc:
            return FeedFailure("transient", str(exc))

    # --- the service loop ---

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self._state_since = time.monotonic()

    def _apply(self, sink: ChangeSink, batch: ChangeBatch, *, replay: bool) -> bool:
        """Tell ``sink`` about one page; True when it had to resynchronise (entries that cannot be placed). A page of
        the replay from a null cursor is only counted (module docstring)."""
        if replay:
            self._counts["replayed"] += len(batch.events) + batch.unusable
            return False
        if batch.unusable:
            # A change we cannot place may be anywhere: drop every cache rather than keep one stale for an hour.
            self._counts["unusable"] += batch.unusable
            log.warning(
                "change feed of %s: %d entries name no usable guid; dropping the metadata caches",
                self._display,
                batch.unusable,
            )
            sink.feed_reset()
        if batch.events:
            self._counts["events"] += len(batch.events)
            self._counts["invalidations"] += sink.apply_changes(batch.events)
            newest = max((e.changed_at_ns for e in batch.events if e.changed_at_ns is not None), default=None)
            if newest is not None:
                self._lag_seconds = max(0.0, time.time() - newest / 1e9)
        return bool(batch.unusable)

    async def _catch_up(self, sink: ChangeSink) -> tuple[bool, bool] | FeedFailure:
        """``list`` until ``has_more`` is false, applying each page and then keeping its cursor (as cterasdk saves it
        only once a batch is processed): (learnt anything, had to resynchronise), or the failure."""
        learnt = resynced = False
        replay = self.cursor is None
        while True:
            batch = await self.list_changes(self.cursor)
            if isinstance(batch, FeedFailure):
                return batch
            resynced = self._apply(sink, batch, replay=replay) or resynced
            learnt = learnt or bool(batch.events) or bool(batch.unusable)
            self.cursor = batch.cursor
            if not batch.has_more:
                return learnt, resynced

    async def _step(self, sink: ChangeSink, new_cursor: bool) -> FeedFailure | None:
        """One turn of the loop: catch up and go up (when not up), or one long-poll and the lists it calls for."""
        if self.folder_ids is None:
            folders = await self._resolve_folders()
            if isinstance(folders, FeedFailure):
                return folders
            self.folder_ids = folders
        cycle_started = trio.current_time()
        if self.state != "up":
            caught = await self._catch_up(sink)
            if isinstance(caught, FeedFailure):
                return caught
            sink.feed_up(new_cursor=new_cursor or caught[1])
            log.info(
                "change feed of %s is %s; metadata is trusted for --metadata-ttl-with-feed",
                self._display,
                "back" if self.ever_up else "followed",
            )
            self.ever_up = True
            self._set_state("up")
            return None
        assert self.cursor is not None
        changes = await self.wait_for_changes(self.cursor)
        if isinstance(changes, FeedFailure):
            return changes
        learnt = False
        if changes:
            caught = await self._catch_up(sink)
            if isinstance(caught, FeedFailure):
                return caught
            learnt, resynced = caught
            if resynced:
                sink.feed_up(new_cursor=True)
        if not learnt:
            await trio.sleep_until(cycle_started + self.settings.min_cycle_seconds)
        return None

    async def run(
        self, sink: ChangeSink, *, required: bool, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The service loop (module docstring); runs until cancelled, or returns when the Portal has no feed. An
        unexpected error ends it after ``sink.feed_down()``: nothing stays trusted without a feed."""
        started = False
        new_cursor = True  # the next feed_up begins a new cursor chain
        failures = 0  # since the feed was last up
        try:
            while True:
                was_up = self.state == "up"
                failure = await self._step(sink, new_cursor)
                if failure is None:
                    if not was_up and self.state == "up":
                        new_cursor = False
                        failures = 0
                        if not started:
                            started = True
                            task_status.started()
                    continue
                failures += 1
                self._counts["failures"] += 1
                self.last_error = failure.detail
                if required and not self.ever_up:
                    raise ConfigError(
                        f"--change-feed on: the change feed of {self._display} is not available: {failure.detail}"
                    )
                if failure.kind == "unsupported":
                    log.info(
                        "%s has no change feed for this mount (%s): metadata is trusted for --metadata-ttl",
                        self._display,
                        failure.detail,
                    )
                    self._set_state("unsupported")
                    if not started:
                        task_status.started()
                    return
                if failure.kind == "cursor":
                    self._counts["resets"] += 1
                    log.warning(
                        "change feed of %s refused its cursor (%s): dropping the metadata caches; new cursor",
                        self._display,
                        failure.detail,
                    )
                    sink.feed_reset()
                    self.cursor = None
                    new_cursor = True
                elif was_up:
                    self._counts["downs"] += 1
                    log.warning(
                        "change feed of %s is down (%s): metadata falls back to --metadata-ttl",
                        self._display,
                        failure.detail,
                    )
                    sink.feed_down()
                else:
                    log.debug("change feed of %s: %s", self._display, failure.detail)
                self._set_state("down" if self.ever_up else "starting")
                if not started:
                    started = True  # the mount goes on with the short TTL; the loop keeps trying
                    task_status.started()
                if failure.kind != "cursor" or failures > 1:
                    await trio.sleep(self.settings.backoff_seconds(failures, self._rng))
        except BaseException as exc:
            if self.state == "up" and not isinstance(exc, trio.Cancelled):
                sink.feed_down()
            raise
        finally:
            if self.state != "unsupported":
                self._set_state("stopped")
            await self.aclose()

    async def _resolve_folders(self) -> list[int] | FeedFailure:
        if self._folder_ids_of is None:
            return []
        try:
            return await self._folder_ids_of()
        except DirectFSError as exc:
            return FeedFailure("transient", f"the cloud folder of the mount: {exc.strerror or exc}")

    # --- metrics ---

    def statistics(self) -> Mapping[str, float | str]:
        """Counters and state (any thread; see the module docstring). ``lag_seconds``: from the Portal's time of the
        newest change of the last batch to its invalidation here (NaN before any); ``last_reply_seconds``: since the
        Portal last answered the feed."""
        now = time.monotonic()
        return {
            "state": self.state,
            "up": 1.0 if self.state == "up" else 0.0,
            "state_seconds": now - self._state_since,
            "last_reply_seconds": now - self._last_reply if self._last_reply else math.nan,
            "lag_seconds": self._lag_seconds,
            **{key: float(value) for key, value in self._counts.items()},
        }
