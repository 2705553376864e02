"""Nearline data (tape libraries, archive tiers): recognise "not online yet" answers and wait for staging.

A nearline store answers a read of data that is still on tape with one of:

* HTTP 503 with ``Retry-After`` (dCache, tape front ends, HTTP archive gateways): "come back in N seconds";
* HTTP 403 with the S3 error code ``InvalidObjectState`` (archive storage classes, tape-backed S3 gateways).

A plain 503 *without* ``Retry-After`` is an overloaded server, not staging: the ordinary retry policy of
``directfs.http`` handles it. A staging answer makes the read wait and ask again, until the data comes or the staging
deadline (``SourceOptions.staging_deadline_seconds``) would be passed; then ``DataNotOnlineError`` (ETIMEDOUT).
We fail *before* sleeping past the deadline: a Retry-After beyond it cannot succeed in time, and an early clear
error beats a late one.

Concurrency: a :class:`StagingWait` belongs to one read (one task); the policy is immutable and shared. Only trio
time is used, so tests drive long stagings with trio's autojump clock.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import trio

from ..errors import ConfigError
from ..http import parse_retry_after

log = logging.getLogger(__name__)

# The S3 error code of an object in an archive tier (Glacier-like classes, tape-backed S3 gateways).
S3_NOT_ONLINE_CODE: Final = b"<Code>InvalidObjectState</Code>"

# How much of an error body is read to classify it: S3 error documents are a few hundred bytes.
ERROR_BODY_BYTES: Final = 4096


@dataclass(frozen=True)
class StagingPolicy:
    """How long and how often a read waits for nearline data."""

    deadline_seconds: float = 300.0  # the default of SourceOptions.staging_deadline_seconds; see there
    # Polling when the store names no time (S3 InvalidObjectState): start after 1 s (a disk-cache hit on the tape
    # system is that fast) and double up to 30 s, so a recall of minutes costs a dozen requests, not hundreds.
    poll_min_seconds: float = 1.0
    poll_max_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.deadline_seconds < 0 or not 0 < self.poll_min_seconds <= self.poll_max_seconds:
            raise ConfigError("staging deadline must be >= 0 and 0 < poll_min <= poll_max")


def not_online_hint(status: int, headers: Mapping[str, str], body: bytes | bytearray) -> float | None:
    """Seconds the store asks us to wait when its reply means "not online yet"; 0.0 when it names no time
    (poll with backoff); None when the reply is anything else."""
    if status == 503:
        return parse_retry_after(headers.get("retry-after"))
    if status == 403 and S3_NOT_ONLINE_CODE in body:
        return 0.0
    return None


class StagingWait:
    """The waiting of one read: started at the first "not online" answer, bounded by the policy's deadline."""

    def __init__(self, policy: StagingPolicy, what: str) -> None:
        self._policy = policy
        self._what = what  # a path, safe to log
        self._deadline = trio.current_time() + policy.deadline_seconds
        self._polls = 0
        self.waited_seconds = 0.0

    async def wait(self, hint_seconds: float) -> bool:
        """Sleep as the store asked (or by backoff when ``hint_seconds`` is 0); False, without sleeping, when that
        would pass the deadline."""
        if hint_seconds > 0:
            delay = hint_seconds
        else:
            delay = min(self._policy.poll_max_seconds, self._policy.poll_min_seconds * 2**self._polls)
        self._polls += 1
        if trio.current_time() + delay > self._deadline:
            log.info(
                "%s: still not online after %.0f s (staging deadline %.0f s)",
                self._what,
                self.waited_seconds,
                self._policy.deadline_seconds,
            )
            return False
        if self._polls == 1:
            log.info("%s: not online yet (nearline), waiting for staging", self._what)
        await trio.sleep(delay)
        self.waited_seconds += delay
        return True
