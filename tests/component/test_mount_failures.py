"""The mount commands fail before any FUSE mount, as real processes: ``directfs mount`` in daemon mode and the
``mount.directfs`` helper report why (a source that is not a folder, a missing mountpoint) with their exit codes,
and leave nothing mounted. Successful runs: tests/mount/test_mount.py and tests/mount/test_mount_helper.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from directfs.commands import mount_helper
from directfs.mount import mount_device
from tests.support.mountd import directfs_command

HELPER = str(Path(sys.executable).parent / "mount.directfs")


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


def test_helper_reports_a_failed_mount_with_status_32(tmp_path: Path) -> None:
    cfg = tmp_path / "directfs.toml"
    cfg.write_text(f'[source.gone]\nurl = "file://{tmp_path / "missing"}"\nmountpoint = "{tmp_path}"\n')
    done = subprocess.run([HELPER, "gone", str(tmp_path), "-o", f"config={cfg}"], capture_output=True, text=True)
    assert done.returncode == mount_helper.EXIT_FAILURE
    assert "directfs mount:" in done.stderr
