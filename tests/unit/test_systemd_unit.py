"""The systemd template unit (verified by systemd-analyze), and the logging it relies on: journal priorities,
rate-limited repeats, SIGUSR1 task dumps."""

from __future__ import annotations

import configparser
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from directfs import logs

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "directfs@.service"
USER_UNIT = ROOT / "systemd" / "directfs-user@.service"  # the variant without root (issue 13 M8)
UNITS = (UNIT, USER_UNIT)


def unit_sections() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def unit_values(unit: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value given, in order (configparser keeps only the last of a repeated key, and
    LoadCredential= and SystemCallFilter= are lists)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_systemd_analyze_verify_is_clean(tmp_path: Path, unit: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: `make test` installs it (Debian package systemd)"
    # The unit names /usr/local/bin/directfs (where `pip install` puts it); point it at this environment's command so
    # verify can check the executable exists. Verify an instance: a template alone is not loadable.
    directfs_bin = Path(sys.executable).parent / "directfs"
    text = unit.read_text().replace("/usr/local/bin/directfs", str(directfs_bin))
    instance = tmp_path / unit.name.replace("@.", "@projects.")
    instance.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for unknown keys and bad values: it only warns, so any output is a failure.
    assert done.returncode == 0 and done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr


def test_unit_is_a_notify_template_with_cleanup_and_hardening() -> None:
    unit = unit_sections()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].endswith("directfs mount --foreground %i")
    assert service["ExecStartPre"].startswith("-/bin/sh -c 'exec /bin/fusermount3 -u -z ")
    assert "fusermount3 -u " in service["ExecStop"]
    assert service["Restart"] == "on-failure"
    assert service["DeviceAllow"] == "/dev/fuse rw"
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"]
    assert "PrivateDevices" not in service
    assert "network-online.target" in unit["Unit"]["After"]
    # systemd's stop timeout is longer than the daemon's drain, so a stop never ends in SIGKILL
    assert int(service["TimeoutStopSec"].removesuffix("s")) >= 10


# --- least privilege (issue 13 M8) --------------------------------------------------------------------------------

# Settings that give the service a mount namespace of its own (systemd's exec_needs_mount_namespace()). systemd makes
# it a slave of the host's first, so the FUSE mount made inside would never reach the host: none may appear.
MOUNT_NAMESPACE_SETTINGS = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateIPC",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "BindPaths",
    "BindReadOnlyPaths",
    "TemporaryFileSystem",
    "RootDirectory",
    "RootImage",
    "MountFlags",
    "PrivateUsers",
    "DynamicUser",
)
# Settings that, for a service whose user lacks CAP_SYS_ADMIN, imply NoNewPrivileges=yes before systemd 255
# (systemd.exec(5)): the non-root unit would lose fusermount3's setuid bit, and with it the mount.
SECCOMP_SETTINGS = (
    "SystemCallFilter",
    "SystemCallArchitectures",
    "SystemCallLog",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "ProtectClock",
    "ProtectHostname",
)


def exposure(unit: Path, tmp_path: Path) -> float:
    """The overall exposure `systemd-analyze security --offline=yes` gives an instance of ``unit``."""
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: `make test` installs it (Debian package systemd)"
    instance = tmp_path / unit.name.replace("@.", "@projects.")
    instance.write_text(unit.read_text())
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", instance.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert found, done.stdout + done.stderr
    return float(found.group(1))


def test_root_unit_exposure_is_below_4(tmp_path: Path) -> None:
    assert exposure(UNIT, tmp_path) < 4.0


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_the_readme_prints_each_units_exposure(tmp_path: Path, unit: Path) -> None:
    security = (ROOT / "README.md").read_text().split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    assert f"`{unit.name}` | {exposure(unit, tmp_path):.1f} |" in security


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_the_mount_stays_visible_to_the_host(unit: Path) -> None:
    service = unit_values(unit)["Service"]
    assert [key for key in MOUNT_NAMESPACE_SETTINGS if key in service] == []
    assert service["DeviceAllow"] == ["/dev/fuse rw"] and service["DevicePolicy"] == ["closed"]
    assert service["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"], "CAP_DAC_READ_SEARCH and friends are not needed"
    assert service["AmbientCapabilities"] == [""]
    # The key id is a secret too (issue 13 L5): both come as systemd credentials, never in the unit or argv.
    assert [value.split(":")[0] for value in service["LoadCredential"]] == ["ctera-key-id", "ctera-secret"]
    assert "--access-key-id" not in " ".join(service["ExecStart"])


def test_root_unit_filters_system_calls_and_gains_no_privileges() -> None:
    service = unit_values(UNIT)["Service"]
    assert "User" not in service  # root: the bdi read-ahead needs uid 0
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["SystemCallFilter"] == ["@system-service @mount", "~@privileged @resources"]
    assert service["SystemCallErrorNumber"] == ["EPERM"]  # an unforeseen call fails, the mount does not die
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert [key for key in SECCOMP_SETTINGS if key not in service] == ["SystemCallLog"]  # logging only


def test_user_unit_runs_without_root_and_keeps_fusermount3_setuid() -> None:
    service = unit_values(USER_UNIT)["Service"]
    assert service["User"] == ["directfs"] and service["Group"] == ["directfs"]
    assert service["NoNewPrivileges"] == ["no"]  # fusermount3's setuid bit makes the mount
    assert [key for key in SECCOMP_SETTINGS if key in service] == [], "each implies NoNewPrivileges=yes (< 255)"
    # Its control socket lives where the stats command is told to look, in a folder of its own user.
    assert "DIRECTFS_RUNTIME_DIR=/run/directfs-user" in service["Environment"]
    assert service["RuntimeDirectory"] == ["directfs-user"]
    assert "ConditionPathExists" in unit_values(USER_UNIT)["Unit"]
    assert service["ExecStart"] == unit_values(UNIT)["Service"]["ExecStart"]


def test_unit_print_mountpoint_command_works(tmp_path: Path) -> None:
    # ExecStartPre/ExecStop resolve the instance's mountpoint with `directfs stats --print-mountpoint NAME`.
    cfg = tmp_path / "directfs.toml"
    cfg.write_text('[source.projects]\nurl = "file:///srv"\nmountpoint = "/mnt/projects"\n')
    done = subprocess.run(
        [sys.executable, "-m", "directfs.cli", "stats", "--print-mountpoint", "projects"],
        capture_output=True,
        text=True,
        env={**os.environ, "DIRECTFS_CONFIG": str(cfg)},
    )
    assert done.returncode == 0 and done.stdout == "/mnt/projects\n", done.stderr


# --- logging ------------------------------------------------------------------------------------------------------


@pytest.mark.expected_logs(r"^read failed: inode", r"^two\nlines$")
def test_journal_format_carries_syslog_priorities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_logging("debug", stream=stream)
        log = logging.getLogger("directfs.test")
        log.warning("read failed: inode %d: %s", 42, "EIO")
        log.error("two\nlines")
        log.debug("fetch https://bucket.example/key?X-Amz-Signature=abc")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    assert stream.getvalue().splitlines() == [
        "<4>directfs.test: read failed: inode 42: EIO",
        "<3>directfs.test: two",
        "<3>lines",
        "<7>directfs.test: fetch https://bucket.example/key?<redacted>",
    ]


def test_rate_limit_by_template_with_a_suppressed_summary() -> None:
    now = [0.0]
    limiter = logs.RateLimitFilter(per_window=3, window_seconds=60, clock=lambda: now[0])

    def record(inode: int, msg: str = "read failed: inode %d: EIO") -> logging.LogRecord:
        return logging.LogRecord("directfs.fuse_ops", logging.WARNING, __file__, 1, msg, (inode,), None)

    passed = [limiter.filter(record(i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limiter.filter(record(1, "another message %d"))  # another template has its own budget
    now[0] = 61.0
    first = record(99)
    assert limiter.filter(first)
    assert first.getMessage() == "read failed: inode 99: EIO (suppressed 7 similar messages in the last 60 s)"
    assert limiter.filter(record(100))
    assert record(100).getMessage() == "read failed: inode 100: EIO"


async def test_sigusr1_dumps_the_trio_task_tree(caplog: pytest.LogCaptureFixture) -> None:
    async def parked_reader() -> None:
        await trio.sleep_forever()

    dumped = trio.Event()

    class Flag(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            dumped.set()  # the watcher logs from the trio thread, so setting the event here is safe

    flag = Flag()
    logging.getLogger("directfs.tasks").addHandler(flag)
    with caplog.at_level(logging.WARNING, logger="directfs.tasks"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parked_reader, name="parked_reader")
            nursery.start_soon(logs.dump_tasks_on_sigusr1, name="sigusr1")
            await trio.testing.wait_all_tasks_blocked()
            os.kill(os.getpid(), signal.SIGUSR1)
            with trio.fail_after(10):
                await dumped.wait()
            nursery.cancel_scope.cancel()
    logging.getLogger("directfs.tasks").removeHandler(flag)
    text = caplog.text
    assert "task parked_reader" in text
    assert "in parked_reader" in text  # the frame it waits in
    assert "task sigusr1" in text
