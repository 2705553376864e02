"""Option values that the flags, ``-o``, the environment and the config file (all through ``options``, the option
table) and the daemon accept: block sizes, S3 endpoint URLs and the metrics listen address.

They live here, beside ``units`` and below everything that reads them, so that ``options`` and ``config`` never
import ``commands`` and ``metrics`` never imports ``config``: imports run downward only (the layers contract in
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


# 18 digits: every such number fits an int64 (file sizes, offsets, lengths, seconds), and int() never sees the
# thousands of digits it refuses (Python's 4300-digit limit) or spends quadratic time on.
MAX_DECIMAL_DIGITS: Final = 18


def parse_decimal(text: str | bytes, *, max_digits: int = MAX_DECIMAL_DIGITS) -> int | None:
    """The non-negative integer that ``text`` spells in ASCII digits (surrounding whitespace allowed), or None.

    The one place a number from a header, a reply or an argument is read: ``str.isdigit()`` accepts ``"²"`` and
    ``"١"``, which ``int()`` then refuses with a ValueError, and any number of digits. No sign, no ``_``, no
    ``0x``: ``int()`` accepts those, HTTP does not."""
    text = text.strip()
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def parse_block_size(text: str) -> int:
    """Bytes of a block size (``"64K"``, ``"8M"``), within MIN_/MAX_BLOCK_SIZE_BYTES; ConfigError (the reason, without
    the value: the caller names the flag or key and shows the value) otherwise."""
    size = parse_size(text)
    if not MIN_BLOCK_SIZE_BYTES <= size <= MAX_BLOCK_SIZE_BYTES:
        raise ConfigError("a block size must be between 4K and 256M")
    return size


def shown_endpoint_url(text: str) -> str:
    """``text`` as an error message may show it: without userinfo or query, at most 100 characters."""
    return text.split("?", 1)[0].rsplit("@", 1)[-1][:100]


def parse_endpoint_url(text: str) -> str:
    """``http(s)://HOST[:PORT]`` (a trailing ``/`` is dropped); ConfigError for anything else. Credentials in it are
    refused (argv is visible to every user) and never echoed back (see ``shown_endpoint_url``)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text.strip())
        port = parts.port  # ValueError for a non-numeric or out-of-range port
    except ValueError:
        port, parts = -1, None
    if parts is None or port == -1 or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("expected http(s)://HOST[:PORT]")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("must not hold credentials: use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise ConfigError("expected http(s)://HOST[:PORT] without a path or query")
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class MetricsAddress:
    """Where the Prometheus endpoint listens. Loopback unless ``metrics_allow_remote`` says otherwise.

    Parsed by ``parse_metrics_address``; checked again by ``metrics.start_metrics_server``."""

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


def parse_metrics_address(value: object) -> MetricsAddress:
    """``HOST:PORT`` or ``[V6]:PORT`` (a bare ``PORT`` means 127.0.0.1:PORT); ValueError(reason) otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str) and value and "\x00" not in value and "\n" not in value:
        text = value
    elif isinstance(value, str) and value:
        raise ValueError("must not contain NUL or newline")
    else:
        raise ValueError("expected a non-empty string")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9567")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9567") from None
    if not 0 < port < 65536:
        raise ValueError("port must be between 1 and 65535")
    return MetricsAddress(host, port)
