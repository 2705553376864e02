"""Writes into the reference portal (``directfs serve DIR --writable``, docs/serve-writes.md), checked from outside:
WebDAV with httpx and raw sockets (for ``Expect: 100-continue`` and cut bodies), the DIR on disk, Direct IO with the
real ``cterasdk`` and with directfs's codec, and the change feed.

One writable portal serves most tests (each test writes under its own folder); a read-only one, two with upload
faults and one on a full disk (a 1 MiB tmpfs in a private mount namespace) check the rest.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from directfs.errors import ConfigError
from tests.support.portal import DAV, Portal, shared_ssl_context, start_portal
from tests.support.portalclients import directio_json, download_with_codec, sdk_download

BLOCK = 64 * 1024  # small blocks: an upload of a few hundred KiB is several blocks
MAX_UPLOAD = 4 * 1024 * 1024
LIST = "/ServicesPortal/v2/api/metadata/list"
LONGPOLL = "/ServicesPortal/v2/api/metadata/longpoll"
TEMP_PREFIX = ".directfs-upload-"
RNG = random.Random(14)


def blob(size: int) -> bytes:
    return RNG.randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    (root / "seed").mkdir()
    (root / "seed" / "file.bin").write_bytes(blob(3 * BLOCK + 5))
    return root


@pytest.fixture(scope="module")
def portal(tree: Path) -> Iterator[Portal]:
    args = ["--block-size", "64K", "--max-upload-size", str(MAX_UPLOAD)]
    with start_portal(tree, writable=True, extra_args=args) as p:
        yield p


def http(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request without the portal's login (a client of the test's own), sharing the TLS context."""
    return httpx.request(method, url, verify=shared_ssl_context(), **kwargs)


def dav(portal: Portal, method: str, relpath: str, *, folder: bool = False, **kwargs: Any) -> httpx.Response:
    with portal.client() as client:
        return client.request(method, portal.dav_url(relpath, folder=folder), **kwargs)


def put(portal: Portal, relpath: str, data: bytes, **kwargs: Any) -> httpx.Response:
    return dav(portal, "PUT", relpath, content=data, **kwargs)


def entry(portal: Portal, relpath: str) -> Any:
    (found,) = portal.propfind(relpath, depth="0")
    return found


def exists(portal: Portal, relpath: str) -> bool:
    return dav(portal, "PROPFIND", relpath, headers={"Depth": "0"}).status_code == 207


def directio_status(portal: Portal, file_id: str) -> int:
    headers = {"Authorization": f"Bearer {portal.access_key_id}"}
    return http("GET", f"{portal.url}/directio/{file_id}", headers=headers).status_code


def served(portal: Portal, file_id: str) -> bytes:
    """The file's bytes through /directio and its signed block URLs, decoded with directfs's codec."""
    return download_with_codec(portal, directio_json(portal, file_id))


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX))


def wait_for(check: Any, timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def proppatch_body(date: str, *extra: str) -> bytes:
    props = f"<D:getlastmodified>{date}</D:getlastmodified>" + "".join(extra)
    return (
        '<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:example">'
        f"<D:set><D:prop>{props}</D:prop></D:set></D:propertyupdate>"
    ).encode()


def propstats(body: bytes) -> dict[str, str]:
    """{property local name: status line} of a one-response multistatus."""
    import xml.etree.ElementTree as ET

    found = {}
    for propstat in ET.fromstring(body).iter(f"{{{DAV}}}propstat"):
        status = propstat.findtext(f"{{{DAV}}}status") or ""
        for prop in propstat.find(f"{{{DAV}}}prop") or []:
            found[prop.tag.rpartition("}")[2]] = status
    return found


# --- raw HTTP (Expect: 100-continue, cut bodies) -------------------------------------------------------------------


def connect(portal: Portal) -> socket.socket:
    url = urllib.parse.urlsplit(portal.url)
    assert url.hostname is not None and url.port is not None
    return socket.create_connection((url.hostname, url.port), timeout=10)


def basic(portal: Portal) -> str:
    return "Basic " + base64.b64encode(f"{portal.username}:{portal.password}".encode()).decode()


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_head(sock: socket.socket) -> tuple[int, dict[str, str]]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(4096)
        assert piece, f"connection closed after {data!r}"
        data += piece
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    status_line, *lines = head.split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


# --- read-only and authentication ---------------------------------------------------------------------------------


def test_without_writable_every_write_answers_405(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"keep me")
    with start_portal(tmp_path) as ro:
        body = proppatch_body("Tue, 15 Nov 1994 12:45:26 GMT")
        for method, kwargs in [
            ("PUT", {"content": b"x"}),
            ("MKCOL", {}),
            ("DELETE", {}),
            ("MOVE", {"headers": {"Destination": ro.dav_url("g.txt")}}),
            ("PROPPATCH", {"content": body}),
        ]:
            response = dav(ro, method, "f.txt", **kwargs)
            assert response.status_code == 405, method
            assert response.headers["Allow"] == "OPTIONS, GET, HEAD, PROPFIND", method
        assert dav(ro, "OPTIONS", "").headers["Allow"] == "OPTIONS, GET, HEAD, PROPFIND"
        # A client waiting for 100 Continue is told at once, and never sends the body.
        with connect(ro) as sock:
            head = {"Authorization": basic(ro), "Content-Length": "5", "Expect": "100-continue"}
            sock.sendall(request_head("PUT", ro.dav_url("new.txt"), head))
            status, headers = read_head(sock)
            assert status == 405 and headers.get("connection") == "close"
        reply = dav(ro, "PROPFIND", "f.txt", headers={"Depth": "0"})
        assert b"<ctera:writepermission>false</ctera:writepermission>" in reply.content
    assert sorted(os.listdir(tmp_path)) == ["f.txt"] and (tmp_path / "f.txt").read_bytes() == b"keep me"


def test_writes_need_the_portal_login(portal: Portal, tree: Path) -> None:
    (tree / "auth").mkdir()
    (tree / "auth" / "f.txt").write_bytes(b"stays")
    portal.rescan()
    wait_for(lambda: exists(portal, "auth/f.txt"))
    url = portal.url + portal.dav_url("auth/f.txt")
    for auth in (None, (portal.username, "wrong password"), (portal.access_key_id, portal.secret_access_key)):
        for method in ("PUT", "MKCOL", "DELETE", "MOVE", "PROPPATCH"):
            response = http(method, url, auth=auth, content=b"x", headers={"Destination": portal.dav_url("auth/g.txt")})
            assert response.status_code == 401, (method, auth)
            assert response.headers.get_list("WWW-Authenticate"), method
    # The Direct IO key is not a portal login.
    bearer = {"Authorization": f"Bearer {portal.access_key_id}"}
    assert http("PUT", url, content=b"x", headers=bearer).status_code == 401
    assert sorted(os.listdir(tree / "auth")) == ["f.txt"] and (tree / "auth" / "f.txt").read_bytes() == b"stays"
    # The Bearer token is one.
    token = {"Authorization": f"Bearer {portal.token}"}
    assert http("PUT", url, content=b"by token", headers=token).status_code == 204
    assert (tree / "auth" / "f.txt").read_bytes() == b"by token"
    # A client that waits for 100 Continue is refused before it sends its body, and the connection is closed.
    with connect(portal) as sock:
        sock.sendall(
            request_head("PUT", portal.dav_url("auth/n.txt"), {"Content-Length": "5", "Expect": "100-continue"})
        )
        status, headers = read_head(sock)
        assert status == 401 and headers.get("connection") == "close"


# --- PUT ---------------------------------------------------------------------------------------------------------


def test_put_creates_and_replaces_with_new_ids_and_exact_blocks(portal: Portal, tree: Path) -> None:
    assert dav(portal, "MKCOL", "put").status_code == 201
    first = blob(5 * BLOCK + 123)
    response = put(portal, "put/data.bin", first)
    assert response.status_code == 201 and response.headers["ETag"]
    assert (tree / "put" / "data.bin").read_bytes() == first
    listed = entry(portal, "put/data.bin")
    assert listed.size == len(first) and listed.etag == response.headers["ETag"]
    old_id = listed.file_id
    reply = directio_json(portal, old_id)
    assert [c["len"] for c in reply["chunks"]] == [BLOCK] * 5 + [123], "encoded with the portal's --block-size"
    assert reply["encrypt_info"]["data_encrypted"] is True and reply["compression_type"] == "SNAPPY"
    assert served(portal, old_id) == first
    assert sdk_download(portal, old_id) == first, "the real cterasdk reads an uploaded file byte-exact"
    assert http("GET", portal.url + portal.dav_url("put/data.bin"), auth=portal.auth).content == first

    second = first[: 2 * BLOCK] + blob(BLOCK + 7)  # the first two blocks unchanged
    assert put(portal, "put/data.bin", second).status_code == 204
    new = entry(portal, "put/data.bin")
    assert new.file_id != old_id and new.size == len(second)
    assert directio_status(portal, old_id) == 400, "the old version's id answers like any unknown id"
    assert served(portal, new.file_id) == second
    new_chunks = directio_json(portal, new.file_id)["chunks"]
    assert [c["url"].split("?")[0] for c in new_chunks[:2]] == [c["url"].split("?")[0] for c in reply["chunks"][:2]]

    flags = dav(portal, "PROPFIND", "put/data.bin", headers={"Depth": "0"}).content
    assert b"<ctera:writepermission>true</ctera:writepermission>" in flags
    assert "PUT" in dav(portal, "OPTIONS", "").headers["Allow"]

    assert put(portal, "put/empty.bin", b"").status_code == 201
    assert entry(portal, "put/empty.bin").size == 0 and (tree / "put" / "empty.bin").read_bytes() == b""
    assert leftovers(tree / "put") == []


def test_put_refusals(portal: Portal, tree: Path) -> None:
    assert dav(portal, "MKCOL", "refuse").status_code == 201
    assert put(portal, "refuse/f.txt", b"v1").status_code == 201
    etag = entry(portal, "refuse/f.txt").etag

    assert put(portal, "no such folder/f.txt", b"x").status_code == 409
    assert put(portal, "refuse/f.txt/under a file", b"x").status_code == 409
    onto_folder = put(portal, "refuse", b"x")
    assert onto_folder.status_code == 405 and "PUT" not in onto_folder.headers["Allow"]
    assert put(portal, "", b"x").status_code == 405
    with portal.client() as client:
        assert client.put(portal.dav_url("refuse/slash") + "/", content=b"x").status_code == 400
    assert put(portal, "refuse/part.txt", b"x", headers={"Content-Range": "bytes 0-0/10"}).status_code == 400
    too_big = put(portal, "refuse/big.bin", bytes(MAX_UPLOAD + 1))
    assert too_big.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the limit is passed
        for _ in range(MAX_UPLOAD // 65536 + 1):
            yield bytes(65536)

    assert put(portal, "refuse/chunked.bin", chunks()).status_code == 413  # type: ignore[arg-type]

    # Preconditions: create only, and replace only the version the client saw.
    assert put(portal, "refuse/f.txt", b"v2", headers={"If-None-Match": "*"}).status_code == 412
    assert put(portal, "refuse/f.txt", b"v2", headers={"If-Match": '"other"'}).status_code == 412
    assert put(portal, "refuse/none.txt", b"v2", headers={"If-Match": "*"}).status_code == 412
    assert put(portal, "refuse/f.txt", b"v2", headers={"If-Match": etag}).status_code == 204
    assert put(portal, "refuse/new.txt", b"n", headers={"If-None-Match": "*"}).status_code == 201

    # Names the client would refuse, reserved names, and escapes.
    with portal.client() as client:
        for raw in (
            "refuse/ctl%01.txt",
            "refuse/bidi%E2%80%AEtxt.exe",
            "refuse/a%2Fb.txt",
            f"refuse/{TEMP_PREFIX}x.part",
            "refuse/%2e%2e/%2e%2e/escape.txt",
            "refuse/%FF.txt",
        ):
            assert client.put("/ServicesPortal/webdav/" + raw, content=b"x").status_code == 400, raw
        assert client.put("/ServicesPortal/webdavx/f.txt", content=b"x").status_code in (404, 405)
    assert sorted(os.listdir(tree / "refuse")) == ["f.txt", "new.txt"]
    assert (tree / "refuse" / "f.txt").read_bytes() == b"v2"
    assert not (tree.parent / "escape.txt").exists()


def test_writes_never_follow_symlinks(portal: Portal, tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside")
    (tree / "links").mkdir()
    (tree / "links" / "to-dir").symlink_to(outside)
    (tree / "links" / "to-file").symlink_to(outside / "secret.txt")
    portal.rescan()
    wait_for(lambda: exists(portal, "links"))
    assert put(portal, "links/to-dir/new.txt", b"x").status_code == 409
    assert put(portal, "links/to-file", b"x").status_code == 409
    assert dav(portal, "MKCOL", "links/to-dir/sub").status_code == 409
    assert dav(portal, "DELETE", "links/to-dir").status_code == 404
    assert dav(portal, "DELETE", "links/to-file").status_code == 404
    moved = dav(portal, "MOVE", "links/to-file", headers={"Destination": portal.dav_url("links/x")})
    assert moved.status_code == 404
    assert sorted(os.listdir(outside)) == ["secret.txt"] and (outside / "secret.txt").read_bytes() == b"outside"
    assert (tree / "links" / "to-file").is_symlink() and (tree / "links" / "to-dir").is_symlink()


def test_expect_100_continue(portal: Portal, tree: Path) -> None:
    assert dav(portal, "MKCOL", "expect").status_code == 201
    with connect(portal) as sock:
        headers = {"Authorization": basic(portal), "Content-Length": "5", "Expect": "100-continue"}
        sock.sendall(request_head("PUT", portal.dav_url("expect/ok.txt"), headers))
        status, _ = read_head(sock)
        assert status == 100, "the portal asks for the body"
        sock.sendall(b"hello")
        status, headers_back = read_head(sock)
        assert status == 201 and "etag" in headers_back
    assert (tree / "expect" / "ok.txt").read_bytes() == b"hello"
    with connect(portal) as sock:  # refused before the body: no 100, and the connection is closed
        headers = {"Authorization": basic(portal), "Content-Length": str(MAX_UPLOAD + 1), "Expect": "100-continue"}
        sock.sendall(request_head("PUT", portal.dav_url("expect/big.bin"), headers))
        status, headers_back = read_head(sock)
        assert status == 413 and headers_back.get("connection") == "close"
    with connect(portal) as sock:
        headers = {"Authorization": basic(portal), "Content-Length": "5", "Expect": "100-continue"}
        sock.sendall(request_head("PUT", portal.dav_url("nowhere/ok.txt"), headers))
        assert read_head(sock)[0] == 409


def test_a_cut_put_leaves_nothing_behind(portal: Portal, tree: Path) -> None:
    assert dav(portal, "MKCOL", "cut").status_code == 201
    assert put(portal, "cut/existing.bin", b"old version").status_code == 201
    for name, framing in (("new.bin", "length"), ("existing.bin", "length"), ("chunked.bin", "chunked")):
        with connect(portal) as sock:
            if framing == "length":
                headers = {"Authorization": basic(portal), "Content-Length": str(1024 * 1024)}
                sock.sendall(request_head("PUT", portal.dav_url(f"cut/{name}"), headers) + bytes(300 * 1024))
            else:
                headers = {"Authorization": basic(portal), "Transfer-Encoding": "chunked"}
                piece = b"%x\r\n" % 65536 + bytes(65536) + b"\r\n"
                sock.sendall(request_head("PUT", portal.dav_url(f"cut/{name}"), headers) + piece * 3)
            # Wait until the server is writing the temp file, then drop the connection mid-body.
            wait_for(lambda: leftovers(tree / "cut") != [])
        wait_for(lambda: leftovers(tree / "cut") == [])
    assert sorted(os.listdir(tree / "cut")) == ["existing.bin"]
    assert (tree / "cut" / "existing.bin").read_bytes() == b"old version"
    assert served(portal, entry(portal, "cut/existing.bin").file_id) == b"old version"
    assert not exists(portal, "cut/new.bin")


# --- MKCOL, DELETE, MOVE, PROPPATCH ---------------------------------------------------------------------------------


def test_mkcol(portal: Portal, tree: Path) -> None:
    assert dav(portal, "MKCOL", "mk", folder=True).status_code == 201
    assert (tree / "mk").is_dir()
    made = entry(portal, "mk")
    assert made.is_dir and made.file_id
    exists_again = dav(portal, "MKCOL", "mk")
    assert exists_again.status_code == 405 and "Allow" in exists_again.headers
    assert put(portal, "mk/f.txt", b"f").status_code == 201
    assert dav(portal, "MKCOL", "mk/f.txt").status_code == 405
    assert dav(portal, "MKCOL", "mk/missing/sub").status_code == 409
    assert dav(portal, "MKCOL", "mk/body", content=b"<x/>").status_code == 415
    assert dav(portal, "MKCOL", "mk/bad\x01name").status_code == 400
    assert dav(portal, "MKCOL", "mk/sub").status_code == 201
    assert [e.relpath for e in portal.propfind("mk")] == ["mk", "mk/f.txt", "mk/sub"]
    assert sorted(os.listdir(tree / "mk")) == ["f.txt", "sub"]


def test_delete(portal: Portal, tree: Path) -> None:
    assert dav(portal, "MKCOL", "del").status_code == 201
    assert put(portal, "del/f.bin", blob(BLOCK)).status_code == 201
    fid = entry(portal, "del/f.bin").file_id
    assert dav(portal, "DELETE", "del/f.bin").status_code == 204
    assert not (tree / "del" / "f.bin").exists() and not exists(portal, "del/f.bin")
    assert directio_status(portal, fid) == 400
    assert dav(portal, "DELETE", "del/f.bin").status_code == 404

    assert dav(portal, "MKCOL", "del/tree").status_code == 201
    assert dav(portal, "MKCOL", "del/tree/sub").status_code == 201
    assert put(portal, "del/tree/sub/deep.txt", b"deep").status_code == 201
    (tree / "del" / "tree" / "local.txt").write_bytes(b"made in DIR, never scanned")
    deep_id = entry(portal, "del/tree/sub/deep.txt").file_id
    assert dav(portal, "DELETE", "del/tree", folder=True).status_code == 204
    assert not (tree / "del" / "tree").exists()
    assert not exists(portal, "del/tree") and not exists(portal, "del/tree/sub/deep.txt")
    assert directio_status(portal, deep_id) == 400
    assert [e.relpath for e in portal.propfind("del")] == ["del"]
    assert dav(portal, "DELETE", "").status_code == 403
    assert (tree / "seed" / "file.bin").exists()


def test_move(portal: Portal, tree: Path) -> None:
    assert dav(portal, "MKCOL", "mv").status_code == 201
    data = blob(2 * BLOCK + 1)
    assert put(portal, "mv/a.bin", data).status_code == 201
    fid = entry(portal, "mv/a.bin").file_id

    # A rename keeps the file id and the bytes; Destination as an absolute URL.
    moved = dav(portal, "MOVE", "mv/a.bin", headers={"Destination": portal.url + portal.dav_url("mv/b.bin")})
    assert moved.status_code == 201
    assert not (tree / "mv" / "a.bin").exists() and (tree / "mv" / "b.bin").read_bytes() == data
    assert not exists(portal, "mv/a.bin") and entry(portal, "mv/b.bin").file_id == fid
    assert served(portal, fid) == data

    # Overwrite: F refuses an existing destination; T (the default) replaces it, whose id stops serving.
    assert put(portal, "mv/c.bin", b"target").status_code == 201
    target_id = entry(portal, "mv/c.bin").file_id
    refused = dav(portal, "MOVE", "mv/b.bin", headers={"Destination": portal.dav_url("mv/c.bin"), "Overwrite": "F"})
    assert refused.status_code == 412 and (tree / "mv" / "c.bin").read_bytes() == b"target"
    assert dav(portal, "MOVE", "mv/b.bin", headers={"Destination": portal.dav_url("mv/c.bin")}).status_code == 204
    assert (tree / "mv" / "c.bin").read_bytes() == data and entry(portal, "mv/c.bin").file_id == fid
    assert directio_status(portal, target_id) == 400

    # A folder moves with its subtree, every id kept; into a new parent that exists.
    assert dav(portal, "MKCOL", "mv/dir").status_code == 201
    assert dav(portal, "MKCOL", "mv/dir/sub").status_code == 201
    assert put(portal, "mv/dir/sub/x.txt", b"x").status_code == 201
    ids = {e.relpath: e.file_id for e in portal.propfind("mv/dir/sub")}
    assert dav(portal, "MKCOL", "mv/elsewhere").status_code == 201
    dest = portal.dav_url("mv/elsewhere/dir", folder=True)
    assert dav(portal, "MOVE", "mv/dir", folder=True, headers={"Destination": dest}).status_code == 201
    after = {e.relpath: e.file_id for e in portal.propfind("mv/elsewhere/dir/sub")}
    assert after == {"mv/elsewhere/dir/sub": ids["mv/dir/sub"], "mv/elsewhere/dir/sub/x.txt": ids["mv/dir/sub/x.txt"]}
    assert not exists(portal, "mv/dir") and (tree / "mv" / "elsewhere" / "dir" / "sub" / "x.txt").read_bytes() == b"x"

    # A folder over an existing folder (Overwrite: T): the old one goes, with everything in it.
    assert dav(portal, "MKCOL", "mv/old").status_code == 201
    assert put(portal, "mv/old/gone.txt", b"gone").status_code == 201
    dest = portal.dav_url("mv/old")
    assert dav(portal, "MOVE", "mv/elsewhere/dir", headers={"Destination": dest}).status_code == 204
    assert sorted(os.listdir(tree / "mv" / "old")) == ["sub"] and not exists(portal, "mv/old/gone.txt")
    assert entry(portal, "mv/old/sub/x.txt").file_id == ids["mv/dir/sub/x.txt"]

    def move(src: str, destination: str | None, **headers: str) -> int:
        if destination is not None:
            headers["Destination"] = destination
        return dav(portal, "MOVE", src, headers=headers).status_code

    assert move("mv/none.bin", portal.dav_url("mv/n.bin")) == 404
    assert move("mv/c.bin", portal.dav_url("mv/no folder/c.bin")) == 409
    assert move("mv/c.bin", "http://another.example:1234" + portal.dav_url("mv/d.bin")) == 502
    assert move("mv/c.bin", "/elsewhere/d.bin") == 400
    assert move("mv/c.bin", None) == 400
    assert move("mv/c.bin", portal.dav_url("mv/d.bin"), Overwrite="maybe") == 400
    assert move("mv/c.bin", portal.dav_url("mv/c.bin")) == 403
    assert move("mv/old", portal.dav_url("mv/old/sub/inside")) == 400
    assert move("mv/c.bin", portal.dav_url("mv/\x01bad")) == 400
    assert sorted(os.listdir(tree / "mv")) == ["c.bin", "elsewhere", "old"]


def test_proppatch_sets_the_mtime(portal: Portal, tree: Path) -> None:
    assert dav(portal, "MKCOL", "pp").status_code == 201
    assert put(portal, "pp/f.txt", b"times").status_code == 201
    fid = entry(portal, "pp/f.txt").file_id
    date = "Tue, 15 Nov 1994 12:45:26 GMT"
    when = email.utils.parsedate_to_datetime(date).timestamp()

    response = dav(portal, "PROPPATCH", "pp/f.txt", content=proppatch_body(date))
    assert response.status_code == 207
    assert propstats(response.content) == {"getlastmodified": "HTTP/1.1 200 OK"}
    listed = entry(portal, "pp/f.txt")
    assert listed.lastmodified == date and listed.file_id == fid, "same bytes, same id"
    assert os.stat(tree / "pp" / "f.txt").st_mtime == when
    assert served(portal, fid) == b"times"
    assert http("GET", portal.url + portal.dav_url("pp/f.txt"), auth=portal.auth).content == b"times"

    assert dav(portal, "PROPPATCH", "pp", folder=True, content=proppatch_body(date)).status_code == 207
    assert entry(portal, "pp").lastmodified == date and os.stat(tree / "pp").st_mtime == when

    # All or nothing: another property is 403 and the date then 424, nothing set.
    later = "Wed, 16 Nov 1994 12:45:26 GMT"
    response = dav(portal, "PROPPATCH", "pp/f.txt", content=proppatch_body(later, "<Z:color>red</Z:color>"))
    assert response.status_code == 207
    assert propstats(response.content) == {
        "getlastmodified": "HTTP/1.1 424 Failed Dependency",
        "color": "HTTP/1.1 403 Forbidden",
    }
    bad = dav(portal, "PROPPATCH", "pp/f.txt", content=proppatch_body("yesterday"))
    assert propstats(bad.content) == {"getlastmodified": "HTTP/1.1 409 Conflict"}
    assert os.stat(tree / "pp" / "f.txt").st_mtime == when
    assert dav(portal, "PROPPATCH", "pp/f.txt", content=b"<not xml").status_code == 400
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><D:propertyupdate xmlns:D="DAV:">&a;</D:propertyupdate>'
    )
    assert dav(portal, "PROPPATCH", "pp/f.txt", content=bomb).status_code == 400
    assert dav(portal, "PROPPATCH", "pp/none.txt", content=proppatch_body(date)).status_code == 404


def test_every_write_is_in_the_change_feed_and_wakes_long_polls(portal: Portal) -> None:
    def feed(cursor: str | None) -> tuple[list[dict[str, Any]], str]:
        reply = http("POST", portal.url + LIST, json={"cursor": cursor, "max_results": 10000}, auth=portal.auth).json()
        assert reply["has_more"] is False
        return reply["entries"], reply["cursor"]

    _, cursor = feed(None)
    woke: dict[str, Any] = {}
    body = {"cursor": cursor, "timeout": 30000}
    waiter = threading.Thread(
        target=lambda: woke.update(http("POST", portal.url + LONGPOLL, json=body, auth=portal.auth, timeout=60).json())
    )
    waiter.start()
    time.sleep(0.2)  # parked before the first write
    assert dav(portal, "MKCOL", "ev").status_code == 201
    waiter.join(timeout=30)
    assert woke == {"changes": True}

    assert put(portal, "ev/f.txt", b"one").status_code == 201
    first_id = int(entry(portal, "ev/f.txt").file_id)
    assert put(portal, "ev/f.txt", b"two!").status_code == 204
    second_id = int(entry(portal, "ev/f.txt").file_id)
    assert dav(portal, "MKCOL", "ev/sub").status_code == 201
    assert dav(portal, "MOVE", "ev/f.txt", headers={"Destination": portal.dav_url("ev/sub/g.txt")}).status_code == 201
    assert (
        dav(portal, "PROPPATCH", "ev/sub/g.txt", content=proppatch_body("Tue, 15 Nov 1994 12:45:26 GMT")).status_code
        == 207
    )
    assert dav(portal, "DELETE", "ev/sub").status_code == 204

    events, _ = feed(cursor)
    seen = [(e["path"], e["type"], e["deleted"], e["id"]) for e in events]
    folder_id, sub_id = events[0]["id"], events[3]["id"]
    assert seen == [
        ("ev", "folder", False, folder_id),
        ("ev/f.txt", "file", False, first_id),
        ("ev/f.txt", "file", False, second_id),  # a new version: a new id, the same guid
        ("ev/sub", "folder", False, sub_id),
        ("ev/f.txt", "file", True, second_id),  # a rename: deleted at the old path...
        ("ev/sub/g.txt", "file", False, second_id),  # ...and there at the new one, same id and guid
        ("ev/sub/g.txt", "file", False, second_id),  # the new mtime
        ("ev/sub/g.txt", "file", True, second_id),  # a folder's deletion: its contents first
        ("ev/sub", "folder", True, sub_id),
    ]
    guids = {e["guid"] for e in events if e["type"] == "file"}
    assert len(guids) == 1
    assert events[1]["parent_guid"] == events[0]["guid"] and events[5]["parent_guid"] == events[3]["guid"]
    assert events[2]["size"] == 4 and events[2]["name"] == "f.txt"
    assert events[6]["file_timestamp"] == "1994-11-15T12:45:26Z"


def test_a_rescan_after_writes_finds_nothing_changed(portal: Portal) -> None:
    """Every write records the stat of what it left on disk, so the next scan re-encodes nothing (no new ids)."""
    assert dav(portal, "MKCOL", "rescan").status_code == 201
    assert put(portal, "rescan/a.bin", blob(BLOCK + 1)).status_code == 201
    assert put(portal, "rescan/a.bin", blob(BLOCK + 2)).status_code == 204
    assert (
        dav(portal, "MOVE", "rescan/a.bin", headers={"Destination": portal.dav_url("rescan/b.bin")}).status_code == 201
    )
    assert (
        dav(portal, "PROPPATCH", "rescan/b.bin", content=proppatch_body("Tue, 15 Nov 1994 12:45:26 GMT")).status_code
        == 207
    )
    before = {e.relpath: e.file_id for e in portal.propfind("rescan")}
    scans = portal.stderr_text().count(" scan: ")
    portal.rescan()
    wait_for(lambda: portal.stderr_text().count(" scan: ") > scans)
    last = portal.stderr_text().rsplit(" scan: ", 1)[1]
    assert last.startswith("0 added, 0 changed, 0 deleted"), last
    assert {e.relpath: e.file_id for e in portal.propfind("rescan")} == before


# --- faults and a full disk ----------------------------------------------------------------------------------------


def test_put_status_fault_then_cdc_upload_of_40_mib(tmp_path: Path) -> None:
    args = ["--fault-put-status", "507", "--fault-put-count", "2", "--chunking", "cdc"]
    with start_portal(tmp_path, writable=True, extra_args=args) as p:
        for _ in range(2):
            assert put(p, "f.bin", b"refused").status_code == 507
        assert os.listdir(tmp_path) == []
        data = blob(40 * 1024 * 1024)
        assert put(p, "f.bin", data).status_code == 201, "later PUTs succeed"
        fid = entry(p, "f.bin").file_id
        lengths = [c["len"] for c in directio_json(p, fid)["chunks"]]
        assert sum(lengths) == len(data) and len(set(lengths)) > 1, "content-defined blocks, as scanned files get"
        assert sha(sdk_download(p, fid)) == sha(data)
        assert leftovers(tmp_path) == []


def test_put_drop_fault_and_the_state_dir_inside_dir(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    args = ["--fault-put-drop", "--fault-put-count", "1"]
    with start_portal(tree, writable=True, extra_args=args, state_dir=tree / ".state") as p:
        with pytest.raises(httpx.TransportError):
            put(p, "f.bin", blob(256 * 1024))
        assert sorted(os.listdir(tree)) == [".state"]
        assert put(p, "f.bin", b"second try").status_code == 201
        # The state dir is never written, removed or moved, nor is anything above it.
        assert put(p, ".state/planted.key", b"x").status_code == 403
        assert dav(p, "MKCOL", ".state/objects/sub").status_code == 403
        assert dav(p, "DELETE", ".state").status_code == 403
        assert dav(p, "MOVE", ".state", headers={"Destination": p.dav_url("stolen")}).status_code == 403
        assert dav(p, "MOVE", "f.bin", headers={"Destination": p.dav_url(".state")}).status_code == 403
        assert sorted(os.listdir(tree)) == [".state", "f.bin"] and not (tree / ".state" / "planted.key").exists()


def test_help_and_refused_fault_combinations(tmp_path: Path) -> None:
    from directfs.commands import serve

    parser = argparse.ArgumentParser(prog="directfs serve")
    serve.add_arguments(parser)
    text = parser.format_help()
    for flag in ("--writable", "--max-upload-size", "--fault-put-status", "--fault-put-drop", "--fault-put-count"):
        assert flag in text, flag
    for args in (
        ["--fault-put-drop"],  # without --writable
        ["--writable", "--fault-put-status", "200"],
        ["--writable", "--fault-put-status", "500", "--fault-put-drop"],
        ["--writable", "--fault-put-count", "-1", "--fault-put-drop"],
        ["--writable", "--max-upload-size", "0"],
    ):
        with pytest.raises(ConfigError):
            serve.build_config(parser.parse_args([str(tmp_path), *args]))


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return result.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare to mount a small tmpfs privately")
def test_a_full_disk_answers_507_and_keeps_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    # The tree is a 1 MiB tmpfs in the portal's own mount namespace: gone with the process, invisible to others.
    prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"',
        str(tree),
    ]
    with start_portal(tree, writable=True, command_prefix=prefix) as p:
        seen = Path(f"/proc/{p.proc.pid}/root") / tree.relative_to("/")
        assert put(p, "big.bin", blob(2 * 1024 * 1024)).status_code == 507
        assert os.listdir(seen) == []
        assert put(p, "small.bin", b"fits").status_code == 201
        assert os.listdir(seen) == ["small.bin"] and served(p, entry(p, "small.bin").file_id) == b"fits"
