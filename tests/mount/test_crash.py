"""Crash and shutdown: ``kill -9`` mid-read leaves a path a new mount can use; SIGTERM with reads in flight exits 0
promptly; a reader blocked in the mount when the daemon dies gets an error, never a hang.

Readers run in subprocesses with timeouts, so a hang fails the test instead of hanging it. The daemon's storage is
made slow (portal ``--fault-latency-ms`` on blocks) so reads are reliably in flight when the signal lands.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.blockserver import payload
from tests.support.faultproxy import ctera_env
from tests.support.mountd import STOP_TIMEOUT_SECONDS, mounted, teardown
from tests.support.mountd import fuse_available as _fuse
from tests.support.portal import Portal, start_portal

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not _fuse(), reason="needs /dev/fuse and root")]

BLOCK = 64 * 1024
READER = (
    "import os,sys,hashlib\n"
    "try:\n"
    "    data=open(sys.argv[1],'rb').read(); print('ok:'+hashlib.sha256(data).hexdigest())\n"
    "except OSError as e: print('errno:%d'%e.errno)\n"
)


@pytest.fixture(scope="module")
def slow_portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Portal, dict[str, bytes]]]:
    tree = tmp_path_factory.mktemp("tree")
    files = {f"f{i}.bin": payload(48 * BLOCK, seed=i) for i in range(6)}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    # 500 ms per block GET: a 48-block file takes ~3 s even with 8 fetches in flight, so signals land mid-read.
    with start_portal(tree, extra_args=["--block-size", "64K", "--fault-latency-ms", "500"]) as portal:
        yield portal, files


def start_readers(mountpoint: Path, names: list[str]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen([sys.executable, "-c", READER, str(mountpoint / name)], stdout=subprocess.PIPE, text=True)
        for name in names
    ]


def outcomes(readers: list[subprocess.Popen[str]], timeout: float) -> list[str]:
    results = []
    for reader in readers:
        out, _ = reader.communicate(timeout=timeout)  # TimeoutExpired = a hung reader = a failed test
        results.append(out.strip())
    return results


def block_gets(portal: Portal) -> int:
    return portal.stderr_text().count("GET /blocks/")


def wait_for_reads_in_flight(portal: Portal, before: int, timeout: float = 20) -> None:
    """Until the portal's access log shows new block GETs (the readers are inside the mount, fetching)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if block_gets(portal) > before:
            return
        time.sleep(0.05)  # polling another process's progress
    raise AssertionError("no block request reached the portal")


def test_kill_9_during_reads_then_a_new_mount_on_the_same_path_works(
    slow_portal: tuple[Portal, dict[str, bytes]], tmp_path: Path
) -> None:
    portal, files = slow_portal
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    source = "ctera+" + portal.url
    args = ["--log-level", "debug"]
    with mounted(source, env=ctera_env(portal), extra_args=args, mountpoint=mountpoint) as mount:
        before = block_gets(portal)
        readers = start_readers(mountpoint, ["f0.bin", "f1.bin"])
        wait_for_reads_in_flight(portal, before)
        mount.proc.send_signal(signal.SIGKILL)
        mount.proc.wait(timeout=10)
        # A reader blocked in the dead mount gets an error (ENOTCONN once the connection is gone), not a hang.
        for outcome in outcomes(readers, timeout=30):
            assert outcome.startswith("errno:") or outcome.startswith("ok:"), outcome
            if outcome.startswith("errno:"):
                assert int(outcome[6:]) in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)
        # The dead mount is still listed; statfs (never answered from a cache) says ENOTCONN. A new mount on the
        # same path cleans it up.
        with pytest.raises(OSError) as info:
            os.statvfs(mountpoint)
        assert info.value.errno == errno.ENOTCONN
    with mounted(source, env=ctera_env(portal), extra_args=args, mountpoint=mountpoint) as again:
        data = (again.mountpoint / "f5.bin").read_bytes()
        assert hashlib.sha256(data).digest() == hashlib.sha256(files["f5.bin"]).digest()


def test_sigterm_with_reads_in_flight_exits_0_promptly(slow_portal: tuple[Portal, dict[str, bytes]]) -> None:
    portal, _ = slow_portal
    with mounted("ctera+" + portal.url, env=ctera_env(portal), extra_args=["--log-level", "debug"]) as mount:
        before = block_gets(portal)
        readers = start_readers(mount.mountpoint, ["f1.bin", "f2.bin", "f3.bin"])
        wait_for_reads_in_flight(portal, before)
        started = time.monotonic()
        mount.proc.send_signal(signal.SIGTERM)
        status = mount.wait_exit(STOP_TIMEOUT_SECONDS)
        seconds = time.monotonic() - started
        print(f"\nSIGTERM with 3 reads in flight: exit {status} after {seconds:.2f} s")
        assert status == 0, mount.stderr()[-3000:]
        assert not mount.is_mounted()
        for outcome in outcomes(readers, timeout=30):  # each ended: whole data or an error, never a hang
            assert outcome.startswith(("ok:", "errno:")), outcome


def test_a_reader_blocked_when_the_daemon_dies_gets_an_error(
    slow_portal: tuple[Portal, dict[str, bytes]], tmp_path: Path
) -> None:
    portal, _ = slow_portal
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mounted("ctera+" + portal.url, env=ctera_env(portal), extra_args=["--log-level", "debug"]) as mount:
        before = block_gets(portal)
        readers = start_readers(mount.mountpoint, ["f4.bin"])
        wait_for_reads_in_flight(portal, before)
        mount.proc.send_signal(signal.SIGKILL)
        started = time.monotonic()
        (outcome,) = outcomes(readers, timeout=30)
        print(f"\nreader blocked when the daemon died: {outcome} after {time.monotonic() - started:.2f} s")
        assert outcome in (f"errno:{errno.ENOTCONN}", f"errno:{errno.ECONNABORTED}", f"errno:{errno.EIO}")
        teardown(mount.mountpoint, mount.proc)
