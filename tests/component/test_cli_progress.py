"""The progress bars of ``directfs cp``, ``stage`` and ``get`` as a user sees them: the real command in a subprocess
with its stdout and stderr on a pseudo-terminal (a bar with bytes, files, rate and ETA), on a pipe (no bar), and with
``--quiet`` (no bar on the terminal either). The bar's drawing itself: tests/unit/test_progress.py."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.blockserver import SECRET, BlockServer, payload
from tests.support.commands import private_umask

# "cp: 100%|##########| 1.50MB/1.50MB [00:00<00:00, 12.3MB/s, 2/2 files]": bytes of the total, elapsed<ETA, rate,
# files (the final line, which every run draws).
BAR = r"{command}: 100%\|[^|]+\| {size}/{size} \[\d\d:\d\d<\d\d:\d\d, [\d.]+[kMG]?B/s, {files} files\]"
SOURCE_FILES = {"a.bin": payload(1_000_000, seed=1), "sub/b.bin": payload(500_000, seed=2)}


@pytest.fixture(autouse=True)
def private_files() -> Iterator[None]:
    with private_umask():
        yield


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel, data in SOURCE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIRECTFS_", "AWS_"))}
    env["HOME"] = str(tmp_path)  # no default config file of the machine's user
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    return env


def on_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``directfs ARGV`` with stdout and stderr on a 100-column pseudo-terminal; its exit status and screen."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "directfs.cli", *argv], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env
        )
    finally:
        os.close(slave)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has closed its side: the end of the output
        while data := os.read(master, 65536):
            chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def on_pipes(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "directfs.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    return done.returncode, done.stdout + done.stderr


def test_cp_draws_bytes_files_rate_and_eta_on_a_terminal_only(tree: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    status, screen = on_terminal(["cp", "-r", f"file://{tree}/", str(tmp_path / "out1")], env)
    assert status == 0, screen
    assert re.search(BAR.format(command="cp", size=r"1\.50MB", files="2/2"), screen), screen
    assert (tmp_path / "out1" / "sub" / "b.bin").read_bytes() == SOURCE_FILES["sub/b.bin"]

    status, output = on_pipes(["cp", "-r", f"file://{tree}/", str(tmp_path / "out2")], env)
    assert status == 0 and output == "", output  # not a terminal: nothing but notices, and there are none

    status, screen = on_terminal(["cp", "-r", "--quiet", f"file://{tree}/", str(tmp_path / "out3")], env)
    assert status == 0 and screen == "", screen  # --quiet: no bar on the terminal either
    assert (tmp_path / "out3" / "a.bin").read_bytes() == SOURCE_FILES["a.bin"]


def test_cp_quiet_still_reports_errors(tmp_path: Path) -> None:
    status, screen = on_terminal(
        ["cp", "-q", f"file://{tmp_path}/missing.bin", str(tmp_path / "x")], clean_env(tmp_path)
    )
    assert status == 1 and "directfs cp:" in screen and "%|" not in screen, screen


def test_stage_draws_the_bar_beside_its_ready_lines_and_quiet_keeps_only_the_lines(tree: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    status, screen = on_terminal(["stage", f"file://{tree}/"], env)
    assert status == 0, screen
    assert re.search(BAR.format(command="stage", size=r"1\.50MB", files="2/2"), screen), screen
    assert screen.count("ready ") == 2, screen

    status, screen = on_terminal(["stage", "--quiet", f"file://{tree}/"], env)
    assert status == 0 and "%|" not in screen and screen.count("ready ") == 2, screen


def test_get_draws_bytes_its_one_file_rate_and_eta(tmp_path: Path) -> None:
    data = payload(300_000, seed=3)
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    with BlockServer(SECRET) as server:
        server.add_file("1", data, block_size=64 * 1024)
        base = [
            "get",
            f"ctera+http://127.0.0.1:{server.port}",
            "1",
            "--access-key-id",
            server.access_key_id,
            "--secret-access-key-file",
            str(secret),
        ]
        env = clean_env(tmp_path)
        status, screen = on_terminal([*base, str(tmp_path / "one.bin")], env)
        assert status == 0, screen
        assert re.search(BAR.format(command="get", size=r"300kB", files="1/1"), screen), screen
        assert (tmp_path / "one.bin").read_bytes() == data

        status, screen = on_terminal([*base, "--quiet", str(tmp_path / "two.bin")], env)
        assert status == 0 and screen == "", screen
        assert (tmp_path / "two.bin").read_bytes() == data
