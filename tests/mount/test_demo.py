"""``make demo`` as CI runs it (CI=true): the whole tour, on a fresh work dir and mountpoint, must exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mountd import fuse_available

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root"),
]


def test_demo_tour_runs_and_unmounts(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    env = {**os.environ, "CI": "true"}
    for name in ("DIRECTFS_ACCESS_KEY_ID", "DIRECTFS_SECRET_ACCESS_KEY", "DIRECTFS_USERNAME", "DIRECTFS_PASSWORD"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "directfs.demo", "--mountpoint", str(mountpoint), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "BAD" not in done.stdout
    for name in ("README.txt", "inventory.sqlite", "docs/random.bin"):
        assert f"ok   {name}" in done.stdout
    assert "5000|87482500" in done.stdout  # sqlite3 answered through the mount
    assert not os.path.ismount(mountpoint)
