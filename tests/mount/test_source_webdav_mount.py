"""webdav:// through a real mount, against a real nginx with the WebDAV modules on 127.0.0.1: a rotating bearer token
file and basic auth. The source itself: tests/component/test_source_webdav.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mountd import mounted
from tests.support.nginx import NginxDav, start_nginx
from tests.support.sourcetree import check_mounted_tree, make_tree, needs_fuse


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "dav"
    root.mkdir()
    return root, make_tree(root)


@pytest.fixture
def nginx(tmp_path: Path, tree: tuple[Path, dict[str, bytes]]) -> Iterator[NginxDav]:
    with start_nginx(tmp_path / "nginx", tree[0], tokens=["initial-token"]) as server:
        yield server


@needs_fuse
@pytest.mark.mount
def test_mount_with_rotating_token_file(nginx: NginxDav, tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    token_file = tmp_path / "oidc-token"
    token_file.write_text("initial-token\n")
    files = tree[1]
    url = f"webdav://{nginx.host}/bearer/"
    with mounted(url, extra_args=["--token-file", str(token_file)], env={"DIRECTFS_TOKEN": ""}) as m:
        assert (m.mountpoint / "many.bin").read_bytes() == files["many.bin"]
        (tmp_path / "t.new").write_text("rotated-token-2\n")
        os.replace(tmp_path / "t.new", token_file)
        nginx.set_tokens(["rotated-token-2"])  # the old token now gets 401
        check_mounted_tree(m.mountpoint, files)  # files and folders not read before: new requests, new token


@needs_fuse
@pytest.mark.mount
def test_mount_basic_auth(nginx: NginxDav, tree: tuple[Path, dict[str, bytes]]) -> None:
    env = {"DIRECTFS_USERNAME": nginx.user, "DIRECTFS_PASSWORD": nginx.password}
    with mounted(f"webdav://{nginx.host}/basic/", env=env) as m:
        check_mounted_tree(m.mountpoint, tree[1])
