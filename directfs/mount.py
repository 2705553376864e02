"""Mount lifecycle: stale-mount cleanup, pyfuse3 init/main under trio, kernel tuning, signals, readiness, unmount.

Order of a mount (``run_mount``)::

    clean a dead mountpoint (fusermount3 -uz)     a crashed daemon leaves ENOTCONN behind
    build the source, stat its root              wrong URL/credentials fail here, before anything is mounted
    trio.run:
      nursery: read engine, invalidation drain, signal watcher
      --change-feed on: follow the source's change feed until it is caught up (failing: the mount fails)
      pyfuse3.init(ro, default_permissions, fsname=directfs:<url>, subtype=directfs[, allow_other])
      raise bdi read_ahead_kb to 1024            1 MiB READs, not 128 KiB (docs/testbed.md §3); root only, else warns
      report "ready" on --ready-fd
      --change-feed auto: follow the change feed in the background, where the source has one
      pyfuse3.main(max_tasks=MAX_TASKS)           returns when someone unmounts us
    SIGTERM/SIGINT: cancel the nursery (stops the request loop and in-flight work), close handles,
    pyfuse3.close(unmount=True), exit 0.

``max_read`` is never passed: with pyfuse3 3.5 it kills the daemon at init (docs/testbed.md §3); 1 MiB READs
come from the bdi read-ahead and max_pages instead.

Daemon mode (``spawn_daemon``): the command re-executes itself with ``-f --ready-fd N`` in a new session and waits
on the pipe for ``ready`` or ``error: <reason>``, so ``directfs mount`` returns only once the mount is live (or fails
with the reason), and ``ls MOUNTPOINT`` right after it never races the daemon.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import trio

from . import http, metrics
from .engine.allocator import tune_allocator
from .engine.diskcache import DiskCacheSettings, DiskTier, open_disk_cache
from .engine.reader import ReadEngine, ReadSettings
from .errors import ConfigError, DirectFSError, NamespaceTimeout, ours_only
from .logs import dump_tasks_on_sigusr1
from .notify import Notifier
from .sources.base import ChangeFeed, ChangeFollower, ChangeSink, Preparable, Source, SourceOptions, Writable
from .vfs import VfsSettings
from .writeback import WriteBack, WriteSettings, default_spool_dir

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

# pyfuse3 worker tasks: by default only one READ runs at a time (docs/testbed.md §3: 16 tasks took 393 -> 1645 MB/s
# with 2 ms backend latency). 32 covers the kernel's 12 background READs plus metadata requests with headroom;
# an idle task costs a few KiB.
MAX_TASKS: Final = 32
MIN_TASKS: Final = 4

# 1 MiB: the largest READ the kernel sends (max_pages=256); more only lengthens the kernel's own read-ahead.
READ_AHEAD_KB: Final = 1024

# How long the parent of a daemon waits for "ready": the root stat has a 20 s deadline, plus process start-up.
DAEMON_READY_TIMEOUT_SECONDS: Final = 60.0


@dataclass(frozen=True)
class MountConfig:
    source_url: str
    mountpoint: str
    source_options: SourceOptions = field(default_factory=SourceOptions)
    vfs_settings: VfsSettings = field(default_factory=VfsSettings)
    write_settings: WriteSettings = field(default_factory=WriteSettings)
    cache_size_bytes: int | None = None  # None: the read engine's default
    read_ahead_max_bytes: int | None = None
    allow_other: bool = False
    ready_fd: int | None = None
    metrics_address: tuple[str, int] | None = None  # opt-in Prometheus endpoint (directfs.metrics)
    metrics_allow_remote: bool = False
    # auto: follow the source's change feed when it has one and it answers (CTERA Portals), the short TTL otherwise;
    # a mount is then both fresher and cheaper than polling, and nothing breaks where there is no feed.
    change_feed: Literal["on", "off", "auto"] = "auto"
    disk_cache: DiskCacheSettings = field(default_factory=DiskCacheSettings)  # --disk-cache (off: no directory)


# --- mountpoint helpers ------------------------------------------------------------------------------------------


def _unescape_mountinfo(field_text: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out = bytearray()
    raw = field_text.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) + 1 and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def resolved_mountpoint(path: str) -> str:
    """``path`` with symlinks resolved in its parent only: resolving the last component would stat the mountpoint,
    which from inside the daemon deadlocks (the kernel waits for a reply the blocked daemon cannot send)."""
    absolute = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def mount_device(mountpoint: str) -> tuple[int, int] | None:
    """``(major, minor)`` of the mount at ``mountpoint`` from /proc/self/mountinfo, or None if not mounted.

    Read from mountinfo, never with stat: a stat of our own mountpoint from the daemon's trio thread would wait for
    a reply only that thread can send.
    """
    target = resolved_mountpoint(mountpoint)
    found: tuple[int, int] | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as lines:
            for line in lines:
                fields = line.split(" ")
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                    major, _, minor = fields[2].partition(":")
                    found = (int(major), int(minor))  # the last one wins: it is the mount on top
    except OSError:
        return None
    return found


def _fusermount(*flags: str, mountpoint: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", *flags, mountpoint], capture_output=True, text=True, timeout=30, check=False)


def clean_stale_mountpoint(mountpoint: str) -> None:
    """If a dead daemon left ``mountpoint`` answering ENOTCONN, detach it (``fusermount3 -uz``); refuse a live mount.

    The probe is statfs: the kernel may answer stat of a dead mount's root from its attribute cache, but never
    statfs, which always goes to the daemon.
    """
    try:
        os.stat(mountpoint)
        if mount_device(mountpoint) is not None:
            os.statvfs(mountpoint)
            raise ConfigError(f"{mountpoint} is already a mount point; unmount it first")
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            if exc.errno == errno.ENOENT:
                raise ConfigError(f"mountpoint does not exist: {mountpoint}") from None
            raise ConfigError(f"mountpoint unusable: {mountpoint}: {exc.strerror}") from None
        log.warning("%s: a previous daemon died without unmounting; cleaning it up", mountpoint)
        done = _fusermount("-u", "-z", mountpoint=mountpoint)
        if done.returncode != 0:
            raise ConfigError(f"cannot clean up the dead mount at {mountpoint}: {done.stderr.strip()}") from None
    if not os.path.isdir(mountpoint):
        raise ConfigError(f"mountpoint is not a folder: {mountpoint}")


def tune_read_ahead(mountpoint: str) -> None:
    """Raise the mount's bdi read-ahead so the kernel sends 1 MiB READs (root only; a warning otherwise)."""
    device = mount_device(mountpoint)
    if device is None:
        log.warning("cannot find %s in /proc/self/mountinfo; kernel read-ahead stays at its default", mountpoint)
        return
    path = f"/sys/class/bdi/{device[0]}:{device[1]}/read_ahead_kb"
    try:
        with open(path, "w", encoding="ascii") as knob:
            knob.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.warning(
            "cannot raise %s to %d (%s): sequential reads will use 128 KiB requests and run slower",
            path,
            READ_AHEAD_KB,
            exc.strerror,
        )
    else:
        log.debug("%s = %d", path, READ_AHEAD_KB)


def _fsname(display_url: str) -> str:
    # libfuse splits options on ',' and treats '\' as an escape: keep the name readable but unambiguous.
    return "directfs:" + display_url.replace("\\", "%5C").replace(",", "%2C")


# --- readiness ---------------------------------------------------------------------------------------------------


class _Readiness:
    """The --ready-fd pipe: one line, ``ready`` or ``error: <reason>``, then closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass  # the parent gave up waiting; nothing else to tell
        finally:
            os.close(fd)

    def ready(self) -> None:
        self._send("ready")

    def failed(self, reason: str) -> None:
        self._send(f"error: {reason}")


# --- the mount ---------------------------------------------------------------------------------------------------


def _read_engine(nursery: trio.Nursery, config: MountConfig, disk: DiskTier | None = None) -> ReadEngine:
    # drop_behind: the kernel's page cache (keep_cache) holds what a sequential reader has read; see ReadSettings.
    defaults = ReadSettings(drop_behind=True)
    overrides: dict[str, Any] = {}  # ReadSettings field -> value (validated by ReadSettings)
    if config.cache_size_bytes is not None:
        overrides["cache_size_bytes"] = config.cache_size_bytes
        # Keep the default ratio (prefetch budget = half the cache): prefetched blocks wait in the cache, so a
        # smaller cache must shrink the budget too or they would be evicted before they are read.
        overrides["prefetch_budget_bytes"] = min(defaults.prefetch_budget_bytes, config.cache_size_bytes // 2)
    if config.read_ahead_max_bytes is not None:
        overrides["read_ahead_max_bytes"] = config.read_ahead_max_bytes
    settings = dataclasses.replace(defaults, **overrides)  # ReadSettings validates: ConfigError (EINVAL)
    return ReadEngine(settings, nursery, disk=disk)


# At unmount, the disk cache's queued writes (at most diskcache.MAX_PENDING_WRITE_BYTES, 64 MiB: well under a second on
# any disk) may finish before the engine's nursery is cancelled; past this they are dropped (those blocks are simply
# not cached). Far below systemd's TimeoutStopSec (90 s), which the write-back drain shares.
DISK_FLUSH_SECONDS = 10.0


async def _stop(cancel_scope: trio.CancelScope, engine: ReadEngine) -> None:
    """End the mount's nursery, after the disk cache's queued writes (``DISK_FLUSH_SECONDS``)."""
    with trio.move_on_after(DISK_FLUSH_SECONDS):
        await engine.flush_disk_writes()
    cancel_scope.cancel()


async def _watch_signals(cancel_scope: trio.CancelScope, engine: ReadEngine) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            await _stop(cancel_scope, engine)
            return


class _State:
    mounted = False  # pyfuse3.init succeeded: pyfuse3.close must run, whatever happens next


async def _prepare(source: Preparable) -> None:
    try:
        await source.prepare()
    except DirectFSError as exc:  # e.g. missing Direct IO credentials: the first open reports it where it matters
        log.debug("preparing the source failed (reported again at open): %s", exc)


async def _serve(config: MountConfig, readiness: _Readiness, state: _State) -> None:
    """Mount and serve until unmounted from outside or signalled."""
    import pyfuse3

    from .fuse_ops import Operations, drain_invalidations
    from .sources.registry import create_source
    from .vfs import FileSystem

    tune_allocator()  # block buffers are recycled, not refaulted (directfs.engine.allocator), whatever the source
    source = create_source(config.source_url, config.source_options)
    writeback = _writeback(source, config)
    notifier = Notifier.from_environment()  # systemd Type=notify: READY=1 after the stat probe, STOPPING=1 at the end
    exits: list[Callable[[], None]] = []  # closers of the metrics endpoint (it runs in a thread)
    try:
        fs: FileSystem | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dump_tasks_on_sigusr1)
                disk = None
                if config.disk_cache.directory is not None:  # blocks keyed by the source's URL (no credentials)
                    disk = DiskTier(await open_disk_cache(config.disk_cache), source.display_url)
                engine = _read_engine(nursery, config, disk)
                nursery.start_soon(_watch_signals, nursery.cancel_scope, engine)
                if writeback is not None:
                    await nursery.start(writeback.run)
                fs = FileSystem(source, engine, config.vfs_settings, writeback)
                await fs.start()
                follower = _follower(source, config.change_feed)
                if follower is not None and config.change_feed == "on":
                    await nursery.start(_follow, follower, fs, True)  # ConfigError: the mount fails before it lives
                    await fs.refresh_root()  # stamped under the feed now: trusted long like everything else
                op_stats = metrics.OpStats()
                registry = metrics.build_registry(
                    metrics.Sources(
                        read_statistics=engine.statistics,
                        vfs_statistics=fs.statistics,
                        write_statistics=writeback.statistics if writeback is not None else None,
                        op_stats=op_stats,
                        http=lambda: http.STATISTICS,
                        feed_statistics=follower.statistics if follower is not None else None,
                    )
                )
                await _start_metrics(nursery, config, registry, exits)
                ops = Operations(fs, negative_ttl_seconds=config.vfs_settings.negative_ttl, op_stats=op_stats)
                options = set(pyfuse3.default_options)  # default_permissions: the kernel checks our 0444/0555 modes
                options |= {f"fsname={_fsname(source.display_url)}", "subtype=directfs"}
                if writeback is None:
                    options.add("ro")
                if config.allow_other:
                    options.add("allow_other")
                try:
                    pyfuse3.init(ops, config.mountpoint, options)
                except RuntimeError as exc:
                    raise ConfigError(f"cannot mount on {config.mountpoint}: {exc} (see the messages above)") from None
                state.mounted = True

                async def serve_requests() -> None:
                    await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
                    log.info("unmounted from outside; stopping")
                    await _stop(nursery.cancel_scope, engine)

                nursery.start_soon(serve_requests)
                nursery.start_soon(drain_invalidations, fs)
                # A stat through the kernel proves the mount answers, and only after the FUSE INIT exchange may the
                # read-ahead be raised (the kernel sets it from INIT). In a thread: the trio thread serves the stat.
                with trio.move_on_after(config.vfs_settings.metadata_deadline_seconds) as probe:
                    await trio.to_thread.run_sync(os.stat, config.mountpoint, abandon_on_cancel=True)
                if probe.cancelled_caught:
                    raise NamespaceTimeout("the new mount did not answer a stat", filename=config.mountpoint)
                tune_read_ahead(config.mountpoint)
                log.info("mounted %s on %s", source.display_url, config.mountpoint)
                if config.ready_fd is not None:
                    os.chdir("/")  # a daemon must not keep the caller's folder (and its filesystem) busy
                readiness.ready()
                notifier.ready(f"serving {source.display_url} on {config.mountpoint}")
                if isinstance(source, Preparable):
                    nursery.start_soon(_prepare, source)  # the first open then finds its clients built
                if follower is not None and config.change_feed == "auto":
                    nursery.start_soon(_follow, follower, fs, False)
        finally:
            if state.mounted:
                notifier.stopping(f"unmounting {config.mountpoint}")
            for close in exits:
                close()
            if fs is not None:
                await fs.aclose()
            if writeback is not None:
                await writeback.drain()  # pending uploads within --write-drain-timeout; the rest kept in failed/
    finally:
        if writeback is not None:
            writeback.close_folder()
        with trio.CancelScope(shield=True):
            await source.aclose()


def _follower(source: Source, mode: str) -> ChangeFollower | None:
    """The change-feed follower of the mount (``--change-feed``), or None: the short TTL only."""
    if mode == "off":
        return None
    if not isinstance(source, ChangeFeed):
        if mode == "on":
            raise ConfigError(f"--change-feed on: {source.display_url} has no change feed (only CTERA Portals do)")
        return None
    return source.change_follower()


class _Started:
    """A ``task_status`` that remembers whether ``started`` was called (``_follow``)."""

    def __init__(self, status: trio.TaskStatus[None]) -> None:
        self._status = status
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self._status.started()


async def _follow(
    follower: ChangeFollower,
    sink: ChangeSink,
    required: bool,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the follower. A failure after it came up costs the feed (the mount keeps serving with the short TTL; the
    follower told the sink the feed is down), never the mount; with ``required``, its failure to come up is the
    mount's error (``ConfigError``)."""
    status = _Started(task_status)
    try:
        await follower.run(sink, required=required, task_status=status)
    except Exception:
        if required and not status.done:
            raise
        log.exception("the change feed stopped; metadata is trusted for --metadata-ttl from now on")
    if not status.done:
        task_status.started()


def _writeback(source: Source, config: MountConfig) -> WriteBack | None:
    """The mount's write-back layer with ``--rw`` (its spool folder made, locked and checked for what a killed
    daemon left), or None: read-only."""
    settings = config.write_settings
    if not settings.enabled:
        return None
    if not isinstance(source, Writable):
        log.warning("--rw: %s cannot be written; mounting read-only (writes answer EROFS)", source.display_url)
        return None
    writeback = WriteBack(
        source,
        settings,
        spool_dir=settings.spool_dir or default_spool_dir(config.mountpoint),
        store_url=source.display_url,
    )
    writeback.open_folder()  # ConfigError: another mount holds it, or it is not private
    log.info("writable mount; spool folder %s", writeback.root)
    return writeback


async def _start_metrics(
    nursery: trio.Nursery, config: MountConfig, registry: CollectorRegistry, exits: list[Callable[[], None]]
) -> None:
    """The control socket for `directfs stats` (always; a warning if it cannot be made) and the opt-in endpoint."""
    path = metrics.control_socket_path(config.mountpoint)
    try:
        listener = metrics.bind_control_socket(path)
    except (OSError, ConfigError) as exc:
        log.warning("no control socket for `directfs stats` at %s: %s", path, exc)
    else:
        await nursery.start(metrics.serve_control_socket, listener, lambda: metrics.exposition(registry))
    if config.metrics_address is not None:
        host, port = config.metrics_address
        server = metrics.start_metrics_server(host, port, registry, allow_remote=config.metrics_allow_remote)
        exits.append(server.close)


def run_mount(config: MountConfig) -> int:
    """Mount in this process (foreground); returns the exit status. Failures before "ready" go to --ready-fd."""
    import pyfuse3

    readiness = _Readiness(config.ready_fd)
    state = _State()
    try:
        clean_stale_mountpoint(config.mountpoint)
        trio.run(_serve, config, readiness, state)
    except BaseException as exc:
        error = ours_only(exc)
        if error is None:
            readiness.failed(f"unexpected error: {exc!r}")
            raise
        log.error("%s", error)
        readiness.failed(str(error))
        return 1
    finally:
        # Unmount unless someone already did (fusermount3 -u ends pyfuse3.main; closing then only cleans up).
        if state.mounted:
            try:
                pyfuse3.close(unmount=mount_device(config.mountpoint) is not None)
            except Exception:
                log.exception("pyfuse3.close failed")
    return 0


# --- daemon mode -------------------------------------------------------------------------------------------------


def spawn_daemon(argv: Sequence[str], *, log_file: str | None) -> int:
    """Re-run ``directfs mount`` (``argv`` without the program name) in the foreground in a new session, and wait
    until it says ready (exit 0) or why it failed (exit 1)."""
    read_fd, write_fd = os.pipe()
    try:
        with open(log_file or os.devnull, "ab") as log_sink, open(os.devnull, "rb") as null_in:
            child = subprocess.Popen(
                [sys.executable, "-m", "directfs.cli", *argv, "--foreground", "--ready-fd", str(write_fd)],
                stdin=null_in,
                stdout=log_sink,
                stderr=log_sink,
                pass_fds=(write_fd,),
                start_new_session=True,  # setsid: the daemon survives the shell that started it
                # same cwd, so relative paths in argv (mountpoint, --*-file, --ca-file) mean what the user meant; the
                # daemon moves to / once mounted (see _serve)
            )
    finally:
        os.close(write_fd)
    try:
        reply = _read_line(read_fd, DAEMON_READY_TIMEOUT_SECONDS)
    finally:
        os.close(read_fd)
    if reply == "ready":
        return 0
    if reply.startswith("error: "):
        print(f"directfs mount: {reply.removeprefix('error: ')}", file=sys.stderr)
    elif reply == "":
        status = child.poll()
        where = f" (see {log_file})" if log_file else " (run with -f to see why)"
        print(
            f"directfs mount: the daemon exited with status {status} before the mount was ready{where}", file=sys.stderr
        )
    else:
        print(
            f"directfs mount: no answer from the daemon within {DAEMON_READY_TIMEOUT_SECONDS:.0f} s; stopping it",
            file=sys.stderr,
        )
        child.terminate()
    return 1


def _read_line(fd: int, timeout_seconds: float) -> str:
    """One line from ``fd``: "" on EOF, "<timeout>" when nothing came in time."""
    deadline = time.monotonic() + timeout_seconds
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "<timeout>"
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").split("\n", 1)[0].strip()
