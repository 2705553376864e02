"""One behaviour suite, two drivers: a real mount in a subprocess, driven with plain os calls and standard tools,
of the same tree served two ways: ``file://`` (the local source) and ``ctera+http://`` (the reference portal,
``directfs serve``, with Direct IO blocks: encrypted, compressed, 64 KiB). Every test that takes ``driver`` runs
against both."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from directfs.mount import mount_device
from tests.support.mountd import Mount, directfs_command, fuse_available, mounted, teardown
from tests.support.portal import Portal, start_portal

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root"),
]

BLOCK = 64 * 1024  # small blocks: a few MiB of data cross hundreds of block edges
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 37 * BLOCK + 123]
NAMES = ["with space.txt", "ünïcödé ✓.txt", "100% #1.txt", "semi;colon,comma'quote\".txt"]
BIG_FOLDER_ENTRIES = 10_000


DRIVERS = ["file", "ctera"]


def file_url(root: Path) -> str:
    return f"file://{root}?block_size_bytes={BLOCK}"


@dataclass
class Served:
    """A tree as a mountable source: the URL and the environment (credentials) the mount needs."""

    url: str
    env: dict[str, str]
    portal: Portal | None = None


def portal_env(portal: Portal) -> dict[str, str]:
    return {
        "DIRECTFS_ACCESS_KEY_ID": portal.access_key_id,
        "DIRECTFS_SECRET_ACCESS_KEY": portal.secret_access_key,
        "DIRECTFS_USERNAME": portal.username,
        "DIRECTFS_PASSWORD": portal.password,
    }


@contextlib.contextmanager
def serve(root: Path, driver: str) -> Iterator[Served]:
    if driver == "file":
        yield Served(file_url(root), {})
        return
    with start_portal(root, extra_args=["--block-size", "64K"]) as portal:
        yield Served("ctera+" + portal.url, portal_env(portal), portal)


def mtime_matches(driver: str, got_ns: int, want_ns: int) -> bool:
    # WebDAV's getlastmodified is an HTTP date: whole seconds. file:// keeps nanoseconds.
    return got_ns == want_ns if driver == "file" else got_ns == (want_ns // 10**9) * 10**9


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("source")
    rng = random.Random(4)
    for size in SIZES:
        (root / f"size-{size}.bin").write_bytes(rng.randbytes(size))
    for name in NAMES:
        (root / name).write_text(f"content of {name}\n")
    nested = root / "a" / "b c" / "d"
    nested.mkdir(parents=True)
    (nested / "leaf.txt").write_text("leaf\n")
    (root / "a" / "mid.bin").write_bytes(rng.randbytes(3 * BLOCK + 5))
    (root / "empty-folder").mkdir()
    big = root / "big"
    big.mkdir()
    for i in range(BIG_FOLDER_ENTRIES):
        (big / f"entry-{i:05d}").touch()
    subprocess.run(  # a short video: ffprobe/ffmpeg seek into the middle of it through the mount
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=6:size=320x240:rate=25",
            "-pix_fmt",
            "yuv420p",
            "-g",
            "25",
            str(root / "clip.mp4"),
        ],
        check=True,
        timeout=120,
    )
    with sqlite3.connect(root / "db.sqlite") as db:
        db.execute("create table t (k integer primary key, v text)")
        db.executemany("insert into t (v) values (?)", [(f"value {i}" * 20,) for i in range(5000)])
    db.close()
    return root


@pytest.fixture(scope="module", params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def served(source: Path, driver: str) -> Iterator[Served]:
    with serve(source, driver) as it:
        yield it


@pytest.fixture(scope="module")
def mount(served: Served) -> Iterator[Mount]:
    with mounted(served.url, extra_args=["--metadata-ttl", "30"], env=served.env) as m:
        yield m


def files_of(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.parent.name != "big")


# --- tree and content ----------------------------------------------------------------------------------------


def test_tree_matches_source(source: Path, mount: Mount, driver: str) -> None:
    mnt = mount.mountpoint
    for dirpath, dirnames, filenames in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        assert sorted(os.listdir(mnt / rel)) == sorted(dirnames + filenames), rel
        for name in dirnames + filenames:
            want = os.stat(Path(dirpath) / name)
            got = os.stat(mnt / rel / name)
            assert (got.st_mode & 0o170000) == (want.st_mode & 0o170000), rel / name
            if name in filenames:  # a portal folder's mtime is its own (PROPFIND), not the local directory's
                assert mtime_matches(driver, got.st_mtime_ns, want.st_mtime_ns), rel / name
            if name in filenames:
                assert got.st_size == want.st_size, rel / name
                assert got.st_mode & 0o777 == 0o444
                assert got.st_blksize == 1024 * 1024
            else:
                assert got.st_mode & 0o777 == 0o555


def test_ls_lR_lists_the_same_names(source: Path, mount: Mount) -> None:
    def listing(root: Path) -> list[str]:
        out = subprocess.run(["ls", "-lR", "--time-style=+%s", "."], cwd=root, capture_output=True, check=True)
        rows = []
        for line in out.stdout.decode().splitlines():
            parts = line.split(maxsplit=6)
            if len(parts) == 7:  # type/mode links owner group size mtime name
                rows.append(f"{parts[0][0]} {parts[4]} {parts[5]} {parts[6]}")
            elif line.endswith(":"):
                rows.append(line)
        return rows

    want = [row for row in listing(source) if not row.startswith("d ")]  # folder sizes differ by design
    got = [row for row in listing(mount.mountpoint) if not row.startswith("d ")]
    assert got == want


def test_sha256_of_every_file(source: Path, mount: Mount) -> None:
    for rel in files_of(source):
        want = hashlib.sha256((source / rel).read_bytes()).hexdigest()
        got = subprocess.run(["sha256sum", str(mount.mountpoint / rel)], capture_output=True, check=True)
        assert got.stdout.split()[0].decode() == want, rel


def test_random_read_oracle_threads_and_fds(source: Path, mount: Mount) -> None:
    files = [rel for rel in files_of(source) if rel.suffix == ".bin"]
    data = {rel: (source / rel).read_bytes() for rel in files}
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        fds = {rel: os.open(mount.mountpoint / rel, os.O_RDONLY) for rel in files}
        try:
            for _ in range(400):
                rel = rng.choice(files)
                want = data[rel]
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
                got = os.pread(fds[rel], length, offset)
                if got != want[offset : offset + length]:
                    failures.append(f"{rel} offset={offset} length={length} got {len(got)} bytes")
        finally:
            for fd in fds.values():
                os.close(fd)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_mmap_reads(source: Path, mount: Mount) -> None:
    rel = Path(f"size-{37 * BLOCK + 123}.bin")
    want = (source / rel).read_bytes()
    with open(mount.mountpoint / rel, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        rng = random.Random(7)
        for _ in range(200):
            offset = rng.randrange(0, len(want))
            length = rng.randrange(1, 3 * BLOCK)
            assert mapped[offset : offset + length] == want[offset : offset + length]
        assert mapped[:] == want


def test_xattrs(mount: Mount, served: Served) -> None:
    path = mount.mountpoint / "size-1.bin"
    if served.portal is None:
        assert os.listxattr(path) == []
        with pytest.raises(OSError) as missing:
            os.getxattr(path, "user.ctera.fileid")
        assert missing.value.errno == errno.ENODATA
    else:
        assert "user.ctera.fileid" in os.listxattr(path)
        assert os.getxattr(path, "user.ctera.fileid").decode() == served.portal.file_id("size-1.bin")
        with pytest.raises(OSError) as missing:
            os.getxattr(path, "user.no.such.attribute")
        assert missing.value.errno == errno.ENODATA


# --- errnos --------------------------------------------------------------------------------------------------


def test_errnos(mount: Mount) -> None:
    mnt = mount.mountpoint
    cases = [
        (lambda: os.stat(mnt / "missing"), errno.ENOENT),
        (lambda: os.open(mnt / "size-1.bin", os.O_WRONLY), errno.EROFS),
        (lambda: os.open(mnt / "size-1.bin", os.O_RDWR), errno.EROFS),
        (lambda: os.open(mnt / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644), errno.EROFS),
        (lambda: os.unlink(mnt / "size-1.bin"), errno.EROFS),
        (lambda: os.mkdir(mnt / "newdir"), errno.EROFS),
        (lambda: os.rmdir(mnt / "empty-folder"), errno.EROFS),
        (lambda: os.rename(mnt / "size-1.bin", mnt / "renamed"), errno.EROFS),
        (lambda: os.truncate(mnt / "size-1.bin", 0), errno.EROFS),
        (lambda: os.chmod(mnt / "size-1.bin", 0o644), errno.EROFS),
        (lambda: os.setxattr(mnt / "size-1.bin", "user.x", b"1"), errno.EROFS),
        (lambda: os.stat(mnt / "size-1.bin" / "x"), errno.ENOTDIR),
        (lambda: os.listdir(mnt / "size-1.bin"), errno.ENOTDIR),
    ]
    for call, want in cases:
        with pytest.raises(OSError) as raised:
            call()
        assert raised.value.errno == want, (call, raised.value)
    fd = os.open(mnt / "a", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as isdir:
            os.read(fd, 10)
        assert isdir.value.errno == errno.EISDIR
    finally:
        os.close(fd)


# --- tools ---------------------------------------------------------------------------------------------------


def test_tar_of_a_folder(source: Path, mount: Mount) -> None:
    subprocess.run(["tar", "-cf", "/dev/null", "a"], cwd=mount.mountpoint, check=True, timeout=60)
    # GNU tar skips reading file data when writing to /dev/null; a pipe makes it read everything
    piped = subprocess.run(["tar", "-cf", "-", "a"], cwd=mount.mountpoint, capture_output=True, check=True)
    listed = subprocess.run(["tar", "-tvf", "-"], input=piped.stdout, capture_output=True, check=True)
    assert b"a/b c/d/leaf.txt" in listed.stdout
    assert (source / "a" / "mid.bin").read_bytes() in piped.stdout


def test_sqlite_queries_a_database_in_the_mount(mount: Mount) -> None:
    db = mount.mountpoint / "db.sqlite"
    out = subprocess.run(
        ["sqlite3", "-readonly", str(db), "select count(*), max(k) from t where v like 'value 4999%'"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.decode().strip() == "1|5000"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("select count(*) from t").fetchone() == (5000,)
    conn.close()


def test_ffprobe_and_ffmpeg_seek_into_a_video(mount: Mount, tmp_path: Path) -> None:
    clip = mount.mountpoint / "clip.mp4"
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(clip)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert abs(float(probe.stdout.decode().strip()) - 6.0) < 0.1
    frame = tmp_path / "middle.png"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-ss", "3", "-i", str(clip), "-frames:v", "1", str(frame)],
        check=True,
        timeout=60,
    )
    assert frame.stat().st_size > 1000


def test_ten_thousand_entries_list_fast(mount: Mount) -> None:
    started = time.monotonic()
    with os.scandir(mount.mountpoint / "big") as entries:
        names = sorted(entry.name for entry in entries if entry.stat().st_size == 0)
    elapsed = time.monotonic() - started
    assert names == [f"entry-{i:05d}" for i in range(BIG_FOLDER_ENTRIES)]
    assert elapsed < 5, f"listing + stat of {BIG_FOLDER_ENTRIES} entries took {elapsed:.2f} s"


# --- changes on the source -----------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS, indirect=True)
def test_changed_file_is_seen_after_the_ttl(tmp_path: Path, driver: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    target = root / "f.txt"
    target.write_bytes(b"A" * 5000)
    with serve(root, driver) as it, mounted(it.url, extra_args=["--metadata-ttl", "0.2"], env=it.env) as m:
        path = m.mountpoint / "f.txt"
        assert path.read_bytes() == b"A" * 5000  # now in the kernel's page cache
        target.write_bytes(b"B" * 5000)  # same size: only the version (mtime/inode) tells
        os.utime(target, ns=(1, 1_000_000_000))
        if it.portal is not None:
            it.portal.rescan()  # the portal notices changes on its rescan (SIGHUP)
        deadline = time.monotonic() + 10
        while os.stat(path).st_mtime_ns != 1_000_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting out the TTL, not asserting
        assert path.read_bytes() == b"B" * 5000


# --- lifecycle -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS, indirect=True)
def test_sigterm_during_a_long_cat(tmp_path: Path, driver: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    with open(root / "long.bin", "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    with serve(root, driver) as it, mounted(it.url, env=it.env) as m:
        # cat blocks writing to a pipe nobody drains: it holds the file open with reads in flight.
        cat = subprocess.Popen(["cat", str(m.mountpoint / "long.bin")], stdout=subprocess.PIPE)
        try:
            assert cat.stdout is not None
            assert len(cat.stdout.read(1)) == 1
            m.proc.send_signal(signal.SIGTERM)
            assert m.wait_exit() == 0, m.stderr()
            assert not m.is_mounted()
        finally:
            cat.kill()
            cat.wait()
            if cat.stdout is not None:
                cat.stdout.close()


@pytest.mark.parametrize("driver", DRIVERS, indirect=True)
def test_kill_9_then_mount_again_on_the_same_path(tmp_path: Path, driver: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with serve(root, driver) as it, mounted(it.url, mountpoint=mnt, env=it.env) as first:
        first.proc.kill()
        first.proc.wait()
        with pytest.raises(OSError) as dead:
            os.statvfs(mnt)
        assert dead.value.errno == errno.ENOTCONN
        with mounted(it.url, mountpoint=mnt, env=it.env) as second:
            assert (second.mountpoint / "hello.txt").read_text() == "hello\n"
            assert "previous daemon died" in second.stderr()


def test_daemon_mode_returns_when_live_and_umount_stops_it(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "x.txt").write_text("x\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        started = subprocess.run(
            directfs_command("mount", file_url(root), str(mnt)), capture_output=True, text=True, timeout=90
        )
        assert started.returncode == 0, started.stderr
        assert mount_device(str(mnt)) is not None  # live the moment the command returned: no polling
        assert (mnt / "x.txt").read_text() == "x\n"
        stopped = subprocess.run(directfs_command("umount", str(mnt)), capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert mount_device(str(mnt)) is None
    finally:
        teardown(mnt, None)


def test_daemon_mode_reports_why_it_failed(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    missing = subprocess.run(
        directfs_command("mount", f"file://{tmp_path}/nope", str(mnt)), capture_output=True, text=True, timeout=90
    )
    assert missing.returncode == 1
    assert "not a folder" in missing.stderr
    no_mnt = subprocess.run(
        directfs_command("mount", f"file://{tmp_path}", str(tmp_path / "no-such-dir")),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert no_mnt.returncode == 1
    assert "mountpoint does not exist" in no_mnt.stderr
    assert mount_device(str(mnt)) is None


def test_kernel_read_ahead_raised_to_1_mib(mount: Mount) -> None:
    device = mount_device(str(mount.mountpoint))
    assert device is not None
    with open(f"/sys/class/bdi/{device[0]}:{device[1]}/read_ahead_kb") as knob:
        assert knob.read().strip() == "1024"
