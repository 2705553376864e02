"""Writes of the webdav:// source (``Writable``: PUT, MKCOL, DELETE, MOVE, PROPPATCH) against real servers on
127.0.0.1: nginx's DAV module (its /rw/ locations), Apache mod_dav, and ``davfront`` in front of nginx as a
dCache-like door (307 to a data node) or a store that fails uploads. Results are checked on the server's folder and
with plain WebDAV GETs, not through the source."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from directfs.errors import (
    DirectoryNotEmptyError,
    EntryExistsError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    NoSpaceError,
    NotADirectory,
    UploadError,
    WriteAccessError,
)
from directfs.sources.base import Credentials, Entry, Writable
from directfs.sources.httpstore import EXPECT_CONTINUE_MIN_BYTES, MAX_PUT_REDIRECTS
from directfs.sources.webdav import WebDAVSource, create
from tests.support.apache import ApacheDav, start_apache
from tests.support.davfront import DavFront, Seen
from tests.support.nginx import NginxDav, start_nginx
from tests.support.sourcetree import options

MIB = 1024 * 1024
BIG = 40 * MIB


def content(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ at every offset between seeds (a wrong offset or seed cannot match)."""
    return hashlib.shake_256(b"%d" % seed).digest(size) if size else b""


@pytest.fixture(scope="module")
def big() -> bytes:
    return content(BIG, seed=40)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / "old.txt").write_bytes(b"old content\n")
    (folder / "full").mkdir()
    (folder / "full" / "keep.bin").write_bytes(b"keep me")
    (folder / "empty").mkdir()
    return folder


@pytest.fixture
def nginx(tmp_path: Path, root: Path) -> Iterator[NginxDav]:
    with start_nginx(tmp_path / "nginx", root, tokens=["token-one"]) as server:
        yield server


@contextlib.asynccontextmanager
async def opened(url: str, **kwargs: object) -> AsyncIterator[WebDAVSource]:
    source = create(url, options(**kwargs))
    try:
        yield source
    finally:
        await source.aclose()


@contextlib.contextmanager
def spooled(tmp_path: Path, data: bytes) -> Iterator[int]:
    """A spool file holding ``data``, open read-only (as the write-back layer hands it to ``commit``)."""
    path = tmp_path / f"spool-{os.urandom(4).hex()}"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


async def upload(source: Writable, path: str, data: bytes, tmp_path: Path, mtime_ns: int | None = None) -> Entry:
    with spooled(tmp_path, data) as fd:
        upload = source.begin_upload(path)
        await upload.part_ready(fd, len(data))
        return await upload.commit(fd, len(data), mtime_ns=mtime_ns)


def dav_get(nginx: NginxDav, path: str) -> bytes:
    reply = httpx.get(f"http://{nginx.host}/open/{path}", timeout=30)
    assert reply.status_code == 200
    return reply.content


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder``: a file's bytes, None for a folder."""
    return {
        p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))
    }


# --- nginx -------------------------------------------------------------------------------------------------------


async def test_uploads_of_0_1_and_40_mib_land_byte_for_byte(
    nginx: NginxDav, root: Path, tmp_path: Path, big: bytes
) -> None:
    async with opened(f"webdav://{nginx.host}/rw/") as source:
        assert isinstance(source, Writable)
        assert source.write_features.folder_rename and not source.write_features.keeps_mtime
        for name, data in [("zero", b""), ("one", b"\x01"), ("sub dir #1 ü.bin", content(3 * MIB + 5))]:
            entry = await upload(source, name, data, tmp_path)
            assert (root / name).read_bytes() == data
            assert dav_get(nginx, quote(name)) == data
            assert entry.size == len(data) and not entry.is_dir and entry.name == name
            assert entry.version == (await source.stat(name)).version
        tracemalloc.start()
        try:
            entry = await upload(source, "big.bin", big, tmp_path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * MIB, f"the upload held {peak} bytes: the spool must be streamed, not read whole"
        assert entry.size == BIG
        assert hashlib.sha256((root / "big.bin").read_bytes()).digest() == hashlib.sha256(big).digest()
        assert hashlib.sha256(dav_get(nginx, "big.bin")).digest() == hashlib.sha256(big).digest()
        listed = {e.name: e async for e in source.list_dir("")}
        assert listed["big.bin"].version == entry.version
        assert not [p for p in (nginx.workdir / "tmp" / "client_body").rglob("*") if p.is_file()]  # no leftovers


async def test_replace_gives_a_new_version_and_the_new_bytes(nginx: NginxDav, root: Path, tmp_path: Path) -> None:
    async with opened(f"webdav://{nginx.host}/rw/") as source:
        before = await source.stat("old.txt")
        new = content(2 * MIB + 1, seed=7)
        entry = await upload(source, "old.txt", new, tmp_path)
        assert entry.version != before.version
        assert (root / "old.txt").read_bytes() == new
        handle = await source.open("old.txt", entry)
        try:
            got = b"".join([bytes(await handle.fetch_block(i)) for i in range(handle.layout.block_count)])
        finally:
            await handle.aclose()
        assert got == new


async def test_same_size_rewrites_within_a_second_get_new_versions(nginx: NginxDav, tmp_path: Path) -> None:
    # nginx gives no ETag and mtimes in seconds: without the source's write marks these versions were all equal, and
    # a mount served the first content for every later one (cached blocks and pages are kept per version).
    async with opened(f"webdav://{nginx.host}/rw/") as source:
        seen = set()
        for i in range(4):
            entry = await upload(source, "same.bin", bytes([i]) * 100, tmp_path)
            assert entry.version not in seen
            seen.add(entry.version)
            assert (await source.stat("same.bin")).version == entry.version
            assert {e.name: e.version async for e in source.list_dir("")}["same.bin"] == entry.version
        replaced = await upload(source, "target.bin", b"T" * 100, tmp_path)
        await upload(source, "incoming.bin", b"I" * 100, tmp_path)
        await source.rename("incoming.bin", "target.bin", is_dir=False)  # rsync's temp file + rename
        assert (await source.stat("target.bin")).version != replaced.version


@pytest.mark.expected_logs(r"skipping invalid name 'bad\\nname'")
async def test_mkdir_and_rmdir(nginx: NginxDav, root: Path) -> None:
    async with opened(f"webdav://{nginx.host}/rw/") as source:
        entry = await source.make_dir("new folder")
        assert entry.is_dir and (root / "new folder").is_dir()
        await source.make_dir("new folder/nested é")
        assert (root / "new folder" / "nested é").is_dir()
        for existing in ("new folder", "old.txt"):
            with pytest.raises(EntryExistsError) as exists:
                await source.make_dir(existing)
            assert exists.value.errno == errno.EEXIST
        with pytest.raises(EntryNotFoundError):
            await source.make_dir("missing/child")
        # rmdir of a folder with entries is refused, and everything in it stays (WebDAV DELETE is recursive)
        with pytest.raises(DirectoryNotEmptyError) as not_empty:
            await source.remove_dir("full")
        assert not_empty.value.errno == errno.ENOTEMPTY
        assert (root / "full" / "keep.bin").read_bytes() == b"keep me"
        # an entry that listings skip (a name with a newline) still makes the folder non-empty
        (root / "empty" / "bad\nname").write_bytes(b"hidden")
        assert [e.name async for e in source.list_dir("empty")] == []
        with pytest.raises(DirectoryNotEmptyError):
            await source.remove_dir("empty")
        assert (root / "empty" / "bad\nname").read_bytes() == b"hidden"
        with pytest.raises(DirectoryNotEmptyError):
            await source.remove_dir("new folder")
        await source.remove_dir("new folder/nested é")
        await source.remove_dir("new folder")
        assert not (root / "new folder").exists()
        with pytest.raises(EntryNotFoundError):
            await source.remove_dir("new folder")
        with pytest.raises(NotADirectory):
            await source.remove_dir("old.txt")
        assert (root / "old.txt").exists()


async def test_unlink(nginx: NginxDav, root: Path) -> None:
    async with opened(f"webdav://{nginx.host}/rw/") as source:
        await source.remove_file("old.txt")
        assert not (root / "old.txt").exists()
        with pytest.raises(EntryNotFoundError) as missing:
            await source.remove_file("old.txt")
        assert missing.value.errno == errno.ENOENT
        with pytest.raises(IsADirectory) as folder:
            await source.remove_file("empty")
        assert folder.value.errno == errno.EISDIR
        assert (root / "empty").is_dir()


async def test_rename_files_and_folders(nginx: NginxDav, root: Path, tmp_path: Path) -> None:
    async with opened(f"webdav://{nginx.host}/rw/") as source:
        await source.rename("old.txt", "renamed #1 ü.txt", is_dir=False)
        assert (root / "renamed #1 ü.txt").read_bytes() == b"old content\n" and not (root / "old.txt").exists()
        await upload(source, "other.txt", b"other", tmp_path)
        await source.rename("other.txt", "renamed #1 ü.txt", is_dir=False)  # replaces a file, as rename(2)
        assert (root / "renamed #1 ü.txt").read_bytes() == b"other" and not (root / "other.txt").exists()
        with pytest.raises(IsADirectory):
            await source.rename("renamed #1 ü.txt", "full", is_dir=False)
        assert (root / "full" / "keep.bin").exists() and (root / "renamed #1 ü.txt").exists()
        # folders: a real move, with what is inside
        await source.rename("full", "moved", is_dir=True)
        assert (root / "moved" / "keep.bin").read_bytes() == b"keep me" and not (root / "full").exists()
        await source.rename("moved", "empty", is_dir=True)  # onto an empty folder: replaced
        assert (root / "empty" / "keep.bin").exists() and not (root / "moved").exists()
        await source.make_dir("second")
        await upload(source, "second/x", b"x", tmp_path)
        with pytest.raises(DirectoryNotEmptyError):
            await source.rename("second", "empty", is_dir=True)
        with pytest.raises(NotADirectory):
            await source.rename("second", "renamed #1 ü.txt", is_dir=True)
        with pytest.raises(InvalidArgumentError):
            await source.rename("second", "second/inside", is_dir=True)
        assert tree(root) == {
            "empty": None,
            "empty/keep.bin": b"keep me",
            "renamed #1 ü.txt": b"other",
            "second": None,
            "second/x": b"x",
        }
        with pytest.raises(EntryNotFoundError):
            await source.rename("gone", "elsewhere", is_dir=False)


async def test_errnos_of_refused_uploads(nginx: NginxDav, root: Path, tmp_path: Path, big: bytes) -> None:
    async with opened(f"webdav://{nginx.host}/rw/") as source:
        with pytest.raises(EntryNotFoundError):  # nginx answers 500 for a missing folder; the parent check tells
            await upload(source, "missing/file", b"data", tmp_path)
        with pytest.raises(IsADirectory):
            await upload(source, "full", b"data", tmp_path)
    async with opened(f"webdav://{nginx.host}/open/") as read_only:
        with pytest.raises(WriteAccessError) as refused:
            await upload(read_only, "new", b"data", tmp_path)
        assert refused.value.errno == errno.EACCES
        assert "405" in str(refused.value)
    wrong = Credentials(username=nginx.user, password="wrong-password")
    async with opened(f"webdav://{nginx.host}/rw-basic/", credentials=wrong) as source:
        with pytest.raises(WriteAccessError) as denied:
            await upload(source, "big.bin", big, tmp_path)
        assert "wrong-password" not in str(denied.value)
    right = Credentials(username=nginx.user, password=nginx.password)
    async with opened(f"webdav://{nginx.host}/rw-basic/", credentials=right) as source:
        await upload(source, "basic.bin", b"with basic auth", tmp_path)
    assert (root / "basic.bin").read_bytes() == b"with basic auth"
    assert not (root / "new").exists() and not (root / "big.bin").exists()


async def test_webdavs_upload(nginx: NginxDav, root: Path, tmp_path: Path) -> None:
    data = content(EXPECT_CONTINUE_MIN_BYTES + 3, seed=3)
    ca_file = str(nginx.write_ca(tmp_path / "ca.pem"))
    async with opened(f"webdavs://{nginx.tls_host}/rw/", ca_file=ca_file) as source:
        await upload(source, "tls.bin", data, tmp_path)
        await source.rename("tls.bin", "tls2.bin", is_dir=False)
    assert (root / "tls2.bin").read_bytes() == data


async def test_set_mtime_refused_by_nginx_is_false_and_not_asked_again(nginx: NginxDav) -> None:
    with DavFront(f"http://{nginx.host}") as front:
        async with opened(f"webdav://127.0.0.1:{front.port}/rw/") as source:
            assert await source.set_mtime("old.txt", 1_000_000_000 * 1_600_000_000) is False
            assert await source.set_mtime("old.txt", 1_000_000_000 * 1_600_000_001) is False
        assert [r.method for r in front.requests] == ["PROPPATCH"]


# --- Apache mod_dav ----------------------------------------------------------------------------------------------


@pytest.fixture
def apache() -> Iterator[ApacheDav]:
    with start_apache() as server:
        yield server


async def test_apache_writes_and_proppatch(apache: ApacheDav, tmp_path: Path) -> None:
    async with opened(f"webdav://{apache.host}/") as source:
        data = content(2 * MIB, seed=9)
        entry = await upload(source, "a.bin", data, tmp_path, mtime_ns=1_600_000_000 * 1_000_000_000)
        assert (apache.root / "a.bin").read_bytes() == data
        assert entry.size == len(data) and "user.etag" in dict(entry.xattrs)  # (weak while its mtime is this second)
        # getlastmodified is protected (RFC 4918 §15.7): Apache answers 409 for it in the multistatus
        assert await source.set_mtime("a.bin", 1_600_000_000 * 1_000_000_000) is False
        await source.make_dir("d")
        with pytest.raises(EntryExistsError):
            await source.make_dir("d")
        assert await source.set_mtime("d", 1_600_000_000 * 1_000_000_000) is False
        await upload(source, "d/inner", b"inner", tmp_path)
        with pytest.raises(DirectoryNotEmptyError):
            await source.remove_dir("d")  # Apache's folder ETags are weak: no If-Match, the PROPFIND check decides
        await source.rename("d", "e", is_dir=True)
        await source.rename("a.bin", "e/a.bin", is_dir=False)
        await source.remove_file("e/inner")
        with pytest.raises(DirectoryNotEmptyError):
            await source.remove_dir("e")
        await source.remove_file("e/a.bin")
        await source.remove_dir("e")
        with pytest.raises(EntryNotFoundError):
            await upload(source, "nowhere/x", b"x", tmp_path)  # Apache: 409
        with pytest.raises(EntryNotFoundError):
            await source.rename("gone", "x", is_dir=False)
    assert tree(apache.root) == {}


# --- redirects (a dCache-like door) --------------------------------------------------------------------------------


def auth_of(requests: list[Seen]) -> list[str | None]:
    return [r.authorization for r in requests]


async def test_put_redirected_to_another_origin_goes_without_credentials(
    nginx: NginxDav, root: Path, tmp_path: Path, big: bytes
) -> None:
    with DavFront(f"http://{nginx.host}") as door, DavFront(f"http://{nginx.host}") as pool:
        door.put_mode = "redirect"
        door.redirect_from, door.redirect_to = "/rw-bearer/", f"{pool.url}/rw/"
        url = f"webdav://127.0.0.1:{door.port}/rw-bearer/"
        async with opened(url, credentials=Credentials(token="token-one")) as source:
            entry = await upload(source, "big.bin", big, tmp_path)
        assert entry.size == BIG
        assert hashlib.sha256((root / "big.bin").read_bytes()).digest() == hashlib.sha256(big).digest()
        (at_door,) = door.puts()
        # the door decided before any body byte came (the body waited for 100 Continue), so it redirected
        assert at_door.early and at_door.body_bytes == at_door.discarded_bytes == 0 and door.impatient == 0
        assert at_door.authorization == "Bearer token-one"
        (at_pool,) = pool.puts()
        assert at_pool.path == "/rw/big.bin?uuid=1" and at_pool.body_bytes == BIG
        assert at_pool.authorization is None  # another port is another origin
        assert [r.method for r in door.requests] == ["PUT", "PROPFIND"]  # the new entry comes from the door


async def test_put_redirected_on_the_same_origin_keeps_credentials(
    nginx: NginxDav, root: Path, tmp_path: Path, big: bytes
) -> None:
    with DavFront(f"http://{nginx.host}") as door:
        door.put_mode = "redirect"
        door.redirect_from, door.redirect_to = "/rw-bearer/", f"{door.url}/rw-bearer/"
        url = f"webdav://127.0.0.1:{door.port}/rw-bearer/"
        async with opened(url, credentials=Credentials(token="token-one")) as source:
            small = b"small bodies are sent at once, without Expect"
            await upload(source, "small.txt", small, tmp_path)
            await upload(source, "big.bin", big, tmp_path)
        puts = door.puts()
        # a small body goes at once, so the door proxies it (as dCache does for clients that do not wait)
        assert [(p.path, p.expect, p.early) for p in puts] == [
            ("/rw-bearer/small.txt", False, False),
            ("/rw-bearer/big.bin", True, True),
            ("/rw-bearer/big.bin?uuid=1", True, False),
        ]
        assert auth_of(puts) == ["Bearer token-one"] * 3
        assert (root / "small.txt").read_bytes() == small
        assert hashlib.sha256((root / "big.bin").read_bytes()).digest() == hashlib.sha256(big).digest()


async def test_redirect_loop_ends(nginx: NginxDav, root: Path, tmp_path: Path) -> None:
    with DavFront(f"http://{nginx.host}") as door:
        door.put_mode = "redirect"
        door.redirect_from, door.redirect_to = "/rw/", f"{door.url}/rw/"
        door.redirect_again = True
        async with opened(f"webdav://127.0.0.1:{door.port}/rw/") as source:
            with pytest.raises(UploadError, match="redirect"):
                await upload(source, "loop.bin", content(2 * MIB), tmp_path)
        assert len(door.puts()) == MAX_PUT_REDIRECTS + 1
        assert not (root / "loop.bin").exists()


# --- failing stores ------------------------------------------------------------------------------------------------


@pytest.fixture
def front(nginx: NginxDav) -> Iterator[DavFront]:
    with DavFront(f"http://{nginx.host}") as server:
        yield server


async def test_500_is_retried_then_eio(front: DavFront, root: Path, tmp_path: Path) -> None:
    front.put_mode = "status"
    front.put_status = 500
    async with opened(f"webdav://127.0.0.1:{front.port}/rw/") as source:
        with pytest.raises(UploadError) as failed:
            await upload(source, "x.bin", content(3 * MIB), tmp_path)
    assert failed.value.errno == errno.EIO and "HTTP 500" in str(failed.value)
    assert len(front.puts()) == 4  # the usual attempts, each with the whole body
    assert all(p.body_bytes == 3 * MIB for p in front.puts())
    assert not (root / "x.bin").exists()


async def test_507_is_enospc_at_once_without_the_body(front: DavFront, root: Path, tmp_path: Path, big: bytes) -> None:
    front.put_mode = "status"
    front.put_status = 507
    front.status_reads_body = False
    async with opened(f"webdav://127.0.0.1:{front.port}/rw/") as source:
        with pytest.raises(NoSpaceError) as full:
            await upload(source, "x.bin", big, tmp_path)
    assert full.value.errno == errno.ENOSPC
    (put,) = front.puts()  # a full store is not asked again (RFC 4918 §11.5)
    assert put.early and put.body_bytes == 0 and put.discarded_bytes == 0  # and not one byte of the body was sent
    assert not (root / "x.bin").exists()


async def test_401_on_put_is_eacces(front: DavFront, root: Path, tmp_path: Path) -> None:
    front.put_mode = "status"
    front.put_status = 401
    async with opened(f"webdav://127.0.0.1:{front.port}/rw/", credentials=Credentials(token="secret-token")) as src:
        with pytest.raises(WriteAccessError) as denied:
            await upload(src, "x.bin", b"data", tmp_path)
    assert denied.value.errno == errno.EACCES and "secret-token" not in str(denied.value)
    assert len(front.puts()) == 1


async def test_body_cut_midway_is_sent_again_whole(front: DavFront, root: Path, tmp_path: Path, big: bytes) -> None:
    front.put_script = ["reset"]
    front.reset_after_bytes = 8 * MIB
    async with opened(f"webdav://127.0.0.1:{front.port}/rw/") as source:
        entry = await upload(source, "big.bin", big, tmp_path)
    assert entry.size == BIG
    assert [p.body_bytes for p in front.puts()] == [8 * MIB, BIG]
    assert hashlib.sha256((root / "big.bin").read_bytes()).digest() == hashlib.sha256(big).digest()


async def test_token_rotated_during_an_upload(
    nginx: NginxDav, front: DavFront, root: Path, tmp_path: Path, big: bytes
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("token-one\n")

    def rotate(seen: Seen) -> None:  # half-way through the body: the agent writes a new token, the old one dies
        front.on_body = None
        (tmp_path / "token.new").write_text("token-two\n")
        os.replace(tmp_path / "token.new", token_file)
        nginx.set_tokens(["token-two"])

    front.on_body = rotate
    front.hook_after_bytes = BIG // 2
    url = f"webdav://127.0.0.1:{front.port}/rw-bearer/"
    async with opened(url, credentials=Credentials(token_file=str(token_file))) as source:
        entry = await upload(source, "big.bin", big, tmp_path)
    assert entry.size == BIG
    # the first PUT was refused at its end (the store no longer took token-one); the retry read the new token
    assert auth_of(front.puts()) == ["Bearer token-one", "Bearer token-two"]
    assert hashlib.sha256((root / "big.bin").read_bytes()).digest() == hashlib.sha256(big).digest()


async def test_server_ignoring_expect_is_not_waited_for_twice(
    front: DavFront, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="directfs")
    front.put_mode = "proxy-no-100"
    data = content(2 * MIB, seed=5)
    async with opened(f"webdav://127.0.0.1:{front.port}/rw/") as source:
        await upload(source, "first.bin", data, tmp_path)  # waits 1 s for a 100 that never comes, then sends
        await upload(source, "second.bin", data, tmp_path)
    assert [p.expect for p in front.puts()] == [True, False]
    assert (root / "first.bin").read_bytes() == data and (root / "second.bin").read_bytes() == data
    assert any("Expect: 100-continue" in r.getMessage() for r in caplog.records)


async def test_retried_changes_whose_answer_was_lost_count_as_done(front: DavFront, root: Path) -> None:
    async with opened(f"webdav://127.0.0.1:{front.port}/rw/") as source:
        front.lose_answer = ["MKCOL"]
        assert (await source.make_dir("made")).is_dir  # the retry's 405 is our own folder
        front.lose_answer = ["MOVE"]
        await source.rename("made", "moved", is_dir=True)  # the retry's 404: the source is gone, the target there
        front.lose_answer = ["DELETE"]
        await source.remove_dir("moved")  # the retry's 404: gone
        with pytest.raises(EntryExistsError):  # an answer that came (405) is believed
            await source.make_dir("full")
    assert [r.method for r in front.requests if r.method != "PROPFIND"] == [
        *["MKCOL", "MKCOL", "MOVE", "MOVE", "DELETE", "DELETE", "MKCOL"]
    ]
    assert not (root / "made").exists() and not (root / "moved").exists()
