"""The change feed without a network or FUSE: parsing the Portal's replies, the follower's state machine against a
scripted portal on a mock clock (``httpx.MockTransport``), and the filesystem as the feed's sink (TTLs, invalidation
by guid, the races between an event and a store call in flight).

The real portal and real mounts: tests/component/test_feed_portal.py and tests/mount/test_feed_mount.py."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from directfs.errors import ConfigError, EntryNotFoundError, MalformedListingError
from directfs.http import HTTPSettings
from directfs.sources.base import ChangeEvent, Credentials, Entry, OpenFile
from directfs.sources.ctera.feed import (
    FeedSettings,
    PortalFeed,
    classify_status,
    parse_event,
    parse_list_reply,
    parse_longpoll_reply,
)
from directfs.sources.httpstore import HTTPAuth
from directfs.vfs import ROOT_INODE, Absent, Attributes, AttrNote, EntryNote, FileSystem, VfsSettings

SHORT = 5.0
LONG = 3600.0

# --- parsing -------------------------------------------------------------------------------------------------------

FULL_EVENT = {
    "type": "file",
    "guid": "6f1c2d3e-0000-4000-8000-000000000001",
    "deleted": False,
    "name": "report.pdf",
    "folder_id": 11,
    "modified": "2026-03-01T10:00:00.500000+00:00",
    "portal_modified_date": "2026-03-01T10:00:01+00:00",
    "file_timestamp": "2026-02-28T09:00:00Z",
    "virtual_portal_id": 1,
    "size": 1234,
    "id": 98765,
    "acl": "O:...",
    "gvsn": "98765",
    "parent_guid": "6f1c2d3e-0000-4000-8000-000000000000",
}


def test_an_entry_with_every_field_is_one_typed_event() -> None:
    event = parse_event(FULL_EVENT)
    assert event == ChangeEvent(
        guid=FULL_EVENT["guid"],
        parent_guid=FULL_EVENT["parent_guid"],
        name="report.pdf",
        deleted=False,
        is_dir=False,
        file_id="98765",
        size=1234,
        mtime_ns=1772269200 * 10**9,
        changed_at_ns=1772359201 * 10**9,
    )
    folder = parse_event({**FULL_EVENT, "type": "folder", "deleted": True, "id": "7"})
    assert folder is not None and folder.is_dir and folder.deleted and folder.file_id == "7"


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"size": -1}, lambda e: e.size is None),
        ({"size": True}, lambda e: e.size is None),
        ({"size": "12"}, lambda e: e.size is None),
        ({"id": True}, lambda e: e.file_id is None),
        ({"id": "12a"}, lambda e: e.file_id is None),
        ({"name": 7}, lambda e: e.name == ""),
        ({"deleted": "no"}, lambda e: e.deleted),  # not a boolean: read the safe way, as deleted
        ({"file_timestamp": "yesterday"}, lambda e: e.mtime_ns is None),
        ({"file_timestamp": "2026-02-28T09:00:00"}, lambda e: e.mtime_ns is None),  # no zone: not a point in time
        ({"parent_guid": 5}, lambda e: e.parent_guid is None),
        ({"guid": ""}, lambda e: e.guid == ""),  # still placed through its parent
        ({"guid": "x" * 300}, lambda e: e.guid == ""),
    ],
)
def test_odd_fields_are_dropped_never_guessed(changes: dict[str, Any], check: Any) -> None:
    event = parse_event({**FULL_EVENT, **changes})
    assert event is not None and check(event), event


def test_an_entry_naming_no_usable_guid_cannot_be_placed() -> None:
    assert parse_event({**FULL_EVENT, "guid": None, "parent_guid": None}) is None
    assert parse_event({**FULL_EVENT, "guid": "\x00bad", "parent_guid": ""}) is None
    assert parse_event(["not", "an", "object"]) is None
    reply = json.dumps({"entries": [FULL_EVENT, {"name": "x"}, 5], "cursor": "c:1", "has_more": True}).encode()
    batch = parse_list_reply(reply)
    assert (len(batch.events), batch.unusable, batch.cursor, batch.has_more) == (1, 2, "c:1", True)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[1]",
        b'{"entries": [], "has_more": false}',
        b'{"entries": [], "cursor": "", "has_more": false}',
        b'{"entries": [], "cursor": 5, "has_more": false}',
        b'{"entries": {}, "cursor": "c", "has_more": false}',
        b'{"entries": [], "cursor": "c", "has_more": "no"}',
        b'{"entries": [], "cursor": "c", "has_more": false, "x": NaN}',
    ],
)
def test_a_malformed_list_reply_is_refused(body: bytes) -> None:
    with pytest.raises(MalformedListingError):
        parse_list_reply(body)


def test_longpoll_replies() -> None:
    assert parse_longpoll_reply(b'{"changes": true}') is True
    assert parse_longpoll_reply(b'{"changes": false}') is False
    for body in (b'{"changes": 1}', b"{}", b"true"):
        with pytest.raises(MalformedListingError):
            parse_longpoll_reply(body)


def test_statuses_are_classified() -> None:
    for status in (429, 500, 502, 503):
        assert classify_status(status, cursor="c", ever_up=False) == "transient"
    for status in (404, 405, 501, 401, 403):
        assert classify_status(status, cursor=None, ever_up=False) == "unsupported"
        assert classify_status(status, cursor=None, ever_up=True) == "transient"  # it worked: a passing outage
    for status in (400, 409, 410, 412, 422):
        assert classify_status(status, cursor="c", ever_up=True) == "cursor"
    assert classify_status(400, cursor=None, ever_up=False) == "unsupported"  # a protocol we do not speak
    assert classify_status(404, cursor="c", ever_up=True) == "cursor"


def test_backoff_is_bounded_and_jittered() -> None:
    settings = FeedSettings()
    rng = random.Random(3)
    delays = [settings.backoff_seconds(n, rng) for n in range(1, 12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= settings.backoff_max_seconds for d in delays)
    assert max(delays) >= settings.backoff_max_seconds / 2
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jittered, not one fixed ceiling


# --- the service loop against a scripted portal ---------------------------------------------------------------------


def event(guid: str, parent: str | None, name: str, *, deleted: bool = False, kind: str = "file") -> dict[str, Any]:
    return {"guid": guid, "parent_guid": parent, "name": name, "deleted": deleted, "type": kind, "size": 1}


class ScriptedPortal:
    """The Notification Service's two calls in memory: cursors ``FEED:SEQ``, ``retained_from`` older events dropped
    (an older cursor answers 410), and ``down`` ("refuse": connection refused, "hang": never answers, or a status)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.feed = "f1"
        self.retained_from = 0
        self.down: str | int | None = None
        self.calls: list[tuple[str, Any]] = []
        self.changed = trio.Event()
        self.instant_false = False  # answer long-polls {"changes": false} at once (a Portal that ignores timeout)

    def add(self, *events: dict[str, Any]) -> None:
        self.events += events
        self._wake()

    def set_down(self, down: str | int | None) -> None:
        """An outage (or its end) reaches parked long-polls too: a dead Portal answers none of them."""
        self.down = down
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _outage(self, request: httpx.Request) -> httpx.Response | None:
        if self.down == "refuse":
            raise httpx.ConnectError("connection refused", request=request)
        if self.down == "hang":
            await trio.sleep_forever()
        if isinstance(self.down, int):
            return httpx.Response(self.down, json={"error": "down"})
        return None

    def _position(self, cursor: Any) -> int | None:
        if cursor is None:
            return self.retained_from
        feed, _, seq = str(cursor).partition(":")
        if feed != self.feed or not seq.isdigit() or int(seq) < self.retained_from:
            return None
        return int(seq)

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(await request.aread())
        call = request.url.path.rsplit("/", 1)[1]
        self.calls.append((call, body.get("cursor")))
        if (refused := await self._outage(request)) is not None:
            return refused
        start = self._position(body.get("cursor"))
        if start is None:
            return httpx.Response(410, json={"error": "cursor expired", "code": "cursor_expired"})
        if call == "list":
            limit = body["max_results"]
            page = self.events[start : start + limit]
            end = start + len(page)
            more = end < len(self.events)
            return httpx.Response(200, json={"entries": page, "cursor": f"{self.feed}:{end}", "has_more": more})
        if self.instant_false:
            return httpx.Response(200, json={"changes": False})
        with trio.move_on_after(body["timeout"] / 1000):
            while len(self.events) <= start and self.down is None:
                await self.changed.wait()
        if (refused := await self._outage(request)) is not None:
            return refused
        return httpx.Response(200, json={"changes": len(self.events) > start})


@dataclass
class RecordingSink:
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[ChangeEvent] = field(default_factory=list)

    def feed_up(self, *, new_cursor: bool) -> None:
        self.calls.append(("up", new_cursor, trio.current_time()))

    def feed_down(self) -> None:
        self.calls.append(("down", trio.current_time()))

    def feed_reset(self) -> None:
        self.calls.append(("reset", trio.current_time()))

    def apply_changes(self, events: Sequence[ChangeEvent]) -> int:
        self.events += events
        return len(events)

    def kinds(self) -> list[Any]:
        return [call[0] if call[0] != "up" else ("up", call[1]) for call in self.calls]


def follower(portal: ScriptedPortal, **settings: Any) -> PortalFeed:
    return PortalFeed(
        "http://portal.invalid",
        HTTPAuth(Credentials(username="u", password="p")),
        HTTPSettings(),
        settings=FeedSettings(**settings),
        transport=httpx.MockTransport(portal.handler),
        rng=random.Random(1),
    )


async def wait_for(condition: Any, *, limit_seconds: float = 120.0) -> None:
    for _ in range(int(limit_seconds / 0.01)):  # polling state another task changes; not an assertion
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"not true within {limit_seconds} s")


async def test_the_loop_replays_then_longpolls_and_lists_what_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    portal = ScriptedPortal()
    portal.add(*(event(f"g{i}", "root", f"f{i}") for i in range(5)))
    sink = RecordingSink()
    feed = follower(portal, max_results=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(feed.run, sink, required=False))
        assert sink.kinds() == [("up", True)]
        assert [c for c, _ in portal.calls[:3]] == ["list", "list", "list"]  # 2 + 2 + 1, then has_more is false
        assert sink.events == []  # the replay is history: counted, never applied
        assert feed.state == "up" and feed.cursor == "f1:5"
        await trio.sleep(25)  # two empty long-polls go by, a third is parked
        assert [c for c, _ in portal.calls[3:]] == ["longpoll"] * 3
        portal.add(event("g9", "root", "new"))
        await wait_for(lambda: len(sink.events) == 1)
        assert sink.events[-1].name == "new" and feed.cursor == "f1:6"
        stats = feed.statistics()
        assert (stats["state"], stats["up"], stats["replayed"]) == ("up", 1.0, 5.0)
        assert (stats["events"], stats["invalidations"]) == (1.0, 1.0)
        nursery.cancel_scope.cancel()
    assert feed.state == "stopped"
    assert sink.kinds() == [("up", True)]  # cancelled (unmount): no feed_down storm


@pytest.mark.parametrize("outage", ["refuse", 503, "hang"])
@pytest.mark.expected_logs(r"change feed of .* is down")
async def test_an_outage_falls_back_within_one_longpoll_deadline_and_resumes_the_cursor(
    autojump_clock: trio.testing.MockClock, outage: str | int
) -> None:
    portal = ScriptedPortal()
    portal.add(event("g1", "root", "a"))
    sink = RecordingSink()
    feed = follower(portal)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(feed.run, sink, required=False))
        await trio.sleep(3)  # a long-poll is parked now
        portal.set_down(outage)
        killed_at = trio.current_time()
        portal.add(event("g2", "root", "b"))  # made while the feed is down: listed from the saved cursor later
        await wait_for(lambda: feed.state == "down")
        down_at = sink.calls[-1][1]
        assert sink.calls[-1][0] == "down"
        assert down_at - killed_at <= feed.settings.longpoll_deadline_seconds + 0.1
        await trio.sleep(60)  # retried with bounded backoff meanwhile, still down
        assert feed.state == "down" and sink.kinds().count("down") == 1
        tries = [c for c in portal.calls if c[0] == "list"]
        assert 2 <= len(tries) <= 3 * (60 / 2.5 + 4), "retried, with backoff"
        portal.set_down(None)
        back = trio.current_time()
        await wait_for(lambda: feed.state == "up")
        hung = feed.settings.list_deadline_seconds if outage == "hang" else 0  # a list in flight stays lost
        assert trio.current_time() - back <= feed.settings.backoff_max_seconds + hung + 1
        assert sink.kinds()[-1] == ("up", False), "the old cursor was accepted: nothing was missed"
        assert [e.name for e in sink.events] == ["b"]  # listed from the saved cursor (a was in the replay)
        nursery.cancel_scope.cancel()


@pytest.mark.expected_logs(r"refused its cursor")
async def test_a_refused_cursor_resets_and_starts_a_new_cursor(autojump_clock: trio.testing.MockClock) -> None:
    portal = ScriptedPortal()
    portal.add(event("g1", "root", "a"))
    sink = RecordingSink()
    feed = follower(portal)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(feed.run, sink, required=False))
        portal.feed = "f2"  # every cursor so far answers 410
        portal.add(event("g2", "root", "b"))
        await wait_for(lambda: sink.kinds()[-1] == ("up", True) and len(sink.kinds()) == 3)
        assert sink.kinds() == [("up", True), "reset", ("up", True)]
        assert feed.statistics()["resets"] == 1.0
        assert "f1:1" in [cursor for _, cursor in portal.calls]  # a long-poll or a list with it: refused, 410
        assert [cursor for call, cursor in portal.calls if call == "list"][-1] is None  # then a new chain
        assert feed.cursor is not None and feed.cursor.startswith("f2:")
        nursery.cancel_scope.cancel()


async def test_a_portal_without_a_feed_ends_the_loop(autojump_clock: trio.testing.MockClock) -> None:
    portal = ScriptedPortal()
    portal.down = 404
    sink = RecordingSink()
    feed = follower(portal)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(feed.run, sink, required=False))
    assert feed.state == "unsupported" and sink.calls == []
    assert len(portal.calls) == 1


@pytest.mark.parametrize("outage", [404, 503, "refuse"])
async def test_change_feed_on_makes_a_failing_feed_an_error(
    autojump_clock: trio.testing.MockClock, outage: str | int
) -> None:
    portal = ScriptedPortal()
    portal.down = outage
    feed = follower(portal)
    with pytest.raises(ConfigError, match="--change-feed on"):
        await feed.run(RecordingSink(), required=True)


@pytest.mark.expected_logs(r"no usable guid")
async def test_entries_that_cannot_be_placed_drop_every_cache(autojump_clock: trio.testing.MockClock) -> None:
    portal = ScriptedPortal()
    sink = RecordingSink()
    feed = follower(portal)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(feed.run, sink, required=False))
        portal.add({"name": "somewhere", "deleted": False})
        await wait_for(lambda: len(sink.calls) == 3)
        assert sink.kinds() == [("up", True), "reset", ("up", True)]
        nursery.cancel_scope.cancel()


async def test_a_portal_answering_at_once_cannot_make_the_loop_spin(autojump_clock: trio.testing.MockClock) -> None:
    portal = ScriptedPortal()
    portal.instant_false = True
    feed = follower(portal)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(feed.run, RecordingSink(), required=False))
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert len(portal.calls) <= 10 / feed.settings.min_cycle_seconds + 2


# --- the filesystem as the sink ----------------------------------------------------------------------------------


class GuidSource:
    """An in-memory store whose entries carry guids (kept across renames, as a Portal's are). ``gate``: store calls
    wait on it while set, so a test can hold one in flight."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[str, bytes | None]] = {"": ("g-root", None)}
        self.versions: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.gate: trio.Event | None = None
        self.answered = 0
        self.with_guids = True
        self._next = 0

    @property
    def display_url(self) -> str:
        return "guid://"

    def put(self, path: str, data: bytes | None) -> str:
        if path in self.items:
            guid = self.items[path][0]
        else:
            self._next += 1
            guid = f"g{self._next}"
        self.items[path] = (guid, data)
        self.versions[path] = self.versions.get(path, 0) + 1
        return guid

    def guid(self, path: str) -> str:
        return self.items[path][0]

    def move(self, old: str, new: str) -> None:
        for path in sorted(p for p in self.items if p == old or p.startswith(old + "/")):
            self.items[new + path[len(old) :]] = self.items.pop(path)

    def remove(self, path: str) -> None:
        for gone in [p for p in self.items if p == path or p.startswith(path + "/")]:
            del self.items[gone]

    def entry(self, path: str) -> Entry:
        guid, data = self.items[path]
        version = self.versions.get(path, 0)
        return Entry(
            name=path.rpartition("/")[2],
            is_dir=data is None,
            size=0 if data is None else len(data),
            mtime_ns=10**18 + version * 10**9,
            version=f"v{version}",
            file_id=None if data is None else f"{guid[1:]}{version:04d}",
            guid=guid if self.with_guids else None,
        )

    def event(self, path: str, *, deleted: bool = False, name: str | None = None) -> ChangeEvent:
        """The event a Portal sends for ``path`` now (``name``/its parent: where it is now)."""
        guid, data = self.items.get(path, ("gone", b""))
        folder = path.rpartition("/")[0]
        now = self.entry(path) if path in self.items else None
        return ChangeEvent(
            guid=guid,
            parent_guid=self.items[folder][0] if folder in self.items else None,
            name=name or path.rpartition("/")[2],
            deleted=deleted,
            is_dir=data is None,
            file_id=now.file_id if now is not None else None,
            size=now.size if now is not None else None,
            mtime_ns=now.mtime_ns + 123_456 if now is not None else None,  # the feed's has sub-seconds, PROPFIND not
        )

    async def _wait(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.gate is not None:
            await self.gate.wait()

    async def stat(self, path: str) -> Entry:
        self.calls.append(("stat", path))
        answer = self.entry(path) if path in self.items else None  # what the store says now...
        await self._wait()  # ...arrives later
        self.answered += 1
        if answer is None:
            raise EntryNotFoundError(filename=path)
        return answer

    async def list_dir(self, path: str) -> AsyncIterator[Entry]:
        self.calls.append(("list", path))
        prefix = f"{path}/" if path else ""
        snapshot = [
            self.entry(p) for p in sorted(self.items) if p and p.startswith(prefix) and "/" not in p[len(prefix) :]
        ]
        await self._wait()
        self.answered += 1
        for entry in snapshot:
            yield entry

    async def open(self, path: str, entry: Entry) -> OpenFile:
        raise AssertionError("not used")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class NoEngine:
    def open(self, file: OpenFile, identity: Hashable) -> Any:
        raise AssertionError("not used")


async def make_fs(source: GuidSource) -> FileSystem:
    fs = FileSystem(source, NoEngine(), VfsSettings(metadata_ttl_seconds=SHORT, metadata_ttl_with_feed_seconds=LONG))
    await fs.start()
    return fs


def notes(fs: FileSystem) -> list[Any]:
    out = []
    while True:
        try:
            out.append(fs.invalidation_requests.receive_nowait())
        except trio.WouldBlock:
            return out


async def lookup_path(fs: FileSystem, path: str) -> Attributes:
    inode = ROOT_INODE
    attrs = None
    for name in path.split("/"):
        attrs = await fs.lookup(inode, name)
        inode = attrs.inode
    assert attrs is not None
    return attrs


def store_calls(source: GuidSource) -> int:
    return len(source.calls)


async def tree_fs(autojump: trio.testing.MockClock) -> tuple[GuidSource, FileSystem]:
    source = GuidSource()
    source.put("docs", None)
    source.put("docs/a.txt", b"a")
    source.put("docs/b.txt", b"b")
    source.put("docs/sub", None)
    source.put("docs/sub/deep.txt", b"deep")
    fs = await make_fs(source)
    return source, fs


async def test_with_the_feed_up_answers_are_trusted_long_and_the_kernel_gets_the_long_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    fh = await fs.opendir(docs.inode)
    fs.releasedir(fh)
    a = await fs.lookup(docs.inode, "a.txt")
    assert a.ttl_seconds > SHORT * 10  # the kernel keeps it for the long TTL too
    absent = await fs.lookup_or_absent(docs.inode, "nope")
    assert isinstance(absent, Absent) and absent.ttl_seconds > SHORT * 10
    calls = store_calls(source)
    autojump_clock.jump(LONG / 2)
    assert (await fs.getattr(a.inode)).size == 1
    assert isinstance(await fs.lookup_or_absent(docs.inode, "nope"), Absent)
    await fs.lookup(docs.inode, "b.txt")
    assert store_calls(source) == calls, "nothing asked again within the long TTL"
    autojump_clock.jump(LONG / 2 + 1)
    await fs.getattr(a.inode)
    assert store_calls(source) > calls, "past the long TTL, asked again"


async def test_without_the_feed_the_short_ttl_applies_as_before(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    docs = await fs.lookup(ROOT_INODE, "docs")
    a = await fs.lookup(docs.inode, "a.txt")
    assert a.ttl_seconds == SHORT
    absent = await fs.lookup_or_absent(docs.inode, "nope")
    assert absent == Absent(SHORT)
    calls = store_calls(source)
    autojump_clock.jump(SHORT + 0.1)
    await fs.getattr(a.inode)
    assert store_calls(source) == calls + 1


async def test_entries_without_a_guid_are_never_trusted_long(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    source.with_guids = False
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    assert docs.ttl_seconds == SHORT
    calls = store_calls(source)
    autojump_clock.jump(SHORT + 0.1)
    await fs.getattr(docs.inode)
    assert store_calls(source) == calls + 1


async def test_feed_loss_falls_back_at_once_and_invalidates_the_kernels_long_timeouts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    a = await fs.lookup(docs.inode, "a.txt")
    absent = await fs.lookup_or_absent(docs.inode, "nope")
    assert isinstance(absent, Absent) and absent.ttl_seconds > SHORT
    notes(fs)
    autojump_clock.jump(SHORT + 1)
    fs.feed_down()
    queued = set(notes(fs))
    assert {
        EntryNote(ROOT_INODE, "docs"),
        AttrNote(docs.inode),
        EntryNote(docs.inode, "a.txt"),
        AttrNote(a.inode),
    } <= queued
    assert EntryNote(docs.inode, "nope") in queued  # the long negative dentry too
    calls = store_calls(source)
    assert (await fs.getattr(a.inode)).ttl_seconds == SHORT
    assert store_calls(source) == calls + 1, "older than the short TTL: asked again"
    assert (await fs.lookup_or_absent(docs.inode, "nope")) == Absent(SHORT)
    # Back with the same cursor (nothing missed): answers of the epoch are trusted again.
    fs.feed_up(new_cursor=False)
    autojump_clock.jump(SHORT + 1)
    calls = store_calls(source)
    await fs.getattr(a.inode)
    assert store_calls(source) == calls


async def test_a_new_cursor_trusts_nothing_stamped_before_it(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    docs = await fs.lookup(ROOT_INODE, "docs")  # before the feed is up: the short TTL only
    fs.feed_up(new_cursor=True)
    autojump_clock.jump(SHORT + 1)
    calls = store_calls(source)
    await fs.getattr(docs.inode)  # asked again, now under the feed
    assert store_calls(source) == calls + 1
    autojump_clock.jump(SHORT + 1)
    await fs.getattr(docs.inode)
    assert store_calls(source) == calls + 1, "trusted long"
    fs.feed_down()
    fs.feed_up(new_cursor=True)  # a new cursor chain: what came before it is not covered
    autojump_clock.jump(SHORT + 1)
    await fs.getattr(docs.inode)
    assert store_calls(source) == calls + 2, "trusted under the old epoch only"


async def test_the_replay_a_new_cursor_starts_with_keeps_what_was_cached_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A listing made before the feed came up keeps its short TTL through the replay of the history (CI saw it
    dropped by the replayed ingest events, then an error while the Portal was down: test_faults_mount.py)."""
    source, fs = await tree_fs(autojump_clock)
    docs = await fs.lookup(ROOT_INODE, "docs")
    fs.releasedir(await fs.opendir(docs.inode))
    portal = ScriptedPortal()
    portal.add(*(event(source.guid(f"docs/{n}"), source.guid("docs"), n) for n in ("a.txt", "b.txt")))
    feed = follower(portal)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(feed.run, fs, required=False))
        calls = store_calls(source)
        fs.releasedir(await fs.opendir(docs.inode))
        await fs.lookup(docs.inode, "a.txt")
        assert store_calls(source) == calls, "the listing from before the replay still answers"
        assert feed.statistics()["replayed"] == 2.0
        source.put("docs/a.txt", b"changed")
        portal.add(event(source.guid("docs/a.txt"), source.guid("docs"), "a.txt"))  # news: applied
        await wait_for(lambda: feed.statistics()["events"] == 1.0)
        assert (await fs.lookup(docs.inode, "a.txt")).size == len(b"changed")
        nursery.cancel_scope.cancel()


async def test_a_reset_drops_every_cache(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    fh = await fs.opendir(docs.inode)
    fs.releasedir(fh)
    a = await fs.lookup(docs.inode, "a.txt")
    notes(fs)
    fs.feed_reset()
    assert fs.statistics()["cached_listings"] == 0
    assert AttrNote(a.inode) in notes(fs)
    calls = store_calls(source)
    await fs.getattr(a.inode)
    assert store_calls(source) == calls + 1


async def test_an_event_invalidates_exactly_the_entry_and_its_folders_listing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    fh = await fs.opendir(docs.inode)
    fs.releasedir(fh)
    a = await fs.lookup(docs.inode, "a.txt")
    b = await fs.lookup(docs.inode, "b.txt")
    sub = await fs.lookup(docs.inode, "sub")
    fh = await fs.opendir(sub.inode)
    fs.releasedir(fh)
    notes(fs)
    source.put("docs/a.txt", b"changed!")
    assert fs.apply_changes([source.event("docs/a.txt")]) == 2  # a's attributes and docs' listing
    assert set(notes(fs)) == {AttrNote(a.inode), EntryNote(docs.inode, "a.txt")}
    calls = list(source.calls)
    assert (await fs.getattr(a.inode)).size == len(b"changed!")
    assert source.calls[len(calls) :] == [("stat", "docs/a.txt")]
    await fs.getattr(b.inode)
    await fs.lookup(sub.inode, "deep.txt")  # sub's listing stays
    assert source.calls[len(calls) + 1 :] == []


async def test_a_new_name_is_seen_through_its_parent_guid_and_drops_the_kernels_negative_entry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    assert isinstance(await fs.lookup_or_absent(docs.inode, "new.txt"), Absent)
    notes(fs)
    source.put("docs/new.txt", b"new")
    fs.apply_changes([source.event("docs/new.txt")])  # a guid never seen: placed by parent_guid + name
    assert EntryNote(docs.inode, "new.txt") in notes(fs)
    assert (await fs.lookup(docs.inode, "new.txt")).size == 3


async def test_an_event_of_unknown_guids_touches_nothing(autojump_clock: trio.testing.MockClock) -> None:
    _, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    await lookup_path(fs, "docs/a.txt")
    notes(fs)
    unknown = ChangeEvent(guid="elsewhere", parent_guid="also-elsewhere", name="x", deleted=False, is_dir=False)
    assert fs.apply_changes([unknown]) == 0
    assert notes(fs) == []


async def test_a_rename_invalidates_the_old_and_the_new_place(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    sub = await fs.lookup(docs.inode, "sub")
    await fs.lookup(docs.inode, "a.txt")
    assert isinstance(await fs.lookup_or_absent(sub.inode, "moved.txt"), Absent)
    notes(fs)
    source.move("docs/a.txt", "docs/sub/moved.txt")
    fs.apply_changes([source.event("docs/sub/moved.txt")])  # one event: same guid, new parent and name
    queued = notes(fs)
    assert EntryNote(docs.inode, "a.txt") in queued and EntryNote(sub.inode, "moved.txt") in queued
    assert isinstance(await fs.lookup_or_absent(docs.inode, "a.txt"), Absent)
    assert (await fs.lookup(sub.inode, "moved.txt")).size == 1


async def test_a_deleted_folder_drops_its_whole_subtree(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    sub = await fs.lookup(docs.inode, "sub")
    fh = await fs.opendir(sub.inode)
    fs.releasedir(fh)
    deep = await fs.lookup(sub.inode, "deep.txt")
    gone = source.event("docs/sub", deleted=True)
    source.remove("docs/sub")
    fs.apply_changes([gone])
    with pytest.raises(EntryNotFoundError):
        await fs.getattr(deep.inode)
    assert isinstance(await fs.lookup_or_absent(docs.inode, "sub"), Absent)


async def test_a_guid_seen_at_a_new_path_drops_its_old_place(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    fh = await fs.opendir(docs.inode)
    fs.releasedir(fh)
    sub = await fs.lookup(docs.inode, "sub")
    source.move("docs/a.txt", "docs/sub/a.txt")  # its event has not come yet
    fh = await fs.opendir(sub.inode)  # ...but a listing shows it moved
    fs.releasedir(fh)
    assert isinstance(await fs.lookup_or_absent(docs.inode, "a.txt"), Absent)


# --- races: an event while a store call is in flight ---------------------------------------------------------------


async def test_a_lookup_raced_by_an_event_is_not_kept_long(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    await fs.lookup(docs.inode, "b.txt")  # a.txt's guid is unknown: its event is placed by parent + name
    source.gate = trio.Event()
    answers: list[Attributes] = []
    async with trio.open_nursery() as nursery:

        async def look() -> None:
            answers.append(await fs.lookup(docs.inode, "a.txt"))

        nursery.start_soon(look)
        await wait_for(lambda: ("stat", "docs/a.txt") in source.calls)  # the old answer is on its way
        source.put("docs/a.txt", b"new content")
        fs.apply_changes([source.event("docs/a.txt")])
        source.gate.set()
    source.gate = None
    (answer,) = answers
    assert answer.size == 1, "the caller gets the answer it asked for"
    assert answer.ttl_seconds == 0, "the kernel must ask again"
    assert (await fs.getattr(answer.inode)).size == len(b"new content"), "not kept: asked again"


async def test_a_single_flight_follower_shares_the_leaders_stamp(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    await fs.lookup(docs.inode, "b.txt")
    source.gate = trio.Event()
    answers: list[Attributes] = []
    async with trio.open_nursery() as nursery:

        async def look() -> None:
            answers.append(await fs.lookup(docs.inode, "a.txt"))

        nursery.start_soon(look)
        await wait_for(lambda: ("stat", "docs/a.txt") in source.calls)
        source.put("docs/a.txt", b"new content")
        fs.apply_changes([source.event("docs/a.txt")])
        nursery.start_soon(look)  # joins the leader's call, after the event
        await trio.testing.wait_all_tasks_blocked()
        source.gate.set()
    source.gate = None
    assert [a.ttl_seconds for a in answers] == [0, 0]
    assert source.calls.count(("stat", "docs/a.txt")) == 1, "one store call for both"
    assert (await fs.getattr(answers[0].inode)).size == len(b"new content")


async def test_a_listing_raced_by_an_event_is_not_kept(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    source.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        handles: list[int] = []

        async def list_docs() -> None:
            handles.append(await fs.opendir(docs.inode))

        nursery.start_soon(list_docs)
        await wait_for(lambda: ("list", "docs") in source.calls)
        source.put("docs/c.txt", b"c")
        fs.apply_changes([source.event("docs/c.txt")])
        source.gate.set()
    source.gate = None
    fs.releasedir(handles[0])
    assert fs.statistics()["cached_listings"] == 0
    assert (await fs.lookup(docs.inode, "c.txt")).size == 1


async def test_readdir_of_an_older_snapshot_after_its_folder_changed_marks_the_entries_raced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An event that touches only the folder (a name that cannot be placed) expires no node; readdir of a snapshot
    taken before it must still treat its entries as raced, not as the answers the nodes already hold."""
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    handle = await fs.opendir(docs.inode)
    names: list[str] = []
    fs.readdir(handle, 0, lambda name, attrs, next_id: names.append(name) or True)
    a = await fs.lookup(docs.inode, "a.txt")
    unplaceable = ChangeEvent(
        guid="g-unknown", parent_guid=source.guid("docs"), name="bad/name", deleted=False, is_dir=False
    )
    fs.apply_changes([unplaceable])
    fs.readdir(handle, 0, lambda name, attrs, next_id: True)  # the same, older snapshot again
    fs.releasedir(handle)
    calls = store_calls(source)
    autojump_clock.jump(SHORT + 1)
    await fs.getattr(a.inode)
    assert store_calls(source) == calls + 1, "raced by the folder's change: asked again, not trusted for an hour"


async def test_a_renamed_item_of_unknown_guid_raced_into_a_stat_is_caught_by_its_guid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The stat of docs/a.txt left before a.txt moved to another folder; its event names the new place only, and
    # neither the old path nor its folder are touched by it. The answer's guid is.
    source, fs = await tree_fs(autojump_clock)
    source.put("other", None)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    await fs.lookup(ROOT_INODE, "other")
    source.gate = trio.Event()
    answers: list[Attributes] = []
    async with trio.open_nursery() as nursery:

        async def look() -> None:
            answers.append(await fs.lookup(docs.inode, "a.txt"))

        nursery.start_soon(look)
        await wait_for(lambda: ("stat", "docs/a.txt") in source.calls)
        source.move("docs/a.txt", "other/a.txt")
        fs.apply_changes([source.event("other/a.txt")])
        source.gate.set()
    source.gate = None
    assert answers[0].ttl_seconds == 0
    assert isinstance(await fs.lookup_or_absent(docs.inode, "a.txt"), Absent)


async def test_an_event_of_the_mount_root_itself_drops_its_attributes_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A Portal reports a folder whose content changed (its mtime); for the mount root, the folder holding it is above
    # the mount, so the event cannot be placed by parent: it is the root's own attributes, not a move of the tree.
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    fh = await fs.opendir(docs.inode)
    fs.releasedir(fh)
    notes(fs)
    root_changed = ChangeEvent(guid="g-root", parent_guid="above-the-mount", name="share", deleted=False, is_dir=True)
    fs.apply_changes([root_changed])
    assert notes(fs) == [AttrNote(ROOT_INODE)]
    assert fs.statistics()["cached_listings"] == 1
    calls = store_calls(source)
    await fs.lookup(docs.inode, "a.txt")
    assert store_calls(source) == calls


async def test_a_moved_tree_reported_item_by_item_is_dropped_at_the_old_place(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # As the reference portal reports a folder MOVE: a deleted event at each old path (deepest first), then an event
    # at each new path (parents first), every item keeping its guid.
    source, fs = await tree_fs(autojump_clock)
    source.put("docs/sub/inner", None)
    source.put("docs/sub/inner/x.txt", b"x")
    source.put("archive", None)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    archive = await fs.lookup(ROOT_INODE, "archive")
    for path in ("docs/sub/inner/x.txt", "docs/sub/deep.txt"):
        await lookup_path(fs, path)
    sub = await fs.lookup(docs.inode, "sub")
    fh = await fs.opendir(sub.inode)
    fs.releasedir(fh)
    old_paths = ["docs/sub/inner/x.txt", "docs/sub/inner", "docs/sub/deep.txt", "docs/sub"]
    gone = [source.event(path, deleted=True) for path in old_paths]
    source.move("docs/sub", "archive/sub")
    new_paths = ["archive/sub", "archive/sub/deep.txt", "archive/sub/inner", "archive/sub/inner/x.txt"]
    fs.apply_changes([*gone, *(source.event(path) for path in new_paths)])
    assert isinstance(await fs.lookup_or_absent(docs.inode, "sub"), Absent)
    moved = await fs.lookup(archive.inode, "sub")
    inner = await fs.lookup(moved.inode, "inner")
    assert (await fs.lookup(inner.inode, "x.txt")).size == 1
    assert fs.statistics()["cached_listings"] == 0


# --- metrics and `directfs stats` -------------------------------------------------------------------------------


def test_the_feed_is_exposed_as_metrics_and_summarised_by_stats() -> None:
    from directfs.commands.stats import summarize
    from directfs.metrics import Sources, build_registry, exposition

    def shown(feed: dict[str, float | str] | None) -> str:
        sources = Sources(feed_statistics=(lambda: feed) if feed is not None else None)
        return exposition(build_registry(sources)).decode()

    numbers = {"events": 12.0, "invalidations": 7.0, "resets": 1.0, "downs": 2.0, "lists": 3.0, "longpolls": 9.0}
    feed = {"state": "up", "up": 1.0, "state_seconds": 42.0, "last_reply_seconds": 0.2, "lag_seconds": 0.05, **numbers}
    text = shown(feed)
    assert "directfs_feed_up 1.0" in text
    assert 'directfs_feed_state{state="up"} 1.0' in text
    assert "directfs_feed_events_total 12.0" in text and "directfs_feed_invalidations_total 7.0" in text
    assert "directfs_feed_lag_seconds 0.05" in text
    assert (
        "change feed    up for 42.0 s (long TTL), lag 50 ms, last reply 200 ms ago; 12 events, 7 invalidations, "
        "1 resets, 2 outages"
    ) in summarize(text, mountpoint="/mnt/x")
    down = summarize(shown({**feed, "state": "down", "up": 0.0, "lag_seconds": float("nan")}), mountpoint="/mnt/x")
    assert "change feed    down for 42.0 s (short TTL until it is back), lag -" in down
    assert "change feed" not in summarize(shown(None), mountpoint="/mnt/x")


# --- events the cache already shows (our own changes coming back through the feed) ----------------------------------


async def test_an_event_the_cache_already_shows_drops_nothing(autojump_clock: trio.testing.MockClock) -> None:
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    fh = await fs.opendir(docs.inode)
    fs.releasedir(fh)
    await fs.lookup(docs.inode, "a.txt")
    notes(fs)
    assert fs.apply_changes([source.event("docs/a.txt"), source.event("docs/sub")]) == 0
    assert notes(fs) == [] and fs.statistics()["cached_listings"] == 1
    source.put("docs/a.txt", b"changed elsewhere")  # a new version: not what the cache shows
    assert fs.apply_changes([source.event("docs/a.txt")]) == 2


async def test_a_change_learnt_before_its_event_reaches_the_kernel(autojump_clock: trio.testing.MockClock) -> None:
    # a.txt changes and the listing of docs is refreshed (for a sibling's event) before a.txt's own event comes:
    # that event then finds the cache already showing it, so the kernel must have been told when the cache learnt it.
    source, fs = await tree_fs(autojump_clock)
    fs.feed_up(new_cursor=True)
    docs = await fs.lookup(ROOT_INODE, "docs")
    a = await fs.lookup(docs.inode, "a.txt")
    assert a.ttl_seconds > SHORT  # the kernel keeps a's attributes long
    assert isinstance(await fs.lookup_or_absent(docs.inode, "late.txt"), Absent)  # ... and late.txt's absence
    source.put("docs/a.txt", b"a, version 2")
    source.put("docs/late.txt", b"late")
    source.put("docs/b.txt", b"b, version 2")
    fs.apply_changes([source.event("docs/b.txt")])
    notes(fs)
    fh = await fs.opendir(docs.inode)  # the fresh listing shows the new a.txt and late.txt
    fs.readdir(fh, 0, lambda *_: True)
    fs.releasedir(fh)
    learnt = notes(fs)
    assert AttrNote(a.inode) in learnt and EntryNote(docs.inode, "late.txt") in learnt
    assert fs.apply_changes([source.event("docs/a.txt"), source.event("docs/late.txt")]) == 0
