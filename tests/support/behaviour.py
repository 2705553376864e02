"""One behaviour suite for the filesystem, run by two drivers (tests/support/fsdrivers.py): ``FileSystem`` called
directly (tests/unit/test_behaviour_vfs.py, over file://) and a real mount (tests/mount/test_behaviour_mount.py, over
file:// and the reference portal).

A behaviour is an async function of a ``Context``: the driver over the shared tree (``make_tree``), that tree on disk
(the oracle), the store serving it, and ``fresh`` to serve and drive another tree (for behaviours that change files
or need odd ones). What only one driver has stays with it: kernel caches, tools, mmap and daemon lifecycle in
tests/mount/test_mount.py; inode table, lookup counts, mock-clock TTLs and internal counters in
tests/unit/test_vfs.py.

A driver module runs every behaviour that applies to its stores with ``cases``. A behaviour that a driver gets wrong
is a finding: mark it there with ``xfail={name: reason}`` (strict), never by loosening the behaviour.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import stat as stat_mod
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from directfs.vfs import BLKSIZE_BYTES, FILEID_XATTR

from .fsdrivers import BLOCK, STORES, Driver, Store

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 7, 37 * BLOCK + 123]
NAMES = ["with space.txt", "ünïcödé ✓.txt", "100% #1.txt", "semi;colon,comma'quote\".txt"]
BIG_FOLDER_ENTRIES = 10_000
SHARED_TTL_SECONDS = 30.0  # the shared tree never changes: long TTLs, as a user would mount a quiet tree


def make_tree(root: Path) -> None:
    """Awkward sizes around the 64 KiB block, names that need quoting, nesting, an empty folder, 10,000 entries."""
    rng = random.Random(4)
    for size in SIZES:
        (root / f"size-{size}.bin").write_bytes(rng.randbytes(size))
    for name in NAMES:
        (root / name).write_text(f"content of {name}\n")
    nested = root / "a" / "b c" / "d"
    nested.mkdir(parents=True)
    (nested / "leaf.txt").write_text("leaf\n")
    (root / "a" / "mid.bin").write_bytes(rng.randbytes(3 * BLOCK + 5))
    (root / "sub dir" / "deep").mkdir(parents=True)
    (root / "sub dir" / "ünï %#.txt").write_text("hello\n")
    (root / "sub dir" / "deep" / "x").write_bytes(b"x" * 10)
    (root / "empty-folder").mkdir()
    big = root / "big"
    big.mkdir()
    for i in range(BIG_FOLDER_ENTRIES):
        (big / f"entry-{i:05d}").touch()


@contextlib.contextmanager
def shared_tree() -> Iterator[Path]:
    """``make_tree`` in a scratch folder, removed afterwards. On tmpfs when the machine has one: its 10,000 empty
    files take under a second there and several on a loaded disk, which the fast tier cannot afford."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="directfs-behaviour-", dir=shm if shm.is_dir() else None))
    try:
        make_tree(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def files_of(root: Path) -> list[str]:
    """Every file of a tree but the big folder's, as relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.parent.name != "big")


Fresh = Callable[[Path, float], AbstractAsyncContextManager[tuple[Driver, Store]]]


@dataclass
class Context:
    driver: Driver  # over ``tree``, served by ``store``, metadata TTL ``SHARED_TTL_SECONDS``
    tree: Path
    store: Store
    fresh: Fresh  # fresh(root, metadata_ttl_seconds): serve ``root`` like ``store`` and drive it
    tmp_path: Path


Behaviour = Callable[[Context], Awaitable[None]]


@dataclass(frozen=True)
class Case:
    name: str
    run: Behaviour
    stores: Collection[str]


BEHAVIOURS: list[Case] = []


def behaviour(*, stores: Collection[str] = STORES) -> Callable[[Behaviour], Behaviour]:
    def register(fn: Behaviour) -> Behaviour:
        BEHAVIOURS.append(Case(fn.__name__, fn, tuple(stores)))
        return fn

    return register


def cases(kind: str, *, xfail: Mapping[str, str] | None = None) -> list[object]:
    """``pytest.param(behaviour)`` for every behaviour that applies to a ``kind`` store; ``xfail`` maps the name of a
    behaviour this driver gets wrong to the reason (strict: it must keep failing until the driver is fixed)."""
    wrong = dict(xfail or {})
    unknown = set(wrong) - {case.name for case in BEHAVIOURS if kind in case.stores}
    assert not unknown, f"xfail names no behaviour of a {kind} store: {unknown}"
    params: list[object] = []
    for case in BEHAVIOURS:
        if kind in case.stores:
            reason = wrong.get(case.name)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason is not None else []
            params.append(pytest.param(case.run, id=case.name, marks=marks))
    return params


# --- helpers -------------------------------------------------------------------------------------------------


async def read_file(driver: Driver, path: str, *, size: int | None = None, chunk_bytes: int = 3 * BLOCK + 5) -> bytes:
    """The whole file, in odd-sized reads; with ``size``, no read may ever return bytes past it."""
    handle = await driver.open(path)
    try:
        out = bytearray()
        while chunk := await driver.pread(handle, len(out), chunk_bytes):
            out += chunk
            if size is not None:
                assert len(out) <= size, (path, len(out))
        return bytes(out)
    finally:
        await driver.close(handle)


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- tree and content ----------------------------------------------------------------------------------------


@behaviour()
async def tree_matches_source(ctx: Context) -> None:
    """Every folder lists the source's names; every entry's type, mode, size, mtime, owner and block counts match,
    and a listing's attributes (readdirplus) are the ones stat shows."""
    for dirpath, dirnames, filenames in os.walk(ctx.tree):
        folder = Path(dirpath).relative_to(ctx.tree).as_posix().removeprefix(".")
        listed = await ctx.driver.scandir(folder)
        assert sorted(listed) == sorted(dirnames + filenames), folder
        assert sorted(await ctx.driver.listdir(folder)) == sorted(listed), folder
        for name in dirnames + filenames:
            path = _join(folder, name)
            want = os.stat(Path(dirpath) / name)
            got = await ctx.driver.stat(path)
            assert listed[name] == got, path
            assert stat_mod.S_IFMT(got.mode) == stat_mod.S_IFMT(want.st_mode), path
            assert got.is_dir == (name in dirnames), path
            assert (got.uid, got.gid, got.nlink) == (os.getuid(), os.getgid(), 1), path
            assert got.blksize == BLKSIZE_BYTES == 1024 * 1024, path
            if got.is_dir:
                assert got.mode == 0o040555, path
                if ctx.store.folder_mtimes:
                    assert got.mtime_ns == want.st_mtime_ns, path
            else:
                assert got.mode == 0o100444, path
                assert got.size == want.st_size, path
                assert got.blocks == (want.st_size + 511) // 512, path
                assert got.mtime_ns == ctx.store.mtime_ns(want.st_mtime_ns), path


@behaviour()
async def every_file_reads_back_exactly(ctx: Context) -> None:
    for path in files_of(ctx.tree):
        want = (ctx.tree / path).read_bytes()
        assert _sha(await read_file(ctx.driver, path, size=len(want))) == _sha(want), path
    assert await read_file(ctx.driver, "sub dir/ünï %#.txt") == b"hello\n"


@behaviour()
async def reads_across_block_edges_and_past_eof(ctx: Context) -> None:
    size = 5 * BLOCK + 7
    want = (ctx.tree / f"size-{size}.bin").read_bytes()
    handle = await ctx.driver.open(f"size-{size}.bin")
    try:
        for offset, length in [(BLOCK - 3, 10), (0, size), (5 * BLOCK, 100), (size, 10), (10**9, 4)]:
            assert await ctx.driver.pread(handle, offset, length) == want[offset : offset + length], (offset, length)
    finally:
        await ctx.driver.close(handle)


@behaviour()
async def random_reads_from_concurrent_handles(ctx: Context) -> None:
    """A seeded oracle: four concurrent readers, each with its own handle on every file, 400 reads each, a third of
    them straddling a block edge and a tenth at or past EOF."""
    files = [path for path in files_of(ctx.tree) if path.endswith(".bin")]
    data = {path: (ctx.tree / path).read_bytes() for path in files}
    failures: list[str] = []

    async def reader(seed: int) -> None:
        rng = random.Random(seed)
        handles = {path: await ctx.driver.open(path) for path in files}
        try:
            for _ in range(400):
                path = rng.choice(files)
                want = data[path]
                size = len(want)
                pick = rng.random()
                if pick < 0.3 and size > 0:  # straddle a block edge
                    edge = rng.randrange(0, size // BLOCK + 1) * BLOCK
                    offset = max(0, edge - rng.randrange(1, 100))
                elif pick < 0.4:  # at or past EOF
                    offset = size + rng.randrange(0, 3 * BLOCK)
                else:
                    offset = rng.randrange(0, max(size, 1))
                length = rng.choice([1, 17, 4096, BLOCK - 1, BLOCK + 1, 3 * BLOCK, rng.randrange(1, 300_000)])
                got = await ctx.driver.pread(handles[path], offset, length)
                if got != want[offset : offset + length]:
                    failures.append(f"{path} offset={offset} length={length} got {len(got)} bytes")
        finally:
            for handle in handles.values():
                await ctx.driver.close(handle)

    async with trio.open_nursery() as nursery:
        for seed in range(4):
            nursery.start_soon(reader, seed)
    assert failures == []


@behaviour()
async def xattrs(ctx: Context) -> None:
    path = "size-1.bin"
    file_id = await trio.to_thread.run_sync(ctx.store.file_id, path)
    if file_id is None:
        assert await ctx.driver.listxattr(path) == []
        with pytest.raises(OSError) as no_id:
            await ctx.driver.getxattr(path, FILEID_XATTR)
        assert no_id.value.errno == errno.ENODATA
    else:
        assert FILEID_XATTR in await ctx.driver.listxattr(path)
        assert (await ctx.driver.getxattr(path, FILEID_XATTR)).decode() == file_id
    with pytest.raises(OSError) as missing:
        await ctx.driver.getxattr(path, "user.no.such.attribute")
    assert missing.value.errno == errno.ENODATA


@behaviour()
async def statfs_reports_name_max_and_block_size(ctx: Context) -> None:
    st = await ctx.driver.statfs()
    assert (st.name_max, st.block_size) == (255, BLKSIZE_BYTES)


@behaviour()
async def big_folder_lists_and_stats_fast(ctx: Context) -> None:
    started = time.monotonic()
    listed = await ctx.driver.scandir("big")
    names = sorted(name for name, st in listed.items() if st.size == 0)
    elapsed = time.monotonic() - started
    assert names == [f"entry-{i:05d}" for i in range(BIG_FOLDER_ENTRIES)]
    assert elapsed < 5, f"listing + stat of {BIG_FOLDER_ENTRIES} entries took {elapsed:.2f} s"


# --- errnos --------------------------------------------------------------------------------------------------


@behaviour()
async def errnos(ctx: Context) -> None:
    d = ctx.driver
    cases: list[tuple[str, Callable[[], Awaitable[object]], int]] = [
        ("stat missing", lambda: d.stat("missing"), errno.ENOENT),
        ("list missing", lambda: d.listdir("missing"), errno.ENOENT),
        ("stat under a file", lambda: d.stat("size-1.bin/x"), errno.ENOTDIR),
        ("list a file", lambda: d.listdir("size-1.bin"), errno.ENOTDIR),
        ("read a folder", lambda: read_file(d, "a"), errno.EISDIR),
        ("create", lambda: d.open("new.txt", os.O_WRONLY | os.O_CREAT), errno.EROFS),
    ]
    for flags in ("O_WRONLY", "O_RDWR", "O_TRUNC", "O_APPEND"):
        value = getattr(os, flags)

        def open_with(value: int = value) -> Awaitable[int]:
            return d.open("size-1.bin", value)

        cases.append((f"open {flags}", open_with, errno.EROFS))
    for op, args in [
        ("unlink", ("size-1.bin",)),
        ("mkdir", ("newdir",)),
        ("rmdir", ("empty-folder",)),
        ("rename", ("size-1.bin", "renamed")),
        ("truncate", ("size-1.bin",)),
        ("chmod", ("size-1.bin",)),
        ("setxattr", ("size-1.bin",)),
    ]:

        def write(op: str = op, args: tuple[str, ...] = args) -> Awaitable[None]:
            return d.write(op, *args)

        cases.append((op, write, errno.EROFS))
    for what, call, want in cases:
        with pytest.raises(OSError) as raised:
            await call()
        assert raised.value.errno == want, (what, raised.value)


# --- changes on the source (fresh trees) ---------------------------------------------------------------------


@behaviour()
async def a_changed_file_is_seen_after_the_ttl(ctx: Context) -> None:
    root = ctx.tmp_path / "changing"
    root.mkdir()
    target = root / "f.txt"
    target.write_bytes(b"A" * 5000)
    async with ctx.fresh(root, 0.2) as (driver, store):
        assert await read_file(driver, "f.txt") == b"A" * 5000  # under a mount: now in the kernel's page cache
        target.write_bytes(b"B" * 5000)  # same size: only the version (mtime/inode) tells
        os.utime(target, ns=(1, 1_000_000_000))
        store.rescan()
        for _ in range(200):  # at least 10 s: waiting out the TTL, not asserting
            if (await driver.stat("f.txt")).mtime_ns == 1_000_000_000:
                break
            await trio.sleep(0.05)
        assert await read_file(driver, "f.txt") == b"B" * 5000


@behaviour(stores=("file",))
async def a_file_changed_while_open_is_estale_and_a_reopen_sees_the_new_version(ctx: Context) -> None:
    # file:// checks every read against the version it opened (directfs.sources.local): bytes that may mix two
    # versions are ESTALE, never returned.
    root = ctx.tmp_path / "rewritten"
    root.mkdir()
    path = root / "f.bin"
    path.write_bytes(random.Random(5).randbytes(BLOCK + 1))
    async with ctx.fresh(root, 0) as (driver, _):
        handle = await driver.open("f.bin")
        try:
            path.write_bytes(b"new content")
            with pytest.raises(OSError) as stale:
                await driver.pread(handle, 0, 10)
            assert stale.value.errno == errno.ESTALE
        finally:
            await driver.close(handle)
        assert await read_file(driver, "f.bin", size=11) == b"new content"


@behaviour(stores=("file",))
async def links_are_followed_and_special_files_are_not_shown(ctx: Context) -> None:
    # file:// follows symlinks (like cp -L) and shows only files and folders (directfs.sources.local).
    root = ctx.tmp_path / "links"
    (root / "folder").mkdir(parents=True)
    (root / "folder" / "inner.txt").write_bytes(b"inner\n")
    (root / "target.txt").write_bytes(b"linked\n")
    (root / "to-file").symlink_to("target.txt")
    (root / "to-folder").symlink_to("folder")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")
    async with ctx.fresh(root, SHARED_TTL_SECONDS) as (driver, _):
        assert sorted(await driver.listdir("")) == ["folder", "target.txt", "to-file", "to-folder"]
        link = await driver.stat("to-file")
        assert (link.mode, link.size) == (0o100444, len(b"linked\n"))
        assert await read_file(driver, "to-file") == b"linked\n"
        assert (await driver.stat("to-folder")).mode == 0o040555
        assert await driver.listdir("to-folder") == ["inner.txt"]
        assert await read_file(driver, "to-folder/inner.txt") == b"inner\n"
        for name in ("dangling", "fifo"):
            with pytest.raises(OSError) as hidden:
                await driver.stat(name)
            assert hidden.value.errno == errno.ENOENT, name
