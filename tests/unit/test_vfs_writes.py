"""Writes through ``FileSystem`` without FUSE (``--rw``; directfs.writeback): a file:// store under a temp folder, the
real read engine, and the spool folder. What a writer's close() answers, what readers see meanwhile, what is kept
when an upload fails, what a killed daemon leaves behind. Real stores through real mounts:
tests/mount/test_writes_mount.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from directfs.engine.reader import ReadEngine, ReadSettings
from directfs.errors import ConfigError, DirectFSError, UploadError
from directfs.sources.base import Entry, SourceOptions, Upload, WriteFeatures
from directfs.sources.local import LocalSource
from directfs.sources.local import create as create_local
from directfs.vfs import RENAME_NOREPLACE, ROOT_INODE, FileSystem, VfsSettings
from directfs.writeback import PART_ANNOUNCE_BYTES, WriteBack, WriteSettings

WRONLY_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


class FailingStore:
    """A file:// store whose uploads fail (``fail_commits`` times) or record the early parts they are told about."""

    def __init__(self, inner: LocalSource) -> None:
        self.inner = inner
        self.fail_commits = 0
        self.announced: list[int] = []
        self.aborted = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @property
    def write_features(self) -> WriteFeatures:
        return self.inner.write_features

    def begin_upload(self, path: str) -> Upload:
        store = self
        real = self.inner.begin_upload(path)

        class Recording:
            async def part_ready(self, spool_fd: int, end: int) -> None:
                store.announced.append(end)
                await real.part_ready(spool_fd, end)

            async def commit(self, spool_fd: int, size: int, *, mtime_ns: int | None = None) -> Entry:
                if store.fail_commits:
                    store.fail_commits -= 1
                    await trio.lowlevel.checkpoint()
                    raise UploadError("HTTP 500 (injected)", filename=path)
                return await real.commit(spool_fd, size, mtime_ns=mtime_ns)

            async def abort(self) -> None:
                store.aborted += 1
                await real.abort()

        return Recording()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    (root / "old.txt").write_bytes(b"old content\n")
    (root / "folder").mkdir()
    (root / "folder" / "inner.txt").write_bytes(b"inner\n")
    return root


class Mounted:
    def __init__(self, fs: FileSystem, writeback: WriteBack, store: Path, spool: Path) -> None:
        self.fs, self.writeback, self.store, self.spool = fs, writeback, store, spool

    async def inode(self, path: str) -> int:
        inode = ROOT_INODE
        for name in path.split("/"):
            inode = (await self.fs.lookup(inode, name)).inode
        return inode

    async def create(self, name: str, data: bytes = b"", parent: int = ROOT_INODE) -> int:
        answer, _ = await self.fs.create(parent, name, 0o644, WRONLY_NEW)
        if data:
            assert await self.fs.write(answer.fh, 0, data) == len(data)
        return answer.fh

    async def close(self, fh: int) -> None:
        await self.fs.flush(fh)
        await self.fs.release(fh)

    async def read_all(self, path: str) -> bytes:
        answer = await self.fs.open_file(await self.inode(path), os.O_RDONLY)
        try:
            return bytes(await self.fs.read(answer.fh, 0, 1 << 30))
        finally:
            await self.fs.release(answer.fh)

    def failed(self) -> list[dict[str, object]]:
        return [json.loads(p.read_text()) for p in sorted((self.spool / "failed").glob("*.json"))]


@contextlib.asynccontextmanager
async def mount_on(store: Path, spool: Path, *, wrap: bool = False, **settings: object) -> AsyncIterator[Mounted]:
    """A writable FileSystem on ``store`` (wrapped in FailingStore with ``wrap``), unmounted as the mount does it:
    handles closed, then the drain, then the spool folder unlocked."""
    local = create_local(f"file://{store}", SourceOptions())
    assert isinstance(local, LocalSource)
    source: LocalSource | FailingStore = FailingStore(local) if wrap else local
    async with trio.open_nursery() as nursery:
        writeback = WriteBack(
            source,  # type: ignore[arg-type]
            WriteSettings(enabled=True, **settings),  # type: ignore[arg-type]
            spool_dir=str(spool),
            store_url="file://test",
        )
        writeback.open_folder()
        await nursery.start(writeback.run)
        fs = FileSystem(source, ReadEngine(ReadSettings(), nursery), VfsSettings(), writeback)  # type: ignore[arg-type]
        await fs.start()
        try:
            yield Mounted(fs, writeback, store, spool)
        finally:
            await fs.aclose()
            await writeback.drain()
            writeback.close_folder()
            nursery.cancel_scope.cancel()


@pytest.fixture
async def mounted(store_dir: Path, tmp_path: Path) -> AsyncIterator[Mounted]:
    async with mount_on(store_dir, tmp_path / "spool") as m:
        yield m


# --- create, write, close ---------------------------------------------------------------------------------------


async def test_a_new_file_reaches_the_store_at_close_and_not_before(mounted: Mounted) -> None:
    fh = await mounted.create("new.bin", b"hello ")
    await mounted.fs.write(fh, 6, b"world")
    assert not (mounted.store / "new.bin").exists()  # spooled, not uploaded
    assert (await mounted.fs.getattr(await mounted.inode("new.bin"))).size == 11  # stat shows the spool
    await mounted.close(fh)
    assert (mounted.store / "new.bin").read_bytes() == b"hello world"
    assert await mounted.read_all("new.bin") == b"hello world"
    assert list((mounted.spool / "active").iterdir()) == []  # nothing left behind
    assert mounted.writeback.counters["uploads"] == 1


async def test_an_empty_new_file_is_uploaded_empty(mounted: Mounted) -> None:
    await mounted.close(await mounted.create("empty"))
    assert (mounted.store / "empty").read_bytes() == b""


async def test_a_new_file_is_listed_while_it_is_written(mounted: Mounted) -> None:
    fh = await mounted.create("pending.txt", b"abc")
    dh = await mounted.fs.opendir(ROOT_INODE)
    names: list[str] = []
    mounted.fs.readdir(dh, 0, lambda name, attrs, _next: names.append(name) or True)
    mounted.fs.releasedir(dh)
    assert "pending.txt" in names
    await mounted.close(fh)


async def test_two_writer_handles_share_one_spool_and_the_last_close_uploads(mounted: Mounted) -> None:
    first = await mounted.create("shared", b"AAAA")
    second = (await mounted.fs.open_file(await mounted.inode("shared"), os.O_WRONLY)).fh
    await mounted.fs.write(second, 4, b"BBBB")
    await mounted.close(first)
    assert not (mounted.store / "shared").exists()  # another writer is still open
    await mounted.close(second)
    assert (mounted.store / "shared").read_bytes() == b"AAAABBBB"


async def test_readers_see_the_old_version_until_the_upload_lands(mounted: Mounted) -> None:
    inode = await mounted.inode("old.txt")
    writer = await mounted.fs.open_file(inode, os.O_WRONLY | os.O_TRUNC)
    assert writer.direct_io
    await mounted.fs.write(writer.fh, 0, b"new bytes")
    reader = await mounted.fs.open_file(inode, os.O_RDONLY)
    assert reader.direct_io  # the kernel shrank the inode at O_TRUNC: this reader must not use its pages
    assert bytes(await mounted.fs.read(reader.fh, 0, 100)) == b"old content\n"
    await mounted.close(writer.fh)
    assert bytes(await mounted.fs.read(reader.fh, 0, 100)) == b"old content\n"  # an open handle keeps its version
    await mounted.fs.release(reader.fh)
    assert await mounted.read_all("old.txt") == b"new bytes"
    assert (mounted.store / "old.txt").read_bytes() == b"new bytes"


async def test_fsync_uploads_and_answers_with_the_result(mounted: Mounted) -> None:
    fh = await mounted.create("synced", b"one")
    await mounted.fs.fsync(fh)
    assert (mounted.store / "synced").read_bytes() == b"one"
    await mounted.fs.write(fh, 3, b"two")
    await mounted.close(fh)
    assert (mounted.store / "synced").read_bytes() == b"onetwo"


# --- in-place updates -------------------------------------------------------------------------------------------


async def test_append_reads_the_old_content_into_the_spool_first(mounted: Mounted) -> None:
    inode = await mounted.inode("old.txt")
    answer = await mounted.fs.open_file(inode, os.O_WRONLY | os.O_APPEND)
    await mounted.fs.write(answer.fh, len(b"old content\n"), b"more\n")
    await mounted.close(answer.fh)
    assert (mounted.store / "old.txt").read_bytes() == b"old content\nmore\n"


async def test_an_update_above_the_limit_is_eopnotsupp_and_changes_nothing(store_dir: Path, tmp_path: Path) -> None:
    async with mount_on(store_dir, tmp_path / "spool", max_update_size_bytes=4) as m:
        answer = await m.fs.open_file(await m.inode("old.txt"), os.O_RDWR)
        with pytest.raises(DirectFSError) as refused:
            await m.fs.write(answer.fh, 0, b"X")
        assert refused.value.errno == errno.EOPNOTSUPP
        await m.close(answer.fh)
        assert (store_dir / "old.txt").read_bytes() == b"old content\n"
        # Replacing it whole (O_TRUNC) is not an update and works at any size.
        answer = await m.fs.open_file(await m.inode("old.txt"), os.O_WRONLY | os.O_TRUNC)
        await m.fs.write(answer.fh, 0, b"replaced")
        await m.close(answer.fh)
        assert (store_dir / "old.txt").read_bytes() == b"replaced"


async def test_truncate_by_path_uploads_at_once(mounted: Mounted) -> None:
    inode = await mounted.inode("old.txt")
    attrs = await mounted.fs.setattr(inode, size=3)
    assert attrs.size == 3
    assert (mounted.store / "old.txt").read_bytes() == b"old"
    await mounted.fs.setattr(inode, size=0)
    assert (mounted.store / "old.txt").read_bytes() == b""


async def test_chmod_is_shown_and_utimens_is_kept_where_the_store_keeps_times(mounted: Mounted) -> None:
    fh = await mounted.create("script.sh", b"#!/bin/sh\n")
    await mounted.close(fh)
    inode = await mounted.inode("script.sh")
    attrs = await mounted.fs.setattr(inode, mode=0o755, mtime_ns=1_000_000_000_000_000_000)
    assert attrs.mode & 0o777 == 0o755
    assert (mounted.store / "script.sh").stat().st_mtime_ns == 1_000_000_000_000_000_000


# --- namespace changes ------------------------------------------------------------------------------------------


async def test_mkdir_rmdir_unlink_and_rename(mounted: Mounted) -> None:
    fs, store = mounted.fs, mounted.store
    made = await fs.mkdir(ROOT_INODE, "made", 0o755)
    assert made.is_dir and (store / "made").is_dir()
    await mounted.close(await mounted.create("f", b"data", parent=made.inode))
    with pytest.raises(DirectFSError) as not_empty:
        await fs.rmdir(ROOT_INODE, "made")
    assert not_empty.value.errno == errno.ENOTEMPTY
    await fs.rename(made.inode, "f", ROOT_INODE, "g")
    assert (store / "g").read_bytes() == b"data" and not (store / "made" / "f").exists()
    assert await mounted.read_all("g") == b"data"
    await fs.rmdir(ROOT_INODE, "made")
    assert not (store / "made").exists()
    await fs.unlink(ROOT_INODE, "g")
    assert not (store / "g").exists()
    with pytest.raises(DirectFSError) as gone:
        await fs.lookup(ROOT_INODE, "g")
    assert gone.value.errno == errno.ENOENT
    with pytest.raises(DirectFSError) as exists:
        await fs.rename(ROOT_INODE, "old.txt", ROOT_INODE, "folder", 0)
    assert exists.value.errno == errno.EISDIR
    await mounted.close(await mounted.create("x", b"x"))
    with pytest.raises(DirectFSError) as noreplace:
        await fs.rename(ROOT_INODE, "x", ROOT_INODE, "old.txt", RENAME_NOREPLACE)
    assert noreplace.value.errno == errno.EEXIST


async def test_rename_of_a_folder_moves_its_known_inodes(mounted: Mounted) -> None:
    inner = await mounted.inode("folder/inner.txt")
    await mounted.fs.rename(ROOT_INODE, "folder", ROOT_INODE, "moved")
    assert await mounted.inode("moved/inner.txt") == inner
    assert await mounted.read_all("moved/inner.txt") == b"inner\n"
    assert (mounted.store / "moved" / "inner.txt").exists()


async def test_renaming_a_file_still_being_written_moves_its_upload(mounted: Mounted) -> None:
    # rsync -a writes .name.XXXXXX, closes it, then renames; editors rename before closing too.
    fh = await mounted.create(".tmp.123", b"content")
    await mounted.fs.rename(ROOT_INODE, ".tmp.123", ROOT_INODE, "final")
    await mounted.close(fh)
    assert (mounted.store / "final").read_bytes() == b"content"
    assert not (mounted.store / ".tmp.123").exists()


async def test_a_file_unlinked_while_open_is_never_uploaded(mounted: Mounted) -> None:
    fh = await mounted.create("scratch", b"temporary")
    await mounted.fs.unlink(ROOT_INODE, "scratch")
    await mounted.fs.write(fh, 9, b" more")  # still writable, as POSIX says
    await mounted.close(fh)
    assert not (mounted.store / "scratch").exists()
    assert mounted.writeback.counters["uploads"] == 0


# --- nothing is ever lost ---------------------------------------------------------------------------------------


@pytest.mark.expected_logs("upload of 'lost.bin' to file://test failed")
async def test_a_failed_upload_is_the_close_result_and_the_bytes_are_kept(store_dir: Path, tmp_path: Path) -> None:
    async with mount_on(store_dir, tmp_path / "spool", wrap=True) as m:
        store = m.fs.source
        assert isinstance(store, FailingStore)
        store.fail_commits = 1
        fh = await m.create("lost.bin", b"precious bytes")
        with pytest.raises(DirectFSError) as failed:
            await m.fs.flush(fh)
        assert failed.value.errno == errno.EIO
        with pytest.raises(DirectFSError):
            await m.fs.write(fh, 0, b"x")  # the spool is in failed/ now: no silent success afterwards
        await m.fs.release(fh)
        assert not (store_dir / "lost.bin").exists()
        [sidecar] = m.failed()
        assert sidecar["target"] == "lost.bin" and sidecar["errno"] == "EIO" and "HTTP 500" in str(sidecar["error"])
        [kept] = (m.spool / "failed").glob("*.data")
        assert kept.read_bytes() == b"precious bytes"
        assert m.writeback.counters["upload_failures"] == 1


@pytest.mark.expected_logs("found new.bin from a previous mount")
async def test_a_killed_daemons_spool_is_found_and_kept_at_the_next_mount(store_dir: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    async with mount_on(store_dir, spool) as m:
        fh = await m.create("new.bin", b"written before kill -9")
        # kill -9: nothing runs any more; the next mount finds active/ as it was
        m.writeback.close_folder()
        before = sorted(p.name for p in (spool / "active").iterdir())
        assert len(before) == 2
        async with mount_on(store_dir, spool) as again:
            [sidecar] = again.failed()
            assert sidecar["target"] == "new.bin" and "killed" in str(sidecar["error"])
            [kept] = (spool / "failed").glob("*.data")
            assert kept.read_bytes() == b"written before kill -9"
            assert again.writeback.counters["recovered"] == 1
        m.writeback.unlink("new.bin")  # the first "daemon" must not upload at its own exit either
        await m.fs.release(fh)


async def test_a_second_mount_cannot_use_the_same_spool_folder(store_dir: Path, tmp_path: Path) -> None:
    async with mount_on(store_dir, tmp_path / "spool"):
        other = WriteBack(
            create_local(f"file://{store_dir}", SourceOptions()),  # type: ignore[arg-type]
            WriteSettings(enabled=True),
            spool_dir=str(tmp_path / "spool"),
            store_url="file://test",
        )
        with pytest.raises(ConfigError, match="in use by another mount"):
            other.open_folder()


async def test_drain_uploads_what_open_writers_left(store_dir: Path, tmp_path: Path) -> None:
    async with mount_on(store_dir, tmp_path / "spool") as m:
        fh = await m.create("still-open", b"unmounted mid-write")
        assert fh  # never closed: unmount (SIGTERM) drains it
    assert (store_dir / "still-open").read_bytes() == b"unmounted mid-write"


@pytest.mark.expected_logs("not uploaded within the drain timeout")
async def test_drain_keeps_what_does_not_finish_in_time(store_dir: Path, tmp_path: Path) -> None:
    async with mount_on(store_dir, tmp_path / "spool", wrap=True, drain_timeout_seconds=0.5) as m:
        store = m.fs.source
        assert isinstance(store, FailingStore)
        real = store.inner.begin_upload

        def stalled(path: str) -> Upload:
            upload = real(path)

            class Stalled:
                async def part_ready(self, spool_fd: int, end: int) -> None:
                    await upload.part_ready(spool_fd, end)

                async def commit(self, spool_fd: int, size: int, *, mtime_ns: int | None = None) -> Entry:
                    await trio.sleep_forever()
                    raise AssertionError

                async def abort(self) -> None:
                    await upload.abort()

            return Stalled()

        store.inner.begin_upload = stalled  # type: ignore[method-assign]
        await m.create("slow", b"never lands")
    [sidecar] = Mounted.failed(m)
    assert sidecar["target"] == "slow" and sidecar["errno"] == "ETIMEDOUT"


# --- early parts ------------------------------------------------------------------------------------------------


async def test_sequential_writers_announce_complete_parts_and_a_rewrite_starts_over(
    store_dir: Path, tmp_path: Path
) -> None:
    async with mount_on(store_dir, tmp_path / "spool", wrap=True) as m:
        store = m.fs.source
        assert isinstance(store, FailingStore)
        fh = await m.create("big")
        piece = os.urandom(1024 * 1024)
        for i in range(2 * PART_ANNOUNCE_BYTES // len(piece) + 1):
            await m.fs.write(fh, i * len(piece), piece)
        await trio.sleep(0.2)  # the feeder runs in the background
        assert store.announced and store.announced[0] >= PART_ANNOUNCE_BYTES
        await m.fs.write(fh, 0, b"rewritten")  # below what was announced: that upload is void
        await m.close(fh)
        expected = b"rewritten" + (piece * (2 * PART_ANNOUNCE_BYTES // len(piece) + 1))[9:]
        assert (store_dir / "big").read_bytes() == expected
        assert store.aborted >= 1


async def test_read_only_without_a_writeback(store_dir: Path) -> None:
    source = create_local(f"file://{store_dir}", SourceOptions())
    async with trio.open_nursery() as nursery:
        fs = FileSystem(source, ReadEngine(ReadSettings(), nursery), VfsSettings())
        await fs.start()
        inode = (await fs.lookup(ROOT_INODE, "old.txt")).inode
        with pytest.raises(DirectFSError) as refused:
            await fs.open_file(inode, os.O_WRONLY)
        assert refused.value.errno == errno.EROFS
        with pytest.raises(DirectFSError) as no_mkdir:
            await fs.mkdir(ROOT_INODE, "x", 0o755)
        assert no_mkdir.value.errno == errno.EROFS
        await fs.aclose()
        nursery.cancel_scope.cancel()


async def test_an_unlinked_file_being_sent_in_parts_aborts_its_upload(store_dir: Path, tmp_path: Path) -> None:
    # S3 would otherwise keep the parts of a multipart upload nobody completes (and bill for them).
    async with mount_on(store_dir, tmp_path / "spool", wrap=True) as m:
        store = m.fs.source
        assert isinstance(store, FailingStore)
        fh = await m.create("scratch.big")
        piece = b"\0" * (1024 * 1024)
        for i in range(PART_ANNOUNCE_BYTES // len(piece) + 1):
            await m.fs.write(fh, i * len(piece), piece)
        await trio.sleep(0.2)
        assert store.announced
        await m.fs.unlink(ROOT_INODE, "scratch.big")
        await m.close(fh)
        assert store.aborted == 1
        assert not (store_dir / "scratch.big").exists()
