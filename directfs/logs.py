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


def setup_logging(level: str = "info", *, stream: object = None) -> None:
    """Configure the root logger once: console format on a terminal, a plain one (journald adds time) otherwise."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)  # type: ignore[arg-type]
    under_journal = bool(os.environ.get("JOURNAL_STREAM")) or bool(os.environ.get("INVOCATION_ID"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hpack", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
