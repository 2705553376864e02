"""A datagram socket the test owns, standing in for systemd's ``NOTIFY_SOCKET``."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def notify_listener(path: str, *, timeout_seconds: float = 5) -> Iterator[socket.socket]:
    """A bound ``AF_UNIX`` datagram socket at ``path``; ``recv`` gives up after ``timeout_seconds``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(timeout_seconds)
    with sock:
        yield sock
