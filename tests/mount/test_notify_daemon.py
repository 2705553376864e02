"""sd_notify from the real daemon: READY=1 only once the mount answers, STOPPING=1 on SIGTERM. The notifier itself
(path and abstract sockets, readiness checks) is pure: tests/unit/test_notify.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from directfs.mount import mount_device
from tests.support.mountd import directfs_command, fuse_available, teardown
from tests.support.notifysock import notify_listener


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    with notify_listener(path) as sock:
        yield sock, path


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root")
def test_daemon_sends_ready_only_when_live_then_stopping_on_sigterm(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_text("hello\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(
            directfs_command("mount", "-f", f"file://{data}", str(mnt)),
            stdout=err,
            stderr=err,
            env={**os.environ, "NOTIFY_SOCKET": path},
        )
    try:
        message = sock.recv(4096).decode()
        # the moment READY arrives, the mount already answers
        assert mount_device(str(mnt)) is not None
        assert (mnt / "hello.txt").read_text() == "hello\n"
        lines = message.split("\n")
        assert lines[0] == "READY=1" and f"MAINPID={proc.pid}" in lines
        assert any(line.startswith("STATUS=serving file://") for line in lines)
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode().split("\n")[0] == "STOPPING=1"
        assert proc.wait(timeout=30) == 0
    finally:
        teardown(mnt, proc)
