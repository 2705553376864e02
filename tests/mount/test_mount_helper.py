"""`mount.directfs` run the way mount(8) runs it from an fstab line: a file:// source named in a config file, standard
options ignored, secrets nowhere, returning only once the mount is live. Its argv rules without mounting:
tests/unit/test_mount_helper_argv.py; a failed mount: tests/component/test_mount_failures.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from directfs.mount import mount_device
from tests.support.mountd import STANDARD_MOUNT_OPTIONS as STANDARD
from tests.support.mountd import directfs_command, fuse_available, teardown

SECRET = "helper-s3cret-never-in-ps"
HELPER = str(Path(sys.executable).parent / "mount.directfs")

needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def daemon_cmdlines() -> list[str]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return lines


@pytest.mark.mount
@needs_fuse
def test_fstab_line_mounts_a_named_source_and_returns_when_live(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    payload = os.urandom(300_000)
    (data / "file.bin").write_bytes(payload)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    log_file = tmp_path / "daemon.log"
    port = free_port()
    cfg = tmp_path / "directfs.toml"
    cfg.write_text(
        f'[mount]\nmetadata_ttl = "1s"\nmetrics_address = "127.0.0.1:{port}"\nlog_level = "debug"\n'
        f'[source.local]\nurl = "file://{data}"\nmountpoint = "{mnt}"\n'
        f'secret_access_key_file = "{secret_file}"\n'
    )
    os.chmod(cfg, 0o600)
    # /etc/fstab: local  <mnt>  directfs  _netdev,nofail,...,config=<cfg>,allow_other  0 0
    argv = [HELPER, "local", str(mnt), "-o", f"{STANDARD},comment=test,config={cfg},allow_other,log_file={log_file}"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        # returned only once live: no polling needed
        assert mount_device(str(mnt)) is not None
        assert (mnt / "file.bin").read_bytes() == payload
        with open("/proc/self/mountinfo", encoding="utf-8") as info:
            line = next(entry for entry in info if f" {mnt} " in entry)
        assert " ro," in line or (" ro " in line and "allow_other" in line)

        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("directfs_read_bytes_served_total", ())] >= len(payload)
        assert samples[("directfs_fuse_requests_total", (("errno", "ok"), ("op", "read")))] >= 1
        assert samples[("directfs_fuse_requests_total", (("errno", "ok"), ("op", "lookup")))] >= 1

        stats = subprocess.run(directfs_command("stats", str(mnt)), capture_output=True, text=True, timeout=30)
        assert stats.returncode == 0, stats.stderr
        assert f"directfs mount at {mnt}" in stats.stdout
        assert "served" in stats.stdout and "read " in stats.stdout

        # the secret is nowhere: not in any process's argv, not in the daemon's log, not in stats
        assert not [line for line in daemon_cmdlines() if SECRET in line]
        assert SECRET not in log_file.read_text() and SECRET not in stats.stdout and SECRET not in text
    finally:
        teardown(mnt, None)
    assert mount_device(str(mnt)) is None
