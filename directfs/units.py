"""Sizes and durations as people write them (``64M``, ``1.5G``, ``500ms``, ``5m``): one parser for every command,
the config file and the reference portal, so ``--block-size 4M`` means the same everywhere."""

from __future__ import annotations

import math
import re
from typing import Final

from .errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_POWERS: Final = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> int:
    """Bytes from ``"4096"``, ``"64K"``, ``"64M"``, ``"1.5G"``, ``"2TiB"``, ``"512KB"``; suffixes are binary
    (K = 1024: memory sizes, as ``free``/``ls -h`` use them). ConfigError on anything else."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"invalid size {text!r}: use a number of bytes or K/M/G/T (e.g. 64M, 1.5G, 512KiB)")
    number, unit, suffix = match.groups()
    if suffix and suffix.lower() == "ib" and not unit:
        raise ConfigError(f"invalid size {text!r}: 'iB' needs a unit (KiB, MiB, ...)")
    value = float(number) * 1024 ** _SIZE_POWERS[unit.lower()]
    if not math.isfinite(value) or value >= 2**63:
        raise ConfigError(f"size {text!r} is too large")
    if value != int(value):
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_SECONDS: Final = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration_seconds(text: str) -> float:
    """Seconds from ``"10"``, ``"2.5s"``, ``"500ms"``, ``"5m"``, ``"1h"``, ``"1d"``; ConfigError on anything else."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"invalid duration {text!r}: use seconds or a unit (500ms, 10s, 5m, 1h, 1d)")
    number, unit = match.groups()
    seconds = float(number) * _DURATION_SECONDS[unit.lower() if unit else None]
    if not math.isfinite(seconds):
        raise ConfigError(f"duration {text!r} is too large")
    return seconds


def format_size(size: int) -> str:
    """``size`` bytes the way ``parse_size`` reads them back, in the largest unit that keeps it whole (``"256M"``,
    ``"4K"``, ``"1000"``): how help texts and the README show a default."""
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if size and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """``seconds`` the way ``parse_duration_seconds`` reads them back, in the largest unit that keeps it whole
    (``"5s"``, ``"5m"``, ``"500ms"``)."""
    if not seconds:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        count = seconds / _DURATION_SECONDS[unit]
        if count == int(count):
            return f"{int(count)}{unit}"
    milliseconds = seconds * 1000
    if milliseconds == int(milliseconds):
        return f"{int(milliseconds)}ms"
    return f"{seconds:g}s"
