"""directfs.transfer without a server: what ``BlockingGetter`` refuses before any connection. Its GETs against real
servers on 127.0.0.1: tests/component/test_transfer.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from directfs.http import HTTPSettings
from directfs.transfer import BlockingGetter


def test_missing_ca_file_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        BlockingGetter(HTTPSettings(ca_file=str(tmp_path / "missing.pem")))
