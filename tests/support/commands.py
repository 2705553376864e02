"""Helpers for the tests of the store commands (``directfs ls``, ``cp``, ``stage``, ``get``) run in-process.

Used by the three tiers of those tests (tests/unit/test_cli_store_offline.py, tests/component/test_cli_store_servers.py,
tests/mount/test_cli_store.py; tests/unit/test_cli_get_args.py and tests/component/test_cli_get.py). The test modules
keep thin fixtures that call these, so each piece of setup has this one home.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from directfs import cli
from tests.support.seaweed import SeaweedFS, start_seaweed
from tests.support.sourcetree import make_tree

BUCKET = "cli-test"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def isolate_cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ambient config file or DIRECTFS_* / AWS_* variables leak into a test."""
    for name in list(os.environ):
        if name.startswith(("DIRECTFS_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def tree_in(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """``make_tree`` under ``tmp_path/tree``: the folder and its files (path -> content)."""
    root = tmp_path / "tree"
    root.mkdir()
    return root, make_tree(root)


@contextmanager
def seeded_bucket(workdir: Path) -> Iterator[tuple[SeaweedFS, dict[str, bytes]]]:
    """SeaweedFS with bucket ``BUCKET`` holding ``make_tree`` under ``data/``: the server and the files."""
    with start_seaweed(workdir, buckets=(BUCKET,)) as s3:
        client: Any = s3.client()
        files = make_tree(workdir / "tree")
        for rel, data in files.items():
            client.put_object(Bucket=BUCKET, Key=f"data/{rel}", Body=data)
        yield s3, files


def use_s3_keys(monkeypatch: pytest.MonkeyPatch, s3: SeaweedFS) -> SeaweedFS:
    """``s3``'s credentials in this process's environment (AWS_*), as a user's shell would hold them."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


@contextmanager
def private_umask() -> Iterator[None]:
    """Secret files written 0600, as an admin would: a readable one draws a warning (issue 13 L5)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)
