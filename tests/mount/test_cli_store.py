"""``directfs mount`` by a named source (s3:// on SeaweedFS, webdav:// on nginx, from the config file) and
``directfs stage`` through a mount. The daemon runs as a subprocess (tests/support/mountd.py); ``stage`` runs
in-process (``directfs.cli.main``). The store commands without a mount: tests/unit/test_cli_store_offline.py (flags,
file://) and tests/component/test_cli_store_servers.py (real servers).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.commands import BUCKET, isolate_cli_env, run, seeded_bucket, tree_in, use_s3_keys
from tests.support.httpfiles import serve_files
from tests.support.mountd import mounted
from tests.support.nginx import NginxDav, start_nginx
from tests.support.seaweed import SeaweedFS
from tests.support.sourcetree import check_mounted_tree, needs_fuse


@pytest.fixture(autouse=True)
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_cli_env(monkeypatch, tmp_path)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    return tree_in(tmp_path)


# --- s3:// (SeaweedFS) --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedFS, dict[str, bytes]]]:
    with seeded_bucket(tmp_path_factory.mktemp("weed")) as it:
        yield it


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, weed: tuple[SeaweedFS, dict[str, bytes]]) -> SeaweedFS:
    return use_s3_keys(monkeypatch, weed[0])


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
