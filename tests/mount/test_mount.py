"""What only a real mount shows, of the same tree served two ways: ``file://`` (the local source) and ``ctera+http://``
(the reference portal, ``directfs serve``, with Direct IO blocks: encrypted, compressed, 64 KiB). Every test that
takes ``kind`` runs against both: standard tools (ls, sha256sum, tar, sqlite3, ffmpeg) and mmap through the kernel,
the daemon's lifecycle (signals, kill -9, daemon mode) and the kernel's read-ahead.

What a program sees of the tree (listing, stat, bytes, errnos, changes after the TTL) is the behaviour suite
(tests/support/behaviour.py), run through a mount by tests/mount/test_behaviour_mount.py and without FUSE by
tests/unit/test_behaviour_vfs.py."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from directfs.mount import mount_device
from tests.support.behaviour import files_of, shared_tree
from tests.support.fsdrivers import BLOCK, STORES, Store, file_url, serve
from tests.support.mountd import Mount, directfs_command, fuse_available, mounted, teardown

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root"),
]


@pytest.fixture(scope="module")
def source() -> Iterator[Path]:
    """The behaviour suite's tree, plus a video and a database for the tools."""
    with shared_tree() as root:
        yield _add_media(root)


def _add_media(root: Path) -> Path:
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


@pytest.fixture(scope="module", params=STORES)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def served(source: Path, kind: str) -> Iterator[Store]:
    with serve(source, kind) as it:
        yield it


@pytest.fixture(scope="module")
def mount(served: Store) -> Iterator[Mount]:
    with mounted(served.url, extra_args=["--metadata-ttl", "30"], env=served.env) as m:
        yield m


# --- tools and mmap ------------------------------------------------------------------------------------------


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


# --- lifecycle -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STORES, indirect=True)
def test_sigterm_during_a_long_cat(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    with open(root / "long.bin", "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    with serve(root, kind) as it, mounted(it.url, env=it.env) as m:
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


@pytest.mark.parametrize("kind", STORES, indirect=True)
def test_kill_9_then_mount_again_on_the_same_path(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with serve(root, kind) as it, mounted(it.url, mountpoint=mnt, env=it.env) as first:
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


def test_kernel_read_ahead_raised_to_1_mib(mount: Mount) -> None:
    device = mount_device(str(mount.mountpoint))
    assert device is not None
    with open(f"/sys/class/bdi/{device[0]}:{device[1]}/read_ahead_kb") as knob:
        assert knob.read().strip() == "1024"
