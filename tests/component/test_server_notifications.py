"""The Notification Service of the reference portal: list with a cursor, long-poll, events after a rescan."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.portal import Portal, start_portal

LIST = "/ServicesPortal/v2/api/metadata/list"
LONGPOLL = "/ServicesPortal/v2/api/metadata/longpoll"
# docs/ctera-direct-io.md §8.3: the fields cterasdk's Event takes.
EVENT_FIELDS = {
    "type",
    "guid",
    "deleted",
    "name",
    "folder_id",
    "modified",
    "portal_modified_date",
    "file_timestamp",
    "virtual_portal_id",
    "size",
    "id",
    "acl",
    "gvsn",
    "parent_guid",
}


def post(portal: Portal, path: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(portal.url + path, json=body, auth=portal.auth, timeout=timeout)


def list_all(portal: Portal, cursor: str | None) -> tuple[list[dict[str, Any]], str]:
    entries: list[dict[str, Any]] = []
    while True:
        reply = post(portal, LIST, {"folder_ids": [], "cursor": cursor, "max_results": 3}).json()
        entries += reply["entries"]
        cursor = reply["cursor"]
        if not reply["has_more"]:
            assert cursor is not None
            return entries, cursor


def test_feed_reports_added_changed_and_deleted_files(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "keep.txt").write_bytes(b"keep")
    (root / "docs" / "change me.txt").write_bytes(b"version 1")
    (root / "docs" / "delete me.txt").write_bytes(b"doomed")
    with start_portal(root) as portal:
        initial, cursor = list_all(portal, None)
        by_name = {e["name"]: e for e in initial}
        assert {"docs", "keep.txt", "change me.txt", "delete me.txt"} <= set(by_name)
        for entry in initial:
            assert set(entry) >= EVENT_FIELDS, entry
        old = by_name["change me.txt"]
        assert old["type"] == "file" and old["deleted"] is False and old["size"] == len(b"version 1")
        assert str(old["id"]) == portal.file_id("docs/change me.txt")
        assert old["parent_guid"] == by_name["docs"]["guid"]

        # Nothing new: a short long-poll says so.
        assert post(portal, LONGPOLL, {"folder_ids": [], "cursor": cursor, "timeout": 100}).json() == {"changes": False}

        # A long-poll parked before the change must wake up after the rescan.
        woke: dict[str, Any] = {}
        waiter = threading.Thread(
            target=lambda: woke.update(
                post(portal, LONGPOLL, {"folder_ids": [], "cursor": cursor, "timeout": 30000}).json()
            )
        )
        waiter.start()
        (root / "docs" / "new file.txt").write_bytes(b"brand new")
        (root / "docs" / "change me.txt").write_bytes(b"version 2, longer")
        os.utime(root / "docs" / "change me.txt", ns=(1, 10**18))  # a different mtime even on coarse clocks
        (root / "docs" / "delete me.txt").unlink()
        portal.rescan()
        waiter.join(timeout=60)
        assert woke == {"changes": True}

        events, cursor2 = list_all(portal, cursor)
        assert cursor2 != cursor
        by_name = {e["name"]: e for e in events}
        # The folder's mtime changed (a file came, one went): an event with its unchanged id.
        assert set(by_name) == {"new file.txt", "change me.txt", "delete me.txt", "docs"}
        assert by_name["docs"]["type"] == "folder" and by_name["docs"]["deleted"] is False
        assert str(by_name["docs"]["id"]) == portal.file_id("docs")
        del by_name["docs"]
        assert by_name["new file.txt"]["deleted"] is False
        assert str(by_name["new file.txt"]["id"]) == portal.file_id("docs/new file.txt")
        changed = by_name["change me.txt"]
        assert changed["deleted"] is False and changed["guid"] == old["guid"]
        assert changed["id"] != old["id"], "a changed file gets a new file id"
        assert changed["size"] == len(b"version 2, longer")
        assert str(changed["id"]) == portal.file_id("docs/change me.txt")
        assert by_name["delete me.txt"]["deleted"] is True

        # The old version's id is gone: Direct IO answers 400 for it.
        headers = {"Authorization": f"Bearer {portal.access_key_id}"}
        assert httpx.get(f"{portal.url}/directio/{old['id']}", headers=headers).status_code == 400

        # Filtering by cloud folder: 'docs' is a top-level folder, so its id is the folder_id of its files.
        docs_id = int(portal.file_id("docs"))
        reply = post(portal, LIST, {"folder_ids": [docs_id], "cursor": cursor, "max_results": 100}).json()
        assert {e["name"] for e in reply["entries"]} == set(by_name)
        reply = post(portal, LIST, {"folder_ids": [docs_id + 999999], "cursor": cursor}).json()
        assert reply["entries"] == []


def test_feed_refuses_bad_requests(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"x")
    with start_portal(tmp_path) as portal:
        assert httpx.post(portal.url + LIST, json={"cursor": None}).status_code == 401
        assert post(portal, LIST, {"cursor": "not-a-cursor"}).status_code == 400
        assert post(portal, LIST, {"folder_ids": list(range(101))}).status_code == 400
        assert post(portal, LIST, {"max_results": 0}).status_code == 400
        response = httpx.post(portal.url + LIST, content=b"{", auth=portal.auth)
        assert response.status_code == 400
        bearer = {"Authorization": f"Bearer {portal.token}"}
        assert httpx.post(portal.url + LIST, json={}, headers=bearer).status_code == 200


def _server_side_unread_bytes(port: int) -> list[int]:
    """Bytes the kernel holds unread for each established connection to ``port`` on loopback (/proc/net/tcp)."""
    unread = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
            unread.append(int(fields[4].split(":")[1], 16))
    return unread


def test_sigterm_exits_zero_promptly_with_a_parked_longpoll(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"x")
    with start_portal(tmp_path) as portal:
        _, cursor = list_all(portal, None)
        url = httpx.URL(portal.url)
        assert url.host == "127.0.0.1" and url.port is not None
        body = json.dumps({"cursor": cursor, "timeout": 60000}).encode()
        token = base64.b64encode(":".join(portal.auth).encode()).decode()
        request = (
            f"POST {LONGPOLL} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nAuthorization: Basic {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        with socket.create_connection((url.host, url.port), timeout=10) as conn:
            conn.sendall(request)
            # Parked: the server has read every byte of the request (nothing unread on its side of the one
            # connection) and, a while later, has still not answered.
            deadline = time.monotonic() + 10
            while _server_side_unread_bytes(url.port) != [0]:
                assert time.monotonic() < deadline, _server_side_unread_bytes(url.port)
                time.sleep(0.01)
            time.sleep(0.3)
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)  # no answer yet: the long-poll is parked
            conn.setblocking(True)
            started = time.monotonic()
            portal.proc.terminate()
            assert portal.proc.wait(timeout=10) == 0
            assert time.monotonic() - started < 3
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        # The parked long-poll was answered on the way out ("no changes"), not dropped.
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), answer
        assert json.loads(payload) == {"changes": False}
