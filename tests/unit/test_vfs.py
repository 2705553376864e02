"""The filesystem object directly (no FUSE), what only it shows: inodes and lookup counts, readdir offsets, caches and
TTLs on a mock clock, single-flight, versions and invalidation, xattrs from the store, the FUSE error boundary.

What a program sees (listing, stat, bytes, errnos) is the behaviour suite (tests/support/behaviour.py), run over
``FileSystem`` by tests/unit/test_behaviour_vfs.py and through a real mount by tests/mount/test_behaviour_mount.py."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, Hashable
from pathlib import Path

import pytest
import trio
import trio.testing

from directfs.errors import DirectFSError, EntryNotFoundError, StaleFileError
from directfs.sources.base import BlockLayout, Entry, OpenFile, SourceOptions
from directfs.sources.local import LocalSource
from directfs.sources.local import create as create_local
from directfs.sources.registry import create_source
from directfs.vfs import BLKSIZE_BYTES, FILEID_XATTR, ROOT_INODE, Attributes, FileSystem, VfsSettings

BLOCK = 4096


class DirectReader:
    """The read-engine contract without caching: exactly ``size`` bytes unless EOF, from whole blocks."""

    def __init__(self, file: OpenFile) -> None:
        self.file = file
        self.closed = False

    async def read(self, offset: int, size: int) -> bytes:
        layout = self.file.layout
        end = min(offset + size, layout.size)
        out = bytearray()
        position = offset
        while position < end:
            index = layout.block_at(position)
            block = await self.file.fetch_block(index)
            start = layout.block_start(index)
            out += block[position - start : min(end, start + len(block)) - start]
            position = start + len(block)
        return bytes(out)

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


class DirectEngine:
    def __init__(self) -> None:
        self.identities: list[Hashable] = []

    def open(self, file: OpenFile, identity: Hashable) -> DirectReader:
        self.identities.append(identity)
        return DirectReader(file)


class FakeOpenFile:
    def __init__(self, data: bytes, version: str) -> None:
        self.data = data
        self._layout = BlockLayout.fixed(version, len(data), BLOCK)

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    async def fetch_block(self, index: int) -> bytes:
        await trio.lowlevel.checkpoint()
        start = self._layout.block_start(index)
        return self.data[start : start + self._layout.block_length(index)]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class FakeSource:
    """An in-memory store that counts calls; ``files`` maps path -> bytes (None = folder)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes | None] = {"": None}
        self.versions: dict[str, int] = {}
        self.file_ids: dict[str, str] = {}
        self.extra_xattrs: dict[str, tuple[tuple[str, bytes], ...]] = {}
        self.stats = 0
        self.lists = 0
        self.stat_delay = 0.0

    @property
    def display_url(self) -> str:
        return "fake://"

    def put(self, path: str, data: bytes | None) -> None:
        self.files[path] = data
        self.versions[path] = self.versions.get(path, 0) + 1

    def _entry(self, path: str) -> Entry:
        data = self.files[path]
        version = f"v{self.versions.get(path, 0)}"
        return Entry(
            name=path.rpartition("/")[2],
            is_dir=data is None,
            size=0 if data is None else len(data),
            mtime_ns=1_700_000_000_000_000_000 + self.versions.get(path, 0),
            version=version,
            file_id=self.file_ids.get(path),
            xattrs=self.extra_xattrs.get(path, ()),
        )

    async def stat(self, path: str) -> Entry:
        self.stats += 1
        await trio.sleep(self.stat_delay)
        if path not in self.files:
            raise EntryNotFoundError(filename=path)
        return self._entry(path)

    async def list_dir(self, path: str) -> AsyncIterator[Entry]:
        self.lists += 1
        prefix = f"{path}/" if path else ""
        for child in sorted(self.files):
            if child and child.startswith(prefix) and "/" not in child[len(prefix) :]:
                await trio.lowlevel.checkpoint()
                yield self._entry(child)

    async def open(self, path: str, entry: Entry) -> OpenFile:
        await trio.lowlevel.checkpoint()
        current = self._entry(path)
        if current.version != entry.version:
            raise StaleFileError(filename=path)
        data = self.files[path]
        assert data is not None
        return FakeOpenFile(data, current.version)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def collect(fs: FileSystem, fh: int, start: int = 0, limit: int | None = None) -> list[tuple[str, Attributes, int]]:
    got: list[tuple[str, Attributes, int]] = []

    def emit(name: str, attrs: Attributes, next_id: int) -> bool:
        if limit is not None and len(got) >= limit:
            return False
        got.append((name, attrs, next_id))
        return True

    fs.readdir(fh, start, emit)
    return got


async def make_fs(source: FakeSource | LocalSource, **settings: float | int) -> FileSystem:
    fs = FileSystem(source, DirectEngine(), VfsSettings(**settings))  # type: ignore[arg-type]
    await fs.start()
    return fs


def errno_of_call(exc_info: pytest.ExceptionInfo[DirectFSError]) -> int | None:
    return exc_info.value.errno


# --- local source through the filesystem ---------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub dir" / "deep").mkdir(parents=True)
    for size in (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 7):
        (root / f"f{size}.bin").write_bytes(os.urandom(size))
    (root / "sub dir" / "ünï %#.txt").write_text("hello\n")
    (root / "sub dir" / "deep" / "x").write_bytes(b"x" * 10)
    return root


def local(tree: Path) -> LocalSource:
    source = create_local(f"file://{tree}?block_size_bytes={BLOCK}", SourceOptions())
    assert isinstance(source, LocalSource)
    return source


async def test_local_listing_skips_undecodable_names(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.close(os.open(os.fsencode(tree) + b"/bad\xffname", os.O_CREAT | os.O_WRONLY, 0o644))
    fs = await make_fs(local(tree))
    with caplog.at_level(logging.WARNING, logger="directfs.sources.local"):
        fh = await fs.opendir(ROOT_INODE)
        names = [name for name, _, _ in collect(fs, fh)]
    assert not any("bad" in name for name in names)
    assert "invalid name" in caplog.text


def test_registry_rejects_unknown_schemes_and_bad_local_urls(tmp_path: Path) -> None:
    for url in ("gopher://x", "file://relative", f"file://{tmp_path}/missing", f"file://{tmp_path}?block_size_bytes=x"):
        with pytest.raises(DirectFSError) as bad:
            create_source(url, SourceOptions())
        assert bad.value.errno == errno.EINVAL
    assert create_source(f"file://{tmp_path}", SourceOptions()).display_url == f"file://{tmp_path}"


# --- inode table and lookup counts ---------------------------------------------------------------------------


async def test_lookup_counts_follow_the_fuse_contract() -> None:
    source = FakeSource()
    source.put("d", None)
    for i in range(5):
        source.put(f"d/f{i}", b"x" * i)
    fs = await make_fs(source)
    d = await fs.lookup(ROOT_INODE, "d")
    assert fs.lookup_count(d.inode) == 1
    assert (await fs.lookup(ROOT_INODE, "d")).inode == d.inode
    assert fs.lookup_count(d.inode) == 2

    fh = await fs.opendir(d.inode)
    first = collect(fs, fh, limit=3)  # the kernel's buffer takes 3 entries, refuses the 4th
    assert [name for name, _, _ in first] == ["f0", "f1", "f2"]
    for _, attrs, _ in first:
        assert fs.lookup_count(attrs.inode) == 1
    assert fs.inode_of("d/f3") is None  # refused: no reference, no inode kept
    rest = collect(fs, fh, start=first[-1][2])
    assert [name for name, _, _ in rest] == ["f3", "f4"]
    fs.releasedir(fh)

    f0 = first[0][1].inode
    assert (await fs.lookup(d.inode, "f0")).inode == f0
    assert fs.lookup_count(f0) == 2
    fs.forget([(f0, 1)])
    assert fs.lookup_count(f0) == 1
    fs.forget([(f0, 1), (d.inode, 2)])
    assert fs.inode_of("d/f0") is None and fs.inode_of("d") is None
    with pytest.raises(DirectFSError) as gone:
        await fs.getattr(f0)
    assert gone.value.errno == errno.ESTALE
    fs.forget([(ROOT_INODE, 100), (999_999, 1)])  # root is never dropped; unknown inodes are ignored
    assert (await fs.getattr(ROOT_INODE)).is_dir
    again = await fs.lookup(ROOT_INODE, "d")
    assert again.inode != d.inode  # numbers are never reused


async def test_readdir_offsets_are_stable_over_server_changes() -> None:
    source = FakeSource()
    for i in range(10):
        source.put(f"n{i:02d}", b"")
    fs = await make_fs(source, metadata_ttl_seconds=0)
    fh = await fs.opendir(ROOT_INODE)
    head = collect(fs, fh, limit=4)
    source.files.pop("n00")
    source.files.pop("n05")
    source.put("a-new", b"")
    again = collect(fs, fh, start=2, limit=2)  # the kernel may re-ask from an earlier offset
    assert [n for n, _, _ in again] == [n for n, _, _ in head[2:4]]
    tail = collect(fs, fh, start=head[-1][2])
    assert [n for n, _, _ in head + tail] == [f"n{i:02d}" for i in range(10)]
    fs.releasedir(fh)
    fh2 = await fs.opendir(ROOT_INODE)
    assert [n for n, _, _ in collect(fs, fh2)] == ["a-new"] + [f"n{i:02d}" for i in range(10) if i not in (0, 5)]


async def test_ten_thousand_entries() -> None:
    source = FakeSource()
    source.put("big", None)
    for i in range(10_000):
        source.put(f"big/file-{i:05d}", b"")
    fs = await make_fs(source)
    big = await fs.lookup(ROOT_INODE, "big")
    fh = await fs.opendir(big.inode)
    names: list[str] = []
    start = 0
    while True:
        page = collect(fs, fh, start=start, limit=30)  # ~ what fits in one readdirplus buffer
        if not page:
            break
        names += [n for n, _, _ in page]
        start = page[-1][2]
    assert names == [f"file-{i:05d}" for i in range(10_000)]
    assert source.lists == 1
    # a fresh listing answers lookups (positive and negative) without asking the store again
    stats = source.stats
    assert (await fs.lookup(big.inode, "file-00042")).size == 0
    with pytest.raises(EntryNotFoundError):
        await fs.lookup(big.inode, "file-10000")
    assert source.stats == stats


# --- TTLs ----------------------------------------------------------------------------------------------------


async def test_attribute_ttl(autojump_clock: trio.testing.MockClock) -> None:
    source = FakeSource()
    source.put("f", b"abc")
    fs = await make_fs(source, metadata_ttl_seconds=10)
    attrs = await fs.lookup(ROOT_INODE, "f")
    assert attrs.ttl_seconds == 10
    stats = source.stats
    source.put("f", b"abcdef")
    await trio.sleep(9)
    assert (await fs.getattr(attrs.inode)).size == 3  # still trusted
    assert source.stats == stats
    await trio.sleep(2)
    assert (await fs.getattr(attrs.inode)).size == 6
    assert source.stats == stats + 1


async def test_negative_ttl(autojump_clock: trio.testing.MockClock) -> None:
    source = FakeSource()
    fs = await make_fs(source, metadata_ttl_seconds=10, negative_ttl_seconds=3)
    with pytest.raises(EntryNotFoundError):
        await fs.lookup(ROOT_INODE, "later")
    stats = source.stats
    source.put("later", b"1")
    await trio.sleep(2)
    with pytest.raises(EntryNotFoundError):
        await fs.lookup(ROOT_INODE, "later")
    assert source.stats == stats
    await trio.sleep(2)
    assert (await fs.lookup(ROOT_INODE, "later")).size == 1
    assert source.stats == stats + 1


async def test_concurrent_lookups_are_single_flight(autojump_clock: trio.testing.MockClock) -> None:
    source = FakeSource()
    source.put("f", b"abc")
    source.stat_delay = 1
    fs = await make_fs(source)
    stats = source.stats
    results: list[int] = []

    async def one() -> None:
        results.append((await fs.lookup(ROOT_INODE, "f")).inode)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert source.stats == stats + 1
    assert len(set(results)) == 1 and fs.lookup_count(results[0]) == 10


async def test_stat_deadline_is_etimedout(autojump_clock: trio.testing.MockClock) -> None:
    source = FakeSource()
    source.put("f", b"abc")
    fs = await make_fs(source, metadata_deadline_seconds=5)
    source.stat_delay = 60
    with pytest.raises(DirectFSError) as slow:
        await fs.lookup(ROOT_INODE, "f")
    assert slow.value.errno == errno.ETIMEDOUT


# --- versions and invalidation -------------------------------------------------------------------------------


async def test_version_change_invalidates_and_new_handles_see_new_data(autojump_clock: trio.testing.MockClock) -> None:
    source = FakeSource()
    source.put("f", b"old data")
    fs = await make_fs(source, metadata_ttl_seconds=1)
    attrs = await fs.lookup(ROOT_INODE, "f")
    fh_old, keep = await fs.open(attrs.inode, os.O_RDONLY)
    assert keep
    source.put("f", b"brand new data")
    await trio.sleep(2)
    assert (await fs.getattr(attrs.inode)).size == len(b"brand new data")
    with trio.fail_after(1):
        assert await fs.invalidation_requests.receive() == attrs.inode
    fh_new, keep_new = await fs.open(attrs.inode, os.O_RDONLY)
    assert not keep_new  # the kernel may hold pages of the old version
    assert bytes(await fs.read(fh_new, 0, 100)) == b"brand new data"
    assert bytes(await fs.read(fh_old, 0, 100)) == b"old data"  # an open handle keeps its version
    await fs.release(fh_old)
    await fs.release(fh_new)
    fh3, keep3 = await fs.open(attrs.inode, os.O_RDONLY)
    assert keep3
    await fs.release(fh3)
    engine = fs.engine
    assert isinstance(engine, DirectEngine)
    assert engine.identities == [("f", "v1"), ("f", "v2"), ("f", "v2")]


async def test_open_retries_once_when_metadata_is_stale(autojump_clock: trio.testing.MockClock) -> None:
    source = FakeSource()
    source.put("f", b"one")
    fs = await make_fs(source, metadata_ttl_seconds=100)
    attrs = await fs.lookup(ROOT_INODE, "f")
    source.put("f", b"two!")
    fh, _ = await fs.open(attrs.inode, os.O_RDONLY)
    assert bytes(await fs.read(fh, 0, 10)) == b"two!"
    await fs.release(fh)


# --- xattrs, statfs ------------------------------------------------------------------------------------------


async def test_xattrs() -> None:
    source = FakeSource()
    source.put("f", b"x")
    source.file_ids["f"] = "12345"
    source.extra_xattrs["f"] = (("user.etag", b'"abc"'),)
    source.put("plain", b"y")
    fs = await make_fs(source)
    f = await fs.lookup(ROOT_INODE, "f")
    assert fs.getxattr(f.inode, FILEID_XATTR) == b"12345"
    assert fs.getxattr(f.inode, "user.etag") == b'"abc"'
    assert fs.listxattr(f.inode) == [FILEID_XATTR, "user.etag"]
    plain = await fs.lookup(ROOT_INODE, "plain")
    assert fs.listxattr(plain.inode) == []
    with pytest.raises(DirectFSError) as missing:
        fs.getxattr(plain.inode, FILEID_XATTR)
    assert missing.value.errno == errno.ENODATA
    st = fs.statfs()
    assert st.name_max == 255 and st.block_size == BLKSIZE_BYTES


# --- the FUSE error boundary ---------------------------------------------------------------------------------


async def test_fuse_boundary_maps_errors_and_survives_bugs(caplog: pytest.LogCaptureFixture) -> None:
    import pyfuse3

    from directfs.fuse_ops import _boundary, fuse_errno

    assert fuse_errno(ExceptionGroup("g", [EntryNotFoundError(), StaleFileError()])) == errno.ENOENT
    with caplog.at_level(logging.ERROR, logger="directfs.fuse_ops"):
        assert fuse_errno(ExceptionGroup("g", [EntryNotFoundError(), KeyError("bug")])) == errno.EIO
    assert "KeyError" in caplog.text

    @_boundary
    async def buggy() -> None:
        await trio.lowlevel.checkpoint()
        raise ZeroDivisionError

    @_boundary
    async def readonly() -> None:
        await trio.lowlevel.checkpoint()
        raise ExceptionGroup("nursery", [StaleFileError()])

    with caplog.at_level(logging.ERROR, logger="directfs.fuse_ops"), pytest.raises(pyfuse3.FUSEError) as eio:
        await buggy()
    assert eio.value.errno == errno.EIO
    assert "ZeroDivisionError" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as stale:
        await readonly()
    assert stale.value.errno == errno.ESTALE


async def test_concurrent_failing_lookups_each_raise_their_own_error(autojump_clock: trio.testing.MockClock) -> None:
    # The single-flight of store calls hands every follower its own exception (chained to the leader's), never one
    # shared object whose traceback all of them would extend.
    from directfs.errors import NamespaceTimeout
    from directfs.vfs import _SingleFlight

    flights: _SingleFlight[int] = _SingleFlight()
    calls = 0

    async def fail() -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        raise NamespaceTimeout("the store did not answer", filename="a")

    caught: list[BaseException] = []

    async def one() -> None:
        try:
            await flights.run("a", fail)
        except NamespaceTimeout as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert calls == 1 and len(caught) == 3
    assert len({id(exc) for exc in caught}) == 3
    assert all(str(exc) == str(caught[0]) for exc in caught)
