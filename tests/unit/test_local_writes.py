"""file:// writes (``Writable`` of directfs.sources.local, issue 14): uploads by temp file + rename, folders, removes,
renames and mtimes, the error tree of each, and the symlink rules of the read side (issue 13 M8) for every change.
The same source through ``directfs cp``: tests/component/test_cli_upload.py."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from directfs.errors import (
    CrossDeviceError,
    DirectoryNotEmptyError,
    EntryExistsError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    NoSpaceError,
    NotADirectory,
    QuotaExceededError,
    ReadOnlyError,
    UploadError,
    UploadTimeout,
    WriteAccessError,
    WriteError,
)
from directfs.sources import local
from directfs.sources.base import Entry, SourceOptions, Writable
from directfs.sources.local import LocalSource, create

SpoolOf = Callable[[bytes], int]
OUT_LOGS = (r"leads out of", r"swapped for a symlink")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "tree"
    folder.mkdir()
    return folder


@pytest.fixture
def source(root: Path) -> LocalSource:
    made = create(root.as_uri(), SourceOptions())
    assert isinstance(made, LocalSource)
    return made


@pytest.fixture
def spool_of(tmp_path: Path) -> Iterator[SpoolOf]:
    """``spool_of(data)``: an fd of a spool file holding ``data`` (closed after the test)."""
    fds: list[int] = []

    def make(data: bytes) -> int:
        path = tmp_path / f"spool{len(fds)}"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


async def upload(source: LocalSource, path: str, spool: int, size: int, mtime_ns: int | None = None) -> Entry:
    job = source.begin_upload(path)
    await job.part_ready(spool, size)  # does nothing on file://, allowed any number of times
    return await job.commit(spool, size, mtime_ns=mtime_ns)


def test_local_source_is_writable_with_folder_moves_and_times(source: LocalSource) -> None:
    assert isinstance(source, Writable)
    assert source.write_features.folder_rename and source.write_features.keeps_mtime
    assert source.write_features.empty_folders


# --- uploads ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3 * 1024 * 1024 + 7])
async def test_upload_writes_the_bytes_and_mtime_and_returns_the_stat_entry(
    source: LocalSource, root: Path, spool_of: SpoolOf, size: int
) -> None:
    data = os.urandom(size)
    spool = spool_of(data)
    os.lseek(spool, 5, os.SEEK_SET)
    entry = await upload(source, "new.bin", spool, size, mtime_ns=1_600_000_000_123_456_789)
    assert (root / "new.bin").read_bytes() == data
    assert os.lseek(spool, 0, os.SEEK_CUR) == 5  # read with pread: the caller's offset never moves
    assert entry == await source.stat("new.bin")
    assert (entry.name, entry.is_dir, entry.size, entry.mtime_ns) == ("new.bin", False, size, 1_600_000_000_123_456_789)
    assert leftovers(root) == []


async def test_upload_takes_only_size_bytes_and_the_umask_mode(
    source: LocalSource, root: Path, spool_of: SpoolOf
) -> None:
    spool = spool_of(b"0123456789")
    old = os.umask(0o027)
    try:
        await upload(source, "part.txt", spool, 4)
    finally:
        os.umask(old)
    assert (root / "part.txt").read_bytes() == b"0123"
    assert stat.S_IMODE((root / "part.txt").stat().st_mode) == 0o640


async def test_replacing_keeps_the_mode_and_an_open_reader_keeps_the_old_version(
    source: LocalSource, root: Path, spool_of: SpoolOf
) -> None:
    target = root / "private.txt"
    target.write_bytes(b"old content")
    target.chmod(0o600)
    before = await source.stat("private.txt")
    reader = await source.open("private.txt", before)
    try:
        entry = await upload(source, "private.txt", spool_of(b"new"), 3)
        assert await reader.fetch_range(0, 11) == b"old content"  # the old inode, whole
    finally:
        await reader.aclose()
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert entry.version != before.version
    assert leftovers(root) == []


async def test_upload_where_no_file_may_go(source: LocalSource, root: Path, spool_of: SpoolOf) -> None:
    (root / "folder").mkdir()
    (root / "file").write_bytes(b"x")
    spool = spool_of(b"data")
    with pytest.raises(IsADirectory):
        await upload(source, "folder", spool, 4)
    with pytest.raises(EntryNotFoundError):
        await upload(source, "missing/new", spool, 4)
    with pytest.raises(NotADirectory):
        await upload(source, "file/new", spool, 4)
    assert leftovers(root) == [] and leftovers(root / "folder") == []


@pytest.fixture(params=["O_TMPFILE", "named temp file"])
def temp_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "named temp file":  # what a file system without O_TMPFILE gets
        monkeypatch.setattr(local, "_O_TMPFILE", 0)
    return str(request.param)


async def test_a_failed_commit_leaves_the_target_and_no_temp_file(
    source: LocalSource, root: Path, spool_of: SpoolOf, temp_kind: str
) -> None:
    (root / "keep.txt").write_bytes(b"previous")
    spool = spool_of(b"short")
    with pytest.raises(UploadError, match="holds 5 bytes, not 100"):
        await upload(source, "keep.txt", spool, 100)
    assert (root / "keep.txt").read_bytes() == b"previous"
    assert entries(root) == ["keep.txt"]
    entry = await upload(source, "keep.txt", spool, 5)  # and the same upload with the right size works
    assert entry.size == 5 and (root / "keep.txt").read_bytes() == b"short"
    assert entries(root) == ["keep.txt"]


async def test_the_copy_falls_back_to_pread_where_copy_file_range_is_refused(
    source: LocalSource, root: Path, spool_of: SpoolOf, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    monkeypatch.setattr(local, "COPY_CHUNK_BYTES", 4096)  # many chunks
    data = os.urandom(5 * 4096 + 3)
    await upload(source, "copied.bin", spool_of(data), len(data))
    assert (root / "copied.bin").read_bytes() == data


async def test_an_upload_is_committed_once(source: LocalSource, spool_of: SpoolOf) -> None:
    spool = spool_of(b"x")
    job = source.begin_upload("once")
    await job.commit(spool, 1)
    with pytest.raises(InvalidArgumentError):
        await job.commit(spool, 1)
    aborted = source.begin_upload("never")
    await aborted.abort()
    await aborted.abort()  # idempotent
    with pytest.raises(InvalidArgumentError):
        await aborted.commit(spool, 1)
    with pytest.raises(EntryNotFoundError):
        await source.stat("never")


# --- folders, removes, renames, times -----------------------------------------------------------------------------


async def test_make_dir(source: LocalSource, root: Path) -> None:
    entry = await source.make_dir("a")
    assert entry.is_dir and entry.name == "a" and (root / "a").is_dir()
    assert (await source.make_dir("a/b")).name == "b"
    (root / "file").write_bytes(b"")
    with pytest.raises(EntryExistsError):
        await source.make_dir("a")
    with pytest.raises(EntryExistsError):
        await source.make_dir("file")
    with pytest.raises(EntryNotFoundError):
        await source.make_dir("missing/c")
    with pytest.raises(NotADirectory):
        await source.make_dir("file/c")


async def test_remove_file_and_remove_dir(source: LocalSource, root: Path) -> None:
    (root / "full").mkdir()
    (root / "full" / "x").write_bytes(b"x")
    (root / "empty").mkdir()
    (root / "link-to-x").symlink_to("full/x")
    await source.remove_file("link-to-x")  # the link, not its target
    assert not (root / "link-to-x").is_symlink() and (root / "full" / "x").exists()
    with pytest.raises(IsADirectory):
        await source.remove_file("full")
    with pytest.raises(DirectoryNotEmptyError):
        await source.remove_dir("full")
    with pytest.raises(NotADirectory):
        await source.remove_dir("full/x")
    await source.remove_file("full/x")
    with pytest.raises(EntryNotFoundError):
        await source.remove_file("full/x")
    await source.remove_dir("full")
    await source.remove_dir("empty")
    with pytest.raises(EntryNotFoundError):
        await source.remove_dir("empty")
    assert entries(root) == []


async def test_rename_has_posix_semantics(source: LocalSource, root: Path) -> None:
    (root / "a.txt").write_bytes(b"a")
    (root / "b.txt").write_bytes(b"b")
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "f").write_bytes(b"f")
    (root / "empty").mkdir()
    (root / "full").mkdir()
    (root / "full" / "y").write_bytes(b"y")
    await source.rename("a.txt", "b.txt", is_dir=False)  # replaces a file
    assert (root / "b.txt").read_bytes() == b"a" and not (root / "a.txt").exists()
    await source.rename("b.txt", "dir/sub/moved.txt", is_dir=False)  # into another folder
    assert (root / "dir" / "sub" / "moved.txt").read_bytes() == b"a"
    with pytest.raises(IsADirectory):
        await source.rename("dir/sub/f", "empty", is_dir=False)
    with pytest.raises(NotADirectory):
        await source.rename("dir", "full/y", is_dir=True)
    with pytest.raises(DirectoryNotEmptyError):
        await source.rename("dir", "full", is_dir=True)
    with pytest.raises(InvalidArgumentError):
        await source.rename("dir", "dir/sub/inside", is_dir=True)
    with pytest.raises(EntryNotFoundError):
        await source.rename("nope", "other", is_dir=False)
    with pytest.raises(EntryNotFoundError):
        await source.rename("full/y", "missing/y", is_dir=False)
    await source.rename("dir", "empty", is_dir=True)  # a folder onto an empty folder: replaced
    assert (root / "empty" / "sub" / "f").read_bytes() == b"f" and not (root / "dir").exists()


async def test_set_mtime_on_files_folders_and_the_root(source: LocalSource, root: Path) -> None:
    (root / "f").write_bytes(b"f")
    (root / "d").mkdir()
    for path in ("f", "d", ""):
        assert await source.set_mtime(path, 1_500_000_000_000_000_001) is True
        assert (await source.stat(path)).mtime_ns == 1_500_000_000_000_000_001
    with pytest.raises(EntryNotFoundError):
        await source.set_mtime("missing", 1)


@pytest.mark.parametrize("path", ["", "..", "a/../b", "a//b", "./x", "bad\nname"])
async def test_paths_must_be_names_below_the_root(source: LocalSource, spool_of: SpoolOf, path: str) -> None:
    with pytest.raises(InvalidArgumentError):
        source.begin_upload(path)
    for call in (source.make_dir, source.remove_file, source.remove_dir):
        with pytest.raises(InvalidArgumentError):
            await call(path)
    with pytest.raises(InvalidArgumentError):
        await source.rename(path or "..", "x", is_dir=False)
    with pytest.raises(InvalidArgumentError):
        await source.rename("x", path, is_dir=False)
    if path:
        with pytest.raises(InvalidArgumentError):
            await source.set_mtime(path, 1)


@pytest.mark.parametrize(
    ("code", "kind", "seen"),
    [
        (errno.ENOSPC, NoSpaceError, errno.ENOSPC),
        (errno.EFBIG, NoSpaceError, errno.ENOSPC),
        (errno.EDQUOT, QuotaExceededError, errno.EDQUOT),
        (errno.EACCES, WriteAccessError, errno.EACCES),
        (errno.EPERM, WriteAccessError, errno.EACCES),
        (errno.ETIMEDOUT, UploadTimeout, errno.ETIMEDOUT),
        (errno.EXDEV, CrossDeviceError, errno.EXDEV),
        (errno.ENOTEMPTY, DirectoryNotEmptyError, errno.ENOTEMPTY),
        (errno.EEXIST, EntryExistsError, errno.EEXIST),
        (errno.ENOENT, EntryNotFoundError, errno.ENOENT),
        (errno.EISDIR, IsADirectory, errno.EISDIR),
        (errno.ENOTDIR, NotADirectory, errno.ENOTDIR),
        (errno.EINVAL, InvalidArgumentError, errno.EINVAL),
        (errno.EROFS, ReadOnlyError, errno.EROFS),
        (errno.EIO, UploadError, errno.EIO),
    ],
)
def test_os_errors_of_writes_map_to_the_tree(code: int, kind: type[Exception], seen: int) -> None:
    error = local._write_error(OSError(code, os.strerror(code)), "dir/name", upload=True)
    assert type(error) is kind and error.filename == "dir/name" and error.errno == seen
    assert isinstance(local._write_error(OSError(errno.EEXIST, "exists"), "d", rename=True), DirectoryNotEmptyError)
    plain = local._write_error(OSError(errno.EIO, "Input/output error"), "d")
    assert type(plain) is WriteError and "Input/output error" in str(plain)


# --- symlinks stay inside the root (issue 13 M8) -----------------------------------------------------------------


@pytest.fixture
def linked(root: Path, tmp_path: Path) -> Path:
    """``root`` with ``v2/``, ``latest -> v2`` (inside), ``out -> ../outside`` and ``leak.txt -> outside/secret``."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    os.utime(outside / "secret.txt", ns=(1, 1))
    (root / "v2").mkdir()
    (root / "v2" / "data.bin").write_bytes(b"inside")
    (root / "latest").symlink_to("v2")
    (root / "out").symlink_to(outside)
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    return outside


def outside_state(outside: Path) -> tuple[list[str], bytes, int]:
    secret = outside / "secret.txt"
    return sorted(p.name for p in outside.iterdir()), secret.read_bytes(), secret.stat().st_mtime_ns


@pytest.mark.expected_logs(*OUT_LOGS)
async def test_no_change_goes_through_a_link_out_of_the_root(
    source: LocalSource, root: Path, linked: Path, spool_of: SpoolOf
) -> None:
    before = outside_state(linked)
    spool = spool_of(b"planted")
    attempts = [
        upload(source, "out/new.txt", spool, 7),
        upload(source, "out/secret.txt", spool, 7),
        upload(source, "leak.txt", spool, 7),
        source.make_dir("out/made"),
        source.remove_file("out/secret.txt"),
        source.remove_file("leak.txt"),
        source.remove_dir("out"),
        source.rename("v2/data.bin", "out/stolen.bin", is_dir=False),
        source.rename("out/secret.txt", "got.txt", is_dir=False),
        source.rename("leak.txt", "got.txt", is_dir=False),
        source.set_mtime("leak.txt", 2),
        source.set_mtime("out/secret.txt", 2),
        source.set_mtime("out", 2),
    ]
    for attempt in attempts:
        with pytest.raises(EntryNotFoundError):
            await attempt
    assert outside_state(linked) == before
    assert (root / "leak.txt").is_symlink() and (root / "out").is_symlink()
    assert (root / "v2" / "data.bin").read_bytes() == b"inside" and not (root / "got.txt").exists()


async def test_links_inside_the_root_are_followed_to_their_folder(
    source: LocalSource, root: Path, spool_of: SpoolOf
) -> None:
    (root / "v2").mkdir()
    (root / "v2" / "data.bin").write_bytes(b"inside")
    (root / "latest").symlink_to("v2")
    (root / "alias.bin").symlink_to("v2/data.bin")
    await upload(source, "latest/new.bin", spool_of(b"new"), 3)
    assert (root / "v2" / "new.bin").read_bytes() == b"new"
    await source.make_dir("latest/sub")
    assert (root / "v2" / "sub").is_dir()
    assert await source.set_mtime("alias.bin", 7_000_000_000) is True  # the target's time, the tree shows it
    assert (root / "v2" / "data.bin").stat().st_mtime_ns == 7_000_000_000
    # Replacing a name that is a link replaces the link by a file: its target is never written through.
    await upload(source, "alias.bin", spool_of(b"replaced"), 8)
    assert not (root / "alias.bin").is_symlink() and (root / "alias.bin").read_bytes() == b"replaced"
    assert (root / "v2" / "data.bin").read_bytes() == b"inside"


@pytest.mark.expected_logs(*OUT_LOGS)
async def test_a_folder_swapped_for_a_link_after_the_check_is_refused(
    source: LocalSource, root: Path, linked: Path, spool_of: SpoolOf, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = outside_state(linked)
    (root / "plain").mkdir()
    # The path check passes if the swap lands between it and the open: simulate that by skipping it.
    monkeypatch.setattr(source, "_check_beneath", lambda path: None)
    (root / "plain").rmdir()
    (root / "plain").symlink_to(linked)
    spool = spool_of(b"planted")
    for attempt in (
        upload(source, "plain/secret.txt", spool, 7),
        source.make_dir("plain/made"),
        source.remove_file("plain/secret.txt"),
        source.rename("v2/data.bin", "plain/stolen", is_dir=False),
        source.set_mtime("plain/secret.txt", 2),
        source.set_mtime("leak.txt", 2),
    ):
        with pytest.raises(EntryNotFoundError):
            await attempt
    assert outside_state(linked) == before


async def test_follow_symlinks_lets_writes_follow_every_link(root: Path, linked: Path, spool_of: SpoolOf) -> None:
    source = create(root.as_uri(), SourceOptions(follow_symlinks=True))
    assert isinstance(source, LocalSource)
    await upload(source, "out/new.txt", spool_of(b"allowed"), 7)
    assert (linked / "new.txt").read_bytes() == b"allowed"


async def test_a_root_that_is_a_link_is_written_into(tmp_path: Path, root: Path, spool_of: SpoolOf) -> None:
    (tmp_path / "alias").symlink_to(root)
    source = create((tmp_path / "alias").as_uri(), SourceOptions())
    assert isinstance(source, LocalSource)
    await upload(source, "x.bin", spool_of(b"x"), 1)
    await source.make_dir("d")
    assert (root / "x.bin").read_bytes() == b"x" and (root / "d").is_dir()
