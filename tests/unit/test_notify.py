"""sd_notify datagrams to a socket the test owns (path and abstract names); readiness only once the mount is live.

The full sequence against a real mount (READY=1 only after stat answers, STOPPING=1 on SIGTERM) runs the daemon as a
subprocess: tests/mount/test_notify_daemon.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from directfs import notify
from directfs.errors import DirectFSError
from tests.support.notifysock import notify_listener


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    with notify_listener(path) as sock:
        yield sock, path


def test_ready_stopping_status_to_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = notify.Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("serving /mnt/x")
    assert sock.recv(4096).decode().split("\n") == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=serving /mnt/x"]
    assert notifier.status("line one\nline two")
    assert sock.recv(4096) == b"STATUS=line one line two"  # a newline would start a new assignment
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket_name() -> None:
    name = f"directfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert notify.Notifier("@" + name).ready()
        assert sock.recv(4096).startswith(b"READY=1\n")


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = notify.Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.stopping()


def test_unreachable_socket_logs_and_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = notify.Notifier(str(tmp_path / "nobody-listens"))
    assert not notifier.ready()
    assert "cannot notify systemd" in caplog.text


async def test_not_ready_while_the_mountpoint_is_a_plain_folder(tmp_path: Path) -> None:
    # tmp_path has the same device as its parent: not a mount. READY must never be sent for it.
    sent: list[str] = []
    with pytest.raises(DirectFSError, match=r"did not answer stat within 0.3 s: the mountpoint still shows"):
        await notify.announce_when_live(
            str(tmp_path), notify.Notifier(None), on_live=lambda: sent.append("ready"), deadline_seconds=0.3
        )
    assert sent == []


async def test_ready_once_a_real_mount_answers(listener: tuple[socket.socket, str]) -> None:
    # /proc is a mount with its own device on every Linux: it stands for a live mount here.
    sock, path = listener
    order: list[str] = []
    await notify.announce_when_live("/proc", notify.Notifier(path), on_live=lambda: order.append("pipe"))
    assert order == ["pipe"]
    message = await trio.to_thread.run_sync(sock.recv, 4096)
    assert message.startswith(b"READY=1\n") and b"STATUS=serving /proc" in message


async def test_stat_errors_are_retried_until_the_deadline(tmp_path: Path) -> None:
    with pytest.raises(DirectFSError, match="No such file or directory"):
        await notify.wait_until_live(str(tmp_path / "missing"), deadline_seconds=0.2)
