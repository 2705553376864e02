"""``directfs ls``, ``cp`` and ``stage`` against real servers on 127.0.0.1 (the HTTP file server with its staging
mode, SeaweedFS, nginx WebDAV, the CTERA reference portal). The commands run in-process (``directfs.cli.main``; each
makes its own ``trio.run``), so these tests are sync. Flags and file:// trees: tests/unit/test_cli_store_offline.py;
mounts: tests/mount/test_cli_store.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.commands import (
    BUCKET,
    isolate_cli_env,
    local_tree,
    run,
    seeded_bucket,
    sha,
    tree_in,
    use_s3_keys,
)
from tests.support.httpfiles import HTTPFiles, serve_files
from tests.support.nginx import NginxDav, start_nginx
from tests.support.portal import make_tree as make_portal_tree
from tests.support.portal import start_portal
from tests.support.seaweed import SeaweedFS
from tests.support.sourcetree import BLOCK


@pytest.fixture(autouse=True)
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_cli_env(monkeypatch, tmp_path)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    return tree_in(tmp_path)


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
    with seeded_bucket(tmp_path_factory.mktemp("weed")) as it:
        yield it


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, weed: tuple[SeaweedFS, dict[str, bytes]]) -> SeaweedFS:
    return use_s3_keys(monkeypatch, weed[0])


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
