"""Logging setup shared by every command: one format, levels, and no secrets.

httpx logs every request at INFO with the full URL, which for a presigned block URL includes its signature (a bearer
credential for up to 24 h). Its loggers are therefore held at WARNING, and a filter on our handler strips query
strings from any URL that still reaches a log line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable

LEVELS = ("debug", "info", "warning", "error")
_URL_QUERY = re.compile(r"(https?://[^\s?#\"'<>]+)\?[^\s\"'<>]*")


class RedactingFilter(logging.Filter):
    """Drop the query of any http(s) URL in a formatted message (presigned URL signatures, tokens in queries)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _URL_QUERY.sub(r"\1?<redacted>", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# syslog priorities (sd-daemon(3)): journald reads a "<N>" prefix on each stderr line as the entry's priority.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Under systemd: ``<priority>name: message`` (journald adds the time and unit; ``journalctl -p warning``
    filters by the priority). Continuation lines of a traceback get the same prefix, so they keep the priority."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def setup_logging(level: str = "info", *, stream: object = None) -> None:
    """Configure the root logger once: console format on a terminal, a plain one (journald adds time) otherwise."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)  # type: ignore[arg-type]
    under_journal = bool(os.environ.get("JOURNAL_STREAM")) or bool(os.environ.get("INVOCATION_ID"))
    if under_journal:
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimitFilter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hpack", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- repeats: rate limit by message template -----------------------------------------------------------------------

# A dead store fails every read the same way; 20 lines a minute per message shape say so without flooding the
# journal (journald's own default burst limit is 10,000 lines per 30 s per unit, which would drop everything else).
RATE_LIMIT_PER_MINUTE = 20
RATE_LIMIT_WINDOW_SECONDS = 60.0


class RateLimitFilter(logging.Filter):
    """At most ``per_window`` records per ``(logger, level, msg template)`` in each window; the first record after a
    window that dropped some says how many (``"... (suppressed 123 similar messages in the last 60 s)"``).

    Keyed by the template (``record.msg`` before %-formatting), so "read failed: inode %d" with different inodes
    counts as one kind of message. Records at ERROR and above are limited too: they repeat the same way. Thread-safe
    (logging calls it under the handler's lock); ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        per_window: int = RATE_LIMIT_PER_MINUTE,
        window_seconds: float = RATE_LIMIT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.per_window = per_window
        self.window_seconds = window_seconds
        self._clock = clock
        # key -> [window start, passed in this window, suppressed in this window]
        self._windows: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_seconds:
            suppressed = int(window[2]) if window is not None else 0
            self._windows[key] = [now, 1, 0]
            if len(self._windows) > 10_000:  # bound memory: forget the oldest shapes
                for old in list(self._windows)[:1000]:
                    del self._windows[old]
            if suppressed:
                record.msg = f"{record.getMessage()} (suppressed {suppressed} similar messages in the last "
                record.msg += f"{self.window_seconds:g} s)"
                record.args = None
            return True
        if window[1] < self.per_window:
            window[1] += 1
            return True
        window[2] += 1
        return False


# --- SIGUSR1: dump the trio task tree -------------------------------------------------------------------------------


def format_task_tree() -> str:
    """Every trio task of the current run with where it is waiting, indented by nursery (call from trio)."""
    import traceback

    import trio

    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        lines.append(f"{'  ' * depth}task {task.name}")
        frames = [frame for frame, _ in task.iter_await_frames()]
        for entry in traceback.StackSummary.extract((f, f.f_lineno) for f in frames):
            lines.append(f"{'  ' * depth}  {entry.filename}:{entry.lineno} in {entry.name}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)  # type: ignore[arg-type]
    return "\n".join(lines)


async def dump_tasks_on_sigusr1() -> None:
    """Log the task tree at WARNING each time SIGUSR1 arrives (``kill -USR1 PID``); runs until cancelled."""
    import signal

    import trio

    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            logging.getLogger("directfs.tasks").warning("SIGUSR1: trio tasks\n%s", format_task_tree())
