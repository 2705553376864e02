"""The reference portal's change feed as a client follower relies on it (issue 15; docs/serve-feed.md): events for
folders (renames, subtree deletes, new mtimes), ``ctera:guid`` in PROPFIND, events served only once PROPFIND shows
them, cursors that expire or belong to another feed (410), the test knobs (feed down, feed reset), server-side
request counts, and long-polls that wake at once and cost no thread each."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.portal import (
    CTERA,
    DAV,
    FEED_LIST,
    FEED_LONGPOLL,
    Portal,
    parse_multistatus,
    start_portal,
)

# docs/ctera-direct-io.md §8.3, the fields a follower reads.
FOLLOWER_FIELDS = {"type", "guid", "parent_guid", "id", "deleted", "size", "modified", "name", "folder_id"}
# A connection closed without an answer: httpx sees the server disconnect, or a reset when bytes were left unread.
CLOSED = (httpx.RemoteProtocolError, httpx.ReadError)


def wait_for_events(portal: Portal, cursor: str, *, timeout_seconds: float = 60) -> tuple[list[dict[str, Any]], str]:
    """Long-poll until something follows ``cursor``, then drain it."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if portal.feed_longpoll(cursor, timeout_ms=5000).json()["changes"]:
            return portal.feed_drain(cursor)  # type: ignore[return-value]
    raise AssertionError(f"no event after {cursor} within {timeout_seconds} s")


def dav(portal: Portal, method: str, relpath: str, **kwargs: Any) -> httpx.Response:
    with portal.client() as client:
        return client.request(method, portal.dav_url(relpath), **kwargs)


def move(portal: Portal, src: str, dst: str) -> int:
    return dav(portal, "MOVE", src, headers={"Destination": portal.dav_url(dst)}).status_code


def by_path(events: list[dict[str, Any]]) -> dict[tuple[str, bool], dict[str, Any]]:
    """(path, deleted) -> event, each key seen once."""
    found: dict[tuple[str, bool], dict[str, Any]] = {}
    for event in events:
        key = (event["path"], event["deleted"])
        assert key not in found, f"two events for {key}"
        found[key] = event
    return found


def test_a_rescan_reports_folder_renames_subtree_deletes_and_new_folder_times(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for rel in ("top/a/b/deep.txt", "top/a/shallow.txt", "top/keep.txt", "gone/x/y.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    with start_portal(root) as portal:
        initial, cursor = portal.feed_drain()
        before = {e["path"]: e for e in initial}
        root_guid = portal.propfind("", depth="0")[0].guid
        top_mtime = portal.propfind("top", depth="0")[0].lastmodified

        os.rename(root / "top" / "a", root / "top" / "a2")  # a folder rename on disk: a delete and an add
        shutil.rmtree(root / "gone")  # a top-level folder with its subtree
        os.utime(root / "top", ns=(10**18, 10**18))  # and a mtime nobody can miss
        portal.rescan()
        events, _ = wait_for_events(portal, cursor)

        for event in events:
            assert set(event) >= FOLLOWER_FIELDS, event
        seen = by_path(events)
        old_tree = ["top/a", "top/a/b", "top/a/b/deep.txt", "top/a/shallow.txt", "gone", "gone/x", "gone/x/y.txt"]
        new_tree = ["top/a2", "top/a2/b", "top/a2/b/deep.txt", "top/a2/shallow.txt"]
        assert set(seen) == {(p, True) for p in old_tree} | {(p, False) for p in new_tree} | {("top", False)}
        order = [(e["path"], e["deleted"]) for e in events]
        for path in old_tree:  # every node of a deleted subtree has its delete, under its id and guid
            gone = seen[path, True]
            assert (gone["id"], gone["guid"], gone["type"]) == (
                before[path]["id"],
                before[path]["guid"],
                before[path]["type"],
            )
            assert gone["parent_guid"] == before[path]["parent_guid"]
            parent = path.rpartition("/")[0]
            if parent in old_tree:  # deepest first: the contents before the folder
                assert order.index((path, True)) < order.index((parent, True))
        assert seen["top/a", True]["type"] == seen["gone", True]["type"] == "folder"
        assert seen["gone", True]["parent_guid"] == root_guid
        for path in new_tree:  # the new paths: parents first, parent_guid naming the new parent
            added = seen[path, False]
            assert added["id"] != before[path.replace("a2", "a", 1)]["id"]
            parent = path.rpartition("/")[0]
            assert added["parent_guid"] == (seen[parent, False] if parent in new_tree else before[parent])["guid"]
            if parent in new_tree:
                assert order.index((parent, False)) < order.index((path, False))
        # The folder that kept its name but whose mtime changed: same id and guid, its new time, and PROPFIND says so.
        top = seen["top", False]
        assert (top["type"], top["id"], top["guid"]) == ("folder", before["top"]["id"], before["top"]["guid"])
        assert top["file_timestamp"].startswith("2001-09-09T01:46:40")
        assert portal.propfind("top", depth="0")[0].lastmodified not in (top_mtime, None)
        assert portal.propfind("top", depth="0")[0].lastmodified == "Sun, 09 Sep 2001 01:46:40 GMT"


def test_an_event_is_listed_only_once_propfind_shows_it(tmp_path: Path) -> None:
    """A scan commits its events in batches of 500 while it goes on encoding; a follower that lists an event and then
    PROPFINDs its folder must find the entry (else it would cache a stale listing for the feed TTL)."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "seed.txt").write_bytes(b"seed")
    with start_portal(root, extra_args=["--compression", "gzip"]) as portal:
        _, cursor = portal.feed_drain()
        burst = root / "burst"
        burst.mkdir()
        for i in range(700):
            (burst / f"f{i:04d}.bin").write_bytes(os.urandom(2048))
        portal.rescan()
        wanted = {f"burst/f{i:04d}.bin" for i in range(700)}
        seen: set[str] = set()
        deadline = time.monotonic() + 120
        with portal.client() as client:
            while not wanted <= seen:
                assert time.monotonic() < deadline, f"{len(wanted - seen)} files never appeared in the feed"
                reply = client.post(FEED_LIST, json={"cursor": cursor, "max_results": 10000}).json()
                cursor = reply["cursor"]
                fresh = {e["path"] for e in reply["entries"] if not e["deleted"]} & wanted
                if fresh:
                    listing = client.request("PROPFIND", portal.dav_url("burst"), headers={"Depth": "1"})
                    assert listing.status_code == 207, "the feed named burst/ before PROPFIND listed it"
                    listed = {e.relpath for e in parse_multistatus(listing.content)}
                    assert fresh <= listed, f"{len(fresh - listed)} events listed before PROPFIND shows their files"
                    seen |= fresh


def test_propfind_offers_ctera_guid_that_matches_the_feed(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "docs" / "sub" / "f.txt").write_bytes(b"one")
    (root / "top.txt").write_bytes(b"top")
    with start_portal(root, writable=True) as portal:
        events, cursor = portal.feed_drain()
        feed = {e["path"]: e for e in events}
        # allprop (an empty body) carries ctera:guid for every entry, the root included
        listed = {e.relpath: e for e in portal.propfind("", depth="1") + portal.propfind("docs/sub", depth="1")}
        assert set(listed) == {"", "docs", "top.txt", "docs/sub", "docs/sub/f.txt"}
        for path, entry in listed.items():
            assert entry.guid, path
            if path:
                assert entry.guid == feed[path]["guid"], path
                parent = path.rpartition("/")[0]
                assert feed[path]["parent_guid"] == listed[parent].guid, path  # parents by guid, the root's too
        # asked for by name
        body = (
            f'<?xml version="1.0"?><D:propfind xmlns:D="{DAV}" xmlns:C="{CTERA}">'
            "<D:prop><C:guid/><C:fileid/></D:prop></D:propfind>"
        ).encode()
        reply = dav(portal, "PROPFIND", "docs/sub", headers={"Depth": "1"}, content=body)
        assert reply.status_code == 207
        for response in ET.fromstring(reply.content).findall(f"{{{DAV}}}response"):
            href = urllib.parse.unquote(response.findtext(f"{{{DAV}}}href") or "")
            guid = response.findtext(f".//{{{CTERA}}}guid")
            assert guid == feed[href.split("/webdav/", 1)[1].strip("/")]["guid"], href
        # A guid stays with the item: a new version (new id) and a rename keep it.
        old = listed["docs/sub/f.txt"]
        assert dav(portal, "PUT", "docs/sub/f.txt", content=b"two!").status_code == 204
        assert move(portal, "docs/sub/f.txt", "docs/g.txt") == 201
        (moved,) = portal.propfind("docs/g.txt", depth="0")
        assert moved.guid == old.guid and moved.file_id != old.file_id
        events, _ = portal.feed_drain(cursor)
        assert {e["guid"] for e in events if e["type"] == "file"} == {old.guid}


def test_a_folder_move_reports_its_whole_subtree(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for rel in ("src/a/f1.txt", "src/a/b/f2.txt", "dst/old/x.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    with start_portal(root, writable=True) as portal:
        initial, cursor = portal.feed_drain()
        before = {e["path"]: e for e in initial}
        assert move(portal, "src/a", "dst/old") == 204  # over a folder: that one's subtree goes first
        events, cursor = portal.feed_drain(cursor)
        order = [(e["path"], e["deleted"]) for e in events]
        gone = ["dst/old/x.txt", "dst/old", "src/a/b/f2.txt", "src/a/b", "src/a/f1.txt", "src/a"]
        came = ["dst/old", "dst/old/b", "dst/old/b/f2.txt", "dst/old/f1.txt"]
        assert sorted(order) == sorted([(p, True) for p in gone] + [(p, False) for p in came])
        assert order[:2] == [("dst/old/x.txt", True), ("dst/old", True)]  # the replaced folder first
        assert all(deleted for _, deleted in order[: len(gone)])  # then every old path, before any new one
        for path, deleted in order:  # contents before their folder when deleted, after it when added
            parent = path.rpartition("/")[0]
            if (parent, deleted) in order and parent not in ("dst", "src"):
                before_parent = order.index((path, deleted)) < order.index((parent, deleted))
                assert before_parent == deleted, (path, deleted)
        seen = by_path(events)
        for old, new in (("src/a", "dst/old"), ("src/a/b", "dst/old/b"), ("src/a/b/f2.txt", "dst/old/b/f2.txt")):
            assert seen[new, False]["id"] == seen[old, True]["id"] == before[old]["id"]  # ids and guids stay
            assert seen[new, False]["guid"] == before[old]["guid"]
        assert seen["dst/old", False]["parent_guid"] == before["dst"]["guid"]
        assert seen["dst/old", False]["type"] == "folder" and seen["src/a/b", True]["type"] == "folder"
        # the folder_id of the moved items is the cloud folder they are in now; their deletes name the old one
        assert seen["dst/old/b/f2.txt", False]["folder_id"] == before["dst"]["id"]
        assert seen["src/a/b/f2.txt", True]["folder_id"] == before["src"]["id"]
        # PROPPATCH of a folder: an event with its new time
        date = "Tue, 15 Nov 1994 12:45:26 GMT"
        patch = (
            f'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:"><D:set><D:prop>'
            f"<D:getlastmodified>{date}</D:getlastmodified></D:prop></D:set></D:propertyupdate>"
        ).encode()
        assert dav(portal, "PROPPATCH", "dst/old", content=patch).status_code == 207
        (event,) = portal.feed_drain(cursor)[0]
        assert (event["path"], event["type"], event["file_timestamp"]) == ("dst/old", "folder", "1994-11-15T12:45:26Z")


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["code"] == code and body["error"], body


def test_cursors_expire_beyond_the_retention_and_belong_to_one_feed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "tree").mkdir()
    args = ["--feed-retention", "5"]
    with start_portal(tmp_path / "tree", writable=True, extra_args=args, state_dir=state) as portal:
        start = portal.feed_cursor()
        for i in range(5):
            assert dav(portal, "MKCOL", f"d{i}").status_code == 201
        edge = portal.feed_cursor()  # 5 events behind the newest once 5 more are made: still served
        for i in range(5, 10):
            assert dav(portal, "MKCOL", f"d{i}").status_code == 201
        with portal.client() as client:
            refused(client.post(FEED_LIST, json={"cursor": start}), 410, "cursor_expired")
            refused(client.post(FEED_LONGPOLL, json={"cursor": start, "timeout": 10}), 410, "cursor_expired")
        events, _ = portal.feed_drain(edge)
        assert [e["path"] for e in events] == [f"d{i}" for i in range(5, 10)]
        # A null cursor starts at the oldest event kept.
        events, newest = portal.feed_drain(None)
        assert [e["path"] for e in events] == [f"d{i}" for i in range(5, 10)]
        assert dav(portal, "MKCOL", "d10").status_code == 201
        with portal.client() as client:
            refused(client.post(FEED_LIST, json={"cursor": edge}), 410, "cursor_expired")  # now one too many
            for bad in ("not-a-cursor", "", 12, ["x"], newest + "x"):
                refused(client.post(FEED_LIST, json={"cursor": bad}), 400, "invalid_cursor")
                refused(client.post(FEED_LONGPOLL, json={"cursor": bad, "timeout": 0}), 400, "invalid_cursor")
            refused(client.post(FEED_LIST, json={"cursor": "7"}), 410, "unknown_cursor")  # an earlier version's
            feed_id, _, seq = newest.partition("-")
            ahead = f"{feed_id}-{int(seq) + 1000}"  # never handed out (a state dir restored from a backup)
            refused(client.post(FEED_LIST, json={"cursor": ahead}), 410, "unknown_cursor")
        with start_portal(tmp_path / "tree") as other, other.client() as client:  # another state dir, another feed
            refused(client.post(FEED_LIST, json={"cursor": newest}), 410, "unknown_cursor")
    # The same state dir again: its cursors go on working across a restart...
    same = {"DIRECTFS_ACCESS_KEY_ID": portal.access_key_id, "DIRECTFS_SECRET_ACCESS_KEY": portal.secret_access_key}
    with start_portal(tmp_path / "tree", writable=True, extra_args=args, state_dir=state, env=same) as portal:
        events, _ = portal.feed_drain(newest)
        assert [e["path"] for e in events] == ["d10"]
    # ...unless the secret changed: every file is re-encoded under new ids without deleted events, so the feed
    # starts again and its old cursors answer 410.
    with start_portal(tmp_path / "tree", state_dir=state) as portal, portal.client() as client:
        refused(client.post(FEED_LIST, json={"cursor": newest}), 410, "unknown_cursor")


def test_sigusr2_resets_the_feed_and_wakes_parked_long_polls(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_bytes(b"x")
    with start_portal(tmp_path, writable=True) as portal:
        cursor = portal.feed_cursor()
        woke: dict[str, Any] = {}
        waiter = threading.Thread(
            target=lambda: woke.update(portal.feed_longpoll(cursor, timeout_ms=30000).json()), daemon=True
        )
        waiter.start()
        time.sleep(0.3)  # parked
        started = time.monotonic()
        portal.reset_feed()
        waiter.join(timeout=10)
        assert woke == {"changes": True} and time.monotonic() - started < 5
        with portal.client() as client:
            refused(client.post(FEED_LIST, json={"cursor": cursor}), 410, "unknown_cursor")
        events, fresh = portal.feed_drain(None)
        assert events == []
        assert dav(portal, "MKCOL", "after").status_code == 201
        assert [e["path"] for e in portal.feed_drain(fresh)[0]] == ["after"]
        assert "change feed reset" in portal.stderr_text()


def test_the_feed_goes_down_and_comes_back(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_bytes(b"x")
    with start_portal(tmp_path, writable=True, feed_faults=True) as portal:
        cursor = portal.feed_cursor()
        cut: dict[str, Any] = {}

        def park() -> None:
            try:
                portal.feed_longpoll(cursor, timeout_ms=30000)
            except httpx.HTTPError as exc:
                cut["error"], cut["after"] = exc, time.monotonic()

        waiter = threading.Thread(target=park, daemon=True)
        waiter.start()
        time.sleep(0.3)
        down_at = time.monotonic()
        portal.set_feed_down(True)  # connections closed without an answer, parked long-polls too
        waiter.join(timeout=10)
        assert isinstance(cut.get("error"), CLOSED), cut
        assert cut["after"] - down_at < 2
        with pytest.raises(CLOSED):
            portal.feed_list(cursor)
        with pytest.raises(CLOSED):
            portal.feed_longpoll(cursor, timeout_ms=100)
        # The rest of the portal serves on, and changes made meanwhile are kept for the feed.
        assert dav(portal, "MKCOL", "while-down").status_code == 201
        assert [e.relpath for e in portal.propfind("while-down", depth="0")] == ["while-down"]
        portal.set_feed_down(True, status=503)
        with portal.client() as client:
            for path, body in ((FEED_LIST, {"cursor": cursor}), (FEED_LONGPOLL, {"cursor": cursor, "timeout": 100})):
                reply = client.post(path, json=body)
                assert reply.status_code == 503 and reply.json()["status"] == 503
        portal.set_feed_down(False)
        assert portal.feed_longpoll(cursor, timeout_ms=100).json() == {"changes": True}
        assert [e["path"] for e in portal.feed_drain(cursor)[0]] == ["while-down"]


def test_request_counts_on_the_server_side(tmp_path: Path) -> None:
    (tmp_path / "many").mkdir()
    for i in range(3):
        (tmp_path / "many" / f"f{i}.txt").write_bytes(b"x")
    with start_portal(tmp_path) as portal:
        base = portal.request_count("PROPFIND", "/ServicesPortal/webdav/many")
        portal.propfind("many")
        portal.propfind("many/f1.txt", depth="0")
        portal.propfind("", depth="1")
        assert portal.request_count("PROPFIND", "/ServicesPortal/webdav/many") == base + 2
        assert portal.request_count("PROPFIND", "/ServicesPortal/webdav/many/f1") == 1
        assert portal.request_count("PROPFIND") >= 3
        assert portal.request_count("GET", "/ServicesPortal/webdav/") == 0
        portal.feed_list()
        assert portal.request_count("POST", FEED_LIST) == 1
        assert portal.request_count(None, "/directfs/") == 0  # the counts themselves are not counted
        # behind the portal login
        assert httpx.get(portal.url + "/directfs/test/requests").status_code == 401
    with start_portal(tmp_path, count_requests=False) as portal, portal.client() as client:
        assert client.get("/directfs/test/requests").status_code == 404


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


async def _raw_post(portal: Portal, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One POST on a connection of its own, read to the end; (JSON answer, when it came). Plain asyncio streams: an
    httpx AsyncClient spends seconds of its own on 200 simultaneous answers, which would hide the server's time."""
    url = httpx.URL(portal.url)
    assert url.port is not None
    payload = json.dumps(body).encode()
    token = base64.b64encode(":".join(portal.auth).encode()).decode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nAuthorization: Basic {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head + payload)
        answer = await reader.read()
    finally:
        writer.close()
    at = time.monotonic()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 200 " in status_line, answer
    return json.loads(rest.partition(b"\r\n\r\n")[2]), at


def test_long_polls_honour_their_timeout_wake_at_once_and_cost_no_thread(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with start_portal(tmp_path, writable=True) as portal:
        cursor = portal.feed_cursor()
        b_id = int(portal.file_id("b"))
        started = time.monotonic()
        assert portal.feed_longpoll(cursor, timeout_ms=300).json() == {"changes": False}
        assert 0.3 <= time.monotonic() - started < 1.5
        with portal.client() as client:  # not a number of milliseconds: 400
            for bad in (-1, "10", True, None):
                reply = client.post(FEED_LONGPOLL, json={"cursor": cursor, "timeout": bad})
                assert reply.status_code == 400, bad
        threads_before = _threads(portal.proc.pid)

        async def many() -> tuple[list[tuple[dict[str, Any], float]], float, int]:
            everyone = [
                asyncio.ensure_future(_raw_post(portal, FEED_LONGPOLL, {"cursor": cursor, "timeout": 30000}))
                for _ in range(200)
            ]
            elsewhere = [  # another cloud folder: nothing for them
                asyncio.ensure_future(
                    _raw_post(portal, FEED_LONGPOLL, {"cursor": cursor, "timeout": 1500, "folder_ids": [b_id]})
                )
                for _ in range(20)
            ]
            await asyncio.sleep(1.0)  # all parked
            parked_threads = _threads(portal.proc.pid)
            changed_at = time.monotonic()
            assert await asyncio.to_thread(lambda: dav(portal, "MKCOL", "a/new").status_code) == 201
            return await asyncio.gather(*everyone, *elsewhere), changed_at, parked_threads

        results, changed_at, parked_threads = asyncio.run(many())
        assert parked_threads <= threads_before + 2, (threads_before, parked_threads)
        woken, other = results[:200], results[200:]
        assert all(answer == {"changes": True} for answer, _ in woken)
        assert max(at for _, at in woken) - changed_at < 1.0
        # Long-polls for another cloud folder stay parked until their own timeout.
        assert all(answer == {"changes": False} for answer, _ in other)
        assert min(at for _, at in other) - changed_at > 0.2
