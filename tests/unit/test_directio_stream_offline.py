"""``ByteRange``, the range argument of the Blocks and Streamer APIs, on its own (no server). The APIs against the
real block server: tests/component/test_directio_stream.py.
"""

from __future__ import annotations

import pytest

from directfs import ByteRange
from directfs.errors import ConfigError


def test_byte_range_validation() -> None:
    for bad in [(-1, None), (5, 4), (True, None), (0, 1.5), ("0", None)]:
        with pytest.raises(ConfigError):
            ByteRange(*bad)  # type: ignore[arg-type]
    assert ByteRange(3, 3).clamp(10) == (3, 4)
    assert ByteRange(3).clamp(3) is None
