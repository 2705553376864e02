"""Writes (``--rw``): files are spooled on local disk and uploaded when their last writer closes.

The write model (README "Writing"): every file opened for writing gets one *spool* file on local disk, shared by all
the handles that write that path in this mount. Writes land in the spool; the store sees nothing until the last
writer handle is flushed (``close()``), or a writer calls ``fsync()``; then the spool is uploaded through the
store's ``Writable`` (``directfs.sources.base``) and **that call returns the upload's result**: 0, or the errno of
the ``WriteError`` that ended it. Readers keep seeing the previous version until the upload completes.

Nothing a program wrote is ever silently lost:

- An upload that fails (after the store's own retries) moves the spool to ``failed/`` with a sidecar naming the
  target and the error, logs that path at ERROR, counts it (``upload_failures``), and ``close()`` returns the errno.
- SIGTERM: ``drain`` uploads every dirty spool within ``drain_timeout_seconds`` before unmount; whatever does not
  finish is moved to ``failed/``.
- ``kill -9``: the spool files stay in ``active/``; the next mount with this spool folder finds them, moves them to
  ``failed/`` and reports each one (never deletes them).

Spool folder (``WriteSettings.spool_dir``, mode 0700, one per mount point by default, locked by the mount using it)::

    lock                        flock(2) held while a mount uses the folder (a second mount on it is refused)
    active/<id>.data, .json     a file being written: its bytes and its sidecar (target path, store, pid, time)
    failed/<id>.data, .json     an upload that did not land: the bytes and a sidecar that names target and error

Early parts: while a file is written strictly sequentially (each write at its current end), every
``PART_ANNOUNCE_BYTES`` written are announced to the upload (``Upload.part_ready``) from a background task, so a
store with multipart uploads (S3) sends complete parts while the writer is still writing and ``close()`` waits only
for the tail. A write below what was announced (or a truncate) aborts that upload; ``commit`` then starts over from
the whole spool.

Concurrency (trio, one thread): a ``Spool``'s fields change only in synchronous code between awaits; its disk I/O
runs in worker threads under the one limiter (``workers.worker_limiter``), never abandoned, so a write is in the file
before the handler answers. ``Spool.lock`` serialises uploads of one spool (a flush and an fsync at once); writes
wait for a running upload (``Spool.lock``) so no upload reads bytes that change under it, and the filesystem holds it
around an unlink or rename of the spool's path (an upload landing after the move would bring the old name back).
``join`` runs under one lock, so two opens of a path at once share one spool. States, owners, the unmount path and a
reviewer checklist: docs/engine-concurrency.md, "The write-back layer". Background work (early
parts, uploads at release) runs in the ``WriteBack.run`` nursery.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import trio

from .errors import (
    ConfigError,
    DirectFSError,
    InvalidArgumentError,
    NoSpaceError,
    QuotaExceededError,
    UploadError,
    UploadTimeout,
    WriteError,
    errno_of,
    ours_only,
)
from .sources.base import Entry, Upload, Writable
from .workers import worker_limiter

log = logging.getLogger(__name__)

T = TypeVar("T")

# 8 MiB: S3's multipart part size here (sources/s3.py); announcing less often than a part would only delay parts,
# more often would wake the feeder for nothing.
PART_ANNOUNCE_BYTES: Final = 8 * 1024 * 1024

# The deadline of one upload: a base for the requests around the data (HEAD, MKCOL, Complete) plus the size at the
# slowest rate we still call working (1 MiB/s: a congested WAN). A stalled store ends in ETIMEDOUT, never a hang.
UPLOAD_BASE_SECONDS: Final = 60.0
UPLOAD_MIN_RATE_BYTES_PER_SECOND: Final = 1024 * 1024

_SPOOL_FILE_MODE: Final = 0o600


def upload_deadline_seconds(size: int) -> float:
    return UPLOAD_BASE_SECONDS + size / UPLOAD_MIN_RATE_BYTES_PER_SECOND


def default_spool_dir(mountpoint: str, env: dict[str, str] | None = None) -> str:
    """``<state>/spool/<mountpoint, escaped>``: ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else
    ``/var/lib/directfs`` for root, else ``$XDG_STATE_HOME/directfs`` (``~/.local/state/directfs``). Per mount point,
    so a restarted mount finds what its killed predecessor left."""
    env = dict(os.environ) if env is None else env
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if not state:
        if os.geteuid() == 0:
            state = "/var/lib/directfs"
        else:
            base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
            state = os.path.join(base, "directfs")
    escaped = os.path.realpath(mountpoint).strip("/").replace("-", "\\x2d").replace("/", "-") or "-"
    return os.path.join(state, "spool", escaped)


@dataclass(frozen=True)
class WriteSettings:
    # Read-only unless asked: a mount that cannot change the store cannot lose or damage data there.
    enabled: bool = False
    spool_dir: str | None = None  # None: default_spool_dir(mountpoint)
    # An in-place update (append, O_RDWR without O_TRUNC) downloads the whole old file into the spool first:
    # 1 GiB bounds that wait and the disk it takes; bigger files are replaced whole (O_TRUNC) or not at all.
    max_update_size_bytes: int = 1024 * 1024 * 1024
    # Within systemd's default 90 s stop timeout, with room left for the unmount itself.
    drain_timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_update_size_bytes < 0:
            raise ConfigError("write_max_size must be 0 or more bytes")
        if not 0 <= self.drain_timeout_seconds < float("inf"):
            raise ConfigError("write_drain_timeout must be 0 or more seconds")


class Spool:
    """The local bytes of one file being written in this mount, shared by its writer handles."""

    def __init__(self, spool_id: str, path: str, fd: int, data_path: Path, base: Entry | None) -> None:
        self.id = spool_id
        self.path = path  # the store path it will be uploaded to (rename moves it)
        self.fd = fd
        self.data_path = data_path
        self.base = base  # the store's version when writing began (None: a new file); readers keep seeing it
        self.loaded = base is None or base.size == 0  # the spool holds base's bytes (or was truncated)
        self.size = 0
        self.dirty = base is None  # a new file is uploaded even when nothing was written (an empty file)
        self.writers = 0
        self.readers = 0  # handles reading a new file's spool (it has no store version yet)
        self.mtime_ns: int | None = None  # utimens while writing: stored with the upload where the store keeps it
        self.modified_ns = time.time_ns()  # what stat shows as mtime until the store answers
        self.failed: DirectFSError | None = None
        self.unlinked = False  # unlink()ed while open: dropped at the last release, never uploaded
        self.lock = trio.Lock()  # one upload at a time; writes wait for it
        self.uploaded: Entry | None = None  # the store's entry after the last upload
        # Early parts (see the module docstring): sequential while every write was at the end.
        self.sequential = True
        self.upload: Upload | None = None
        self.announced = 0  # bytes [0, announced) told to ``upload`` as final
        self.feeding: trio.Event | None = None  # set when the running part_ready returns

    @property
    def active(self) -> bool:
        """Still has writers or bytes not uploaded: readers opened now see ``base``, stat shows the spool."""
        return not self.unlinked and self.failed is None and (self.writers > 0 or self.dirty)


@dataclass(frozen=True)
class Recovered:
    """A spool file a previous daemon left behind, now kept in ``failed/``."""

    data_path: str
    target: str
    size: int


Committed = Callable[[Spool, Entry], None]


class WriteBack:
    """The spools of one mount and their uploads. ``run`` (in the mount's nursery) owns the background work."""

    def __init__(
        self,
        source: Writable,
        settings: WriteSettings,
        *,
        spool_dir: str,
        store_url: str,
        on_committed: Committed | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.root = Path(spool_dir)
        self.store_url = store_url  # safe to show (display_url): written into sidecars
        self.on_committed = on_committed  # the filesystem's hook: cache the new entry, drop stale pages
        self._spools: dict[str, Spool] = {}
        self._join_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._lock_fd: int | None = None
        self._nursery: trio.Nursery | None = None
        self._background = 0
        self._idle = trio.Event()
        self._idle.set()
        self.counters: dict[str, int] = {
            "uploads": 0,
            "upload_bytes": 0,
            "upload_failures": 0,
            "failed_kept": 0,
            "recovered": 0,
        }

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def open_folder(self) -> list[Recovered]:
        """Make (0700) and lock the spool folder, and move what a dead daemon left in ``active/`` to ``failed/``.
        ConfigError when another mount holds it or it is not ours. Blocking (small): call before serving."""
        for folder in (self.root, self.root / "active", self.root / "failed"):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(folder)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise ConfigError(f"spool folder {folder} must be a folder owned by uid {os.geteuid()} with mode 0700")
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _SPOOL_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"spool folder {self.root} is in use by another mount (--write-spool-dir)") from None
        self._lock_fd = fd
        recovered = []
        for sidecar in sorted((self.root / "active").glob("*.json")):
            data = sidecar.with_suffix(".data")
            target = str(_read_sidecar(sidecar).get("target", "?"))
            if not data.exists():
                sidecar.unlink()
                continue
            kept = self._keep_failed(data, sidecar, target, "the daemon stopped before uploading it (killed?)", 0)
            size = kept.stat().st_size if kept.exists() else 0
            recovered.append(Recovered(str(kept), target, size))
            log.error(
                "found %s from a previous mount of %s (%d bytes, not uploaded): kept at %s",
                target,
                self.store_url,
                size,
                kept,
            )
        self.counters["recovered"] = len(recovered)
        self.counters["failed_kept"] = sum(1 for _ in (self.root / "failed").glob("*.data"))
        return recovered

    def close_folder(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background work (early parts, uploads at release) until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None  # a closed nursery takes no new task: what is left waits for drain

    def statistics(self) -> dict[str, int]:
        return {
            **self.counters,
            "spools": len(self._spools),
            "spooled_bytes": sum(spool.size for spool in self._spools.values()),
            "dirty": sum(1 for spool in self._spools.values() if spool.dirty and spool.failed is None),
        }

    # --- spools --------------------------------------------------------------------------------------------------

    def spool(self, path: str) -> Spool | None:
        """The active spool of ``path``, if any."""
        spool = self._spools.get(path)
        return spool if spool is not None and spool.active else None

    def spools_below(self, folder: str) -> list[Spool]:
        prefix = folder + "/" if folder else ""
        return [s for p, s in self._spools.items() if p.startswith(prefix) and s.active]

    async def join(self, path: str, base: Entry | None, *, truncate: bool) -> Spool:
        """The spool of ``path`` for one more writer handle, made if there is none (``base`` is the store's current
        entry, None for a new file). ``truncate``: O_TRUNC (the spool starts empty)."""
        async with self._join_lock:  # two opens of one path at once (open takes no folder lock) share one spool
            spool = self._spools.get(path)
            if spool is not None and (spool.failed is not None or spool.unlinked):
                self._forget(spool)
                spool = None
            if spool is None:
                spool = await self._create(path, base)
            spool.writers += 1
        if truncate:
            try:
                await self.truncate(spool, 0)
            except BaseException:
                await self.leave(spool)
                raise
        return spool

    async def _create(self, path: str, base: Entry | None) -> Spool:
        spool_id = f"{os.getpid()}-{next(self._ids)}"
        data_path = self.root / "active" / f"{spool_id}.data"
        sidecar = {"target": path, "store": self.store_url, "pid": os.getpid(), "started": _now_text()}

        def make() -> int:
            fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _SPOOL_FILE_MODE)
            _write_sidecar(data_path.with_suffix(".json"), sidecar)
            return fd

        fd = await self._disk(make)
        spool = Spool(spool_id, path, fd, data_path, base)
        self._spools[path] = spool
        return spool

    def attach_reader(self, spool: Spool) -> None:
        spool.readers += 1

    def detach(self, spool: Spool, *, writer: bool) -> None:
        """A handle goes away without an upload (unmount: ``drain`` uploads what is dirty next)."""
        if writer:
            spool.writers -= 1
        else:
            spool.readers -= 1

    async def leave(self, spool: Spool, *, writer: bool = True) -> None:
        """A handle of ``spool`` is released. The last writer uploads what is still dirty (in the background:
        release has no caller to tell; a failure goes to ``failed/`` and the log); the last handle drops a clean
        spool."""
        self.detach(spool, writer=writer)
        if spool.writers > 0:
            await trio.lowlevel.checkpoint()
            return
        if spool.unlinked or spool.failed is not None or not spool.dirty:
            if spool.readers == 0:
                await self._discard(spool)
            else:
                await trio.lowlevel.checkpoint()
            return
        # Without a running ``run`` (unmounting) the spool stays dirty: ``drain`` uploads it within its timeout.
        self._start_background(self._upload_at_release, spool)
        await trio.lowlevel.checkpoint()

    async def _upload_at_release(self, spool: Spool) -> None:
        with contextlib.suppress(DirectFSError):  # reported by commit (ERROR + failed/)
            await self.commit(spool)

    def rename(self, old: str, new: str) -> None:
        """Retarget the spools of ``old`` (a file, or everything below a folder) to ``new``: their uploads go there."""
        moved: list[Spool] = []
        for path in list(self._spools):
            if path == old or path.startswith(old + "/"):
                moved.append(self._spools.pop(path))
        for spool in moved:
            spool.path = new + spool.path[len(old) :]
            replaced = self._spools.get(spool.path)
            if replaced is not None:
                replaced.unlinked = True  # the renamed file took its name (POSIX rename over an open file)
            self._spools[spool.path] = spool
            self._update_sidecar(spool)

    def unlink(self, path: str) -> Spool | None:
        """``path`` was unlinked: its spool (if any) keeps serving open handles and is never uploaded."""
        spool = self._spools.get(path)
        if spool is not None:
            spool.unlinked = True
            spool.dirty = False
        return spool

    # --- data ----------------------------------------------------------------------------------------------------

    async def write(self, spool: Spool, offset: int, data: bytes) -> int:
        self._check(spool)
        if offset < 0:
            raise InvalidArgumentError(f"negative offset {offset}")
        async with spool.lock:  # never under an upload that is reading the spool
            self._check(spool)
            await self._disk(_pwrite_all, spool.fd, data, offset)
            end = offset + len(data)
            if offset != spool.size:
                spool.sequential = False
            if offset < spool.announced:
                self._invalidate_early_upload(spool)
            spool.size = max(spool.size, end)
            spool.dirty = True
            spool.modified_ns = time.time_ns()
        self._maybe_announce(spool)
        return len(data)

    async def read(self, spool: Spool, offset: int, size: int) -> bytes:
        self._check(spool)
        if offset >= spool.size or size <= 0:
            await trio.lowlevel.checkpoint()
            return b""
        return await self._disk(os.pread, spool.fd, min(size, spool.size - offset), offset)

    async def truncate(self, spool: Spool, size: int) -> None:
        self._check(spool)
        if size < 0:
            raise InvalidArgumentError(f"negative size {size}")
        async with spool.lock:
            await self._disk(os.ftruncate, spool.fd, size)
            if size < spool.announced:
                self._invalidate_early_upload(spool)
            if size != spool.size:
                spool.sequential = spool.sequential and size > spool.size
            spool.size = size
            spool.loaded = True
            spool.dirty = True
            spool.modified_ns = time.time_ns()

    async def load(self, spool: Spool, chunks: Callable[[], Awaitable[bytes]]) -> None:
        """Fill a spool that is not ``loaded`` with its base's bytes, ``chunks()`` giving them in order (b"" at the
        end). Called by the filesystem before the first write, read or truncate of an in-place update."""
        async with spool.lock:
            if spool.loaded:
                return
            offset = 0
            while True:
                data = await chunks()
                if not data:
                    break
                await self._disk(_pwrite_all, spool.fd, data, offset)
                offset += len(data)
            spool.size = offset
            spool.loaded = True

    def _check(self, spool: Spool) -> None:
        if spool.failed is not None:
            raise UploadError(
                f"an upload of this file failed earlier ({spool.failed.strerror}); its bytes are kept in the spool's "
                "failed/ folder",
                filename=spool.path,
            )

    # --- uploads -------------------------------------------------------------------------------------------------

    def _maybe_announce(self, spool: Spool) -> None:
        if (
            self._nursery is None
            or not spool.sequential
            or spool.feeding is not None
            or spool.size - spool.announced < PART_ANNOUNCE_BYTES
        ):
            return
        if spool.upload is None:
            spool.upload = self.source.begin_upload(spool.path)
        spool.feeding = trio.Event()
        self._start_background(self._feed, spool)

    async def _feed(self, spool: Spool) -> None:
        assert spool.feeding is not None
        try:
            while spool.upload is not None and spool.sequential and spool.size - spool.announced >= PART_ANNOUNCE_BYTES:
                end = spool.size
                upload = spool.upload
                try:
                    with trio.fail_after(upload_deadline_seconds(end - spool.announced)):
                        await upload.part_ready(spool.fd, end)
                except (DirectFSError, trio.TooSlowError) as exc:
                    # Not fatal: commit starts over from the whole spool, with the store's retries.
                    log.warning("early upload of %r stopped (%s); it is sent whole at close", spool.path, exc)
                    self._invalidate_early_upload(spool)
                    return
                if spool.upload is upload:
                    spool.announced = max(spool.announced, end)
        finally:
            event, spool.feeding = spool.feeding, None
            event.set()

    def _invalidate_early_upload(self, spool: Spool) -> None:
        """The bytes announced so far changed: that upload is void; abort it (in the background) and start over."""
        upload, spool.upload = spool.upload, None
        spool.announced = 0
        spool.sequential = False
        if upload is not None:
            self._start_background(upload.abort)

    async def commit(self, spool: Spool) -> Entry | None:
        """Upload ``spool`` now (flush of the last writer, fsync, release, drain) and return the new entry (None:
        nothing to upload, it was unlinked); on failure move it to ``failed/`` and raise the error the caller's
        ``close()`` returns."""
        async with spool.lock:
            if spool.failed is not None:
                self._check(spool)
            if not spool.dirty or spool.unlinked:
                return spool.uploaded or spool.base
            feeding = spool.feeding
            if feeding is not None:
                await feeding.wait()
            upload = spool.upload
            if upload is None or not spool.sequential:
                if upload is not None:
                    await upload.abort()
                upload = self.source.begin_upload(spool.path)
            spool.upload = None
            spool.announced = 0
            size = spool.size
            target = spool.path
            started = time.monotonic()
            try:
                with trio.move_on_after(upload_deadline_seconds(size)) as scope:
                    entry = await upload.commit(spool.fd, size, mtime_ns=spool.mtime_ns)
                if scope.cancelled_caught:
                    raise UploadTimeout(f"upload of {size} bytes did not finish in time", filename=target)
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await upload.abort()
                error = ours_only(exc) if isinstance(exc, Exception) else None
                if error is None and isinstance(exc, Exception):
                    log.error("unexpected error uploading %r", target, exc_info=exc)
                    error = UploadError(f"unexpected {type(exc).__name__} while uploading", filename=target)
                if error is not None:
                    self._fail(spool, error)
                    raise error from exc
                raise  # cancelled (unmount): the spool stays dirty; drain uploads it or keeps it
            self.counters["uploads"] += 1
            self.counters["upload_bytes"] += size
            spool.uploaded = entry
            spool.base = entry
            spool.dirty = False  # writes wait for the lock: nothing changed while it was sent
            log.info("uploaded %r (%d bytes in %.2f s)", target, size, time.monotonic() - started)
            if self.on_committed is not None:
                self.on_committed(spool, entry)
            if spool.writers == 0 and spool.readers == 0:
                await self._discard(spool)
            return entry

    def _fail(self, spool: Spool, error: DirectFSError) -> None:
        spool.failed = error
        spool.dirty = False
        self.counters["upload_failures"] += 1
        kept = self._keep_failed(
            spool.data_path, spool.data_path.with_suffix(".json"), spool.path, str(error), errno_of(error)
        )
        spool.data_path = kept
        log.error("upload of %r to %s failed: %s; the bytes are kept at %s", spool.path, self.store_url, error, kept)

    def _keep_failed(self, data: Path, sidecar: Path, target: str, reason: str, code: int) -> Path:
        """Move ``data`` (and a sidecar naming ``target`` and ``reason``) into ``failed/``. Blocking, small."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{data.stem}"
        kept = self.root / "failed" / f"{name}.data"
        meta = _read_sidecar(sidecar)
        meta.update(
            {
                "target": target,
                "store": self.store_url,
                "error": reason,
                "errno": errno.errorcode.get(code, str(code)) if code else None,
                "failed": _now_text(),
            }
        )
        try:
            os.rename(data, kept)
            _write_sidecar(kept.with_suffix(".json"), meta)
            with contextlib.suppress(FileNotFoundError):
                sidecar.unlink()
        except OSError as exc:  # the bytes stay where they are, and the log says so
            log.error("could not move %s to %s: %s", data, kept, exc)
            return data
        self.counters["failed_kept"] += 1
        return kept

    async def _discard(self, spool: Spool) -> None:
        """Close and delete a spool nobody needs any more (uploaded, unlinked; failed ones stay in failed/). An early
        upload still open (an unlinked file that was being sent in parts) is aborted first, after its running
        ``part_ready``: that call reads the spool's fd, which must not be closed (and its number reused) under it."""
        self._forget(spool)
        with trio.CancelScope(shield=True):
            if spool.feeding is not None:
                await spool.feeding.wait()
            upload, spool.upload = spool.upload, None
            if upload is not None:
                await upload.abort()
        fd, spool.fd = spool.fd, -1
        failed = spool.failed is not None

        def drop() -> None:
            if fd >= 0:
                os.close(fd)
            if not failed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spool.data_path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spool.data_path.with_suffix(".json"))

        with trio.CancelScope(shield=True):
            await self._disk(drop)

    def _forget(self, spool: Spool) -> None:
        if self._spools.get(spool.path) is spool:
            del self._spools[spool.path]

    async def drain(self) -> None:
        """Unmount: upload every dirty spool within ``drain_timeout_seconds``; keep the rest in ``failed/``."""
        dirty = [s for s in self._spools.values() if s.dirty and not s.unlinked and s.failed is None]
        if dirty:
            log.info("uploading %d pending file(s) before unmount", len(dirty))
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.drain_timeout_seconds) as scope:
            async with trio.open_nursery() as nursery:
                for spool in dirty:
                    nursery.start_soon(self._drain_one, spool)
            await self._idle.wait()
        if scope.cancelled_caught:
            for spool in dirty:
                if spool.dirty and spool.failed is None:
                    self._fail(
                        spool,
                        UploadTimeout(
                            f"not uploaded within the drain timeout ({self.settings.drain_timeout_seconds:g} s)",
                            filename=spool.path,
                        ),
                    )
        for spool in list(self._spools.values()):  # uploaded, unlinked or kept in failed/: close (and delete) them
            await self._discard(spool)

    async def _drain_one(self, spool: Spool) -> None:
        with contextlib.suppress(DirectFSError):
            await self.commit(spool)

    # --- helpers -------------------------------------------------------------------------------------------------

    def _start_background(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is None:
            return
        self._background += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle

        async def wrapped() -> None:
            try:
                await fn(*args)
            finally:
                self._background -= 1
                if self._background == 0:
                    self._idle.set()

        self._nursery.start_soon(wrapped)

    async def _disk(self, fn: Callable[..., T], *args: object) -> T:
        """Local disk work in a worker thread (never abandoned: the bytes are on disk when this returns). A full
        or over-quota spool disk is ENOSPC/EDQUOT for the writer."""
        try:
            return await trio.to_thread.run_sync(lambda: fn(*args), limiter=worker_limiter())
        except OSError as exc:
            if isinstance(exc, DirectFSError):
                raise
            if exc.errno == errno.ENOSPC:
                raise NoSpaceError(f"the spool folder {self.root} is full") from exc
            if exc.errno == errno.EDQUOT:
                raise QuotaExceededError(f"over quota in the spool folder {self.root}") from exc
            raise WriteError(f"spool file: {exc.strerror}") from exc

    def _update_sidecar(self, spool: Spool) -> None:
        sidecar = spool.data_path.with_suffix(".json")
        meta = _read_sidecar(sidecar)
        meta["target"] = spool.path
        with contextlib.suppress(OSError):
            _write_sidecar(sidecar, meta)

    def __iter__(self) -> Iterator[Spool]:
        return iter(list(self._spools.values()))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _read_sidecar(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_sidecar(path: Path, meta: dict[str, object]) -> None:
    temp = path.with_suffix(".json.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, _SPOOL_FILE_MODE)
    with os.fdopen(fd, "w") as out:
        json.dump(meta, out, indent=2)
        out.write("\n")
    os.replace(temp, path)
