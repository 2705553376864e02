"""Option values that the flags (``commands.common``), the config file (``config``) and the daemon all accept: block
sizes, S3 endpoint URLs and the metrics listen address.

They live here, beside ``units`` and below everything that reads them, so that ``config`` never imports
``commands`` and ``metrics`` never imports ``config``: imports run downward only (the layers contract in
pyproject.toml, checked by ``make lint``). Stdlib, ``errors`` and ``units`` only: every command imports this at
parse time.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from .errors import ConfigError
from .units import parse_size

# Bounds of --block-size (plain stores fetch and hold one block whole). Below 4 KiB (a page) every 128 KiB READ of
# the kernel would cost dozens of requests; above 256 MiB (the default --cache-size) one block fills the cache and a
# random 4 KiB read waits seconds for a block it mostly throws away.
MIN_BLOCK_SIZE_BYTES: Final = 4 * 1024
MAX_BLOCK_SIZE_BYTES: Final = 256 * 1024 * 1024


def parse_block_size(text: str, flag: str = "--block-size") -> int:
    """Bytes of a block size (``"64K"``, ``"8M"``), within MIN_/MAX_BLOCK_SIZE_BYTES; ConfigError otherwise."""
    size = parse_size(text)
    if not MIN_BLOCK_SIZE_BYTES <= size <= MAX_BLOCK_SIZE_BYTES:
        raise ConfigError(f"{flag} must be between 4K and 256M, not {text!r}")
    return size


def parse_endpoint_url(text: str, flag: str = "--endpoint-url") -> str:
    """``http(s)://HOST[:PORT]`` (a trailing ``/`` is dropped); ConfigError for anything else. Credentials in it are
    refused (argv is visible to every user) and never echoed back."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text.strip())
        port = parts.port  # ValueError for a non-numeric or out-of-range port
    except ValueError:
        port, parts = -1, None
    shown = text.split("?", 1)[0].rsplit("@", 1)[-1][:100]
    if parts is None or port == -1 or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{flag} wants http(s)://HOST[:PORT], not {shown!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{flag} must not hold credentials: use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise ConfigError(f"{flag} wants http(s)://HOST[:PORT] without a path or query, not {shown!r}")
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class MetricsAddress:
    """Where the Prometheus endpoint listens. Loopback unless ``metrics_allow_remote`` says otherwise.

    Parsed by ``config.parse_metrics_address``; checked again by ``metrics.start_metrics_server``."""

    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may resolve to anything, so it counts as remote

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
