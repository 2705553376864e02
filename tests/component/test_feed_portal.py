"""The change-feed follower against the real reference portal (``directfs serve`` on 127.0.0.1): the CTERA source's
follower with the filesystem as its sink, changes made through the portal's own WebDAV (``--writable``) seen within
2 s although every TTL is long, a repeated walk that asks the portal nothing, the feed taken down (connections closed,
503, a hung network) and brought back, a reset feed (every cursor 410), and a portal without a feed.

No FUSE here: the same scenarios through real mounts are tests/mount/test_feed_mount.py."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from directfs.errors import ConfigError, EntryNotFoundError
from directfs.sources import ctera
from directfs.sources.base import ChangeEvent, Credentials, OpenFile, SourceOptions
from directfs.sources.ctera.feed import FeedSettings, PortalFeed
from directfs.vfs import ROOT_INODE, FileSystem, VfsSettings
from tests.support.faultproxy import FaultProxy
from tests.support.portal import Portal, start_portal

# Short long-polls keep the outage tests fast; "within one long-poll deadline" is checked against the setting.
FAST = FeedSettings(longpoll_timeout_ms=2000, longpoll_margin_seconds=1.0, backoff_max_seconds=2.0)
VISIBLE_WITHIN_SECONDS = 2.0


def source_for(portal: Portal, url: str | None = None) -> ctera.CteraSource:
    credentials = Credentials(
        access_key_id=portal.access_key_id,
        secret_access_key=portal.secret_access_key,
        username=portal.username,
        password=portal.password,
    )
    return ctera.create("ctera+" + (url or portal.url), SourceOptions(credentials=credentials))


def dav(portal: Portal, method: str, relpath: str, **kwargs: Any) -> httpx.Response:
    with portal.client() as client:
        response = client.request(method, portal.dav_url(relpath), **kwargs)
    assert response.status_code < 300, (method, relpath, response.status_code, response.text[:200])
    return response


def move(portal: Portal, old: str, new: str) -> None:
    dav(portal, "MOVE", old, headers={"Destination": portal.dav_url(new)})


class NoEngine:
    def open(self, file: OpenFile, identity: Hashable) -> Any:
        raise AssertionError("metadata only")


@dataclass
class Recorder:
    """A sink that records the feed's calls and passes them on to a filesystem, if given."""

    fs: FileSystem | None = None
    calls: list[tuple[str, float]] = field(default_factory=list)
    events: list[ChangeEvent] = field(default_factory=list)

    def feed_up(self, *, new_cursor: bool) -> None:
        self.calls.append(("up-new" if new_cursor else "up-resumed", time.monotonic()))
        if self.fs is not None:
            self.fs.feed_up(new_cursor=new_cursor)

    def feed_down(self) -> None:
        self.calls.append(("down", time.monotonic()))
        if self.fs is not None:
            self.fs.feed_down()

    def feed_reset(self) -> None:
        self.calls.append(("reset", time.monotonic()))
        if self.fs is not None:
            self.fs.feed_reset()

    def apply_changes(self, events: Sequence[ChangeEvent]) -> int:
        self.events += events
        return self.fs.apply_changes(events) if self.fs is not None else len(events)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


async def until(condition: Callable[[], object], limit_seconds: float, what: str) -> float:
    """Seconds until ``condition()`` holds (polled every 20 ms), or fail naming ``what``."""
    started = time.monotonic()
    for _ in range(int(limit_seconds / 0.02) + 1):  # polling what another task or process changes
        if condition():
            return time.monotonic() - started
        await trio.sleep(0.02)
    raise AssertionError(f"{what}: not within {limit_seconds} s")


async def eventually(check: Callable[[], Awaitable[bool]], limit_seconds: float, what: str) -> float:
    """Seconds until the async ``check()`` returns True (polled every 20 ms), or fail naming ``what``."""
    started = time.monotonic()
    for _ in range(int(limit_seconds / 0.02) + 1):
        if await check():
            return time.monotonic() - started
        await trio.sleep(0.02)
    raise AssertionError(f"{what}: not within {limit_seconds} s")


@asynccontextmanager
async def following(feed: PortalFeed, sink: Recorder, *, required: bool = True) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(feed.run, sink, required=required))
        yield nursery
        nursery.cancel_scope.cancel()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "docs" / "a.txt").write_bytes(b"version 1")
    (root / "docs" / "keep.txt").write_bytes(b"keep")
    (root / "docs" / "sub" / "deep.txt").write_bytes(b"deep")
    (root / "other").mkdir()
    (root / "other" / "o.txt").write_bytes(b"o")
    return root


@pytest.fixture
def portal(tree: Path) -> Iterator[Portal]:
    with start_portal(tree, writable=True, feed_faults=True) as running:
        yield running


async def test_entries_carry_the_guids_the_feed_names(portal: Portal) -> None:
    source = source_for(portal)
    try:
        by_name = {entry.name: entry async for entry in source.list_dir("docs")}
        propfind = {e.relpath: e for e in portal.propfind("docs")}
        assert by_name["a.txt"].guid == propfind["docs/a.txt"].guid is not None
        assert (await source.stat("docs")).guid == propfind["docs"].guid
        events, _ = portal.feed_drain()
        event = next(e for e in events if e["name"] == "a.txt")
        assert event["guid"] == by_name["a.txt"].guid
        assert event["parent_guid"] == (await source.stat("docs")).guid
        assert await source.cloud_folder_ids() == []
    finally:
        await source.aclose()


async def test_a_sub_folder_mount_follows_its_cloud_folder_only(portal: Portal) -> None:
    source = source_for(portal, f"{portal.url}/docs/sub")
    feed = source.change_follower(FAST)
    sink = Recorder()
    try:
        async with following(feed, sink):
            assert feed.folder_ids == [int(portal.file_id("docs"))]
            seen = len(sink.events)
            await trio.to_thread.run_sync(functools.partial(dav, portal, "PUT", "other/x.txt", content=b"x"))
            await trio.to_thread.run_sync(functools.partial(dav, portal, "PUT", "docs/sub/y.txt", content=b"y"))
            await until(lambda: any(e.name == "y.txt" for e in sink.events[seen:]), 10, "the event of docs/sub")
            assert all(e.name != "x.txt" for e in sink.events), "another cloud folder's events are not ours"
    finally:
        await source.aclose()


async def test_portal_changes_are_seen_within_2_s_with_every_ttl_long(portal: Portal) -> None:
    source = source_for(portal)
    # Even the short TTL is long here: whatever is seen within 2 s was invalidated by the feed.
    settings = VfsSettings(metadata_ttl_seconds=600, metadata_ttl_with_feed_seconds=3600)
    fs = FileSystem(source, NoEngine(), settings)
    await fs.start()
    sink = Recorder(fs)
    feed = source.change_follower(FAST)
    try:
        async with following(feed, sink):
            docs = await fs.lookup(ROOT_INODE, "docs")
            handle = await fs.opendir(docs.inode)
            fs.releasedir(handle)
            a = await fs.lookup(docs.inode, "a.txt")
            with pytest.raises(EntryNotFoundError):
                await fs.lookup(docs.inode, "new.txt")

            async def run(*args: Any, **kwargs: Any) -> None:
                await trio.to_thread.run_sync(functools.partial(dav, portal, *args, **kwargs))

            async def absent(path: str) -> bool:
                try:
                    await fs.lookup(docs.inode, path)
                except EntryNotFoundError:
                    return True
                return False

            async def present(path: str) -> bool:
                return not await absent(path)

            timings: dict[str, float] = {}
            await run("PUT", "docs/new.txt", content=b"brand new")
            timings["new file"] = await eventually(lambda: present("new.txt"), VISIBLE_WITHIN_SECONDS, "new file")

            await run("PUT", "docs/a.txt", content=b"version 2, longer")

            async def changed() -> bool:
                return (await fs.getattr(a.inode)).size == len(b"version 2, longer")

            timings["changed file"] = await eventually(changed, VISIBLE_WITHIN_SECONDS, "changed file")

            await trio.to_thread.run_sync(move, portal, "docs/a.txt", "docs/renamed.txt")

            async def renamed() -> bool:
                return await absent("a.txt") and await present("renamed.txt")

            timings["renamed file"] = await eventually(renamed, VISIBLE_WITHIN_SECONDS, "renamed file")

            await run("DELETE", "docs/renamed.txt")
            timings["deleted file"] = await eventually(
                lambda: absent("renamed.txt"), VISIBLE_WITHIN_SECONDS, "deleted file"
            )

            await run("MKCOL", "docs/new folder")
            timings["new folder"] = await eventually(
                lambda: present("new folder"), VISIBLE_WITHIN_SECONDS, "new folder"
            )
            assert sink.kinds() == ["up-new"]
            print({what: f"{seconds * 1000:.0f} ms" for what, seconds in timings.items()})
    finally:
        await fs.aclose()
        await source.aclose()


async def test_a_repeated_walk_asks_the_portal_nothing_while_the_feed_is_up(tmp_path: Path) -> None:
    root = tmp_path / "walked"
    for folder in range(6):
        (root / f"d{folder}").mkdir(parents=True)
        for i in range(50):
            (root / f"d{folder}" / f"f{i:02d}.txt").write_bytes(b"x")
    with start_portal(root) as portal:
        await walk_twice(portal)


async def walk_twice(portal: Portal) -> None:
    source = source_for(portal)
    fs = FileSystem(source, NoEngine(), VfsSettings(metadata_ttl_seconds=0.1))  # the short TTL: 100 ms
    await fs.start()
    feed = source.change_follower(FAST)
    try:
        async with following(feed, Recorder(fs)):

            async def walk(inode: int) -> int:
                handle = await fs.opendir(inode)
                names: list[tuple[str, int, bool]] = []
                fs.readdir(handle, 0, lambda name, attrs, _: names.append((name, attrs.inode, attrs.is_dir)) is None)
                fs.releasedir(handle)
                total = len(names)
                for name, child, is_dir in names:
                    await fs.lookup(inode, name)
                    fs.forget([(child, 1)])
                    if is_dir:
                        total += await walk(child)
                return total

            first = await walk(ROOT_INODE)
            before = portal.request_count("PROPFIND")
            await trio.sleep(1.0)  # ten short TTLs
            assert await walk(ROOT_INODE) == first
            assert portal.request_count("PROPFIND") == before, "nothing asked again: the feed vouches for it"
    finally:
        await fs.aclose()
        await source.aclose()


@pytest.mark.parametrize("status", [None, 503])
@pytest.mark.expected_logs(r"change feed of .* is down")
async def test_feed_down_falls_back_within_one_longpoll_deadline_and_resumes(
    portal: Portal, status: int | None
) -> None:
    source = source_for(portal)
    fs = FileSystem(source, NoEngine(), VfsSettings(metadata_ttl_seconds=0.5))
    await fs.start()
    sink = Recorder(fs)
    feed = source.change_follower(FAST)
    try:
        async with following(feed, sink):
            docs = await fs.lookup(ROOT_INODE, "docs")
            await trio.sleep(0.3)  # a long-poll is parked
            portal.set_feed_down(True, status=status)
            killed = time.monotonic()
            await until(lambda: sink.kinds()[-1] == "down", FAST.longpoll_deadline_seconds + 1, "feed_down")
            assert sink.calls[-1][1] - killed <= FAST.longpoll_deadline_seconds
            assert not fs.feed_trusted
            # Still serving, with the short TTL: a change is seen once it has run out.
            await trio.to_thread.run_sync(functools.partial(dav, portal, "PUT", "docs/while-down.txt", content=b"d"))

            async def seen() -> bool:
                try:
                    await fs.lookup(docs.inode, "while-down.txt")
                except EntryNotFoundError:
                    return False
                return True

            await eventually(seen, 0.5 + VISIBLE_WITHIN_SECONDS, "a change while the feed is down")
            portal.set_feed_down(False)
            await until(lambda: sink.kinds()[-1] == "up-resumed", FAST.backoff_max_seconds + 3, "the feed back")
            assert fs.feed_trusted
            assert any(e.name == "while-down.txt" for e in sink.events), "listed from the kept cursor"
            assert sink.kinds() == ["up-new", "down", "up-resumed"]
            stats = feed.statistics()
            assert (stats["state"], stats["downs"], stats["resets"]) == ("up", 1.0, 0.0)
    finally:
        await fs.aclose()
        await source.aclose()


@pytest.mark.expected_logs(r"change feed of .* is down")
async def test_a_hung_portal_is_down_within_one_longpoll_deadline(portal: Portal) -> None:
    port = int(portal.url.rsplit(":", 1)[1])
    with FaultProxy(port) as proxy:
        source = source_for(portal, proxy.url)
        sink = Recorder()
        feed = source.change_follower(FAST)
        try:
            async with following(feed, sink):
                await trio.sleep(0.3)  # a long-poll is parked on a kept-alive connection
                proxy.mode = "hang"
                hung = time.monotonic()
                await until(lambda: sink.kinds()[-1] == "down", FAST.longpoll_deadline_seconds + 2, "feed_down")
                assert sink.calls[-1][1] - hung <= FAST.longpoll_deadline_seconds + 0.5
                proxy.mode = "pass"
                limit = FAST.list_deadline_seconds + FAST.backoff_max_seconds + 3  # a list may hang in flight
                await until(lambda: sink.kinds()[-1] == "up-resumed", limit, "the feed back")
        finally:
            await source.aclose()


@pytest.mark.expected_logs(r"refused its cursor")
async def test_a_reset_feed_resets_the_caches_and_starts_a_new_cursor(portal: Portal) -> None:
    source = source_for(portal)
    fs = FileSystem(source, NoEngine(), VfsSettings(metadata_ttl_seconds=600))
    await fs.start()
    sink = Recorder(fs)
    feed = source.change_follower(FAST)
    try:
        async with following(feed, sink):
            docs = await fs.lookup(ROOT_INODE, "docs")
            handle = await fs.opendir(docs.inode)
            fs.releasedir(handle)
            await trio.to_thread.run_sync(portal.reset_feed)
            await until(lambda: sink.kinds()[-2:] == ["reset", "up-new"], 10, "reset and a new cursor")
            assert fs.statistics()["cached_listings"] == 0
            assert feed.statistics()["resets"] == 1.0
            handle = await fs.opendir(docs.inode)  # cached again, under the new cursor (and a 10-minute short TTL)
            fs.releasedir(handle)
            # The new cursor follows: a change after the reset is seen within 2 s again.
            await trio.to_thread.run_sync(functools.partial(dav, portal, "PUT", "docs/after.txt", content=b"a"))

            async def seen() -> bool:
                try:
                    await fs.lookup(docs.inode, "after.txt")
                except EntryNotFoundError:
                    return False
                return True

            await eventually(seen, VISIBLE_WITHIN_SECONDS, "a change after the reset")
    finally:
        await fs.aclose()
        await source.aclose()


async def test_a_portal_without_a_feed_leaves_the_short_ttl(portal: Portal) -> None:
    portal.set_feed_down(True, status=404)
    source = source_for(portal)
    feed = source.change_follower(FAST)
    sink = Recorder()
    try:
        await feed.run(sink, required=False)  # returns: nothing to follow
        assert feed.state == "unsupported" and sink.calls == []
        with pytest.raises(ConfigError, match="--change-feed on"):
            await source.change_follower(FAST).run(sink, required=True)
    finally:
        await source.aclose()
