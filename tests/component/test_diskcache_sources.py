"""The disk cache against real stores: the reference portal (``directfs serve``: encrypted and native ``ctera+`` files,
block GETs counted at the server) and SeaweedFS (``s3://``). Each read runs a fresh source and engine on the same
cache folder, as a remount or a second process does (docs/disk-cache.md)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from directfs.engine.diskcache import HEADER, KIND_RAW, KIND_SEALED, DiskCacheSettings, DiskStatistics, DiskTier
from directfs.engine.diskcache import open_disk_cache as open_cache
from directfs.engine.reader import ReadEngine, ReadSettings
from directfs.sources.base import Credentials, SourceOptions
from directfs.sources.registry import create_source
from tests.support.portal import Portal, start_portal
from tests.support.seaweed import SeaweedFS
from tests.support.sourcetree import isolate_aws_env, s3_bucket

MARKER = b"PLAINTEXT-MARKER-7f3a9c"  # a known plaintext: must never appear in the cache folder
BLOCK = 64 * 1024
BUCKET = "directfs-diskcache"


def _content(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    # Incompressible data with the marker every block or so: any block on disk in clear would show it.
    parts = []
    while sum(map(len, parts)) < size:
        parts += [MARKER, rng.randbytes(BLOCK // 2)]
    return b"".join(parts)[:size]


FILES = {
    "secret/a.bin": _content(1, 5 * BLOCK + 123),
    "secret/b.bin": _content(2, 3 * BLOCK),
    "native/plain.bin": _content(3, 4 * BLOCK + 1),
}


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tree = tmp_path_factory.mktemp("tree")
    for rel, data in FILES.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    with start_portal(tree, extra_args=["--block-size", "64K", "--native", "native/*"]) as it:
        yield it


def _ctera(portal: Portal) -> tuple[str, SourceOptions]:
    credentials = Credentials(
        access_key_id=portal.access_key_id,
        secret_access_key=portal.secret_access_key,
        username=portal.username,
        password=portal.password,
    )
    return "ctera+" + portal.url, SourceOptions(credentials=credentials)


@dataclass
class Folder:
    directory: Path
    key_file: Path

    def settings(self, **kwargs: int) -> DiskCacheSettings:
        return DiskCacheSettings(directory=str(self.directory), key_file=str(self.key_file), min_free_bytes=0, **kwargs)

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("??/*") if p.is_file())


@pytest.fixture
def folder(tmp_path: Path) -> Folder:
    return Folder(tmp_path / "cache", tmp_path / "keys" / "disk-cache.key")


async def read_through(
    url: str, options: SourceOptions, settings: DiskCacheSettings, paths: list[str]
) -> tuple[dict[str, bytes], DiskStatistics]:
    """Each path read whole, 128 KiB at a time, by a fresh source and engine on ``settings``'s folder."""
    source = create_source(url, options)
    out: dict[str, bytes] = {}
    try:
        disk = DiskTier(await open_cache(settings), source.display_url)
        async with trio.open_nursery() as nursery:
            engine = ReadEngine(ReadSettings(), nursery, disk=disk)
            for path in paths:
                entry = await source.stat(path)
                handle = await source.open(path, entry)
                reader = engine.open(handle, (path, entry.version))
                data = bytearray()
                while len(data) < entry.size:
                    data += await reader.read(len(data), 128 * 1024)
                await reader.aclose()
                await handle.aclose()
                out[path] = bytes(data)
            # Let the background writes land (they never delay a reader, so the test waits for them).
            await engine.flush_disk_writes()
            stats = disk.cache.statistics()
            nursery.cancel_scope.cancel()
    finally:
        await source.aclose()
    return out, stats


def block_gets(portal: Portal) -> int:
    return portal.request_count("GET", "/blocks/")


def _grep(directory: Path, needle: bytes) -> bool:
    found = subprocess.run(["grep", "-rlaF", needle.decode(), str(directory)], capture_output=True, check=False)
    assert found.returncode in (0, 1), found.stderr
    return found.returncode == 0


def _kind(path: Path) -> int:
    return HEADER.unpack_from(path.read_bytes())[2]


async def test_second_read_sends_no_block_get_and_no_plaintext_on_disk(portal: Portal, folder: Folder) -> None:
    url, options = _ctera(portal)
    paths = list(FILES)
    before = block_gets(portal)
    first, stats = await read_through(url, options, folder.settings(), paths)
    assert first == FILES
    fetched = block_gets(portal) - before
    assert fetched == 6 + 3 + 5  # every block once
    assert stats.writes == fetched and stats.hits == 0

    between = block_gets(portal)
    second, stats = await read_through(url, options, folder.settings(), paths)
    assert second == FILES
    assert block_gets(portal) == between, "a warm disk cache sends no block GET"
    assert stats.hits == fetched and stats.writes == 0 and stats.corrupt == 0

    assert not _grep(folder.directory, MARKER), "no plaintext in the cache folder"
    kinds = sorted(_kind(p) for p in folder.files())
    # encrypted files: the ciphertext as fetched; the native file's plaintext objects: sealed with the cache key
    assert kinds.count(KIND_RAW) == 9 and kinds.count(KIND_SEALED) == 5
    assert not _grep(folder.key_file.parent, MARKER)
    assert folder.key_file.stat().st_mode & 0o777 == 0o600
    names = {p.name for p in folder.files()}
    assert all(len(n) == 64 and set(n) <= set("0123456789abcdef") for n in names)  # hashes only: no file names


@pytest.mark.expected_logs("disk cache: dropped a damaged file")
@pytest.mark.parametrize("path", ["secret/a.bin", "native/plain.bin"])
async def test_flipped_truncated_and_swapped_files_are_dropped_and_refetched(
    portal: Portal, folder: Folder, path: str
) -> None:
    url, options = _ctera(portal)
    await read_through(url, options, folder.settings(), [path])
    files = folder.files()
    assert len(files) >= 4
    flipped, truncated, swapped, other = files[:4]
    damage = bytearray(flipped.read_bytes())
    damage[len(damage) // 2] ^= 0x01
    flipped.write_bytes(damage)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 100)
    os.replace(other, swapped)  # swapped now holds another block's (valid) file, and other's is gone
    bad = {p: p.read_bytes() for p in (flipped, truncated, swapped)}

    before = block_gets(portal)
    out, stats = await read_through(url, options, folder.settings(), [path])
    assert out[path] == FILES[path], "the reader gets the right bytes"
    assert stats.corrupt == 3, "each damaged file is counted"
    assert block_gets(portal) - before == 4, "three damaged blocks and the moved one are fetched again"
    for damaged, content in bad.items():
        assert damaged.read_bytes() != content, "the damaged file is gone (a good copy replaced it)"
    third, stats = await read_through(url, options, folder.settings(), [path])
    assert third[path] == FILES[path] and stats.corrupt == 0 and stats.writes == 0


async def test_size_bound_holds_while_reading_twice_its_size(portal: Portal, folder: Folder) -> None:
    url, options = _ctera(portal)
    bound = 6 * (BLOCK + 200)  # six cache files of 64 KiB blocks (header and padding included)
    out, stats = await read_through(url, options, folder.settings(size_bytes=bound), list(FILES))
    assert out == FILES
    on_disk = sum(p.stat().st_size for p in folder.files())
    assert on_disk <= bound and stats.size_bytes == on_disk
    assert stats.evictions == stats.writes - len(folder.files()) > 0


# --- s3:// -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with s3_bucket(tmp_path_factory.mktemp("weed"), BUCKET) as (s3, _):
        s3.client().put_object(Bucket=BUCKET, Key="data/marked.bin", Body=FILES["secret/a.bin"])
        yield s3


async def test_s3_blocks_are_sealed_on_disk(
    weed: SeaweedFS, folder: Folder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s3 = isolate_aws_env(monkeypatch, tmp_path, weed)
    options = SourceOptions(block_size_bytes=BLOCK, endpoint_url=s3.endpoint)
    url = f"s3://{BUCKET}/data"
    first, stats = await read_through(url, options, folder.settings(), ["marked.bin"])
    assert first["marked.bin"] == FILES["secret/a.bin"] and stats.writes == 6
    second, stats = await read_through(url, options, folder.settings(), ["marked.bin"])
    assert second["marked.bin"] == FILES["secret/a.bin"] and stats.hits == 6 and stats.writes == 0
    assert {_kind(p) for p in folder.files()} == {KIND_SEALED}
    assert not _grep(folder.directory, MARKER)
    assert hashlib.sha256(second["marked.bin"]).digest() == hashlib.sha256(FILES["secret/a.bin"]).digest()
