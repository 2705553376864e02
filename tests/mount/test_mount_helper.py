"""`mount.directfs` run the way mount(8) runs it: fstab-style options, standard ones ignored, secrets refused,
returning only once the mount is live. The real runs mount a file:// source named in a config file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from directfs.commands import mount_helper
from directfs.mount import mount_device
from tests.support.mountd import directfs_command, fuse_available, teardown

SECRET = "helper-s3cret-never-in-ps"
HELPER = str(Path(sys.executable).parent / "mount.directfs")
STANDARD = "_netdev,nofail,noauto,auto,defaults,rw,ro,user,users,nosuid,nodev,x-systemd.automount,x-systemd.requires=a"


def test_standard_options_are_ignored_and_known_ones_mapped() -> None:
    inv = mount_helper.parse_argv(
        ["projects", "/mnt/p", "-n", "-o", f"{STANDARD},comment=x,config=/etc/d.toml,allow_other,cache_size=64M"]
    )
    assert mount_helper.mount_command(inv) == [
        "mount",
        "projects",
        "/mnt/p",
        "--config",
        "/etc/d.toml",
        "-o",
        "allow_other,cache_size=64M",
    ]


def test_flags_switches_and_glued_options() -> None:
    inv = mount_helper.parse_argv(["-sv", "file:///d", "/m", "-ometrics_allow_remote,no_verify_tls,bogus=1"])
    assert inv.sloppy and inv.verbose
    assert mount_helper.mount_command(inv) == [
        "mount",
        "file:///d",
        "/m",
        "--metrics-allow-remote",
        "--no-verify-tls",
        "--log-level",
        "debug",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["only-one"], "usage: mount.directfs SOURCE MOUNTPOINT"),
        (["a", "/m", "-o"], "-o needs a value"),
        (["a", "/m", "-q"], "unknown flag -q"),
        (["a", "/m", "-o", "colour=blue"], "unknown option 'colour' (use -s"),
        (["a", "/m", "-o", f"password={SECRET}"], "option password= would put a secret in fstab and in ps"),
        (["a", "/m", "-o", "config"], "option config needs a value"),
        (["a", "/m", "-o", "no_verify_tls=1"], "option no_verify_tls takes no value"),
    ],
)
def test_bad_invocations_exit_1_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mount_helper.main(argv) == mount_helper.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert SECRET not in err


def test_fake_mode_prints_and_does_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert mount_helper.main(["-f", "projects", "/mnt/p", "-o", "_netdev,allow_other"]) == 0
    assert "directfs.cli mount projects /mnt/p -o allow_other" in capsys.readouterr().err


# --- real mounts ----------------------------------------------------------------------------------------------------

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


@pytest.mark.mount
@needs_fuse
def test_helper_reports_a_failed_mount_with_status_32(tmp_path: Path) -> None:
    cfg = tmp_path / "directfs.toml"
    cfg.write_text(f'[source.gone]\nurl = "file://{tmp_path / "missing"}"\nmountpoint = "{tmp_path}"\n')
    done = subprocess.run([HELPER, "gone", str(tmp_path), "-o", f"config={cfg}"], capture_output=True, text=True)
    assert done.returncode == mount_helper.EXIT_FAILURE
    assert "directfs mount:" in done.stderr
