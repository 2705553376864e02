"""http:// and https:// sources through a real mount, against a real HTTP server on 127.0.0.1
(tests/support/httpfiles.py). The source itself: tests/component/test_source_http.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.httpfiles import serve_files
from tests.support.mountd import mounted
from tests.support.sourcetree import check_mounted_tree, make_tree, needs_fuse


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "www"
    root.mkdir()
    return root, make_tree(root)


@needs_fuse
@pytest.mark.mount
def test_mount_http_folder_with_staging(tree: tuple[Path, dict[str, bytes]]) -> None:
    with serve_files(tree[0]) as server:
        # Real seconds here (the daemon is another process): two 503 + Retry-After: 1 answers, then the data.
        server.staging["many.bin"] = 2
        with mounted(server.url, extra_args=["--log-level", "debug"]) as m:
            check_mounted_tree(m.mountpoint, tree[1])
            assert server.staging["many.bin"] == 0
            assert (m.mountpoint / "sub dir" / "na me #1%.txt").read_bytes() == tree[1]["sub dir/na me #1%.txt"]


@needs_fuse
@pytest.mark.mount
def test_mount_https_single_file_with_ca(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    with serve_files(tree[0], tls=True) as server:
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(server.ca_pem)
        with mounted(server.url + "many.bin", extra_args=["--ca-file", str(ca_file)]) as m:
            assert os.listdir(m.mountpoint) == ["many.bin"]
            check_mounted_tree(m.mountpoint, {"many.bin": tree[1]["many.bin"]})
