"""The reference portal as a real subprocess, checked with independent clients.

* WebDAV: httpx + the standard library's XML parser.
* Direct IO: the real ``cterasdk`` client (``cterasdk.direct.client.DirectIO``, asyncio, run with ``asyncio.run`` in
  these sync tests). cterasdk defects we step around, each one named where it happens:
  - ``streamer()`` with no ``byte_range`` raises AttributeError (docs/ctera-direct-io.md §11.3): we use the Blocks
    API, and the Streamer only with an explicit ``ByteRange``;
  - a 0-byte file answered with ``"chunks": []`` raises ``BlocksNotFoundError`` (after 3 tries with 1 s + 2 s
    sleeps): 0-byte files are checked once with ``--empty-files zero-chunk`` and with raw HTTP otherwise;
  - ``blocks()`` returns whole blocks as Tasks in completion order: we reassemble by ``offset``;
  - every error status is retried 3 times with sleeps, so status codes are checked with httpx, not cterasdk.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from directfs.sources.ctera import codec
from directfs.sources.ctera.codec import Compression
from tests.support.portal import (
    UNICODE_NAME,
    Portal,
    make_tree,
    parse_multistatus,
    serve_command,
    start_portal,
)
from tests.support.portalclients import directio_json, download_with_codec, sdk_download

BLOCK = 256 * 1024  # small blocks: many blocks per file, quick ingest
MANY = 10_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def walk(portal: Portal) -> dict[str, Any]:
    """Every entry of the namespace, by PROPFIND Depth 1 folder by folder (what a client does)."""
    found: dict[str, Any] = {}
    todo = [""]
    while todo:
        folder = todo.pop()
        entries = portal.propfind(folder, depth="1", folder=True)
        assert entries[0].relpath == folder and entries[0].is_dir, "first response is the folder itself"
        for entry in entries[1:]:
            found[entry.relpath] = entry
            if entry.is_dir:
                todo.append(entry.relpath)
    return found


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("tree")
    hashes = make_tree(root, BLOCK, many_files=MANY, few_mib=20)
    return root, hashes


@pytest.fixture(scope="module")
def portal(tree: tuple[Path, dict[str, str]]) -> Iterator[Portal]:
    root, _ = tree
    with start_portal(root, extra_args=["--block-size", "256K", "--non-direct", "text/*"]) as p:
        yield p


# --- WebDAV ----------------------------------------------------------------------------------------------------


def test_propfind_lists_the_whole_tree_with_sizes_and_ids(portal: Portal, tree: tuple[Path, dict[str, str]]) -> None:
    root, hashes = tree
    found = walk(portal)
    files = {rel: e for rel, e in found.items() if not e.is_dir}
    assert set(files) == set(hashes)
    for rel, entry in files.items():
        assert entry.size == (root / rel).stat().st_size, rel
        assert entry.file_id is not None and entry.file_id.isdecimal(), rel
        assert entry.etag and entry.lastmodified
    ids = [e.file_id for e in found.values()]
    assert len(ids) == len(set(ids)), "file ids are unique"
    assert {"empty folder", "a", "a/b", "a/b/c", "many", "unicode", "spaced"} <= {
        rel for rel, e in found.items() if e.is_dir
    }


def test_hrefs_quote_awkward_names(portal: Portal) -> None:
    with portal.client() as client:
        response = client.request("PROPFIND", portal.dav_url("spaced", folder=True), headers={"Depth": "1"})
        raw = response.text
        assert "/ServicesPortal/webdav/spaced/name%20with%20%25%20and%20%23%20and%20%3F%20and%20%2B.txt" in raw
        response = client.request("PROPFIND", portal.dav_url("unicode", folder=True), headers={"Depth": "1"})
        href = parse_multistatus(response.content)[1].href
        assert href == "/ServicesPortal/webdav/" + urllib.parse.quote(UNICODE_NAME, safe="/")
        assert href.isascii()
        # the quoted href is itself a working address
        response = client.request("PROPFIND", href, headers={"Depth": "0"})
        assert response.status_code == 207
        assert parse_multistatus(response.content)[0].relpath == UNICODE_NAME


def test_depth_one_of_a_folder_with_10000_files(portal: Portal) -> None:
    started = time.monotonic()
    entries = portal.propfind("many", depth="1", folder=True)
    elapsed = time.monotonic() - started
    assert len(entries) == MANY + 1
    assert entries[1].relpath == "many/f00000.txt" and entries[1].size == len(b"file 0\n")
    assert elapsed < 10, f"PROPFIND of {MANY} entries took {elapsed:.1f} s"


def test_depth_infinity_and_missing_depth_are_refused(portal: Portal) -> None:
    with portal.client() as client:
        for headers in ({"Depth": "infinity"}, {}):
            response = client.request("PROPFIND", "/ServicesPortal/webdav/", headers=headers)
            assert response.status_code == 403
            assert b"propfind-finite-depth" in response.content


def test_propfind_prop_request_reports_unknown_properties_as_404(portal: Portal) -> None:
    body = (
        '<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:c="http://www.ctera.com/ns">'
        "<D:prop><D:getcontentlength/><c:fileid/><D:nosuchprop/></D:prop></D:propfind>"
    )
    with portal.client() as client:
        response = client.request("PROPFIND", portal.dav_url("one-byte.bin"), headers={"Depth": "0"}, content=body)
        assert response.status_code == 207
        assert "nosuchprop" in response.text and "404 Not Found" in response.text
        assert "getlastmodified" not in response.text  # only what was asked for
        response = client.request("PROPFIND", "/ServicesPortal/webdav/", headers={"Depth": "0"}, content=b"<bad")
        assert response.status_code == 400


def test_webdav_auth_basic_bearer_and_refusals(portal: Portal) -> None:
    url = portal.url + "/ServicesPortal/webdav/"
    assert httpx.request("PROPFIND", url, headers={"Depth": "0"}).status_code == 401
    response = httpx.request("PROPFIND", url, headers={"Depth": "0"}, auth=(portal.username, "wrong"))
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
    bearer = {"Depth": "0", "Authorization": f"Bearer {portal.token}"}
    assert httpx.request("PROPFIND", url, headers=bearer).status_code == 207
    bad_bearer = {"Depth": "0", "Authorization": "Bearer nope"}
    assert httpx.request("PROPFIND", url, headers=bad_bearer).status_code == 401
    missing = portal.url + "/ServicesPortal/webdav/no-such-file"
    assert httpx.request("PROPFIND", missing, headers={"Depth": "0"}, auth=portal.auth).status_code == 404


def test_webdav_get_with_range(portal: Portal, tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = tree
    data = (root / UNICODE_NAME).read_bytes()
    with portal.client() as client:
        full = client.get(portal.dav_url(UNICODE_NAME))
        assert full.status_code == 200 and full.content == data
        part = client.get(portal.dav_url(UNICODE_NAME), headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206
        assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        assert part.content == data[1000:2000]
        assert client.get(portal.dav_url("a", folder=True)).status_code == 405
        head = client.head(portal.dav_url(UNICODE_NAME))
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)


# --- Direct IO with the real cterasdk -----------------------------------------------------------------------------


def test_cterasdk_downloads_every_file_byte_exact(portal: Portal, tree: tuple[Path, dict[str, str]]) -> None:
    _, hashes = tree
    ids = {e.relpath: e for e in walk(portal).values() if not e.is_dir}
    checked = 0
    for rel, expected in hashes.items():
        if rel.startswith("text/"):
            continue  # configured --non-direct: 422 (see the status code test)
        if rel.startswith("many/") and not rel.endswith(("00000.txt", "04999.txt", "09999.txt")):
            continue  # three of the 10,000 small files are enough for the SDK; all are listed above
        if ids[rel].size == 0:
            continue  # "chunks": [] -> cterasdk BlocksNotFoundError; see test_zero_byte_files
        assert sha(sdk_download(portal, ids[rel].file_id)) == expected, rel
        checked += 1
    assert checked >= 12


def test_cterasdk_streamer_with_a_byte_range(portal: Portal, tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = tree
    data = (root / "big/few-mib.bin").read_bytes()
    fid = portal.file_id("big/few-mib.bin")
    start, end = BLOCK - 10, 3 * BLOCK + 5  # crosses block edges; cterasdk's end is inclusive
    assert sdk_download(portal, fid, (start, end)) == data[start : end + 1]


def test_directio_reply_shape(portal: Portal) -> None:
    fid = portal.file_id("big/few-mib.bin")
    with httpx.Client(base_url=portal.url) as client:
        reply = client.get(f"/directio/{fid}", headers={"Authorization": f"Bearer {portal.access_key_id}"}).json()
    size = 20 * 1024 * 1024 + 12345
    assert reply["encrypt_info"]["data_encrypted"] is True
    assert len(reply["encrypt_info"]["wrapped_key"]) == 64  # 48 bytes: AES-ECB over a 46-byte JSON string
    assert reply["compression_type"] == "SNAPPY"
    assert [c["len"] for c in reply["chunks"]] == [BLOCK] * (size // BLOCK) + [size % BLOCK]
    assert reply["actual_blocks_range"] == {"file_size": size, "range": f"0-{size}"}
    url = urllib.parse.urlsplit(reply["chunks"][0]["url"])
    assert url.path.startswith("/blocks/") and "expires=" in url.query and "sig=" in url.query


def test_directio_status_codes(portal: Portal) -> None:
    good = {"Authorization": f"Bearer {portal.access_key_id}"}
    fid = portal.file_id("one-byte.bin")
    with httpx.Client(base_url=portal.url) as client:
        assert client.get(f"/directio/{fid}", headers=good).status_code == 200
        assert client.get(f"/directio/{fid}").status_code == 401
        assert client.get(f"/directio/{fid}", headers={"Authorization": "Bearer WRONGKEY"}).status_code == 401
        assert (
            client.get(f"/directio/{fid}", headers={"Authorization": f"Basic {portal.access_key_id}"}).status_code
            == 401
        )
        assert client.get("/directio/99999999", headers=good).status_code == 400
        assert client.get("/directio/not-a-number", headers=good).status_code == 400
        assert client.get(f"/directio/{portal.file_id('a')}", headers=good).status_code == 400  # a folder
        non_direct = portal.file_id("text/lorem.txt")
        response = client.get(f"/directio/{non_direct}", headers=good)
        assert response.status_code == 422
        assert client.get(f"/directio/{fid}?rangeStart=x", headers=good).status_code == 400


def test_signed_block_urls_refuse_tampering(portal: Portal) -> None:
    fid = portal.file_id("sizes/block.bin")
    with httpx.Client(base_url=portal.url) as client:
        reply = client.get(f"/directio/{fid}", headers={"Authorization": f"Bearer {portal.access_key_id}"}).json()
        url = reply["chunks"][0]["url"]
        assert client.get(url).status_code == 200
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        sig = query["sig"]
        flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
        tampered = [
            parts._replace(query=urllib.parse.urlencode({**query, "sig": flipped})),
            parts._replace(query=urllib.parse.urlencode({**query, "expires": str(int(query["expires"]) + 1)})),
            parts._replace(path=parts.path[:-1] + ("0" if parts.path[-1] != "0" else "1")),
            parts._replace(query=""),
        ]
        for variant in tampered:
            assert client.get(urllib.parse.urlunsplit(variant)).status_code == 403


def test_zero_byte_files(portal: Portal, tmp_path: Path) -> None:
    root = tmp_path
    fid = portal.file_id("empty.bin")
    with httpx.Client(base_url=portal.url) as client:
        reply = client.get(f"/directio/{fid}", headers={"Authorization": f"Bearer {portal.access_key_id}"}).json()
    assert reply["chunks"] == [] and reply["actual_blocks_range"]["file_size"] == 0
    # With one 0-length chunk the real SDK reads an empty file (the other answer a Portal might give).
    other_root = root / "zero-tree"
    other_root.mkdir(exist_ok=True)
    (other_root / "zero").write_bytes(b"")
    with start_portal(other_root, extra_args=["--empty-files", "zero-chunk"]) as other:
        reply = directio_json(other, other.file_id("zero"))
        assert [c["len"] for c in reply["chunks"]] == [0]
        assert sdk_download(other, other.file_id("zero")) == b""


# --- restart, demo credentials, encodings, TLS, dedup ---------------------------------------------------------


def test_restart_keeps_ids_and_does_not_reencode(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_tree(root, 64 * 1024, few_mib=1)
    state = tmp_path / "state"
    with start_portal(root, state_dir=state, extra_args=["--block-size", "64K"]) as first:
        before = {e.relpath: e.file_id for e in walk(first).values()}
        env = {
            "DIRECTFS_ACCESS_KEY_ID": first.access_key_id,
            "DIRECTFS_SECRET_ACCESS_KEY": first.secret_access_key,
        }
    with start_portal(root, state_dir=state, env=env, extra_args=["--block-size", "64K"]) as second:
        after = {e.relpath: e.file_id for e in walk(second).values()}
        assert after == before
        assert "0 added, 0 changed, 0 deleted" in second.stderr_text()
        assert "0 objects written" in second.stderr_text()
        fid = second.file_id("big/few-mib.bin")
        assert sha(sdk_download(second, fid)) == sha((root / "big/few-mib.bin").read_bytes())
    # Another block size is another encoding: every file is re-encoded with a new id.
    with start_portal(root, state_dir=state, env=env, extra_args=["--block-size", "32K"]) as third:
        changed = {e.relpath: e.file_id for e in walk(third).values() if not e.is_dir}
        assert all(changed[rel] != before[rel] for rel in changed)


def _serve_stderr(argv: list[str], env: dict[str, str]) -> tuple[str, int | None, str]:
    """Start ``directfs serve``, stop it after its first stdout line: (that line, exit status, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    return line, proc.returncode, err.decode()


def test_demo_credentials_are_printed_and_user_secrets_are_not(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "x").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRECTFS_")}
    argv = [*serve_command(), str(root), "--listen", "127.0.0.1:0", "--rescan-interval", "0"]
    # Nothing configured: the whole public demo set, printed.
    line, status, text = _serve_stderr([*argv, "--state-dir", str(tmp_path / "demo")], env)
    assert line.startswith("directfs serve: listening on http://127.0.0.1:") and status == 0
    assert "DIRECTFS_ACCESS_KEY_ID=DIRECTFSDEMOACCESSKEY" in text and "DIRECTFS_PASSWORD=demo" in text
    # Credentials are one set (issue 13, H1): a user's secret alone is not completed with demo values, and the
    # refusal does not echo it.
    secret_file = tmp_path / "secret"
    secret_file.write_text("c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXh5")
    argv += ["--secret-access-key-file", str(secret_file)]
    line, status, text = _serve_stderr([*argv, "--state-dir", str(tmp_path / "s")], env)
    assert line == "" and status == 1
    assert "c2VjcmV0" not in text and "DIRECTFS_SECRET_ACCESS_KEY" not in text and "=demo" not in text
    # The whole set configured: it starts, and no value the user gave is printed.
    password_file, token_file = tmp_path / "password", tmp_path / "token"
    password_file.write_text("cGFzc3dvcmQtcGFzc3dvcmQ")
    token_file.write_text("dG9rZW4tdG9rZW4tdG9rZW4")
    argv += ["--access-key-id", "AKUSERKEY", "--username", "alice"]
    argv += ["--password-file", str(password_file), "--token-file", str(token_file)]
    line, status, text = _serve_stderr([*argv, "--state-dir", str(tmp_path / "s")], env)
    assert line.startswith("directfs serve: listening on http://127.0.0.1:") and status == 0
    for value in ("c2VjcmV0", "cGFzc3dvcmQ", "dG9rZW4", "AKUSERKEY", "DIRECTFS_SECRET_ACCESS_KEY", "public demo"):
        assert value not in text, value


def test_codec_decodes_what_the_portal_serves_for_every_encoding(tmp_path: Path) -> None:
    """Our own decoder against gzip, raw snappy, native and CDC objects (cterasdk covers the default path)."""
    root = tmp_path / "tree"
    hashes = make_tree(root, 64 * 1024, few_mib=2)
    args = [
        "--chunking",
        "cdc",
        "--compression-rule",
        "sizes/*=gzip",
        "--compression-rule",
        "a/*=snappy-raw",
        "--native",
        "big/*",
    ]
    with start_portal(root, extra_args=args) as portal:
        expected = {"sizes/block.bin": "GZIP", "a/b/sibling 2.bin": "SNAPPY", "big/few-mib.bin": "NONE"}
        for rel, compression_type in expected.items():
            reply = directio_json(portal, portal.file_id(rel))
            assert reply["compression_type"] == compression_type, rel
            assert reply["encrypt_info"]["data_encrypted"] is (compression_type != "NONE")
            assert sha(download_with_codec(portal, reply)) == hashes[rel], rel
            assert sha(sdk_download(portal, portal.file_id(rel))) == hashes[rel], rel
        lens = [c["len"] for c in directio_json(portal, portal.file_id("big/few-mib.bin"))["chunks"]]
        assert len(set(lens)) > 1, "content-defined chunks vary in size"
        assert all(c <= 4 * 1024 * 1024 for c in lens)


def test_partial_block_lists_page_with_range_start(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    hashes = make_tree(root, 64 * 1024, few_mib=1)
    with start_portal(root, extra_args=["--block-size", "64K", "--max-blocks-per-reply", "3"]) as portal:
        fid = portal.file_id("big/few-mib.bin")
        size = 1024 * 1024 + 12345
        data = bytearray()
        pages = 0
        while len(data) < size:
            reply = directio_json(portal, fid, rangeStart=len(data), rangeEnd=size - 1)
            covered = reply["actual_blocks_range"]
            assert covered["file_size"] == size
            start, end = (int(x) for x in covered["range"].split("-"))
            assert start == len(data) and end - start == sum(c["len"] for c in reply["chunks"])
            assert len(reply["chunks"]) <= 3
            data += download_with_codec(portal, reply)
            pages += 1
        assert sha(bytes(data)) == hashes["big/few-mib.bin"]
        assert pages == -(-size // (3 * 64 * 1024))
        # A range in the middle answers the blocks that overlap it.
        reply = directio_json(portal, fid, rangeStart=64 * 1024 + 5, rangeEnd=64 * 1024 + 6)
        assert reply["actual_blocks_range"]["range"] == f"{64 * 1024}-{2 * 64 * 1024}"


def test_https_with_tls_cert(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    root = tmp_path / "tree"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello over TLS")
    args = ["--tls-cert", str(cert_path), "--tls-key", str(key_path)]
    with start_portal(root, extra_args=args) as portal:
        assert portal.url.startswith("https://127.0.0.1:")
        verify = ssl.create_default_context(cafile=str(ca_path))
        with httpx.Client(base_url=portal.url, verify=verify) as client:
            response = client.request(
                "PROPFIND", "/ServicesPortal/webdav/hello.txt", headers={"Depth": "0"}, auth=portal.auth
            )
            assert response.status_code == 207
            fid = parse_multistatus(response.content)[0].file_id
            reply = client.get(f"/directio/{fid}", headers={"Authorization": f"Bearer {portal.access_key_id}"}).json()
            assert reply["chunks"][0]["url"].startswith(portal.url + "/blocks/")
            obj = client.get(reply["chunks"][0]["url"]).raise_for_status().content
        key = codec.unwrap_file_key(reply["encrypt_info"]["wrapped_key"], portal.secret_access_key)
        plain = codec.decode_block(obj, key=key, compression=Compression.SNAPPY, expected_length=14)
        assert plain == b"hello over TLS"


def test_a_changed_file_reuses_its_unchanged_blocks(tmp_path: Path) -> None:
    """Dedup within a file key: a new version keeps the path's key, so only the changed block is written."""
    root = tmp_path / "tree"
    root.mkdir()
    data = bytearray(os.urandom(8 * 64 * 1024))
    (root / "f.bin").write_bytes(data)
    with start_portal(root, extra_args=["--block-size", "64K"]) as portal:
        old_id = portal.file_id("f.bin")
        data[3 * 64 * 1024 + 7] ^= 0xFF
        (root / "f.bin").write_bytes(data)
        os.utime(root / "f.bin", ns=(1, 10**18))
        portal.rescan()
        deadline = time.monotonic() + 30
        while "1 changed" not in portal.stderr_text():
            assert time.monotonic() < deadline, portal.stderr_text()
            time.sleep(0.05)  # waiting for the server's rescan, not asserting on time
        assert "1 objects written, 1 collected" in portal.stderr_text()
        new_id = portal.file_id("f.bin")
        assert new_id != old_id
        assert sdk_download(portal, new_id) == bytes(data)
