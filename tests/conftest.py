"""Session-wide guard: no directfs mount left under pytest's temp folders, before or after the run.

A test process killed between mount and teardown (a CI timeout, a developer's Ctrl-C) can leave a FUSE mount whose
daemon is gone. pytest removes old temp folders at the end of a later session, and a stat into such a mount can block
that cleanup (or fail it). So the session starts and ends by detaching every directfs mount under the temp root.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mountd import directfs_mounts, force_unmount


def _clean_pytest_mounts() -> None:
    root = Path(tempfile.gettempdir()).resolve()
    for mountpoint, _ in directfs_mounts():
        relative = os.path.relpath(mountpoint, root)
        if not relative.startswith("..") and relative.split(os.sep, 1)[0].startswith("pytest-of-"):
            force_unmount(mountpoint)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mounts() -> Iterator[None]:
    _clean_pytest_mounts()
    yield
    _clean_pytest_mounts()
