"""systemd readiness (``Type=notify``) without libsystemd: one AF_UNIX datagram per message to ``$NOTIFY_SOCKET``.

Protocol (sd_notify(3)): newline-separated ``KEY=VALUE`` assignments in one datagram. ``READY=1`` when the mount is
live, ``STOPPING=1`` when shutdown begins, ``STATUS=...`` for ``systemctl status``. An address starting with ``@`` is
in the abstract namespace (the ``@`` becomes a NUL byte). Without ``$NOTIFY_SOCKET`` every call does nothing, so the
daemon is the same program under systemd, in a container and in a terminal.

"Live" means a stat of the mountpoint from another thread is answered by *our* filesystem: ``READY=1`` sent right
after ``pyfuse3.init`` would race the request loop, and units ordered ``After=`` this one would start against a
mountpoint that still shows the folder underneath. :func:`announce_when_live` runs as a task beside
``pyfuse3.main``: the stat goes to a worker thread (a stat from the trio thread would wait for an answer only the
trio thread can give), and it is retried until the kernel reports the FUSE mount or the deadline passes.

A failure to notify is logged, never raised: systemd's own start timeout is the authority on a daemon that never
says ready, and a broken notify socket must not take a working mount down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Final

import trio

from .errors import DirectFSError

log = logging.getLogger(__name__)

ENV_NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"

# How long the mount may take to answer its first stat: the kernel delivers it as soon as pyfuse3.main runs, so
# seconds mean something is wrong; 30 s stays well inside systemd's default TimeoutStartSec (90 s).
LIVE_DEADLINE_SECONDS: Final = 30.0
# Pause between stat attempts while the mountpoint still shows the folder underneath (init has not finished).
LIVE_POLL_SECONDS: Final = 0.02


class Notifier:
    """Sends sd_notify messages to one socket address (None: every call is a no-op). Thread-safe, never raises."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        return cls(env.get(ENV_NOTIFY_SOCKET))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode("utf-8", "surrogateescape")
        return self.address

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines (keys upper-cased); whether it was sent."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")  # a newline would start a new assignment
            lines.append(f"{key.upper()}={text}")
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self._target())
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address, exc.strerror or exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"ready": 1, "mainpid": os.getpid()}
        if status:
            fields["status"] = status
        return self.send(**fields)

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"stopping": 1}
        if status:
            fields["status"] = status
        return self.send(**fields)

    def status(self, text: str) -> bool:
        return self.send(status=text)


def _is_live(mountpoint: str) -> bool:
    """Whether ``mountpoint`` is a mount answering stat (its device differs from its parent's). Blocking."""
    here = os.stat(mountpoint)
    parent = os.stat(os.path.join(mountpoint, ".."))
    return here.st_dev != parent.st_dev


async def wait_until_live(
    mountpoint: str,
    *,
    deadline_seconds: float = LIVE_DEADLINE_SECONDS,
    is_live: Callable[[str], bool] = _is_live,
) -> None:
    """Return once a stat of ``mountpoint`` (in a worker thread) is answered by the mount; DirectFSError (EIO)
    after ``deadline_seconds``. A stat error (e.g. ENOTCONN) is retried until the deadline too."""
    last_error = "the mountpoint still shows the folder underneath"
    with trio.move_on_after(deadline_seconds):
        while True:
            try:
                # abandon_on_cancel: a stat stuck in the kernel must not hold up the deadline or shutdown.
                if await trio.to_thread.run_sync(is_live, mountpoint, abandon_on_cancel=True):
                    return
            except OSError as exc:
                last_error = exc.strerror or str(exc)
            await trio.sleep(LIVE_POLL_SECONDS)
    raise DirectFSError(f"the mount at {mountpoint} did not answer stat within {deadline_seconds:g} s: {last_error}")


async def announce_when_live(
    mountpoint: str,
    notifier: Notifier,
    *,
    on_live: Callable[[], None] | None = None,
    status: str | None = None,
    deadline_seconds: float = LIVE_DEADLINE_SECONDS,
    is_live: Callable[[str], bool] = _is_live,
) -> None:
    """Wait until the mount answers stat, then call ``on_live`` (e.g. the --ready-fd pipe) and send ``READY=1``.
    Run it as a nursery task beside ``pyfuse3.main``; a timeout raises (the mount is not working: fail the unit)."""
    await wait_until_live(mountpoint, deadline_seconds=deadline_seconds, is_live=is_live)
    if on_live is not None:
        on_live()
    notifier.ready(status or f"serving {mountpoint}")
