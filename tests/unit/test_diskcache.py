"""The disk cache alone (directfs.engine.diskcache, docs/disk-cache.md): key file, names, the two entry kinds, every
refusal, LRU eviction under the size bound and the free-space floor, and that "off" leaves the engine's path as it
was. Real files in tmp_path; no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from directfs.engine.diskcache import (
    HEADER,
    KIND_RAW,
    KIND_SEALED,
    DiskCache,
    DiskCacheSettings,
    DiskTier,
    open_disk_cache,
    stable_identity,
)
from directfs.engine.reader import ReadEngine, ReadSettings
from directfs.errors import ConfigError, DecryptBlockError
from directfs.sources.base import BlockLayout

BLOCK = b"block bytes " * 1000


def _settings(tmp_path: Path, **kwargs: int) -> DiskCacheSettings:
    return DiskCacheSettings(
        directory=str(tmp_path / "cache"), key_file=str(tmp_path / "keys" / "k"), min_free_bytes=0, **kwargs
    )


def _files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").glob("??/*"))


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _write_key(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir()
    path.write_text(text)
    os.chmod(path, mode)


def _reverse(raw: memoryview) -> bytes:
    """A stand-in codec for raw entries: the "object" is the block reversed."""
    return bytes(raw)[::-1]


async def _put(cache: DiskCache, name: bytes, data: bytes, kind: int = KIND_SEALED) -> None:
    async with trio.open_nursery() as nursery:
        await cache.save(nursery, name, kind, len(data), data if kind == KIND_SEALED else data[::-1])
        await cache.flush()


async def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    first = await open_disk_cache(settings)
    key = Path(settings.key_file or "")
    assert _mode(key) == 0o600 and _mode(key.parent) == 0o700
    second = await open_disk_cache(settings)
    assert first.name_of("s", "i", "v", 1) == second.name_of("s", "i", "v", 1)
    assert _mode(tmp_path / "cache") == 0o700


@pytest.mark.parametrize("problem", ["readable", "garbage", "inside"])
async def test_a_bad_key_file_is_refused(tmp_path: Path, problem: str) -> None:
    settings = _settings(tmp_path)
    key = Path(settings.key_file or "")
    _write_key(key, "00" * 32 if problem != "garbage" else "not a key\n", 0o644 if problem == "readable" else 0o600)
    if problem == "inside":
        settings = DiskCacheSettings(directory=str(tmp_path / "keys"), key_file=str(key))
    with pytest.raises(ConfigError):
        await open_disk_cache(settings)


def test_stable_identity_only_for_values_every_process_spells_alike() -> None:
    assert stable_identity(("a/b.bin", "v1")) == "('a/b.bin','v1')"
    assert stable_identity(("directio", 7)) == "('directio',7)"
    assert stable_identity(object()) is None
    assert stable_identity(("x", object())) is None


async def test_names_differ_by_every_part_of_the_key(tmp_path: Path) -> None:
    cache = await open_disk_cache(_settings(tmp_path))
    base = cache.name_of("s3://b", "('p','v')", "v", 3)
    others = [
        cache.name_of("s3://c", "('p','v')", "v", 3),
        cache.name_of("s3://b", "('q','v')", "v", 3),
        cache.name_of("s3://b", "('p','v')", "w", 3),
        cache.name_of("s3://b", "('p','v')", "v", 4),
        cache.name_of("s3://b", "('p','v')", "v", 3, 65536),
    ]
    assert base not in others and len(set(others)) == len(others)


@pytest.mark.parametrize("kind", [KIND_SEALED, KIND_RAW])
async def test_round_trip_and_nothing_in_clear(tmp_path: Path, kind: int) -> None:
    cache = await open_disk_cache(_settings(tmp_path))
    name = cache.name_of("s", "i", "v", 0)
    await _put(cache, name, BLOCK, kind)
    (path,) = _files(tmp_path)
    assert path.name == name.hex() and HEADER.unpack_from(path.read_bytes())[2] == kind
    if kind == KIND_SEALED:
        assert b"block bytes" not in path.read_bytes()
    decode = _reverse if kind == KIND_RAW else None
    assert await cache.load(name, len(BLOCK), decode) == BLOCK
    reopened = await open_disk_cache(_settings(tmp_path))  # a new process: the scan finds it
    assert name in reopened and await reopened.load(name, len(BLOCK), decode) == BLOCK
    stats = reopened.statistics()
    assert (stats.hits, stats.corrupt, stats.entries) == (1, 0, 1)


def _flip(offset: int) -> object:
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x40
        path.write_bytes(data)

    return damage


@pytest.mark.expected_logs("disk cache: dropped a damaged file")
@pytest.mark.parametrize(
    ("kind", "damage", "ask_length"),
    [
        (KIND_SEALED, _flip(-1), None),  # tag
        (KIND_SEALED, _flip(HEADER.size + 5), None),  # ciphertext
        (KIND_SEALED, _flip(0), None),  # magic
        (KIND_SEALED, _flip(30), None),  # name in the header
        (KIND_SEALED, _flip(12), None),  # plaintext length in the header
        (KIND_RAW, _flip(HEADER.size + 5), None),  # the object itself: the GMAC tag catches it
        (KIND_RAW, _flip(-3), None),  # tag
        (KIND_SEALED, lambda p: os.truncate(p, p.stat().st_size - 1), None),
        (KIND_SEALED, lambda p: os.truncate(p, 10), None),
        (KIND_SEALED, lambda p: p.write_bytes(p.read_bytes() + b"x"), None),
        (KIND_SEALED, None, len(BLOCK) + 1),  # asked for another length than stored
    ],
)
async def test_every_damage_is_a_counted_miss_and_the_file_goes(
    tmp_path: Path, kind: int, damage: object, ask_length: int | None
) -> None:
    cache = await open_disk_cache(_settings(tmp_path))
    name = cache.name_of("s", "i", "v", 0)
    await _put(cache, name, BLOCK, kind)
    (path,) = _files(tmp_path)
    if callable(damage):
        damage(path)
    decode = _reverse if kind == KIND_RAW else None
    assert await cache.load(name, ask_length or len(BLOCK), decode) is None
    assert cache.statistics().corrupt == 1 and not path.exists()


@pytest.mark.expected_logs("disk cache: dropped a damaged file")
async def test_a_swapped_file_and_a_kind_mismatch_are_refused(tmp_path: Path) -> None:
    cache = await open_disk_cache(_settings(tmp_path))
    one, two = cache.name_of("s", "i", "v", 1), cache.name_of("s", "i", "v", 2)
    await _put(cache, one, BLOCK)
    await _put(cache, two, BLOCK[::-1])
    os.replace(tmp_path / "cache" / one.hex()[:2] / one.hex(), tmp_path / "cache" / two.hex()[:2] / two.hex())
    assert await cache.load(two, len(BLOCK), None) is None  # holds block 1's (valid) file: refused
    await _put(cache, one, BLOCK)
    assert await cache.load(one, len(BLOCK), _reverse) is None  # a sealed entry where a raw one is expected

    def refuse(raw: memoryview) -> bytes:
        raise DecryptBlockError("bad padding")

    await _put(cache, two, BLOCK, KIND_RAW)
    assert await cache.load(two, len(BLOCK), refuse) is None  # the codec refuses the object
    assert cache.statistics().corrupt == 3


async def test_lru_eviction_keeps_the_folder_under_its_bound(tmp_path: Path) -> None:
    entry = len(BLOCK) + HEADER.size + 16
    cache = await open_disk_cache(_settings(tmp_path, size_bytes=3 * entry))
    names = [cache.name_of("s", "i", "v", i) for i in range(6)]
    for name in names[:3]:
        await _put(cache, name, BLOCK)
    assert await cache.load(names[0], len(BLOCK), None) == BLOCK  # 0 becomes the most recently used
    for name in names[3:5]:
        await _put(cache, name, BLOCK)
    on_disk = {p.name for p in _files(tmp_path)}
    assert on_disk == {names[0].hex(), names[3].hex(), names[4].hex()}
    assert sum(p.stat().st_size for p in _files(tmp_path)) <= 3 * entry
    stats = cache.statistics()
    assert stats.evictions == 2 and stats.size_bytes == 3 * entry and stats.entries == 3


async def test_the_free_space_floor_stops_writes(tmp_path: Path) -> None:
    settings = DiskCacheSettings(
        directory=str(tmp_path / "cache"), key_file=str(tmp_path / "k"), min_free_bytes=1 << 62
    )
    cache = await open_disk_cache(settings)
    await _put(cache, cache.name_of("s", "i", "v", 0), BLOCK)
    assert _files(tmp_path) == [] and cache.statistics().skipped_writes == 1


async def test_stale_temp_files_are_removed_by_the_scan(tmp_path: Path) -> None:
    await open_disk_cache(_settings(tmp_path))
    stale = tmp_path / "cache" / "tmp" / "leftover.123.abcd"
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    fresh = tmp_path / "cache" / "tmp" / "writing.456.ef01"
    fresh.write_bytes(b"y")
    await open_disk_cache(_settings(tmp_path))
    assert not stale.exists() and fresh.exists()


class _Plain:
    def __init__(self, data: bytes) -> None:
        self.layout = BlockLayout.fixed("v1", len(data), 4096)
        self._data = data
        self.fetches = 0

    async def fetch_block(self, index: int) -> bytes:
        self.fetches += 1
        await trio.lowlevel.checkpoint()
        return self._data[index * 4096 : (index + 1) * 4096]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_off_means_the_engine_path_of_before_and_on_serves_from_disk(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 5)
    async with trio.open_nursery() as nursery:
        plain = ReadEngine(ReadSettings(), nursery).open(_Plain(data), ("f", "v1"))
        assert plain._fetch_impl == plain._fetch_verified  # no disk tier: not one extra call per block
        cache = await open_disk_cache(_settings(tmp_path))
        for round_ in range(2):
            engine = ReadEngine(ReadSettings(), nursery, disk=DiskTier(cache, "file:///x"))
            file = _Plain(data)
            reader = engine.open(file, ("f", "v1"))
            assert bytes(await reader.read(0, len(data))) == data
            await engine.flush_disk_writes()
            await reader.aclose()
            assert file.fetches == (4 if round_ == 0 else 0)
        stats = engine.statistics().disk
        assert stats is not None and stats.hits == 4
        unstable = engine.open(_Plain(data), object())  # no stable name: not disk-cached, still read
        assert unstable._fetch_impl == unstable._fetch_verified
        nursery.cancel_scope.cancel()
