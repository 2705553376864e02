"""The filesystem behaviour suite (tests/support/behaviour.py) run by the mount driver: plain os calls on a real
mount in a subprocess, of the same tree served two ways, file:// and ctera+http:// (the reference portal). The same
behaviours run without FUSE in tests/unit/test_behaviour_vfs.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.behaviour import SHARED_TTL_SECONDS, Behaviour, Context, cases, shared_tree
from tests.support.fsdrivers import MountDriver, Store, fresh_mount, mount_args, serve
from tests.support.mountd import Mount, fuse_available, mounted

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root"),
]


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    with shared_tree() as root:
        yield root


@pytest.fixture(scope="module")
def file_mount(tree: Path) -> Iterator[tuple[Store, Mount]]:
    with serve(tree, "file") as store, mounted(store.url, extra_args=mount_args(SHARED_TTL_SECONDS)) as m:
        yield store, m


@pytest.fixture(scope="module")
def ctera_mount(tree: Path) -> Iterator[tuple[Store, Mount]]:
    with (
        serve(tree, "ctera") as store,
        mounted(store.url, extra_args=mount_args(SHARED_TTL_SECONDS), env=store.env) as m,
    ):
        yield store, m


def context(tree: Path, served: tuple[Store, Mount], tmp_path: Path) -> Context:
    store, mount = served
    fresh = lambda root, ttl: fresh_mount(root, store.kind, ttl)  # noqa: E731
    return Context(MountDriver(mount.mountpoint), tree, store, fresh, tmp_path)


@pytest.mark.parametrize("behaviour", cases("file"))
async def test_file_store(behaviour: Behaviour, tree: Path, file_mount: tuple[Store, Mount], tmp_path: Path) -> None:
    await behaviour(context(tree, file_mount, tmp_path))


@pytest.mark.parametrize("behaviour", cases("ctera"))
async def test_ctera_store(behaviour: Behaviour, tree: Path, ctera_mount: tuple[Store, Mount], tmp_path: Path) -> None:
    await behaviour(context(tree, ctera_mount, tmp_path))
