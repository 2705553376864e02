"""``directfs ls`` and ``cp`` without a server: the store flags, their config keys and environment twins, and
file:// trees. The commands run in-process (``directfs.cli.main``; each makes its own ``trio.run``), so these tests
are sync. The same commands against real servers: tests/component/test_cli_store_servers.py; through mounts:
tests/mount/test_cli_store.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from directfs import cli
from directfs.commands import common
from directfs.commands.storeio import printable, resolve_source_arg
from directfs.config import mount_settings, parse_config, source_settings
from directfs.errors import ConfigError
from directfs.sources.base import SourceOptions
from tests.support.commands import isolate_cli_env, local_tree, run, sha, tree_in


@pytest.fixture(autouse=True)
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_cli_env(monkeypatch, tmp_path)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    return tree_in(tmp_path)


# --- flags, config keys and their environment twins ---------------------------------------------------------------


def _parsed(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_store_flags_feed_source_options() -> None:
    args = _parsed("ls", "s3://b", "--endpoint-url", "http://127.0.0.1:9000/", "--block-size", "64K")
    args.staging_deadline = "90s"
    settings = source_settings(args, env={})
    options = common.build_source_options(settings, common.resolve_credentials(settings, env={}))
    assert options.endpoint_url == "http://127.0.0.1:9000"
    assert options.block_size_bytes == 64 * 1024
    assert options.staging_deadline_seconds == 90.0
    defaults = common.build_source_options(
        source_settings(_parsed("ls", "s3://b"), env={}), common.resolve_credentials(settings, env={})
    )
    assert defaults.block_size_bytes == SourceOptions().block_size_bytes
    assert defaults.staging_deadline_seconds == SourceOptions().staging_deadline_seconds


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--block-size", "1K", "between 4K and 256M"),
        ("--block-size", "1G", "between 4K and 256M"),
        ("--block-size", "lots", "invalid size"),
        ("--staging-deadline", "forever", "invalid duration"),
        ("--endpoint-url", "ftp://127.0.0.1", "http"),
        ("--endpoint-url", "http://key:secret@127.0.0.1:9000", "must not hold credentials"),
        ("--endpoint-url", "http://127.0.0.1:9000/bucket", "without a path"),
    ],
)
def test_store_flags_are_validated(flag: str, value: str, message: str) -> None:
    args = _parsed("cp", "s3://b/k", "/tmp/x", flag, value)
    with pytest.raises(ConfigError, match=message) as caught:
        settings = source_settings(args, env={})
        common.build_source_options(settings, common.resolve_credentials(settings, env={}))
    assert "secret" not in str(caught.value).replace("must not hold credentials", "")


def test_config_keys_and_environment_twins(tmp_path: Path) -> None:
    config = tmp_path / "directfs.toml"
    config.write_text(
        '[source.archive]\nurl = "s3://tape-bucket/raw"\nendpoint_url = "http://127.0.0.1:8333"\n'
        'block_size = "1M"\nstaging_deadline = "30m"\n'
    )
    args = _parsed("ls", "archive/2024 q", "--config", str(config))
    url, options = resolve_source_arg(args)  # NAME/sub/path
    assert url == "s3://tape-bucket/raw/2024%20q"
    assert (options.endpoint_url, options.block_size_bytes, options.staging_deadline_seconds) == (
        "http://127.0.0.1:8333",
        1024 * 1024,
        1800.0,
    )
    # environment over the file, flags over both
    args = _parsed("ls", "archive", "--config", str(config), "--block-size", "2M")
    settings = source_settings(args, env={"DIRECTFS_BLOCK_SIZE": "4M", "DIRECTFS_STAGING_DEADLINE": "10s"})
    options = common.build_source_options(settings, common.resolve_credentials(settings, env={}))
    assert (options.block_size_bytes, options.staging_deadline_seconds) == (2 * 1024 * 1024, 10.0)
    with pytest.raises(ConfigError, match="block_size"):
        parse_config('[source.x]\nurl = "s3://b"\nblock_size = "3"\n')
    with pytest.raises(ConfigError, match="endpoint_url"):
        parse_config('[source.x]\nurl = "s3://b"\nendpoint_url = "s3.example.org"\n')


def test_mount_o_options_and_help_list_every_scheme(tmp_path: Path) -> None:
    from directfs.commands import mount as mount_command

    args = _parsed("mount", "s3://b", str(tmp_path), "-o", "block_size=1M,staging_deadline=1h,ro")
    args.options.append("endpoint_url=http://127.0.0.1:9000")
    settings = mount_settings(args, env={})
    options = common.build_source_options(settings, common.resolve_credentials(settings, env={}))
    assert (options.block_size_bytes, options.staging_deadline_seconds, options.endpoint_url) == (
        1024 * 1024,
        3600.0,
        "http://127.0.0.1:9000",
    )
    flag_wins = _parsed("mount", "s3://b", str(tmp_path), "-o", "block_size=1M", "--block-size", "64K")
    assert mount_settings(flag_wins, env={})["block_size"] == 64 * 1024
    mount_parser = argparse.ArgumentParser(prog="directfs mount")
    mount_command.add_arguments(mount_parser)
    text = mount_parser.format_help() + mount_command.HELP
    for scheme in ("ctera+https://", "s3://", "webdav://", "webdavs://", "http(s)://", "file://", "NAME"):
        assert scheme in text


# --- file:// --------------------------------------------------------------------------------------------------


def test_ls_file_url(capsys: pytest.CaptureFixture[str], tree: tuple[Path, dict[str, bytes]]) -> None:
    root, files = tree
    url = f"file://{root}"
    status, out, _ = run(capsys, "ls", url)
    assert status == 0
    assert out.splitlines() == sorted(["empty", "one", "block-1", "block", "block+1", "many.bin", "sub dir"])
    status, out, _ = run(capsys, "ls", "-lR", url)
    assert status == 0
    lines = {line.split(None, 4)[4]: line.split(None, 4) for line in out.splitlines()}
    assert set(lines) == set(files) | {"sub dir", "sub dir/deeper"}
    assert lines["sub dir"][0] == "d" and lines["many.bin"][0] == "-"
    assert int(lines["many.bin"][1]) == len(files["many.bin"])
    status, out, _ = run(capsys, "ls", "-l", f"file://{root}/sub%20dir/na%20me%20%231%25.txt")
    assert status == 0 and out.split(None, 4)[4].strip() == "na me #1%.txt"
    status, out, err = run(capsys, "ls", f"file://{root}/missing")
    assert status == 1 and out == ""
    assert err.strip() == f"directfs ls: file://{root}/missing: No such file or directory"


@pytest.mark.expected_logs(r"skipping an entry with an invalid name")
def test_ls_escapes_control_characters(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "evil\x1b[2Jname\n").write_bytes(b"x")
    (tmp_path / "back\\slash").write_bytes(b"y")
    status, out, _ = run(capsys, "ls", f"file://{tmp_path}")
    assert status == 0
    # A name with control characters never enters the tree (issue 13 L6); what is listed is still escaped.
    assert "\x1b" not in out and "evil" not in out and "back\\\\slash" in out
    assert printable("evil\x1b[2Jname\n") == "evil\\x1b[2Jname\\x0a"
    assert printable("plain ünicode") == "plain ünicode"


def test_cp_file_url_tree_exact_bytes_and_mtimes(
    capsys: pytest.CaptureFixture[str], tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, files = tree
    os.utime(root / "many.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(root / "sub dir", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    dest = tmp_path / "copy"
    status, _, err = run(capsys, "cp", "-r", f"file://{root}", str(dest), "--block-size", "4K", "--max-workers", "3")
    assert status == 0, err
    assert {rel: sha(data) for rel, data in local_tree(dest).items()} == {rel: sha(d) for rel, d in files.items()}
    assert (dest / "many.bin").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert (dest / "sub dir").stat().st_mtime_ns == 1_500_000_000_000_000_000
    assert not list(dest.rglob("*.part"))
    # one file, into an existing folder and to a new name
    status, _, _ = run(capsys, "cp", f"file://{root}/many.bin", str(tmp_path))
    assert status == 0 and (tmp_path / "many.bin").read_bytes() == files["many.bin"]
    status, _, _ = run(capsys, "cp", f"file://{root}/empty", str(tmp_path / "renamed"))
    assert status == 0 and (tmp_path / "renamed").read_bytes() == b""
    # a folder without -r, a missing file, a destination folder that does not exist
    status, _, err = run(capsys, "cp", f"file://{root}", str(tmp_path / "x"))
    assert status == 1 and "Is a directory" in err and "-r" in err
    status, _, err = run(capsys, "cp", f"file://{root}/nope", str(tmp_path / "x"))
    assert status == 1 and "No such file or directory" in err
    status, _, err = run(capsys, "cp", f"file://{root}/one", str(tmp_path / "no" / "such" / "dir"))
    assert status == 1 and "No such file or directory" in err
    assert not (tmp_path / "x").exists()
