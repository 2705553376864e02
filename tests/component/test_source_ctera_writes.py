"""Writes of the CTERA source (through the Portal's WebDAV) against the real reference portal with ``--writable``
(a subprocess on 127.0.0.1): an upload gives the file a new Direct IO file id and its blocks are read back through
Direct IO; folders, renames, deletes and mtimes. Results are checked in the portal's folder as well."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from directfs.errors import DirectoryNotEmptyError, EntryExistsError, EntryNotFoundError, WriteAccessError
from directfs.sources import ctera
from directfs.sources.base import Credentials, Entry, SourceOptions, Writable
from directfs.sources.httprange import RangeFile
from tests.support.portal import Portal, start_portal

BLOCK = 64 * 1024
MIB = 1024 * 1024


def content(size: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(b"ctera %d" % seed).digest(size) if size else b""


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[Portal]:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "old.bin").write_bytes(content(3 * BLOCK + 5, seed=1))
    (tree / "full").mkdir()
    (tree / "full" / "keep.txt").write_bytes(b"keep me\n")
    with start_portal(tree, extra_args=["--block-size", "64K"], writable=True) as server:
        yield server


def source_for(portal: Portal, *, password: str | None = None) -> ctera.CteraSource:
    credentials = Credentials(
        access_key_id=portal.access_key_id,
        secret_access_key=portal.secret_access_key,
        username=portal.username,
        password=password or portal.password,
    )
    return ctera.create("ctera+" + portal.url, SourceOptions(credentials=credentials))


@contextlib.contextmanager
def spooled(tmp_path: Path, data: bytes) -> Iterator[int]:
    path = tmp_path / f"spool-{os.urandom(4).hex()}"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


async def upload(source: Writable, path: str, data: bytes, tmp_path: Path, mtime_ns: int | None = None) -> Entry:
    with spooled(tmp_path, data) as fd:
        return await source.begin_upload(path).commit(fd, len(data), mtime_ns=mtime_ns)


async def read_direct(source: ctera.CteraSource, path: str, entry: Entry) -> bytes:
    """The file's bytes through ``open``/``fetch_block``, checking they came over Direct IO, not a WebDAV GET."""
    opened = await source.open(path, entry)
    try:
        assert not isinstance(opened, RangeFile), "read over the WebDAV fallback, not Direct IO"
        return b"".join([bytes(await opened.fetch_block(i)) for i in range(opened.layout.block_count)])
    finally:
        await opened.aclose()


async def test_upload_gets_a_file_id_and_reads_back_over_direct_io(portal: Portal, tmp_path: Path) -> None:
    source = source_for(portal)
    try:
        assert isinstance(source, Writable)
        assert source.write_features.keeps_mtime and source.write_features.folder_rename
        data = content(5 * BLOCK + 123, seed=2)
        entry = await upload(source, "new file ü #1.bin", data, tmp_path)
        assert entry.file_id is not None and entry.size == len(data)
        assert (portal.tree / "new file ü #1.bin").read_bytes() == data
        assert (await source.stat("new file ü #1.bin")).version == entry.version
        assert await read_direct(source, "new file ü #1.bin", entry) == data
        empty = await upload(source, "empty.bin", b"", tmp_path)
        assert empty.size == 0 and (portal.tree / "empty.bin").read_bytes() == b""
    finally:
        await source.aclose()


async def test_replace_gives_a_new_file_id_and_the_new_blocks(portal: Portal, tmp_path: Path) -> None:
    source = source_for(portal)
    try:
        before = await source.stat("old.bin")
        new = content(7 * BLOCK + 1, seed=3)
        entry = await upload(source, "old.bin", new, tmp_path)
        assert entry.file_id is not None and entry.file_id != before.file_id
        assert entry.version != before.version
        assert await read_direct(source, "old.bin", entry) == new
        assert (portal.tree / "old.bin").read_bytes() == new
    finally:
        await source.aclose()


async def test_40_mib_upload(portal: Portal, tmp_path: Path) -> None:
    big = content(40 * MIB, seed=40)
    source = source_for(portal)
    try:
        entry = await upload(source, "big.bin", big, tmp_path)
        assert entry.size == len(big)
        digest = hashlib.sha256(big).digest()
        assert hashlib.sha256((portal.tree / "big.bin").read_bytes()).digest() == digest
        assert hashlib.sha256(await read_direct(source, "big.bin", entry)).digest() == digest
    finally:
        await source.aclose()


async def test_folders_renames_and_deletes(portal: Portal, tmp_path: Path) -> None:
    source = source_for(portal)
    try:
        folder = await source.make_dir("made")
        assert folder.is_dir and (portal.tree / "made").is_dir()
        with pytest.raises(EntryExistsError):
            await source.make_dir("made")
        with pytest.raises(EntryNotFoundError):
            await source.make_dir("missing/child")
        with pytest.raises(DirectoryNotEmptyError):
            await source.remove_dir("full")
        assert (portal.tree / "full" / "keep.txt").read_bytes() == b"keep me\n"
        await upload(source, "made/a.txt", b"a", tmp_path)
        await source.rename("made/a.txt", "made/b.txt", is_dir=False)
        await source.rename("made", "moved", is_dir=True)
        assert (portal.tree / "moved" / "b.txt").read_bytes() == b"a" and not (portal.tree / "made").exists()
        moved = await source.stat("moved/b.txt")
        assert await read_direct(source, "moved/b.txt", moved) == b"a"
        await source.remove_file("moved/b.txt")
        await source.remove_dir("moved")
        assert not (portal.tree / "moved").exists()
        with pytest.raises(EntryNotFoundError):
            await source.remove_file("moved/b.txt")
    finally:
        await source.aclose()


async def test_mtime_is_kept(portal: Portal, tmp_path: Path) -> None:
    when = 1_600_000_000 * 1_000_000_000
    source = source_for(portal)
    try:
        entry = await upload(source, "dated.bin", b"dated", tmp_path, mtime_ns=when)
        assert entry.mtime_ns == when
        assert await source.set_mtime("old.bin", when + 1_000_000_000) is True
        assert (await source.stat("old.bin")).mtime_ns == when + 1_000_000_000
        assert (portal.tree / "old.bin").stat().st_mtime_ns // 1_000_000_000 == when // 1_000_000_000 + 1
        assert await source.set_mtime("full", when) is True  # a folder (asked without its slash)
        assert (await source.stat("full")).mtime_ns == when
    finally:
        await source.aclose()


async def test_refused_credentials_are_eacces(portal: Portal, tmp_path: Path) -> None:
    source = source_for(portal, password="not-the-password")
    try:
        with pytest.raises(WriteAccessError) as denied:
            await upload(source, "x.bin", content(2 * MIB), tmp_path)
        assert denied.value.errno == errno.EACCES and "not-the-password" not in str(denied.value)
    finally:
        await source.aclose()
    assert not (portal.tree / "x.bin").exists()
