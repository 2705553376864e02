"""Security of a mount: secrets never in argv, logs (DEBUG included) or files on disk, presigned URLs redacted,
allow_other off by default; file:// symlinks stay inside the tree.

Secrets are passed by environment (``DIRECTFS_*``): ``/proc/<pid>/environ`` is readable only by the same user and
root, which is why the environment (or ``--*-file``) is how secrets reach the daemon, never argv. TLS verification and
secrets in exception text, against the portal without a mount: tests/component/test_security_portal.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.blockserver import payload
from tests.support.faultproxy import ctera_env
from tests.support.mountd import fuse_available, mounted
from tests.support.portal import start_portal


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and root")
def test_mount_keeps_secrets_out_of_argv_logs_and_disk(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f.bin").write_bytes(payload(300_000, seed=2))
    log_file = tmp_path / "daemon.log"
    with start_portal(tree, extra_args=["--block-size", "64K"]) as portal:
        env = ctera_env(portal)
        args = ["--log-level", "debug", "--log-file", str(log_file)]
        with mounted("ctera+" + portal.url, env=env, extra_args=args) as mount:
            assert (mount.mountpoint / "f.bin").read_bytes() == (tree / "f.bin").read_bytes()
            with contextlib.suppress(OSError):
                (mount.mountpoint / "missing").read_bytes()
            pid = mount.proc.pid
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            options = next(
                line.split()[3]
                for line in Path("/proc/mounts").read_text().splitlines()
                if line.split()[1] == str(mount.mountpoint)
            )
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
            stderr = mount.stderr()
        log_text = stderr + (log_file.read_text(errors="replace") if log_file.exists() else "")
    secrets = [env["DIRECTFS_SECRET_ACCESS_KEY"], env["DIRECTFS_PASSWORD"], env["DIRECTFS_ACCESS_KEY_ID"]]
    for secret in secrets:
        assert secret not in cmdline and secret not in ps
        assert secret not in log_text, "a secret reached the daemon's debug log"
    # Presigned block URLs are bearer tokens: no signature or expiry query in any log line, DEBUG included.
    assert "sig=" not in log_text and "expires=" not in log_text and "X-Amz-Signature" not in log_text
    assert "allow_other" not in options.split(","), options
    assert "ro" in options.split(",")
    # Nothing the daemon wrote on disk holds a secret (it writes its log only; no on-disk block cache exists).
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_relative_to(tree):
            data = path.read_bytes()
            for secret in secrets[:2]:
                assert secret.encode() not in data, path


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and root")
def test_file_source_symlinks_stay_inside_the_tree_unless_follow_symlinks(tmp_path: Path) -> None:
    # Issue 13 M8: under a root daemon with allow_other, whoever can write into a file:// tree could plant
    # `x -> /etc/shadow` and read it through the mount. Links out of the tree are not part of it (ENOENT, not listed);
    # links inside it still work; --follow-symlinks restores the old behaviour.
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "v2").mkdir(parents=True)
    outside.mkdir()
    (tree / "v2" / "data.bin").write_bytes(b"inside")
    (outside / "shadow").write_bytes(b"root:secret-hash:")
    (outside / "shadow").chmod(0o600)
    (tree / "latest").symlink_to("v2")
    (tree / "x").symlink_to(outside / "shadow")
    (tree / "etc").symlink_to(outside)
    with mounted(tree.as_uri()) as mount:
        root = mount.mountpoint
        assert sorted(os.listdir(root)) == ["latest", "v2"]
        assert (root / "latest" / "data.bin").read_bytes() == b"inside"
        for name in ("x", "etc/shadow"):
            with pytest.raises(FileNotFoundError):
                (root / name).read_bytes()
        log = mount.stderr()
    assert "skipping 'x': a symlink that leads out of" in log
    with mounted(tree.as_uri(), extra_args=["--follow-symlinks"]) as mount:
        assert sorted(os.listdir(mount.mountpoint)) == ["etc", "latest", "v2", "x"]
        assert (mount.mountpoint / "x").read_bytes() == b"root:secret-hash:"
