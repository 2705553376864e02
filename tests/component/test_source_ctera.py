"""The CTERA source against the real reference portal (a subprocess on 127.0.0.1): listing, stat, exact bytes over
Direct IO, the WebDAV-GET fallback for non-direct files, native files, and the errors a user can see."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from directfs.errors import DirectFSError
from directfs.sources import ctera
from directfs.sources.base import Credentials, Entry, SourceOptions
from tests.support.portal import AWKWARD_NAME, UNICODE_NAME, Portal, make_tree, start_portal

BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Portal, dict[str, str]]]:
    tree = tmp_path_factory.mktemp("ctera-tree")
    hashes = make_tree(tree, BLOCK, few_mib=2)
    (tree / "native").mkdir()
    (tree / "native" / "plain.bin").write_bytes(b"native bytes " * 10000)
    hashes["native/plain.bin"] = hashlib.sha256(b"native bytes " * 10000).hexdigest()
    (tree / "legacy").mkdir()
    (tree / "legacy" / "cold.bin").write_bytes(bytes(range(256)) * 1000)
    hashes["legacy/cold.bin"] = hashlib.sha256(bytes(range(256)) * 1000).hexdigest()
    args = [
        "--block-size",
        "64K",
        "--native",
        "native/*",
        "--non-direct",
        "legacy/*",
        "--compression-rule",
        "text/*=gzip",
    ]
    with start_portal(tree, extra_args=args) as portal:
        yield portal, hashes


def source_for(portal: Portal, *, password: str | None = None, secret: str | None = None) -> ctera.CteraSource:
    credentials = Credentials(
        access_key_id=portal.access_key_id,
        secret_access_key=secret or portal.secret_access_key,
        username=portal.username,
        password=password or portal.password,
    )
    return ctera.create("ctera+" + portal.url, SourceOptions(credentials=credentials))


async def walk(source: ctera.CteraSource, folder: str = "") -> dict[str, Entry]:
    found: dict[str, Entry] = {}
    async for entry in source.list_dir(folder):
        path = f"{folder}/{entry.name}" if folder else entry.name
        found[path] = entry
        if entry.is_dir:
            found.update(await walk(source, path))
    return found


async def read_all(source: ctera.CteraSource, path: str, entry: Entry) -> bytes:
    opened = await source.open(path, entry)
    try:
        layout = opened.layout
        assert layout.size == entry.size
        return b"".join([bytes(await opened.fetch_block(i)) for i in range(layout.block_count)])
    finally:
        await opened.aclose()


@pytest.mark.expected_logs(r"is not on a Direct-mode storage node \(Portal 422\): reading it over WebDAV")
async def test_listing_matches_the_tree_and_every_file_reads_exactly(served: tuple[Portal, dict[str, str]]) -> None:
    portal, hashes = served
    source = source_for(portal)
    try:
        entries = await walk(source)
        files = {path: e for path, e in entries.items() if not e.is_dir}
        assert set(files) == set(hashes)
        assert entries["empty folder"].is_dir
        for path, entry in files.items():
            assert entry.size == (portal.tree / path).stat().st_size, path
            assert abs(entry.mtime_ns - (portal.tree / path).stat().st_mtime_ns) < 2 * 10**9, path
            assert entry.file_id, path
            data = await read_all(source, path, entry)
            assert hashlib.sha256(data).hexdigest() == hashes[path], path
    finally:
        await source.aclose()


async def test_stat_of_awkward_names_and_root(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served
    source = source_for(portal)
    try:
        for path in (UNICODE_NAME, AWKWARD_NAME):
            entry = await source.stat(path)
            assert entry.name == path.rsplit("/", 1)[1]
            assert entry.file_id == portal.file_id(path)
        root = await source.stat("")
        assert root.is_dir
    finally:
        await source.aclose()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ("stat-missing", errno.ENOENT),
        ("list-missing", errno.ENOENT),
        ("list-a-file", errno.ENOTDIR),
        ("wrong-password", errno.EACCES),
        ("wrong-secret", errno.EIO),
    ],
)
async def test_errors_carry_the_errno_a_user_sees(
    served: tuple[Portal, dict[str, str]], call: str, expected: int
) -> None:
    portal, _ = served
    source = source_for(
        portal,
        password="wrong" if call == "wrong-password" else None,
        secret="QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNk" if call == "wrong-secret" else None,
    )
    try:
        with pytest.raises(DirectFSError) as info:
            if call == "stat-missing":
                await source.stat("no/such/file")
            elif call == "list-missing":
                [e async for e in source.list_dir("no-such-folder")]
            elif call == "list-a-file":
                [e async for e in source.list_dir("one-byte.bin")]
            elif call == "wrong-password":
                await source.stat("one-byte.bin")
            else:
                entry = await source.stat("big/few-mib.bin")  # listing works: the password is right
                await read_all(source, "big/few-mib.bin", entry)
        assert info.value.errno == expected
        assert portal.password not in str(info.value)
        assert portal.secret_access_key not in str(info.value)
    finally:
        await source.aclose()


async def test_non_direct_file_falls_back_to_webdav_get(
    served: tuple[Portal, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    portal, hashes = served
    source = source_for(portal)
    try:
        entry = await source.stat("legacy/cold.bin")
        data = await read_all(source, "legacy/cold.bin", entry)
        assert hashlib.sha256(data).hexdigest() == hashes["legacy/cold.bin"]
        assert any("422" in r.getMessage() for r in caplog.records)
    finally:
        await source.aclose()


async def test_versions_change_with_the_file(served: tuple[Portal, dict[str, str]], tmp_path: Path) -> None:
    portal, _ = served
    source = source_for(portal)
    try:
        before = await source.stat("a/b/c/deep.txt")
        (portal.tree / "a/b/c/deep.txt").write_bytes(b"changed content, longer than before\n")
        portal.rescan()
        for _ in range(200):  # the rescan runs in the portal process: poll its answer, bounded
            after = await source.stat("a/b/c/deep.txt")
            if after.version != before.version:
                break
            await trio.sleep(0.05)
        assert after.version != before.version
        assert after.file_id != before.file_id
        assert await read_all(source, "a/b/c/deep.txt", after) == b"changed content, longer than before\n"
    finally:
        await source.aclose()
