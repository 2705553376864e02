"""An s3:// bucket prefix through a real mount, against a real SeaweedFS (SigV4 enforced) on 127.0.0.1. The source
itself: tests/component/test_source_s3.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mountd import mounted
from tests.support.seaweed import SeaweedFS
from tests.support.sourcetree import check_mounted_tree, isolate_aws_env, needs_fuse, s3_bucket

BUCKET = "directfs-test"


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedFS, dict[str, bytes]]]:
    with s3_bucket(tmp_path_factory.mktemp("weed"), BUCKET) as it:
        yield it


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weed: tuple[SeaweedFS, dict[str, bytes]]) -> SeaweedFS:
    return isolate_aws_env(monkeypatch, tmp_path, weed[0])


@needs_fuse
@pytest.mark.mount
def test_mount_bucket_prefix(aws_env: SeaweedFS, weed: tuple[SeaweedFS, dict[str, bytes]]) -> None:
    env = {**aws_env.env(), "AWS_EC2_METADATA_DISABLED": "true"}
    with mounted(f"s3://{BUCKET}/data", env=env, extra_args=["--endpoint-url", aws_env.endpoint]) as m:
        check_mounted_tree(m.mountpoint, weed[1])
        assert sorted(os.listdir(m.mountpoint / "sub dir")) == ["deeper", "na me #1%.txt"]  # marker not shown
