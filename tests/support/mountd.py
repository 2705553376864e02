"""Mount test harness: ``directfs mount SOURCE MNT -f`` in a subprocess (one FUSE per process), always torn down.

    with mounted("file:///data") as m:
        os.listdir(m.mountpoint)

Start-up waits until the mount is live (listed in /proc/self/mountinfo and answering statfs), or fails with the
daemon's stderr attached. Teardown always runs: ``fusermount3 -u``, then ``-uz``, then kill, so a broken test never
leaves a dead mount behind for the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from directfs.mount import _unescape_mountinfo, mount_device

# What mount(8) and fstab put in ``-o`` that ``mount.directfs`` must ignore (standard and systemd options).
STANDARD_MOUNT_OPTIONS = (
    "_netdev,nofail,noauto,auto,defaults,rw,ro,user,users,nosuid,nodev,x-systemd.automount,x-systemd.requires=a"
)

# Start-up on a loaded 2-core CI box: interpreter + imports ~1 s, the root stat, the mount itself.
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None and os.geteuid() == 0


def directfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "directfs.cli", *args]


@dataclass
class Mount:
    mountpoint: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def is_mounted(self) -> bool:
        return mount_device(str(self.mountpoint)) is not None

    def wait_exit(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        return self.proc.wait(timeout=timeout)


def _wait_live(mount: Mount, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = mount.proc.poll()
        if status is not None:
            raise RuntimeError(f"directfs mount exited with {status} before the mount was live:\n{mount.stderr()}")
        if mount.is_mounted():
            with contextlib.suppress(OSError):
                # statfs, not stat: the kernel answers it only from a live daemon (a dead mount left on the same
                # path answers stat from its attribute cache, and ENOTCONN here)
                os.statvfs(mount.mountpoint)
                return
        time.sleep(0.02)  # polling another process's progress; not an assertion
    raise RuntimeError(f"mount not live after {timeout} s:\n{mount.stderr()}")


def directfs_mounts() -> list[tuple[str, int]]:
    """(mountpoint, device minor) of every directfs FUSE mount this machine has."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split(" ")
            tail = fields[fields.index("-") + 1 :] if "-" in fields else []
            if tail and tail[0] == "fuse.directfs":
                found.append((_unescape_mountinfo(fields[4]), int(fields[2].split(":")[1])))
    return found


def force_unmount(path: str) -> None:
    """Detach every directfs mount stacked at ``path``, even one whose daemon is gone but whose connection is not:
    abort the FUSE connection (fusectl) so nothing can block on it, then lazy-unmount. A test that died between
    mount and teardown must not leave a mount that hangs a later run's cleanup of old temp folders."""
    for _ in range(8):  # bounded: at most a few mounts can be stacked on one path
        minors = [minor for mountpoint, minor in directfs_mounts() if mountpoint == path]
        if not minors:
            return
        abort = Path(f"/sys/fs/fuse/connections/{minors[-1]}/abort")
        with contextlib.suppress(OSError):
            abort.write_text("1\n")
        subprocess.run(["fusermount3", "-uz", path], capture_output=True, check=False, timeout=30)


def teardown(mountpoint: Path, proc: subprocess.Popen[bytes] | None) -> None:
    """Unmount and stop the daemon, escalating: fusermount3 -u, -uz, SIGKILL, then abort what is left."""
    path = str(mountpoint)
    if mount_device(path) is not None:
        subprocess.run(["fusermount3", "-u", path], capture_output=True, check=False, timeout=30)
    if proc is not None:
        try:
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)
    if mount_device(path) is not None:
        subprocess.run(["fusermount3", "-uz", path], capture_output=True, check=False, timeout=30)
    force_unmount(path)


def start(
    source_url: str,
    mountpoint: Path,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stderr_path: Path,
) -> Mount:
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            directfs_command("mount", source_url, str(mountpoint), "-f", *extra_args),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
    mount = Mount(mountpoint, proc, stderr_path)
    try:
        _wait_live(mount, START_TIMEOUT_SECONDS)
    except BaseException:
        teardown(mountpoint, proc)
        raise
    return mount


@contextlib.contextmanager
def mounted(
    source_url: str,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    mountpoint: Path | None = None,
) -> Iterator[Mount]:
    """Mount ``source_url`` in a subprocess; yields once live; always unmounts and reaps the daemon."""
    workdir = Path(tempfile.mkdtemp(prefix="directfs-mount-"))
    mnt = mountpoint if mountpoint is not None else workdir / "mnt"
    # Not mkdir(exist_ok=True): it stats an existing path, and a mountpoint left dead by a killed daemon answers
    # ENOTCONN (when the kernel's attribute cache has expired). The daemon itself cleans such a mountpoint up.
    with contextlib.suppress(FileExistsError):
        mnt.mkdir()
    mount = start(source_url, mnt, extra_args=extra_args, env=env, stderr_path=workdir / "daemon.stderr")
    try:
        yield mount
    finally:
        teardown(mnt, mount.proc)
        if mount.proc.poll() is None:  # pragma: no cover - teardown kills it; belt and braces
            mount.proc.send_signal(signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
