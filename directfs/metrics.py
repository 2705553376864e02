"""Metrics of a running mount: FUSE request counters, and Prometheus exposition of what the engine already counts.

Nothing is counted twice. The read engine (``ReadEngine.statistics()``), its block cache and the filesystem
(``FileSystem.statistics()``) keep their own plain counters; :class:`DirectfsCollector` reads them *at scrape time*
and turns them into metric families. The only counters kept here are per-request FUSE counters and latencies
(:class:`OpStats`), which ``fuse_ops`` feeds from its error boundary.

Two ways out, both opt-out-free of the trio loop's timing:

- ``--metrics-address 127.0.0.1:PORT``: ``prometheus_client``'s HTTP server in its own thread
  (:func:`start_metrics_server`). Loopback only unless ``--metrics-allow-remote``: the numbers reveal file
  activity, and the endpoint has no authentication.
- Always: a control socket ``<runtime dir>/<hash of the mountpoint>.sock`` (mode 0600 in a 0700 folder) that
  answers every connection with the same exposition text and closes (:func:`serve_control_socket`, a trio task).
  ``directfs stats MOUNTPOINT`` finds it from the mountpoint alone, without a network flag. The socket reads
  nothing from its clients, so there is no request to parse and nothing to exploit. Runtime dir:
  ``$DIRECTFS_RUNTIME_DIR``, else ``/run/directfs`` for root, else ``$XDG_RUNTIME_DIR/directfs``, else
  ``/tmp/directfs-<uid>`` (created 0700 and refused if someone else owns it).

Concurrency: ``OpStats.record`` and the engine's counters are only written by the trio thread. The HTTP server's
thread only *reads*: ``dict.copy()``/``list.copy()`` of ints are single C calls under the GIL, so a scrape sees
each dict whole; a histogram's sum may lag its count by the one request being recorded at that instant, which is
harmless. Collectors never await, lock or call into trio objects. ``prometheus_client`` is imported only when an
exposition is built, so importing this module (from ``fuse_ops``) stays cheap.
"""

from __future__ import annotations

import bisect
import contextlib
import errno as errno_mod
import hashlib
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from .errors import ConfigError
from .values import MetricsAddress

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from .engine.reader import ReadStatistics
    from .http import HTTPStatistics

log = logging.getLogger(__name__)

PREFIX: Final = "directfs"
ENV_RUNTIME_DIR: Final = "DIRECTFS_RUNTIME_DIR"

# FUSE request latency buckets (seconds): 100 µs is a request answered from memory (one FUSE round trip costs ~80 µs,
# docs/testbed.md §3); 1-100 ms are block fetches; 25-30 s is the per-read retry budget (docs/design-notes.md §5).
LATENCY_BUCKETS_SECONDS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# How long `directfs stats` waits for the daemon's answer: it is built from counters in memory, so a second means
# the daemon is wedged; 5 s leaves room for a loaded machine.
CONTROL_TIMEOUT_SECONDS: Final = 5.0


def errno_label(code: int) -> str:
    """``"ok"`` for success, else the errno's symbolic name (``ENOENT``): stable across kernels, readable."""
    if code == 0:
        return "ok"
    return errno_mod.errorcode.get(code, str(code))


class _Latency:
    __slots__ = ("buckets", "sum_seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)  # the last one is +Inf
        self.sum_seconds = 0.0


class OpStats:
    """Counters of FUSE requests: ``(op, errno label) -> count`` and a latency histogram per op.

    Written only by the trio thread (``record``); read by any thread through ``snapshot`` (see the module docstring).
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _Latency] = {}

    def record(self, op: str, code: int, seconds: float) -> None:
        key = (op, errno_label(code))
        self._counts[key] = self._counts.get(key, 0) + 1
        latency = self._latency.get(op)
        if latency is None:
            latency = self._latency[op] = _Latency()
        latency.buckets[bisect.bisect_left(LATENCY_BUCKETS_SECONDS, seconds)] += 1
        latency.sum_seconds += seconds

    def counts(self) -> dict[tuple[str, str], int]:
        return self._counts.copy()

    def latencies(self) -> dict[str, tuple[list[int], float]]:
        """op -> (per-bucket counts, the last one +Inf; sum of seconds)."""
        return {op: (lat.buckets.copy(), lat.sum_seconds) for op, lat in self._latency.copy().items()}


@dataclass(frozen=True)
class Sources:
    """Where the collector reads its numbers; each callable returns a fresh snapshot and never blocks."""

    read_statistics: Callable[[], ReadStatistics] | None = None
    vfs_statistics: Callable[[], Mapping[str, int]] | None = None
    write_statistics: Callable[[], Mapping[str, int]] | None = None  # --rw: directfs.writeback.WriteBack
    op_stats: OpStats | None = None
    http: Callable[[], HTTPStatistics] | None = None  # the HTTP layer's attempt/retry counts
    # The change-feed follower's counters and state (directfs.sources.ctera.feed.PortalFeed.statistics); None: no
    # feed for this mount (--change-feed off, or a store without one).
    feed_statistics: Callable[[], Mapping[str, float | str]] | None = None


class DirectfsCollector:
    """A ``prometheus_client`` custom collector over :class:`Sources` (registered with ``registry.register``)."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []  # dynamic: a registry must not call collect() at registration (it would before the mount is up)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        ops = self.sources.op_stats
        if ops is not None:
            requests = CounterMetricFamily(
                f"{PREFIX}_fuse_requests",
                "FUSE requests answered, by operation and errno (ok = success)",
                labels=["op", "errno"],
            )
            for (op, code), count in sorted(ops.counts().items()):
                requests.add_metric([op, code], count)
            yield requests
            latency = HistogramMetricFamily(
                f"{PREFIX}_fuse_request_duration_seconds", "Time to answer a FUSE request", labels=["op"]
            )
            for op, (buckets, total) in sorted(ops.latencies().items()):
                cumulative, running = [], 0
                for bound, count in zip((*LATENCY_BUCKETS_SECONDS, float("inf")), buckets, strict=True):
                    running += count
                    cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
                latency.add_metric([op], cumulative, total)
            yield latency

        if self.sources.read_statistics is not None:
            s = self.sources.read_statistics()
            c = s.cache
            yield counter("reads", "read() calls answered by the read engine", s.reads)
            yield counter("read_bytes_served", "Bytes returned to readers", s.bytes_served)
            yield counter(
                "read_bytes_fetched", "Plaintext bytes fetched from the store (demand + prefetch)", s.bytes_fetched
            )
            amplification = s.bytes_fetched / s.bytes_served if s.bytes_served else 0.0
            yield gauge(
                "read_amplification_ratio", "Bytes fetched per byte served since start (1 = no waste)", amplification
            )
            yield counter("cache_hits", "Block reads answered from the cache", c.hits)
            yield counter("cache_misses", "Block reads that waited for a fetch", c.misses)
            yield counter("cache_evictions", "Blocks dropped from the cache to make room", c.evictions)
            yield counter(
                "cache_dropped_behind",
                "Blocks a sequential reader finished, dropped (the page cache has them)",
                c.dropped_behind,
            )
            yield counter("cache_joined_misses", "Misses that joined a fetch already in flight", c.joined_misses)
            yield gauge("cache_size_bytes", "Bytes of decrypted blocks cached now", c.size_bytes)
            yield gauge("cache_capacity_bytes", "Cache capacity", c.capacity_bytes)
            yield gauge("cache_entries", "Blocks cached now", c.entries)
            yield gauge("fetches_in_flight", "Block fetches running now (demand and prefetch)", c.inflight_fetches)
            yield counter("fetches_started", "Block fetches started", c.fetches_started)
            yield counter("fetches_failed", "Block fetches that failed", c.failed_fetches)
            yield counter("fetch_fast_failures", "Reads answered with a remembered recent failure", c.fast_failures)
            yield counter("prefetch_issued", "Blocks prefetched", s.prefetch_issued)
            yield counter("prefetch_used", "Prefetched blocks that were read", s.prefetch_used)
            yield counter("prefetch_wasted", "Prefetched blocks dropped unread", s.prefetch_wasted)
            yield counter("prefetch_cancelled", "Wasted prefetches cancelled while running", s.prefetch_cancelled)
            yield gauge("prefetch_outstanding", "Prefetched blocks not yet read or dropped", s.prefetch_outstanding)
            yield counter("prefetch_window_resets", "Read-ahead windows reset by a random read", s.window_resets)
            yield gauge("prefetch_reserved_bytes", "Prefetch budget in use", s.gate.reserved_bytes)
            yield gauge("prefetch_budget_bytes", "Prefetch budget", s.gate.budget_bytes)
            yield gauge("open_readers", "Open file readers", s.open_readers)
            if s.disk is not None:  # --disk-cache (directfs.engine.diskcache): this process's view of DIR
                d = s.disk
                yield counter("disk_cache_hits", "Blocks read from the disk cache instead of the store", d.hits)
                yield counter("disk_cache_misses", "Disk cache lookups that found no usable file", d.misses)
                yield counter("disk_cache_writes", "Blocks written to the disk cache", d.writes)
                yield counter(
                    "disk_cache_written_bytes", "Bytes written to the disk cache (headers included)", d.written_bytes
                )
                yield counter(
                    "disk_cache_skipped_writes",
                    "Blocks not written (queue full, no free space, write error)",
                    d.skipped_writes,
                )
                yield counter(
                    "disk_cache_evictions", "Disk cache files removed to stay under size and free space", d.evictions
                )
                yield counter(
                    "disk_cache_corrupt", "Damaged disk cache files deleted (the block was fetched again)", d.corrupt
                )
                yield counter("disk_cache_read_errors", "I/O errors reading disk cache files", d.read_errors)
                yield gauge(
                    "disk_cache_size_bytes", "Bytes in the disk cache folder, as this process knows it", d.size_bytes
                )
                yield gauge("disk_cache_capacity_bytes", "Disk cache size bound (--disk-cache-size)", d.capacity_bytes)
                yield gauge("disk_cache_entries", "Files in the disk cache folder, as this process knows it", d.entries)

        if self.sources.vfs_statistics is not None:
            v = dict(self.sources.vfs_statistics())
            calls = CounterMetricFamily(
                f"{PREFIX}_source_calls", "Metadata calls to the store (Portal PROPFIND/stat/open)", labels=["kind"]
            )
            for kind in ("stat", "list", "open"):
                if kind in v:
                    calls.add_metric([kind], v[kind])
            yield calls
            if "invalidations" in v:
                yield counter(
                    "kernel_invalidations", "Kernel page-cache invalidations of changed files", v["invalidations"]
                )
            for key, doc in (
                ("inodes", "Inodes known to the kernel"),
                ("open_files", "Open file handles"),
                ("open_dirs", "Open folder handles"),
                ("cached_listings", "Folder listings cached"),
                ("negative_names", "Names cached as absent"),
            ):
                if key in v:
                    yield gauge(key, doc, v[key])

        if self.sources.write_statistics is not None:
            w = dict(self.sources.write_statistics())
            yield counter("uploads", "Files uploaded (--rw)", w["uploads"])
            yield counter("upload_bytes", "Bytes uploaded", w["upload_bytes"])
            yield counter(
                "upload_failures", "Uploads that failed and were kept in the spool's failed/", w["upload_failures"]
            )
            yield counter("spools_recovered", "Spool files of a previous daemon found at mount", w["recovered"])
            yield gauge("failed_kept", "Files kept in the spool's failed/ folder", w["failed_kept"])
            yield gauge("spools", "Files being written (spool files)", w["spools"])
            yield gauge("spooled_bytes", "Bytes in spool files", w["spooled_bytes"])
            yield gauge("dirty_spools", "Spool files not uploaded yet", w["dirty"])

        if self.sources.feed_statistics is not None:
            yield from self._feed(dict(self.sources.feed_statistics()))

        if self.sources.http is not None:
            h = self.sources.http()
            yield counter(
                "http_attempts", "HTTP attempts (Portal, listing and storage), first tries included", h.attempts
            )
            yield counter("http_retries", "HTTP attempts retried (timeouts, resets, 5xx, 429)", h.retries)
            yield counter("http_gave_up", "HTTP operations that failed after their retries or budget", h.gave_up)

    @staticmethod
    def _feed(f: dict[str, float | str]) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def number(key: str) -> float:
            value = f.get(key, 0.0)
            return value if isinstance(value, float | int) else 0.0

        yield GaugeMetricFamily(
            f"{PREFIX}_feed_up", "1 while the change feed is followed and caught up (long TTL), else 0", number("up")
        )
        state = GaugeMetricFamily(
            f"{PREFIX}_feed_state", "The change feed's state (1 for the current one)", labels=["state"]
        )
        state.add_metric([str(f.get("state", "stopped"))], 1.0)
        yield state
        for key, doc in (
            ("events", "Change-feed events received and applied"),
            ("replayed", "Change-feed events of a replay from a null cursor (history: counted, not applied)"),
            ("invalidations", "Cache records (attributes, listings, negative names) dropped for change-feed events"),
            ("lists", "Change-feed list calls"),
            ("longpolls", "Change-feed long-polls"),
            ("failures", "Change-feed calls that failed (transport, deadline, status, bad reply)"),
            ("downs", "Times the change feed went down after being up"),
            ("resets", "Cursors the Portal refused: every cache dropped, a new cursor started"),
            ("unusable", "Change-feed entries without a usable guid (each batch of them drops every cache)"),
        ):
            yield CounterMetricFamily(f"{PREFIX}_feed_{key}", doc, value=number(key))
        yield GaugeMetricFamily(
            f"{PREFIX}_feed_lag_seconds",
            "From the Portal's time of the newest change of the last batch to its invalidation here (NaN: none yet)",
            number("lag_seconds"),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_feed_last_reply_seconds",
            "Seconds since the Portal last answered the change feed (NaN: never)",
            number("last_reply_seconds"),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_feed_state_seconds", "Seconds in the current change-feed state", number("state_seconds")
        )


def build_registry(sources: Sources) -> CollectorRegistry:
    """A registry holding only directfs's collector (no process/platform collectors: one daemon, one set of names)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DirectfsCollector(sources))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)


# --- the HTTP endpoint ---------------------------------------------------------------------------------------------


class MetricsServer:
    """The running HTTP endpoint; ``close()`` stops it (idempotent)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


def start_metrics_server(host: str, port: int, registry: CollectorRegistry, *, allow_remote: bool) -> MetricsServer:
    """Serve ``registry`` on http://host:port/metrics in a thread. Refuses a non-loopback host unless allowed."""
    from prometheus_client import start_http_server

    address = MetricsAddress(host, port)
    if not address.is_loopback and not allow_remote:
        raise ConfigError(
            f"--metrics-address {address}: not a loopback address; the endpoint has no authentication and shows "
            "file activity, so pass --metrics-allow-remote to serve it beyond this machine"
        )
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"--metrics-address {address}: cannot listen: {exc.strerror or exc}") from None
    log.info("metrics on http://%s/metrics", MetricsAddress(host, server.server_address[1]))
    return MetricsServer(server, thread)


# --- the control socket ------------------------------------------------------------------------------------------


def runtime_dir(env: Mapping[str, str] = os.environ) -> str:
    """Where control sockets live (see the module docstring); not created here."""
    if env.get(ENV_RUNTIME_DIR):
        return env[ENV_RUNTIME_DIR]
    if os.geteuid() == 0:
        return "/run/directfs"
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "directfs")
    return f"/tmp/directfs-{os.geteuid()}"  # noqa: S108 - created 0700 and ownership-checked in _private_dir


def control_socket_path(mountpoint: str, env: Mapping[str, str] = os.environ) -> str:
    """The control socket of the mount at ``mountpoint`` (the same path for any spelling of it)."""
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(runtime_dir(env), f"{digest}.sock")


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(f"runtime folder {path} must be a folder owned by uid {os.geteuid()} with mode 0700")


def bind_control_socket(path: str) -> socket.socket:
    """A listening AF_UNIX socket at ``path``, mode 0600; a stale socket file (no one listening) is replaced."""
    _private_dir(os.path.dirname(path))
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by a daemon that died
        else:
            raise ConfigError(f"another daemon already serves this mountpoint (control socket {path} answers)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # before listen(): no one can connect while it is wider
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_control_socket(
    listener: socket.socket,
    render: Callable[[], bytes],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer each connection to ``listener`` with ``render()`` and close it; runs until cancelled, then removes
    the socket file. One client at a time: an answer takes microseconds, and a slow reader costs only itself
    (each send has a deadline)."""
    path = listener.getsockname()
    trio_listener = trio.socket.from_stdlib_socket(listener)
    task_status.started()
    try:
        with trio_listener:
            while True:
                conn, _ = await trio_listener.accept()
                with conn, trio.move_on_after(CONTROL_TIMEOUT_SECONDS):
                    try:
                        data = memoryview(render())
                        while data:
                            sent = await conn.send(data)
                            data = data[sent:]
                    except OSError as exc:
                        log.debug("control socket client went away: %s", exc)
    finally:
        with contextlib.suppress(OSError):  # already gone: nothing to clean up
            os.unlink(path)


def read_control_socket(path: str, *, timeout_seconds: float = CONTROL_TIMEOUT_SECONDS) -> str:
    """The exposition text a daemon's control socket answers (blocking; for ``directfs stats``)."""
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_seconds)
        sock.connect(path)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8")
