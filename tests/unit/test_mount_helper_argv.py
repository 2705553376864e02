"""``mount.directfs`` argv as mount(8) passes it, without mounting: standard options ignored, known ones mapped to
``directfs mount`` flags, secrets refused, bad invocations exit 1 with a reason. Real runs:
tests/mount/test_mount_helper.py (an fstab line) and tests/component/test_mount_failures.py (a failed mount)."""

from __future__ import annotations

import pytest

from directfs.commands import mount_helper
from tests.support.mountd import STANDARD_MOUNT_OPTIONS as STANDARD

SECRET = "helper-s3cret-never-in-ps"


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
