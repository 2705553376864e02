"""``directfs get`` end to end against the real block server. Its argument parsing and the shared flag parsing of
commands/common.py: tests/unit/test_cli_get_args.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from directfs import cli
from tests.support.blockserver import SECRET, BlockServer, Fault, payload
from tests.support.commands import private_umask

DATA = payload(500_000, seed=3)


@pytest.fixture(autouse=True)
def private_files() -> Iterator[None]:
    with private_umask():
        yield


@pytest.fixture
def server() -> Iterator[BlockServer]:
    with BlockServer(SECRET) as s:
        s.add_file("1", DATA, block_size=64 * 1024)
        yield s


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    return str(path)


def get(server: BlockServer, secret_file: str, dest: str, *extra: str) -> int:
    return cli.main(
        [
            "get",
            f"ctera+http://127.0.0.1:{server.port}",
            "1",
            dest,
            "--access-key-id",
            server.access_key_id,
            "--secret-access-key-file",
            secret_file,
            *extra,
        ]
    )


def test_get_downloads_the_file(server: BlockServer, secret_file: str, tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    assert get(server, secret_file, str(dest)) == 0
    assert dest.read_bytes() == DATA
    assert not list(tmp_path.glob("*.part"))


def test_get_range(server: BlockServer, secret_file: str, tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    assert get(server, secret_file, str(dest), "--range", "1000-200000", "--max-workers", "2") == 0
    assert dest.read_bytes() == DATA[1000:200_001]
    assert get(server, secret_file, str(dest), "--range", "499990-") == 0
    assert dest.read_bytes() == DATA[499_990:]


def test_get_to_stdout(server: BlockServer, secret_file: str, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert get(server, secret_file, "-", "--range", "0-99") == 0
    assert capfdbinary.readouterr().out == DATA[:100]


def test_get_resumes_after_a_block_failure(
    server: BlockServer, secret_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.block_faults[("1", 4)] = [Fault(status=404)]  # not retried inside the stream: the stream stops
    dest = tmp_path / "out.bin"
    assert get(server, secret_file, str(dest)) == 0
    assert dest.read_bytes() == DATA
    err = capsys.readouterr().err
    assert f"resuming at byte {3 * 64 * 1024}" in err
    assert "sig0" not in err and SECRET not in err


def test_get_gives_up_after_the_resume_budget(
    server: BlockServer, secret_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.block_faults[("1", 2)] = [Fault(status=404)] * 10
    dest = tmp_path / "out.bin"
    assert get(server, secret_file, str(dest), "--resumes", "1") == 1
    assert not dest.exists() and not list(tmp_path.glob("*.part"))
    assert server.stats.block_requests[("1", 2)] == 2
    assert "Stream interrupted" in capsys.readouterr().err


def test_get_unknown_file_fails_cleanly(
    server: BlockServer, secret_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "get",
            f"ctera+http://127.0.0.1:{server.port}",
            "999",
            str(tmp_path / "x"),
            "--access-key-id",
            server.access_key_id,
            "--secret-access-key-file",
            secret_file,
        ]
    )
    assert code == 1
    assert "File not found" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["secret"]
