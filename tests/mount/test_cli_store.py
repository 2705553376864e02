"""``directfs ls``, ``cp`` and ``stage`` against real servers on 127.0.0.1 (file://, the HTTP file server with its
staging mode, SeaweedFS, nginx WebDAV, the CTERA reference portal), the store flags and their config twins, and
mounts by --endpoint-url, by a named source, and ``stage`` through a mount.

The commands run in-process (``directfs.cli.main``; each makes its own ``trio.run``), so these tests are sync;
mounts run the daemon as a subprocess (tests/support/mountd.py).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directfs import cli
from directfs.commands import common
from directfs.commands.storeio import printable, resolve_source_arg
from directfs.config import mount_settings, parse_config, source_settings
from directfs.errors import ConfigError
from directfs.sources.base import SourceOptions
from tests.support.httpfiles import HTTPFiles, serve_files
from tests.support.mountd import mounted
from tests.support.nginx import NginxDav, start_nginx
from tests.support.portal import make_tree as make_portal_tree
from tests.support.portal import start_portal
from tests.support.seaweed import SeaweedFS, start_seaweed
from tests.support.sourcetree import BLOCK, check_mounted_tree, make_tree, needs_fuse

BUCKET = "cli-test"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ambient config file or DIRECTFS_* / AWS_* variables leak into a test."""
    for name in list(os.environ):
        if name.startswith(("DIRECTFS_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "tree"
    root.mkdir()
    return root, make_tree(root)


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


def test_ls_escapes_control_characters(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "evil\x1b[2Jname\n").write_bytes(b"x")
    (tmp_path / "back\\slash").write_bytes(b"y")
    status, out, _ = run(capsys, "ls", f"file://{tmp_path}")
    assert status == 0
    assert "\x1b" not in out and "evil\\x1b[2Jname\\x0a" in out and "back\\\\slash" in out
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


# --- http:// with staging -----------------------------------------------------------------------------------------


@pytest.fixture
def http_server(tree: tuple[Path, dict[str, bytes]]) -> Iterator[HTTPFiles]:
    with serve_files(tree[0]) as server:
        yield server


def test_http_ls_cp_and_single_file_url(
    capsys: pytest.CaptureFixture[str], http_server: HTTPFiles, tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    files = tree[1]
    status, out, _ = run(capsys, "ls", "-R", http_server.url)
    assert status == 0 and set(out.splitlines()) == set(files) | {"sub dir", "sub dir/deeper"}
    status, _, err = run(capsys, "cp", "-r", http_server.url, str(tmp_path / "c"), "--block-size", "64K")
    assert status == 0, err
    assert {rel: sha(d) for rel, d in local_tree(tmp_path / "c").items()} == {rel: sha(d) for rel, d in files.items()}
    status, _, err = run(capsys, "cp", http_server.url + "many.bin", str(tmp_path / "one.bin"))
    assert status == 0, err
    assert (tmp_path / "one.bin").read_bytes() == files["many.bin"]


def test_stage_http_waits_for_staging_then_ready(
    capsys: pytest.CaptureFixture[str], http_server: HTTPFiles, tree: tuple[Path, dict[str, bytes]]
) -> None:
    # 503 + Retry-After: 1 (real seconds: the command makes its own trio.run, no mock clock), then the data
    http_server.staging["many.bin"] = 2
    http_server.staging["sub dir/deeper/x"] = 1
    status, out, err = run(capsys, "stage", http_server.url, "--block-size", "64K")
    assert status == 0, err
    lines = out.splitlines()
    assert f"ready {http_server.url}many.bin" in lines
    assert f"ready {http_server.url}sub dir/deeper/x" in lines
    total = sum(len(d) for d in tree[1].values())
    assert lines[-1].startswith(f"{len(tree[1])} ready, 0 failed, {total} bytes")
    assert http_server.staging == {"many.bin": 0, "sub dir/deeper/x": 0}


def test_stage_http_past_the_staging_deadline_fails_with_etimedout(
    capsys: pytest.CaptureFixture[str], http_server: HTTPFiles
) -> None:
    http_server.staging["many.bin"] = 1000  # Retry-After: 1 s is already past a 0.5 s deadline: fails at once
    status, out, _ = run(capsys, "stage", http_server.url, "--staging-deadline", "500ms")
    assert status == 1
    failed = [line for line in out.splitlines() if line.startswith("failed")]
    assert len(failed) == 1
    assert failed[0].startswith(f"failed {http_server.url}many.bin: {os.strerror(errno.ETIMEDOUT)}")
    assert " 1 failed," in out.splitlines()[-1]


# --- s3:// (SeaweedFS) --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedFS, dict[str, bytes]]]:
    workdir = tmp_path_factory.mktemp("weed")
    with start_seaweed(workdir, buckets=(BUCKET,)) as s3:
        client: Any = s3.client()
        files = make_tree(workdir / "tree")
        for rel, data in files.items():
            client.put_object(Bucket=BUCKET, Key=f"data/{rel}", Body=data)
        yield s3, files


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, weed: tuple[SeaweedFS, dict[str, bytes]]) -> SeaweedFS:
    for key, value in weed[0].env().items():
        monkeypatch.setenv(key, value)
    return weed[0]


def test_s3_ls_cp_stage(
    capsys: pytest.CaptureFixture[str],
    aws: SeaweedFS,
    weed: tuple[SeaweedFS, dict[str, bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = weed[1]
    ep = ["--endpoint-url", aws.endpoint, "--block-size", "64K"]
    status, out, err = run(capsys, "ls", "-l", f"s3://{BUCKET}/data", *ep)
    assert status == 0, err
    names = {line.split(None, 4)[4] for line in out.splitlines()}
    assert names == {"empty", "one", "block-1", "block", "block+1", "many.bin", "sub dir"}
    status, out, _ = run(capsys, "ls", "-l", f"s3://{BUCKET}/data/many.bin", *ep)  # a key, not a prefix
    assert status == 0 and out.split()[1] == str(len(files["many.bin"])) and out.split()[-1] == "many.bin"
    status, _, err = run(capsys, "cp", "-r", f"s3://{BUCKET}/data", str(tmp_path / "c"), *ep)
    assert status == 0, err
    assert {rel: sha(d) for rel, d in local_tree(tmp_path / "c").items()} == {rel: sha(d) for rel, d in files.items()}
    status, _, err = run(capsys, "cp", f"s3://{BUCKET}/data/sub%20dir/deeper/x", str(tmp_path / "x"), *ep)
    assert status == 0, err
    assert (tmp_path / "x").read_bytes() == files["sub dir/deeper/x"]
    status, out, err = run(capsys, "stage", f"s3://{BUCKET}/data/sub dir", *ep)
    assert status == 0, err
    assert out.splitlines()[-1].startswith("2 ready, 0 failed")
    status, _, err = run(capsys, "ls", f"s3://{BUCKET}/data/missing-key", *ep)
    assert status == 1 and "No such file or directory" in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    status, _, err = run(capsys, "ls", f"s3://{BUCKET}/data", *ep)
    assert status == 1 and "Permission denied" in err and "wrong" not in err


@needs_fuse
@pytest.mark.mount
def test_mount_named_s3_source(aws: SeaweedFS, weed: tuple[SeaweedFS, dict[str, bytes]], tmp_path: Path) -> None:
    config = tmp_path / "directfs.toml"
    config.write_text(
        f'[source.bucket]\nurl = "s3://{BUCKET}/data"\nendpoint_url = "{aws.endpoint}"\nblock_size = "64K"\n'
    )
    env = {**aws.env(), "AWS_EC2_METADATA_DISABLED": "true", "DIRECTFS_CONFIG": str(config)}
    with mounted("bucket", env=env) as m:
        check_mounted_tree(m.mountpoint, weed[1])


# --- webdav:// (nginx) ----------------------------------------------------------------------------------------------


@pytest.fixture
def nginx(tmp_path: Path, tree: tuple[Path, dict[str, bytes]]) -> Iterator[NginxDav]:
    with start_nginx(tmp_path / "nginx", tree[0]) as server:
        yield server


def test_webdav_ls_and_cp_with_basic_auth(
    capsys: pytest.CaptureFixture[str],
    nginx: NginxDav,
    tree: tuple[Path, dict[str, bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = tree[1]
    url = f"webdav://{nginx.host}/basic/"
    status, _, err = run(capsys, "ls", url)
    assert status == 1 and "Permission denied" in err
    monkeypatch.setenv("DIRECTFS_USERNAME", nginx.user)
    monkeypatch.setenv("DIRECTFS_PASSWORD", nginx.password)
    status, out, err = run(capsys, "ls", "-R", url)
    assert status == 0, err
    assert set(out.splitlines()) == set(files) | {"sub dir", "sub dir/deeper"}
    status, out, _ = run(capsys, "ls", "-l", url + "many.bin")
    assert status == 0 and out.split()[1] == str(len(files["many.bin"]))
    status, _, err = run(capsys, "cp", "-r", url, str(tmp_path / "c"), "--block-size", "64K")
    assert status == 0, err
    assert {rel: sha(d) for rel, d in local_tree(tmp_path / "c").items()} == {rel: sha(d) for rel, d in files.items()}
    assert nginx.password not in err


@needs_fuse
@pytest.mark.mount
def test_mount_named_webdav_source(nginx: NginxDav, tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    password_file = tmp_path / "dav-password"
    password_file.write_text(nginx.password + "\n")
    config = tmp_path / "directfs.toml"
    config.write_text(
        f'[source.dav]\nurl = "webdav://{nginx.host}/basic/"\nusername = "{nginx.user}"\n'
        f'password_file = "{password_file}"\nblock_size = "64K"\nmountpoint = "{tmp_path / "mnt"}"\n'
    )
    (tmp_path / "mnt").mkdir()
    with mounted("dav", env={"DIRECTFS_CONFIG": str(config)}, mountpoint=tmp_path / "mnt") as m:
        check_mounted_tree(m.mountpoint, tree[1])


# --- ctera+http:// (the reference portal) -------------------------------------------------------------------------


def test_ctera_cp_and_ls_with_file_ids(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes = make_portal_tree(tmp_path / "ptree", block_size=BLOCK, few_mib=1)
    with start_portal(tmp_path / "ptree", extra_args=["--block-size", "64K"]) as portal:
        for name, value in {
            "DIRECTFS_ACCESS_KEY_ID": portal.access_key_id,
            "DIRECTFS_SECRET_ACCESS_KEY": portal.secret_access_key,
            "DIRECTFS_USERNAME": portal.username,
            "DIRECTFS_PASSWORD": portal.password,
        }.items():
            monkeypatch.setenv(name, value)
        url = "ctera+" + portal.url
        status, out, err = run(capsys, "ls", "-l", url + "/big")
        assert status == 0, err
        (line,) = out.splitlines()
        assert line.split(None, 4)[3] == portal.file_id("big/few-mib.bin")
        status, _, err = run(capsys, "cp", "-r", url, str(tmp_path / "c"), "--max-workers", "4")
        assert status == 0, err
        assert {rel: sha(d) for rel, d in local_tree(tmp_path / "c").items()} == hashes
        assert (tmp_path / "c" / "empty folder").is_dir()
        status, _, err = run(capsys, "cp", url + "/big/few-mib.bin", str(tmp_path / "one"))
        assert status == 0, err
        assert sha((tmp_path / "one").read_bytes()) == hashes["big/few-mib.bin"]
        assert portal.secret_access_key not in err and portal.password not in err


# --- stage through a mount ------------------------------------------------------------------------------------------


@needs_fuse
@pytest.mark.mount
def test_stage_through_a_mount(
    capsys: pytest.CaptureFixture[str], tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    files = tree[1]
    with serve_files(tree[0]) as server:
        server.staging["many.bin"] = 2  # two 503 + Retry-After: 1 s, then the data
        with mounted(server.url, extra_args=["--block-size", "64K", "--staging-deadline", "30s"]) as m:
            status, out, err = run(capsys, "stage", str(m.mountpoint), "--max-workers", "2")
            assert status == 0, err
            assert f"ready {m.mountpoint}/many.bin" in out.splitlines()
            total = sum(len(d) for d in files.values())
            assert out.splitlines()[-1].startswith(f"{len(files)} ready, 0 failed, {total} bytes")
            assert server.staging["many.bin"] == 0
        server.staging["block"] = 1000
        with mounted(server.url, extra_args=["--block-size", "64K", "--staging-deadline", "500ms"]) as m:
            status, out, _ = run(capsys, "stage", str(m.mountpoint / "block"), str(m.mountpoint / "one"))
            assert status == 1
            assert f"failed {m.mountpoint}/block: {os.strerror(errno.ETIMEDOUT)}" in out
            assert f"ready {m.mountpoint}/one" in out
            assert out.splitlines()[-1].startswith("1 ready, 1 failed, 1 bytes")
    status, _, err = run(capsys, "stage", str(tmp_path))
    assert status == 1 and "not inside a directfs mount" in err
