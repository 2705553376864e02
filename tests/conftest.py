"""Session-wide guard: no directfs mount left under pytest's temp folders, before or after the run.

A test process killed between mount and teardown (a CI timeout, a developer's Ctrl-C) can leave a FUSE mount whose
daemon is gone. pytest removes old temp folders at the end of a later session, and a stat into such a mount can block
that cleanup (or fail it). So the session starts and ends by detaching every directfs mount under the temp root.
"""

from __future__ import annotations

import logging
import os
import re
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


# --- log check (after s3ql's pytest_checklogs.py) ---------------------------------------------------------------------
# A WARNING or ERROR logged by directfs in the test process fails the test, unless the test declares it:
# ``@pytest.mark.expected_logs(r"regex", ...)`` (each pattern is searched in the formatted message), or the test takes
# ``caplog`` and so checks its own log records. Logs of daemons run as subprocesses are not seen here.


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def check_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    handler = _Collect()
    logger = logging.getLogger("directfs")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if "caplog" in request.fixturenames:
        return
    expected = [re.compile(p) for m in request.node.iter_markers("expected_logs") for p in m.args]
    unexpected = [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in handler.records
        if not any(p.search(r.getMessage()) for p in expected)
    ]
    if unexpected:
        pytest.fail(
            "unexpected WARNING/ERROR logs (declare them with @pytest.mark.expected_logs):\n" + "\n".join(unexpected)
        )
