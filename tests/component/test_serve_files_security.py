"""What ``directfs serve`` reads from DIR, attacked through a real portal on loopback (issue 13: H2, M6, M7, L4).

* H2: a published file or folder swapped for a symlink (or for another file) after the scan never makes a WebDAV GET
  answer with bytes from elsewhere: the GET opens beneath DIR without following links and checks the inode.
* L4: ``Accept-Encoding: gzip, br`` never turns a GET of NAME into NAME.gz or NAME.br.
* M7: a file swapped for a FIFO between the scan's walk and its read is skipped; the scan ends and the next one runs.
  Next to it: a file truncated while the ingest reads it is a short read, not a SIGBUS that kills the server.
* M6: PROPFIND property lists and request bodies are bounded, and the multistatus is streamed.

Every test here failed on the code before the fix (the windowed-read and index-upgrade tests check the fix itself).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import random
import re
import sqlite3
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from directfs.errors import StaleFileError
from directfs.server.chunking import CDC_WINDOW_BYTES, cdc_spans, file_blocks, fixed_spans
from directfs.server.config import CDC_MAX_BYTES
from tests.support.portal import CTERA, DAV, Portal, parse_multistatus, start_portal

PUBLIC = b"public bytes, the only ones a client may read\n"
SECRET = b"SECRET: bytes outside DIR that no client may read\n"
RESCAN_TIMEOUT_SECONDS = 60.0


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file.txt").write_bytes(SECRET)
    return outside / "file.txt"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "pub").mkdir(parents=True)
    (root / "pub" / "file.txt").write_bytes(PUBLIC)
    return root


@pytest.fixture
def portal(tree: Path) -> Iterator[Portal]:
    with start_portal(tree) as p:
        yield p


def scans_done(portal: Portal) -> int:
    return len(re.findall(r"\bscan: \d+ added", portal.stderr_text()))


def rescan_and_wait(portal: Portal) -> None:
    """SIGHUP, then wait until the server logs one more finished scan."""
    before = scans_done(portal)
    portal.rescan()
    deadline = time.monotonic() + RESCAN_TIMEOUT_SECONDS
    while scans_done(portal) <= before:
        assert time.monotonic() < deadline, "the rescan did not finish:\n" + portal.stderr_text()[-3000:]
        time.sleep(0.05)  # waiting for the server, not asserting on time


def get(portal: Portal, relpath: str, **headers: str) -> httpx.Response:
    with portal.client() as client:
        return client.get(portal.dav_url(relpath), headers=headers)


# --- H2: symlink (and other) swaps after the scan ----------------------------------------------------------------


def test_a_file_swapped_for_a_symlink_is_not_followed(portal: Portal, tree: Path, secret: Path) -> None:
    assert get(portal, "pub/file.txt").content == PUBLIC
    target = tree / "pub" / "file.txt"
    target.unlink()
    target.symlink_to(secret)
    for headers in ({}, {"Range": "bytes=0-9"}):
        response = get(portal, "pub/file.txt", **headers)
        assert response.status_code == 404, (response.status_code, response.content)
        assert b"SECRET" not in response.content
    with portal.client() as client:
        head = client.head(portal.dav_url("pub/file.txt"))
    assert head.status_code == 404
    assert "not the indexed file" in portal.stderr_text()


def test_a_folder_swapped_for_a_symlink_is_not_followed(portal: Portal, tree: Path, secret: Path) -> None:
    (tree / "pub").rename(tree / "pub.old")
    (tree / "pub").symlink_to(secret.parent, target_is_directory=True)
    response = get(portal, "pub/file.txt")
    assert response.status_code == 404, (response.status_code, response.content)
    assert b"SECRET" not in response.content


def test_a_file_replaced_by_another_with_the_same_size_and_mtime_is_not_served(portal: Portal, tree: Path) -> None:
    """Another inode at the path (a rename over it, or a planted hard link) is not the file the scan indexed."""
    target = tree / "pub" / "file.txt"
    st = target.stat()
    other = tree / "pub" / ".other"
    other.write_bytes(SECRET[: len(PUBLIC)].ljust(len(PUBLIC), b"!"))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    other.replace(target)
    response = get(portal, "pub/file.txt")
    assert response.status_code == 404, (response.status_code, response.content)
    assert b"SECRET" not in response.content


def test_a_file_changed_in_place_is_refused_until_the_next_scan(portal: Portal, tree: Path) -> None:
    (entry,) = portal.propfind("pub/file.txt", depth="0")
    assert entry.etag is not None
    with open(tree / "pub" / "file.txt", "ab") as f:  # same inode, new size and mtime
        f.write(b"appended after the scan\n")
    assert get(portal, "pub/file.txt").status_code == 409
    assert get(portal, "pub/file.txt", **{"If-Match": entry.etag}).status_code == 412
    rescan_and_wait(portal)
    (fresh,) = portal.propfind("pub/file.txt", depth="0")
    response = get(portal, "pub/file.txt", **{"If-Match": fresh.etag or ""})
    assert response.status_code == 200
    assert response.content == PUBLIC + b"appended after the scan\n"
    assert response.headers["ETag"] == fresh.etag


def test_ranges_and_conditional_gets_of_the_indexed_file(portal: Portal) -> None:
    (entry,) = portal.propfind("pub/file.txt", depth="0")
    etag = entry.etag or ""
    part = get(portal, "pub/file.txt", Range="bytes=7-11")
    assert part.status_code == 206 and part.content == PUBLIC[7:12]
    assert part.headers["Content-Range"] == f"bytes 7-11/{len(PUBLIC)}"
    tail = get(portal, "pub/file.txt", Range="bytes=-5")
    assert tail.status_code == 206 and tail.content == PUBLIC[-5:]
    assert get(portal, "pub/file.txt", Range="bytes=9999-").status_code == 416
    assert get(portal, "pub/file.txt", **{"If-None-Match": etag}).status_code == 304
    assert get(portal, "pub/file.txt", **{"If-Match": '"nope"'}).status_code == 412
    assert get(portal, "pub/file.txt", **{"Range": "bytes=0-3", "If-Range": etag}).status_code == 206
    stale = get(portal, "pub/file.txt", **{"Range": "bytes=0-3", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == PUBLIC
    whole = get(portal, "pub/file.txt")
    assert whole.headers["ETag"] == etag and whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Length"] == str(len(PUBLIC))


# --- L4: no compressed sibling instead of the file ------------------------------------------------------------------


def test_accept_encoding_never_serves_a_compressed_sibling(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "doc.txt").write_bytes(PUBLIC)
    (root / "doc.txt.gz").write_bytes(gzip.compress(SECRET))
    (root / "doc.txt.br").write_bytes(b"not even brotli: " + SECRET)
    with start_portal(root) as portal, portal.client() as client:
        for encoding in ("gzip", "br", "gzip, br", "br;q=1, gzip;q=0.5"):
            with client.stream("GET", portal.dav_url("doc.txt"), headers={"Accept-Encoding": encoding}) as response:
                raw = b"".join(response.iter_raw())
            assert response.status_code == 200
            assert "Content-Encoding" not in response.headers, encoding
            assert raw == PUBLIC, encoding


# --- M7: a FIFO swapped in between the walk and the read; a file truncated while it is read --------------------------


@contextlib.contextmanager
def ingesting_a_big_file(tmp_path: Path) -> Iterator[tuple[Portal, Path, int]]:
    """A portal with one ingest thread, in the middle of a rescan that reads ``a-big.bin`` (96 MiB, ~1,500 objects:
    well over a second) and then ``b.bin``: yields (portal, DIR, scans finished before this one) once the walk is over
    (the first object of a-big.bin is in the store) and a-big.bin is being read."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "keep.txt").write_bytes(PUBLIC)
    state = tmp_path / "state"
    with start_portal(root, state_dir=state, extra_args=["--ingest-workers", "1", "--block-size", "64K"]) as portal:
        objects = state / "objects"

        def stored() -> int:
            return sum(len(files) for _, _, files in os.walk(objects))

        before = stored()
        (root / "a-big.bin").write_bytes(os.urandom(96 * 1024 * 1024))
        (root / "b.bin").write_bytes(b"a regular file when walked\n")
        scans = scans_done(portal)
        portal.rescan()
        deadline = time.monotonic() + RESCAN_TIMEOUT_SECONDS
        while stored() == before:
            assert time.monotonic() < deadline, portal.stderr_text()[-3000:]
            time.sleep(0.001)
        yield portal, root, scans


def wait_for_scan(portal: Portal, scans_before: int, what: str) -> None:
    deadline = time.monotonic() + RESCAN_TIMEOUT_SECONDS
    while scans_done(portal) <= scans_before:
        assert portal.proc.poll() is None, f"the server died ({portal.proc.returncode}) {what}"
        assert time.monotonic() < deadline, f"the scan hung {what}:\n" + portal.stderr_text()[-3000:]
        time.sleep(0.05)


def test_a_fifo_swapped_in_during_the_ingest_is_skipped_and_rescans_go_on(tmp_path: Path) -> None:
    """``b.bin`` was a regular file when walked and is a FIFO when read: opening it must not wait for a writer."""
    with ingesting_a_big_file(tmp_path) as (portal, root, scans):
        fifo = root / "b.bin"
        fifo.unlink()
        os.mkfifo(fifo)
        try:
            wait_for_scan(portal, scans, "on the FIFO")
            assert "'b.bin' is now a FIFO, not a regular file" in portal.stderr_text()
            names = {e.relpath for e in portal.propfind("", folder=True)}
            assert "a-big.bin" in names and "b.bin" not in names
            (root / "later.txt").write_bytes(b"added after the FIFO\n")
            rescan_and_wait(portal)
            assert "later.txt" in {e.relpath for e in portal.propfind("", folder=True)}
        finally:
            # On a server that blocks in open(FIFO), a writer's open releases it, so the portal can stop.
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_file_truncated_while_it_is_read_does_not_kill_the_server(tmp_path: Path) -> None:
    """A mapped file cut short under the reader is SIGBUS; read with pread, it is a short read and the file waits for
    the next scan."""
    with ingesting_a_big_file(tmp_path) as (portal, root, scans):
        os.truncate(root / "a-big.bin", 0)
        wait_for_scan(portal, scans, "on the truncated file")
        assert "'a-big.bin' shrank while encoding" in portal.stderr_text()
        assert "a-big.bin" not in {e.relpath for e in portal.propfind("", folder=True)}
        rescan_and_wait(portal)
        (entry,) = portal.propfind("a-big.bin", depth="0")
        assert entry.size == 0


# --- M6: bounded PROPFIND -------------------------------------------------------------------------------------------


def propfind_body(names: list[tuple[str, str]]) -> bytes:
    namespaces = sorted({ns for ns, _ in names})
    prefixes = {ns: f"n{i}" for i, ns in enumerate(namespaces)}
    decls = " ".join(f'xmlns:{p}="{ns}"' for ns, p in prefixes.items())
    props = "".join(f"<{prefixes[ns]}:{local}/>" for ns, local in names)
    return f'<?xml version="1.0"?><D:propfind xmlns:D="DAV:" {decls}><D:prop>{props}</D:prop></D:propfind>'.encode()


def test_propfind_with_too_many_properties_is_refused(portal: Portal) -> None:
    body = propfind_body([("urn:x", f"p{i}") for i in range(2000)])
    with portal.client() as client:
        response = client.request("PROPFIND", portal.dav_url("pub", folder=True), headers={"Depth": "1"}, content=body)
    assert response.status_code == 400, len(response.content)
    assert "too many properties" in response.text


def test_propfind_with_a_huge_body_is_refused(portal: Portal) -> None:
    body = propfind_body([(DAV, "getetag")]).replace(b"<D:prop>", b"<D:prop>" + b" " * (200 * 1024))
    with portal.client() as client:
        response = client.request("PROPFIND", portal.dav_url("pub", folder=True), headers={"Depth": "1"}, content=body)
    assert response.status_code == 413


def test_propfind_repeated_properties_are_answered_once(portal: Portal) -> None:
    names = [(DAV, "getetag"), (CTERA, "fileid"), ("urn:x", "unknown")] * 1000
    with portal.client() as client:
        response = client.request(
            "PROPFIND", portal.dav_url("pub/file.txt"), headers={"Depth": "0"}, content=propfind_body(names)
        )
    assert response.status_code == 207
    assert len(response.content) < 2000
    tags = [el.tag for el in ET.fromstring(response.content).iter()]
    assert tags.count(f"{{{DAV}}}getetag") == 1 and tags.count("{urn:x}unknown") == 1
    (entry,) = parse_multistatus(response.content)
    assert entry.etag and entry.file_id


def test_propfind_multistatus_is_streamed_with_bounded_memory(tmp_path: Path) -> None:
    """The largest allowed request over a 3,000-file folder: the reply is well-formed, sent in chunks, the server's
    peak memory barely moves, and other requests are answered while it streams."""
    root = tmp_path / "tree"
    (root / "many").mkdir(parents=True)
    for i in range(3000):
        (root / "many" / f"f{i:04d}").write_bytes(b"x")
    names = [(DAV, "getetag"), (DAV, "resourcetype")]
    names += [("urn:" + "n" * 90, f"unknown{i:02d}" + "x" * 140) for i in range(62)]  # 64 names of 240 characters
    with start_portal(root) as portal, httpx.Client(base_url=portal.url, auth=portal.auth, timeout=120) as client:
        peak_before = peak_rss_bytes(portal.proc.pid)
        received = 0
        url = portal.dav_url("many", folder=True)
        with client.stream("PROPFIND", url, headers={"Depth": "1"}, content=propfind_body(names)) as response:
            assert response.status_code == 207, response.read()[:300]
            chunked = response.headers.get("Transfer-Encoding") == "chunked"  # asserted below, after reading
            head = b""
            for piece in response.iter_raw():
                if not head:
                    head = piece[:200]
                    started = time.monotonic()
                    with portal.client() as other:
                        assert other.request("OPTIONS", portal.dav_url("")).status_code == 200
                    assert time.monotonic() - started < 5
                received += len(piece)
        assert head.startswith(b"<?xml")
        assert received > 3000 * 62 * 150  # every unknown property answered for every file
        grown = peak_rss_bytes(portal.proc.pid) - peak_before
        assert grown < 32 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {received / 2**20:.0f} MiB reply"
        assert chunked
        entries = portal.propfind("many", folder=True)
        assert len(entries) == 3001


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


# --- the ingest reads (never maps) and still cuts the same blocks ----------------------------------------------------


@pytest.mark.parametrize("block_size", [None, 1024 * 1024])
def test_windowed_reads_cut_exactly_the_blocks_of_the_whole_file(tmp_path: Path, block_size: int | None) -> None:
    """``file_blocks`` reads a window at a time; content-defined cuts must be those of the whole file in memory, or a
    restarted server would re-encode (new objects, new ids) what an older one stored."""
    data = random.Random(13).randbytes(2 * CDC_WINDOW_BYTES + 3 * CDC_MAX_BYTES + 12345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = [(offset, len(block)) for offset, block in file_blocks(fd, len(data), block_size_bytes=block_size)]
        joined = b"".join(block for _, block in file_blocks(fd, len(data), block_size_bytes=block_size))
        with pytest.raises(StaleFileError):
            list(file_blocks(fd, len(data) + 1, block_size_bytes=block_size))  # the file is shorter than listed
    finally:
        os.close(fd)
    want = cdc_spans(memoryview(data)) if block_size is None else fixed_spans(len(data), block_size)
    assert got == want
    assert joined == data


def test_an_index_from_before_devices_were_recorded_is_upgraded_without_reencoding(tmp_path: Path) -> None:
    """The GET check needs each file's device: an older index lacks the column; it is added and filled by the first
    scan, with the same ids and nothing re-encoded."""
    root = tmp_path / "tree"
    (root / "pub").mkdir(parents=True)
    (root / "pub" / "file.txt").write_bytes(PUBLIC)
    state = tmp_path / "state"
    with start_portal(root, state_dir=state) as first:
        fid = first.file_id("pub/file.txt")
        env = {"DIRECTFS_ACCESS_KEY_ID": first.access_key_id, "DIRECTFS_SECRET_ACCESS_KEY": first.secret_access_key}
    with contextlib.closing(sqlite3.connect(state / "index.sqlite3")) as db:
        db.execute("ALTER TABLE nodes DROP COLUMN dev")  # the schema as it was
        db.commit()
    with start_portal(root, state_dir=state, env=env) as second:
        assert "0 added, 0 changed, 0 deleted" in second.stderr_text()
        assert second.file_id("pub/file.txt") == fid
        assert get(second, "pub/file.txt").content == PUBLIC
    with contextlib.closing(sqlite3.connect(state / "index.sqlite3")) as db:
        assert db.execute("SELECT COUNT(*) FROM nodes WHERE dev IS NULL").fetchone() == (0,)
