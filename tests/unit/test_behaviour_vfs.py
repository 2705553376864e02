"""The filesystem behaviour suite (tests/support/behaviour.py) run by the FUSE-free driver: ``FileSystem`` and the
read engine called directly, over a file:// tree. The same behaviours run through a real mount in
tests/mount/test_behaviour_mount.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.behaviour import SHARED_TTL_SECONDS, Behaviour, Context, cases, shared_tree
from tests.support.fsdrivers import fresh_vfs, serve, vfs_driver


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    with shared_tree() as root:
        yield root


@pytest.fixture
async def context(tree: Path, tmp_path: Path) -> AsyncIterator[Context]:
    with serve(tree, "file") as store:
        async with vfs_driver(store, metadata_ttl_seconds=SHARED_TTL_SECONDS) as driver:
            yield Context(driver, tree, store, lambda root, ttl: fresh_vfs(root, "file", ttl), tmp_path)


@pytest.mark.parametrize("behaviour", cases("file"))
async def test_file_store(behaviour: Behaviour, context: Context) -> None:
    await behaviour(context)
