"""The disk cache: a second block cache level under the memory cache, on local disk, holding only ciphertext.

Read ``docs/disk-cache.md`` (format, threat model, flags) and ``docs/engine-concurrency.md`` ("The disk cache")
first; this docstring is the short version.

Where it sits: inside a block fetch of the read engine (``FileReader._fetch_through_disk``), so the memory cache's
single-flight covers it. A block that misses memory is looked up here before a GET; a fetched block is handed to a
background write and the reader gets it at once. Both run in worker threads through the one ``CapacityLimiter`` of
``directfs.workers``; nothing here touches the disk on the trio thread. With ``--disk-cache`` off no
:class:`DiskCache` exists and the engine's data path is the one without it (no extra await, thread or call).

What is on disk, per block, one file ``DIR/<2 hex>/<64 hex>`` whose name is an HMAC of the block's key (the source's
display URL (no credentials), the engine's file identity (path), the version token, the block index and granule)
under a key derived from the key file, so a listing of DIR reveals no names and cannot be matched against guessed
paths. Contents: a fixed header (magic, format version, kind, plaintext length, payload length, the name again, a
random nonce) and then either

* ``KIND_SEALED`` (native CTERA files, plain stores): the block under AES-256-GCM, the header as associated data; or
* ``KIND_RAW`` (encrypted CTERA files, ``base.RawBlocks``): the stored object exactly as fetched (AES-CBC ciphertext
  under the file's key, which lives only in memory) followed by a GMAC tag over header and object.

Since the name (inside the authenticated header) is the HMAC of key, version and index, a file moved or swapped in
DIR fails its header check or its tag. Anything that fails (short, wrong magic or version, wrong name or length, bad
tag, a raw object the codec refuses) is deleted, counted in ``corrupt``, and treated as a miss: the block is fetched
again. Never wrong bytes, never an error to the reader.

Sharing: every write goes to ``DIR/tmp`` and is renamed into place (atomic), so a reader sees a whole file or none;
several processes may share DIR without a lock server. A reader opens a file once and reads it through that
descriptor, so an eviction (``unlink``) by another process never cuts a read short. Eviction is LRU by access time:
an index (name -> size, in LRU order) is rebuilt by scanning DIR at start and again each time this process has
written ``rescan_bytes`` since the last scan (files of other processes are learned then or when read); a hit sets the
file's atime, so the next scan of any process orders it right. Each process keeps DIR under ``size_bytes`` and the
filesystem above ``min_free_bytes`` by its own index; with several writers the overshoot is bounded by their
writes between scans (docs/disk-cache.md "Sharing").
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import logging
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import BlockError, ConfigError
from ..workers import worker_limiter
from .cache import BlockData

log = logging.getLogger(__name__)

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

MAGIC: Final = b"DFSBLK\x00\x01"
FORMAT_VERSION: Final = 1
KIND_SEALED: Final = 1
KIND_RAW: Final = 2
# magic, format version, kind, reserved (0), plaintext length, payload length, name (32), nonce (12): 72 bytes
HEADER: Final = struct.Struct("<8sBBHQQ32s12s")
TAG_BYTES: Final = 16
NONCE_BYTES: Final = 12
KEY_BYTES: Final = 32
# Largest cache file accepted: the largest block a source may give (DirectIOSettings.max_block_bytes, 64 MiB) plus the
# worst-case growth of a stored object (its own bound, client._object_limit) and the header. A bigger file is damage.
MAX_FILE_BYTES: Final = 64 * MiB + 64 * MiB // 5 + 4096 + HEADER.size + TAG_BYTES
TMP_DIR: Final = "tmp"
# A temp file older than this was left by a process that died mid-write (a write takes milliseconds): removed at scan.
STALE_TMP_SECONDS: Final = 600.0
# Bytes of blocks waiting to be written. 64 MiB: two read-ahead windows (ReadSettings.read_ahead_max_bytes); a disk
# slower than the network would otherwise make the queue (and memory) grow without bound. Over it, the fetch that
# hands on the next block waits for room (``save``): reads slow to the disk's pace rather than leave blocks uncached
# (skipping them lost 4 of 128 blocks of a 512 MiB read here, the write threads sharing the worker tokens with GETs).
MAX_PENDING_WRITE_BYTES: Final = 64 * MiB
# Writes in worker threads at once: 2 keeps a local disk busy while most of the 16 worker tokens stay for GETs.
WRITE_CONCURRENCY: Final = 2
# Rescan DIR after this share of its size was written by this process: the overshoot other writers can cause.
RESCAN_FRACTION: Final = 8
MIN_RESCAN_BYTES: Final = 64 * MiB

_NAME_LABEL: Final = b"directfs disk cache v1: names"
_SEAL_LABEL: Final = b"directfs disk cache v1: blocks"


def default_key_file() -> str:
    """``$XDG_STATE_HOME/directfs/disk-cache.key`` (else ``~/.local/state/...``): outside any cache folder, and the
    same for every mount of one user, so mounts sharing a DIR share its key."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "directfs", "disk-cache.key")


@dataclass(frozen=True)
class DiskCacheSettings:
    """``--disk-cache`` and its flags (``directfs.options``); ``directory`` None: no disk cache."""

    directory: str | None = None
    # 10 GiB: a few epochs' worth of a mid-size training set or a render job's assets, small next to a data disk;
    # the floor below keeps a full disk from ever being the cache's doing. Raise it for larger working sets.
    size_bytes: int = 10 * GiB
    # 1 GiB: room for logs, spools (--rw) and other programs' temp files; the cache evicts before the disk fills.
    min_free_bytes: int = 1 * GiB
    # None: default_key_file(). Created 0600 (folder 0700) when missing; must not lie inside the cache folder.
    key_file: str | None = None

    def __post_init__(self) -> None:
        if self.size_bytes < 0 or self.min_free_bytes < 0:
            raise ConfigError("disk cache sizes must not be negative")


@dataclass(frozen=True, slots=True)
class DiskStatistics:
    """Counters of one process's view of the disk cache; counters only grow, sizes are current estimates."""

    hits: int
    misses: int
    corrupt: int  # damaged or foreign files deleted (each one then fetched again)
    writes: int
    written_bytes: int
    skipped_writes: int  # blocks not written: queue full, no free space, or a write error
    evictions: int
    size_bytes: int  # bytes of cache files in DIR as this process's index knows them
    capacity_bytes: int
    entries: int
    read_errors: int  # I/O errors reading a cache file (a miss, the block fetched again)


def _load_key(path: str) -> bytes:
    """The 32-byte cache key in ``path`` (64 hex digits), created 0600 if missing. Raises ConfigError."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            _create_key(path)
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read the disk cache key file {path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if info.st_mode & 0o077:
                raise ConfigError(f"the disk cache key file {path} must not be readable by others (chmod 600)")
            if info.st_uid != os.getuid():
                raise ConfigError(f"the disk cache key file {path} belongs to another user")
            text = os.read(fd, 256).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise ConfigError(f"the disk cache key file {path} does not hold a key (64 hex digits)")
        return key
    raise ConfigError(f"the disk cache key file {path} keeps disappearing")


def _create_key(path: str) -> None:
    """Write a new key to ``path`` atomically without replacing one another process wrote meanwhile (link)."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made one first: use theirs
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(f"cannot create the disk cache key file {path}: {exc.strerror}") from None
    log.info("created the disk cache key file %s", path)


def _inside(path: str, folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip("/") + "/")


def stable_identity(identity: Hashable) -> str | None:
    """The engine's file identity as text that means the same in every process (str, int and tuples of them), or
    None when it has no such form (that file is then not disk-cached: a name must never depend on object ids)."""
    if isinstance(identity, str | int) and not isinstance(identity, bool):
        return repr(identity)
    if isinstance(identity, tuple):
        parts = [stable_identity(item) for item in identity]
        if all(part is not None for part in parts):
            return "(" + ",".join(part for part in parts if part is not None) + ")"
    return None


class DiskCache:
    """One cache folder as seen by this process. Made by :func:`open_disk_cache`; thread-safe (its index and
    counters are guarded by one lock; the files themselves need none: see the module docstring)."""

    def __init__(self, settings: DiskCacheSettings, key: bytes) -> None:
        assert settings.directory is not None
        self.settings = settings
        self.root = os.path.abspath(settings.directory)
        self._tmp = os.path.join(self.root, TMP_DIR)
        self._name_key = hmac.digest(key, _NAME_LABEL, "sha256")
        self._seal_key = hmac.digest(key, _SEAL_LABEL, "sha256")
        self._aead = AESGCM(self._seal_key)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # hex name -> file size, least recently used first
        self._total = 0
        self._hits = self._misses = self._corrupt = self._read_errors = 0
        self._writes = self._written_bytes = self._skipped = self._evictions = 0
        self._since_scan_bytes = 0
        self._scanning = False
        self._rescan_bytes = max(MIN_RESCAN_BYTES, settings.size_bytes // RESCAN_FRACTION)
        # trio thread only: bytes handed to background writes that have not finished
        self._pending_bytes = 0
        self._write_ended = trio.Event()  # set (and replaced) as each write ends: save and flush check again
        self._write_slots = trio.Semaphore(WRITE_CONCURRENCY)

    # --- names ---------------------------------------------------------------------------------------------------

    def name_of(self, scope: str, identity: str, version: str, index: int, granule_bytes: int = 0) -> bytes:
        """The 32-byte name of one block: HMAC-SHA256 of its key (NUL-separated; none of the parts holds a NUL)."""
        text = "\0".join((scope, identity, version, str(index), str(granule_bytes)))
        return hmac.digest(self._name_key, text.encode("utf-8", "surrogatepass"), "sha256")

    def __contains__(self, name: object) -> bool:
        """Whether this process knows a file for ``name`` (32 bytes); no I/O, no statistics."""
        return isinstance(name, bytes) and name.hex() in self._index

    def _path(self, hexname: str) -> str:
        return os.path.join(self.root, hexname[:2], hexname)

    # --- the async face (trio thread) -----------------------------------------------------------------------------

    async def load(
        self,
        name: bytes,
        plain_length: int,
        decode: Callable[[memoryview], BlockData] | None,
    ) -> BlockData | None:
        """The block cached under ``name``, or None (a miss, or a damaged file now deleted). ``decode``: how a raw
        entry becomes plaintext (``RawBlocks.decode_raw``); None when this file's entries are sealed. Runs in a
        worker thread; a cancelled caller returns at once (the thread only reads and finishes on its own)."""
        job = functools.partial(self._load, name, plain_length, decode)
        return await trio.to_thread.run_sync(job, limiter=worker_limiter(), abandon_on_cancel=True)

    async def save(self, nursery: trio.Nursery, name: bytes, kind: int, plain_length: int, payload: BlockData) -> None:
        """Write ``payload`` (the plaintext for ``KIND_SEALED``, the object as fetched for ``KIND_RAW``) in the
        background. Returns at once unless ``MAX_PENDING_WRITE_BYTES`` are already queued: then it waits for room
        (module constant's comment). A nursery that is closing takes no new write: the block is simply not cached."""
        size = len(payload)
        while self._pending_bytes and self._pending_bytes + size > MAX_PENDING_WRITE_BYTES:
            await self._write_ended.wait()
        self._pending_bytes += size
        try:
            nursery.start_soon(self._save_task, name, kind, plain_length, payload)
        except RuntimeError:  # the engine's nursery is closing: the block is simply not cached
            self._pending_bytes -= size
            with self._lock:
                self._skipped += 1
        await trio.lowlevel.checkpoint()

    async def _save_task(self, name: bytes, kind: int, plain_length: int, payload: BlockData) -> None:
        try:
            async with self._write_slots:
                job = functools.partial(self._save, name, kind, plain_length, payload)
                await trio.to_thread.run_sync(job, limiter=worker_limiter())
        finally:
            self._pending_bytes -= len(payload)
            self._write_ended.set()
            self._write_ended = trio.Event()

    async def flush(self) -> None:
        """Wait until every write handed to :meth:`save` so far has ended (``cp`` and ``stage`` before they
        close their engine, and the mount at unmount, so what they fetched is on disk)."""
        while self._pending_bytes:
            await self._write_ended.wait()
        await trio.lowlevel.checkpoint()

    async def scan(self) -> None:
        """Rebuild the index from DIR (in a worker thread)."""
        await trio.to_thread.run_sync(self._scan, limiter=worker_limiter())

    def statistics(self) -> DiskStatistics:
        with self._lock:
            return DiskStatistics(
                hits=self._hits,
                misses=self._misses,
                corrupt=self._corrupt,
                writes=self._writes,
                written_bytes=self._written_bytes,
                skipped_writes=self._skipped,
                evictions=self._evictions,
                size_bytes=self._total,
                capacity_bytes=self.settings.size_bytes,
                entries=len(self._index),
                read_errors=self._read_errors,
            )

    # --- reading (worker threads) ---------------------------------------------------------------------------------

    def _load(
        self, name: bytes, plain_length: int, decode: Callable[[memoryview], BlockData] | None
    ) -> BlockData | None:
        hexname = name.hex()
        path = self._path(hexname)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            with self._lock:
                self._misses += 1
                self._forget(hexname)
            return None
        except OSError as exc:
            self._unreadable(exc)
            return None
        try:
            info = os.fstat(fd)
            buffer = self._read_all(fd, info.st_size)
            if buffer is None:
                self._damaged(path, hexname, info, "of the wrong size")
                return None
            data, why = self._open_entry(buffer, name, plain_length, decode)
            if data is None:
                self._damaged(path, hexname, info, why)
                return None
            with contextlib.suppress(OSError):  # the access time orders the LRU of every process (next scan)
                os.utime(fd, ns=(time.time_ns(), info.st_mtime_ns))
        except OSError as exc:
            self._unreadable(exc)
            return None
        finally:
            os.close(fd)
        with self._lock:
            self._hits += 1
            if hexname in self._index:
                self._index.move_to_end(hexname)
            else:  # written by another process since our last scan
                self._index[hexname] = info.st_size
                self._total += info.st_size
        return data

    @staticmethod
    def _read_all(fd: int, size: int) -> bytearray | None:
        if not HEADER.size + TAG_BYTES <= size <= MAX_FILE_BYTES:
            return None
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = os.readv(fd, [view[got:]])
            if count == 0:
                return None
            got += count
        return buffer

    def _open_entry(
        self,
        buffer: bytearray,
        name: bytes,
        plain_length: int,
        decode: Callable[[memoryview], BlockData] | None,
    ) -> tuple[BlockData | None, str]:
        """The plaintext of one cache file, or None and why it was refused."""
        magic, version, kind, _, length, payload_length, stored_name, nonce = HEADER.unpack_from(buffer)
        if magic != MAGIC or version != FORMAT_VERSION:
            return None, "not a cache file of this format"
        if stored_name != name:
            return None, "holds another block (moved or swapped)"
        if length != plain_length:
            return None, "wrong length for this block"
        view = memoryview(buffer)
        header, payload = view[: HEADER.size], view[HEADER.size :]
        if len(payload) != payload_length + (TAG_BYTES if kind == KIND_RAW else 0):
            return None, "truncated or padded"
        if kind == KIND_SEALED:
            if decode is not None:
                return None, "sealed, but this file's blocks are kept raw"
            try:
                plain: BlockData = self._aead.decrypt(nonce, payload, header)
            except InvalidTag:
                return None, "failed its authentication tag"
        elif kind == KIND_RAW:
            if decode is None:
                return None, "raw, but this file's blocks are sealed"
            raw, tag = payload[:payload_length], bytes(payload[payload_length:])
            decryptor = Cipher(algorithms.AES(self._seal_key), modes.GCM(nonce, tag)).decryptor()
            decryptor.authenticate_additional_data(header)
            decryptor.authenticate_additional_data(raw)
            try:
                decryptor.finalize()
            except InvalidTag:
                return None, "failed its authentication tag"
            try:
                plain = decode(raw)
            except BlockError as exc:
                return None, f"does not decode ({exc})"
            except Exception as exc:  # the codec raises only BlockError; a damaged cache is never the reader's error
                log.debug("decoding a cached object failed unexpectedly", exc_info=True)
                return None, f"does not decode ({type(exc).__name__})"
        else:
            return None, f"unknown kind {kind}"
        if len(plain) != plain_length:
            return None, "decoded to the wrong length"
        return plain, ""

    def _damaged(self, path: str, hexname: str, info: os.stat_result, why: str) -> None:
        # Delete it unless another process has replaced it (a good copy) since we opened it.
        with contextlib.suppress(OSError):
            now = os.stat(path, follow_symlinks=False)
            if (now.st_ino, now.st_dev) == (info.st_ino, info.st_dev):
                os.unlink(path)
        log.warning("disk cache: dropped a damaged file (%s); fetching the block again", why)
        with self._lock:
            self._corrupt += 1
            self._misses += 1
            self._forget(hexname)

    def _unreadable(self, exc: OSError) -> None:
        log.warning("disk cache: cannot read a cache file (%s); fetching the block again", exc.strerror)
        with self._lock:
            self._read_errors += 1
            self._misses += 1

    def _forget(self, hexname: str) -> None:
        """Under the lock: drop ``hexname`` from the index."""
        size = self._index.pop(hexname, None)
        if size is not None:
            self._total -= size

    # --- writing (worker threads) ---------------------------------------------------------------------------------

    def _save(self, name: bytes, kind: int, plain_length: int, payload: BlockData) -> None:
        try:
            self._write(name, kind, plain_length, payload)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                log.warning("disk cache: cannot write a block (%s); it stays uncached", exc.strerror)
            with self._lock:
                self._skipped += 1

    def _write(self, name: bytes, kind: int, plain_length: int, payload: BlockData) -> None:
        nonce = os.urandom(NONCE_BYTES)
        if kind == KIND_SEALED:
            header = HEADER.pack(MAGIC, FORMAT_VERSION, kind, 0, plain_length, len(payload) + TAG_BYTES, name, nonce)
            parts: list[bytes | bytearray | memoryview] = [header, self._aead.encrypt(nonce, payload, header)]
        else:
            header = HEADER.pack(MAGIC, FORMAT_VERSION, kind, 0, plain_length, len(payload), name, nonce)
            encryptor = Cipher(algorithms.AES(self._seal_key), modes.GCM(nonce)).encryptor()
            encryptor.authenticate_additional_data(header)
            encryptor.authenticate_additional_data(payload)
            encryptor.finalize()
            parts = [header, payload, encryptor.tag]
        size = sum(len(part) for part in parts)
        if not self._make_room(size):
            with self._lock:
                self._skipped += 1
            return
        hexname = name.hex()
        tmp = os.path.join(self._tmp, f"{hexname}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = self._create(tmp)
        try:
            try:
                _write_all(fd, parts)
            finally:
                os.close(fd)
            final = self._path(hexname)
            try:
                os.rename(tmp, final)
            except FileNotFoundError:  # the shard folder is not there yet (or was removed)
                os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
                os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        rescan = False
        with self._lock:
            self._forget(hexname)
            self._index[hexname] = size
            self._total += size
            self._writes += 1
            self._written_bytes += size
            self._since_scan_bytes += size
            victims = self._over_size()
            if self._since_scan_bytes >= self._rescan_bytes and not self._scanning:
                rescan = self._scanning = True
        self._evict(victims)
        if rescan:
            self._scan()

    def _create(self, tmp: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # DIR/tmp removed under us (someone emptied the cache): make it again
            os.makedirs(self._tmp, mode=0o700, exist_ok=True)
            return os.open(tmp, flags, 0o600)

    def _over_size(self) -> list[str]:
        """Under the lock: take least recently used names out of the index until it fits ``size_bytes``."""
        victims: list[str] = []
        while self._total > self.settings.size_bytes and self._index:
            hexname, size = self._index.popitem(last=False)
            self._total -= size
            victims.append(hexname)
        return victims

    def _make_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit above the free-space floor, evicting LRU files until they do."""
        if size > self.settings.size_bytes:
            return False
        while True:
            try:
                stat = os.statvfs(self.root)
            except OSError:
                return False
            free = stat.f_bavail * stat.f_frsize
            if free - size >= self.settings.min_free_bytes:
                return True
            with self._lock:
                victims: list[str] = []
                need = self.settings.min_free_bytes + size - free
                while need > 0 and self._index:
                    hexname, victim_size = self._index.popitem(last=False)
                    self._total -= victim_size
                    need -= victim_size
                    victims.append(hexname)
            if not victims:
                return False
            self._evict(victims)

    def _evict(self, victims: list[str]) -> None:
        for hexname in victims:
            with contextlib.suppress(FileNotFoundError):  # another process evicted it first
                os.unlink(self._path(hexname))
        if victims:
            with self._lock:
                self._evictions += len(victims)

    # --- scanning (worker threads) --------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Rebuild the index from DIR (LRU order = access time), drop stale temp files, evict what is over size."""
        found: list[tuple[int, str, int]] = []  # (atime_ns, hexname, size)
        started = time.time()
        with self._lock:
            self._scanning = True
            self._since_scan_bytes = 0
        try:
            try:
                shards = [entry for entry in os.scandir(self.root) if len(entry.name) == 2 and entry.is_dir()]
            except OSError as exc:
                log.warning("disk cache: cannot list %s (%s)", self.root, exc.strerror)
                shards = []
            for shard in shards:
                with contextlib.suppress(OSError), os.scandir(shard.path) as entries:
                    for entry in entries:
                        if len(entry.name) == 64 and entry.name.startswith(shard.name):
                            with contextlib.suppress(OSError):
                                info = entry.stat(follow_symlinks=False)
                                found.append((info.st_atime_ns, entry.name, info.st_size))
            with contextlib.suppress(OSError), os.scandir(self._tmp) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_mtime < started - STALE_TMP_SECONDS:
                            os.unlink(entry.path)
            found.sort()
            with self._lock:
                seen = {name for _, name, _ in found}
                recent = [(k, v) for k, v in self._index.items() if k not in seen]
                self._index = OrderedDict((name, size) for _, name, size in found)
                # Files this process wrote while the scan ran are not in ``found`` yet; they are the most recent.
                for hexname, size in recent[-256:]:
                    self._index[hexname] = size
                self._total = sum(self._index.values())
                victims = self._over_size()
        finally:
            with self._lock:
                self._scanning = False
        self._evict(victims)


def _write_all(fd: int, parts: list[bytes | bytearray | memoryview]) -> None:
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        count = os.writev(fd, views)
        while views and count >= len(views[0]):
            count -= len(views[0])
            views.pop(0)
        if views and count:
            views[0] = views[0][count:]


def _prepare(settings: DiskCacheSettings) -> DiskCache:
    directory = settings.directory
    assert directory is not None
    key_file = settings.key_file or default_key_file()
    if _inside(key_file, directory):
        raise ConfigError(f"the disk cache key file {key_file} must not lie inside the cache folder {directory}")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)  # the folder itself 0700 (makedirs gives parents 0755)
        os.makedirs(os.path.join(directory, TMP_DIR), mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use {directory} as a disk cache: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot use {directory} as a disk cache: not writable")
    return DiskCache(settings, _load_key(key_file))


async def open_disk_cache(settings: DiskCacheSettings) -> DiskCache:
    """The disk cache of ``settings.directory``: the folder and key file made ready and the index scanned, in a
    worker thread. Raises ``ConfigError`` for an unusable folder or key file."""

    def prepare_and_scan() -> DiskCache:
        cache = _prepare(settings)
        cache._scan()
        return cache

    return await trio.to_thread.run_sync(prepare_and_scan, limiter=worker_limiter())


@dataclass(frozen=True, slots=True)
class DiskTier:
    """What one read engine needs of a disk cache: the cache and the *scope* of its source (its display URL, which
    carries no credentials), so two stores never share a name."""

    cache: DiskCache
    scope: str


__all__ = [
    "DiskCache",
    "DiskCacheSettings",
    "DiskStatistics",
    "DiskTier",
    "default_key_file",
    "open_disk_cache",
    "stable_identity",
]
