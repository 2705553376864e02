"""``ctera://``: an fsspec filesystem over the directfs read engine, for pandas, pyarrow, Dask and friends.

::

    import fsspec, pandas as pd
    fs = fsspec.filesystem("ctera", portal_url="https://tenant.example.com")   # the rest from DIRECTFS_* / config
    fs.ls("Projects", detail=True)          # name, size, type, mtime, file_id
    df = pd.read_csv("ctera://Projects/a.csv", storage_options={"portal_url": "https://tenant.example.com"})

Paths are the paths under the mount root (``ctera://Projects/a.csv`` is ``/mnt/ctera/Projects/a.csv`` of a mount of
the same Portal). Registered through the ``fsspec.specs`` entry point, so nothing imports directfs first.

Configuration (``docs/python-data-tools.md``): ``storage_options`` take the store options of ``directfs ls`` under
their option names (``portal_url``, ``access_key_id``, ``secret_access_key``, ``username``, ``password``, ``token``,
``verify_tls``, ``ca_file``, ..., ``cache_size``, ``read_ahead``); each one not given falls back to its ``DIRECTFS_*``
variable and the config file, exactly as the CLI's flags do (``config.source_settings``). ``portal_url`` falls back
to ``$DIRECTFS_PORTAL_URL`` and may name a ``[source.NAME]`` of the config file. Keys and values are checked when the
filesystem is built (a typo is a ``ConfigError`` at once); the environment and the config file are read at the first
call, in the process that makes it, so a Dask worker uses its own environment, and ``fsspec.filesystem("ctera")``
with nothing configured builds and only its first call says what is missing.

Thread model: one trio thread per process (:class:`_EngineThread`, started at the first call, stopped at exit by
``atexit``) runs every request. A sync call from any thread (plain code, worker threads, an asyncio or trio program's
own thread) hands a coroutine to it and waits for the answer; nothing of the caller's event loop is used. A caller
interrupted while it waits (``KeyboardInterrupt``) cancels its request. Filesystems with the same options share one
*session* in the process (:class:`_Session`: the source with its connections, and one ``ReadEngine`` whose cache,
read-ahead and single-flight serve every file and thread), even though fsspec makes one instance per thread.

Pickling: fsspec's convention, by the options as given (``storage_args``/``storage_options``), so a Dask worker in
another process builds its own filesystem, session and connections; secrets given in ``storage_options`` travel in
the pickle (prefer ``DIRECTFS_*`` or the config file on the workers). ``repr`` never shows a secret.

Errors are the ``directfs.errors`` classes, which are builtin ``OSError`` subclasses (``FileNotFoundError``,
``PermissionError``, ``TimeoutError``, ...). Writes (``open("wb")``, ``put``, ``mkdir``, ``rm``, ``mv``) go through
the store's ``Writable`` side; a store without one raises ``PermissionError``.

Layering: on top, beside ``cli`` (it folds ``config`` and uses the commands' credential builders and part files).
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import difflib
import io
import itertools
import logging
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import fsspec
import trio
from fsspec.utils import tokenize

from .api import API_READ_SETTINGS
from .commands import common
from .commands.partfile import PartFile, pwrite_all
from .config import source_settings
from .engine.reader import FileReader, ReadEngine, ReadSettings
from .engine.streams import fetch_all
from .errors import (
    ConfigError,
    DirectFSError,
    EntryExistsError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    NoSuchAttributeError,
    NotADirectory,
    PermissionDeniedError,
    WriteNotSupportedError,
    ours_only,
)
from .options import OPTIONS, SECRET_KEYS, STORE_GROUPS, names_in
from .sources.base import Entry, OpenFile, Source, SourceOptions, Writable, join, valid_name
from .sources.registry import create_source

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_PORTAL_URL: Final = "DIRECTFS_PORTAL_URL"  # config.OTHER_ENV knows it, so the CLI does not warn about it
# The store options of `directfs ls` (credentials, TLS, stores, the config file), under the same names: those that go
# into SourceOptions and Credentials, the secret files, --config and --strict-permissions. Store options with another
# home (the disk cache's) are not taken until this module passes them on: accepted and ignored would be a lie.
_STORE_KEYS: Final = frozenset(
    name
    for name in names_in(STORE_GROUPS)
    if (home := OPTIONS[name].home) is None or home.owner in ("SourceOptions", "Credentials")
)
_ENGINE_KEYS: Final = ("cache_size", "read_ahead")  # the mount's flags; here with the Python API's defaults
_FSSPEC_KEYS: Final = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths"})  # fsspec's DirCache
KNOWN_OPTIONS: Final = frozenset({"portal_url", *_STORE_KEYS, *_ENGINE_KEYS, *_FSSPEC_KEYS})

# 5 s: the mount's --metadata-ttl default; a listing answers info() and glob() for that long (fsspec's DirCache),
# so a Dask graph over a folder costs one PROPFIND, while a change elsewhere shows within seconds.
DEFAULT_LISTINGS_EXPIRY_SECONDS: Final = 5.0
# Every call hops to the engine thread and back (~50 us); a small read asks for up to this much more, within the block
# (and the cheap-first-fetch range) it ends in, so it costs no extra GET, and keeps it for the next reads: readline()
# and parsers reading a few bytes at a time cost one hop per 64 KiB, while a random read still costs one block GET.
MIN_READ_BYTES: Final = 64 * 1024
# A large read is asked of the engine in pieces of this size, in order: the engine sees a sequential reader (read-ahead
# keeps 8 blocks in flight) instead of one read of every block at once, and memory is the result plus a window.
READ_PIECE_BYTES: Final = 8 * 1024 * 1024
# get(): files downloaded at once, and blocks fetched or held at once across them. 8 and 8: the per-file cost (a
# PROPFIND, a block list) overlaps for small files, while memory stays at 8 blocks, the CLI's --max-workers default.
DEFAULT_FILES_AT_ONCE: Final = 8
DEFAULT_BLOCKS_AT_ONCE: Final = 8
# At exit, sessions get this long to close their connections; a hung server does not hold the interpreter.
CLOSE_TIMEOUT_SECONDS: Final = 5.0
# The engine thread is ready in milliseconds; a thread that never reports is broken, not slow.
START_TIMEOUT_SECONDS: Final = 30.0


# --- the engine thread: one trio run per process ------------------------------------------------------------------


class _EngineThread:
    """A daemon thread running ``trio.run``; :meth:`call` runs a coroutine function there and waits for its result.

    Requests are spawned with ``TrioToken.run_sync_soon`` into a nursery of the run (not with ``trio.from_thread``,
    which refuses a thread that runs a trio loop of its own: a trio program calling fsspec is a valid caller too).
    Sessions live in the same nursery until :meth:`stop`."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.sessions: dict[str, _Session] = {}  # touched only on the engine thread
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping: trio.Event | None = None
        self._failure: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="directfs-fsspec", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_SECONDS) or self._token is None:
            raise DirectFSError(f"the directfs engine thread did not start: {self._failure!r}")

    def _run(self, ready: threading.Event) -> None:
        try:
            trio.run(self._main, ready)
        except BaseException as exc:  # reported by call(); a daemon thread has nobody else to tell
            self._failure = exc
            log.error("the directfs engine thread stopped: %r", exc)
        finally:
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            ready.set()
            await self._stopping.wait()
            with trio.move_on_after(CLOSE_TIMEOUT_SECONDS) as scope:
                scope.shield = True
                for session in list(self.sessions.values()):
                    await session.aclose()
            self.sessions.clear()
            nursery.cancel_scope.cancel()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._token is not None and self.pid == os.getpid()

    def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await function(*args)`` on the engine thread; its result, or its exception, here."""
        if threading.current_thread() is self._thread:
            raise DirectFSError("a ctera:// filesystem call from the engine thread itself would wait for itself")
        token = self._token
        if token is None or not self._thread.is_alive():
            raise DirectFSError(f"the directfs engine thread is not running: {self._failure!r}")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        scope = trio.CancelScope()

        def spawn() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(self._serve, future, scope, function, args)

        try:
            token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            raise DirectFSError("the directfs engine thread has stopped (interpreter exit)") from None
        try:
            return future.result()
        except BaseException as exc:
            if not future.done():  # interrupted while waiting: the request is not wanted any more
                future.cancel()
                with contextlib.suppress(trio.RunFinishedError):  # stopped: nothing left to cancel
                    token.run_sync_soon(scope.cancel)
            if isinstance(exc, concurrent.futures.CancelledError):
                raise DirectFSError("the request was cancelled: the engine thread is stopping") from None
            raise

    @staticmethod
    async def _serve(
        future: concurrent.futures.Future[T],
        scope: trio.CancelScope,
        function: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return
        error: BaseException | None = None
        result: Any = None
        with scope:
            try:
                result = await function(*args)
            except BaseException as exc:  # handed to the waiting thread; Cancelled is absorbed by our own scope
                error = exc
        if scope.cancelled_caught or isinstance(error, trio.Cancelled):
            future.set_exception(concurrent.futures.CancelledError())
        elif error is not None:
            future.set_exception(ours_only(error) or error)
        else:
            future.set_result(result)

    async def session(self, target: _Target) -> _Session:
        """The session of ``target``'s options, started on first use (runs on the engine thread)."""
        session = self.sessions.get(target.key)
        if session is None:
            assert self._nursery is not None
            session = self.sessions[target.key] = _Session(target)
            self._nursery.start_soon(session.serve)
        await session.ready.wait()
        if session.failure is not None:
            self.sessions.pop(target.key, None)  # the next call tries again
            raise session.failure
        return session

    def stop(self) -> None:
        """Close every session (bounded by ``CLOSE_TIMEOUT_SECONDS``) and end the run. Idempotent."""
        if not self.alive or self._token is None or self._stopping is None:
            return
        try:
            self._token.run_sync_soon(self._stopping.set)
        except trio.RunFinishedError:
            return
        self._thread.join(CLOSE_TIMEOUT_SECONDS + 1.0)


_engine_lock = threading.Lock()
_engine: _EngineThread | None = None


def engine_thread() -> _EngineThread:
    """The process's engine thread, started on first use (again in a forked child: threads do not survive a fork)."""
    global _engine
    with _engine_lock:
        if _engine is None or _engine.pid != os.getpid() or not _engine.alive:
            _engine = _EngineThread()
        return _engine


def _reset_after_fork() -> None:
    global _engine, _engine_lock
    _engine = None  # the parent's thread and connections are not ours; a new thread starts at the first call
    _engine_lock = threading.Lock()


@atexit.register
def _stop_at_exit() -> None:
    engine = _engine
    if engine is not None and engine.pid == os.getpid():
        engine.stop()


os.register_at_fork(after_in_child=_reset_after_fork)


# --- what a filesystem's options resolve to -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    """The resolved options: the store URL, its ``SourceOptions`` (credentials inside, hidden from repr) and the
    engine's settings. ``key`` names the session (the options as given, hashed)."""

    key: str
    url: str
    options: SourceOptions = dataclasses.field(repr=False)
    read_settings: ReadSettings
    is_ctera: bool


def _parse_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """``storage_options`` checked and parsed (no I/O): ConfigError for an unknown key or a bad value."""
    parsed: dict[str, Any] = {}
    for key, value in given.items():
        if key not in KNOWN_OPTIONS:
            close = difflib.get_close_matches(key, sorted(KNOWN_OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"ctera:// storage_options: unknown option {key!r}{hint}")
        if key in _FSSPEC_KEYS or value is None:
            continue
        if key == "portal_url":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError("ctera:// storage_options portal_url: expected https://HOST[:PORT] or a NAME")
            parsed[key] = value.strip()
            continue
        option = OPTIONS[key]
        try:
            parsed[key] = option.parse(value)
        except ValueError as exc:
            raise ConfigError(f"ctera:// storage_options {key}={option.shown(value)}: {exc}") from None
    return parsed


def _store_url(portal: str) -> str:
    """``https://HOST[:PORT][/folder]`` (or ``ctera+https://...``) -> the ctera source URL."""
    scheme, _, rest = portal.partition("://")
    scheme = scheme.lower()
    if scheme in ("https", "http"):
        return f"ctera+{scheme}://{rest}"
    if scheme in ("ctera+https", "ctera+http"):
        return f"{scheme}://{rest}"
    raise ConfigError(
        f"portal_url must be https://HOST[:PORT][/folder] or the NAME of a [source.NAME] of the config file, "
        f"not a {scheme}:// URL"
    )


def _resolve(parsed: Mapping[str, Any], key: str, env: Mapping[str, str]) -> _Target:
    """Fold ``parsed`` storage_options over ``DIRECTFS_*`` and the config file, as the CLI folds its flags."""
    portal = parsed.get("portal_url") or env.get(ENV_PORTAL_URL, "").strip()
    if not portal:
        raise ConfigError(
            "ctera:// needs a Portal: give storage_options portal_url='https://portal.example.com' (or the NAME of "
            f"a [source.NAME] of the config file), or set ${ENV_PORTAL_URL}"
        )
    name = None if "://" in portal else portal
    # The storage_options are the command line of this "command": given_flags reads them as flags.
    flags = argparse.Namespace(source=name, **{k: v for k, v in parsed.items() if k in _STORE_KEYS})
    settings = source_settings(flags, env, source=name)
    given_here = {k: f"storage_options {k}" for k in parsed if k in _STORE_KEYS}
    settings = dataclasses.replace(settings, origins={**settings.origins, **given_here})
    url = settings.source if name is not None else _store_url(portal)
    assert url is not None  # a NAME resolves to its url (config.Config.source raises otherwise)
    credentials = common.resolve_credentials(settings, env)
    options = common.build_source_options(settings, credentials)
    is_ctera = url.lower().startswith(("ctera+https://", "ctera+http://"))
    webdav_login = (credentials.username and credentials.password) or credentials.token or credentials.token_file
    if is_ctera and not webdav_login:
        missing = "password" if credentials.username else "username and password"
        raise ConfigError(
            f"ctera:// lists the Portal's namespace over WebDAV and needs a {missing} (storage_options "
            "username=/password=, $DIRECTFS_USERNAME and $DIRECTFS_PASSWORD, or the config file) or a token "
            "(storage_options token=, $DIRECTFS_TOKEN)"
        )
    sizes: dict[str, int] = {}
    for option_name in _ENGINE_KEYS:
        if option_name in parsed:
            sizes[option_name] = parsed[option_name]
            continue
        option = OPTIONS[option_name]
        text = env.get(option.env or "")
        if text:
            try:
                sizes[option_name] = option.parse(text)
            except ValueError as exc:
                raise ConfigError(f"environment {option.env}={option.shown(text)}: {exc}") from None
    read_settings = API_READ_SETTINGS
    if "cache_size" in sizes:
        cache = sizes["cache_size"]
        read_settings = dataclasses.replace(read_settings, cache_size_bytes=cache, prefetch_budget_bytes=cache // 2)
    if "read_ahead" in sizes:
        read_settings = dataclasses.replace(read_settings, read_ahead_max_bytes=sizes["read_ahead"])
    return _Target(key, url, options, read_settings, is_ctera)


# --- the session: a source and its engine, on the engine thread ---------------------------------------------------


class _Handle:
    """One open file of a session: the store's version and its reader through the engine."""

    def __init__(self, opened: OpenFile, reader: FileReader, entry: Entry) -> None:
        self.opened = opened
        self.reader = reader
        self.entry = entry


class _Session:
    """The source of one set of options and its ``ReadEngine`` (every method runs on the engine thread)."""

    def __init__(self, target: _Target) -> None:
        self.target = target
        self.ready = trio.Event()
        self.failure: BaseException | None = None
        self.source: Source | None = None
        self._engine: ReadEngine | None = None
        self._stop = trio.Event()
        self._done = trio.Event()
        self._handles: dict[int, _Handle] = {}
        self._ids = itertools.count(1)

    async def serve(self) -> None:
        """Own the engine's nursery until :meth:`aclose` (a task of the engine thread's nursery)."""
        try:
            try:
                self.source = create_source(self.target.url, self.target.options)
            except DirectFSError as exc:
                self.failure = exc
                return
            async with trio.open_nursery() as nursery:
                self._engine = ReadEngine(self.target.read_settings, nursery)
                self.ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except Exception as exc:  # a bug: this session is over, the engine thread and the other sessions go on
            log.error("a ctera:// session stopped: %r", exc)
            self.failure = DirectFSError(f"the ctera:// session stopped: {type(exc).__name__}")
        finally:
            self.ready.set()
            self._done.set()

    async def aclose(self) -> None:
        for handle_id in list(self._handles):
            await self.close_file(handle_id)
        self._stop.set()
        await self._done.wait()
        if self.source is not None:
            await self.source.aclose()

    @property
    def engine(self) -> ReadEngine:
        assert self._engine is not None  # set before ready
        return self._engine

    @property
    def store(self) -> Source:
        assert self.source is not None
        return self.source

    async def writable(self) -> bool:
        await trio.lowlevel.checkpoint()
        return isinstance(self.store, Writable)

    async def display_url(self) -> str:
        await trio.lowlevel.checkpoint()
        return self.store.display_url

    def writer(self, what: str) -> Writable:
        store = self.store
        if not isinstance(store, Writable):
            raise PermissionDeniedError(f"{store.display_url} is read-only: cannot {what}")
        return store

    # --- namespace ---

    async def stat(self, path: str) -> Entry:
        return await self.store.stat(path)

    async def list_dir(self, path: str) -> list[Entry]:
        return [entry async for entry in self.store.list_dir(path)]

    # --- reads ---

    async def open_file(self, path: str) -> tuple[int, Entry]:
        entry = await self.store.stat(path)
        if entry.is_dir:
            raise IsADirectory(filename=path or "/")
        handle = await self._open(path, entry)
        handle_id = next(self._ids)
        self._handles[handle_id] = handle
        return handle_id, entry

    async def _open(self, path: str, entry: Entry) -> _Handle:
        credentials = self.target.options.credentials
        if self.target.is_ctera and entry.size and not (credentials.access_key_id and credentials.secret_access_key):
            raise ConfigError(
                "reading CTERA files needs the Direct IO key pair: storage_options access_key_id= and "
                "secret_access_key= (or $DIRECTFS_ACCESS_KEY_ID and $DIRECTFS_SECRET_ACCESS_KEY, or the config file)"
            )
        opened = await self.store.open(path, entry)
        try:
            reader = self.engine.open(opened, ("fsspec", path))
        except BaseException:
            with trio.CancelScope(shield=True):
                await opened.aclose()
            raise
        return _Handle(opened, reader, entry)

    async def read(self, handle_id: int, offset: int, size: int, more: int = 0) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer only at EOF), copied out of the cache here, on the engine
        thread: the engine may reuse a block's memory once it is evicted. ``more``: up to that many bytes beyond,
        as long as they lie in the block (and the cheap-first-fetch range) the read ends in, so they cost no GET."""
        handle = self._handles.get(handle_id)
        if handle is None:
            raise InvalidArgumentError("read of a closed ctera:// file")
        reader = handle.reader
        end = offset + size
        if more > 0 and offset >= 0 and end < reader.size:
            last = max(offset, end - 1)
            layout = reader.layout
            block_end = layout.block_start(layout.block_at(last)) + layout.block_length(layout.block_at(last))
            granule = self.engine.settings.random_read_bytes
            range_end = (last // granule + 1) * granule if granule > 0 else block_end
            end = max(end, min(end + more, block_end, range_end))
        return await self._read(reader, offset, end - offset)

    @staticmethod
    async def _read(reader: FileReader, offset: int, size: int) -> bytes:
        end = min(offset + size, reader.size)
        if end <= offset:
            await trio.lowlevel.checkpoint()
            return b""
        if end - offset <= READ_PIECE_BYTES:
            return bytes(await reader.read(offset, end - offset))
        pieces = []
        for start in range(offset, end, READ_PIECE_BYTES):
            pieces.append(bytes(await reader.read(start, min(READ_PIECE_BYTES, end - start))))
        return b"".join(pieces)

    async def close_file(self, handle_id: int) -> None:
        handle = self._handles.pop(handle_id, None)
        if handle is None:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True):  # the reader's fetches must end before the file closes
            await handle.reader.aclose()
            await handle.opened.aclose()

    async def cat(self, path: str, start: int | None, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of ``path``, negative values counted from the end (Python slices), clipped."""
        handle_id, entry = await self.open_file(path)
        try:
            size = entry.size
            lo = 0 if start is None else max(0, size + start) if start < 0 else min(start, size)
            hi = size if end is None else max(0, size + end) if end < 0 else min(end, size)
            return await self.read(handle_id, lo, hi - lo)
        finally:
            await self.close_file(handle_id)

    async def download(self, pairs: list[tuple[str, str]], files_at_once: int, blocks_at_once: int) -> None:
        """Every ``(store path, local path)``: ``files_at_once`` files at a time, at most ``blocks_at_once`` blocks
        fetched or held across them; each written to a part file renamed into place when complete
        (``commands.partfile``). The first failure cancels the rest and is raised."""
        files = trio.Semaphore(files_at_once)
        blocks = trio.Semaphore(blocks_at_once)

        async def one(path: str, local: str) -> None:
            async with files:
                await self._download(path, local, blocks)

        try:
            async with trio.open_nursery() as nursery:
                for path, local in pairs:
                    nursery.start_soon(one, path, local)
        except BaseExceptionGroup as group:
            ours = ours_only(group)
            if ours is None:
                raise
            raise ours from None

    async def _download(self, path: str, local: str, blocks: trio.Semaphore) -> None:
        entry = await self.store.stat(path)
        if entry.is_dir:
            await trio.to_thread.run_sync(lambda: os.makedirs(local, exist_ok=True))
            return
        handle = await self._open(path, entry)
        try:
            part = await trio.to_thread.run_sync(PartFile.beside, local)
            try:

                async def write(offset: int, data: memoryview) -> None:
                    await trio.to_thread.run_sync(pwrite_all, part.fd, data, offset)

                await fetch_all(handle.reader, blocks, write)
                await trio.to_thread.run_sync(part.commit, entry.mtime_ns)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(part.discard)
                raise
        finally:
            with trio.CancelScope(shield=True):
                await handle.reader.aclose()
                await handle.opened.aclose()

    # --- writes ---

    async def upload(self, path: str, fd: int, size: int, mtime_ns: int | None = None) -> Entry:
        """The ``size`` bytes of ``fd`` become the file ``path`` (readers see the old or the new content)."""
        if not path:
            raise IsADirectory("the root is a folder, not a file to write", filename="/")
        upload = self.writer(f"write {path}").begin_upload(path)
        try:
            return await upload.commit(fd, size, mtime_ns=mtime_ns)
        except BaseException:
            with trio.CancelScope(shield=True):
                await upload.abort()  # idempotent, never raises
            raise

    async def copy(self, source: str, dest: str) -> Entry:
        """A file of the store to another name: read through the engine into a spool, then uploaded."""
        self.writer(f"copy to {dest}")  # refused before anything is read
        handle_id, entry = await self.open_file(source)
        try:
            spool = await trio.to_thread.run_sync(tempfile.TemporaryFile)
            try:
                for offset in range(0, entry.size, READ_PIECE_BYTES):
                    data = await self.read(handle_id, offset, READ_PIECE_BYTES)
                    await trio.to_thread.run_sync(pwrite_all, spool.fileno(), data, offset)
                return await self.upload(dest, spool.fileno(), entry.size, entry.mtime_ns or None)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(spool.close)
        finally:
            await self.close_file(handle_id)

    async def make_dir(self, path: str) -> Entry:
        if not path:
            raise _exists("/")
        return await self.writer(f"create folder {path}").make_dir(path)

    async def make_dirs(self, path: str, exist_ok: bool) -> None:
        parts = path.split("/") if path else []
        writer = self.writer(f"create folder {path}")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            try:
                await writer.make_dir(prefix)
            except FileExistsError:
                entry = await self.store.stat(prefix)
                if not entry.is_dir:
                    raise NotADirectory(filename=prefix) from None
                if depth == len(parts) and not exist_ok:
                    raise
        if not parts and not exist_ok:
            raise _exists("/")

    async def remove(self, path: str, want_dir: bool | None) -> None:
        """Remove ``path``: a file, an empty folder, or either when ``want_dir`` is None."""
        writer = self.writer(f"remove {path or '/'}")
        if not path:
            raise PermissionDeniedError("the root cannot be removed", filename="/")
        is_dir = want_dir
        if is_dir is None:
            is_dir = (await self.store.stat(path)).is_dir
        if is_dir:
            await writer.remove_dir(path)
        else:
            await writer.remove_file(path)

    async def rename(self, old: str, new: str) -> None:
        writer = self.writer(f"move {old}")
        if not old or not new:
            raise InvalidArgumentError("the root cannot be moved, nor anything moved over it")
        entry = await self.store.stat(old)
        await writer.rename(old, new, is_dir=entry.is_dir)


def _exists(path: str) -> EntryExistsError:
    return EntryExistsError(filename=path)


async def _in_session(engine: _EngineThread, target: _Target, method: str, *args: Any) -> Any:
    session = await engine.session(target)
    return await getattr(session, method)(*args)


# --- the filesystem -----------------------------------------------------------------------------------------------

# get() in progress on this thread: get_file() queues its files here, and get() downloads them all at once.
_get_batch: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("_get_batch", default=None)


def _info(path: str, entry: Entry) -> dict[str, Any]:
    return {
        "name": path,
        "size": entry.size,
        "type": "directory" if entry.is_dir else "file",
        "mtime": entry.mtime_ns / 1e9 if entry.mtime_ns > 0 else None,
        "file_id": entry.file_id,
    }


class CteraFileSystem(fsspec.AbstractFileSystem):  # type: ignore[misc]  # fsspec has no type information
    """fsspec filesystem ``ctera://`` (see the module docstring). Build it with ``fsspec.filesystem("ctera", ...)``
    or let ``fsspec.open``/pandas/Dask build it from ``storage_options``."""

    protocol = "ctera"
    root_marker = ""

    def __init__(self, **storage_options: Any) -> None:
        parsed = _parse_options(storage_options)  # first: a bad option is refused before anything is built
        fsspec_options = {k: v for k, v in storage_options.items() if k in _FSSPEC_KEYS}
        super().__init__(**fsspec_options)
        fsspec_options.setdefault("listings_expiry_time", DEFAULT_LISTINGS_EXPIRY_SECONDS)
        self.dircache = fsspec.dircache.DirCache(**fsspec_options)
        self._parsed = parsed
        # The session's name: the options as given (hashed), so every instance with them shares one session.
        self._key = tokenize(sorted((k, repr(v)) for k, v in storage_options.items() if k not in _FSSPEC_KEYS))
        self._target: _Target | None = None
        self._target_lock = threading.Lock()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{key}=<hidden>" if key in SECRET_KEYS else f"{key}={value!r}"
            for key, value in sorted(self._parsed.items())
        )
        return f"CteraFileSystem({shown})"

    __str__ = __repr__

    # --- plumbing ---

    def _resolved(self) -> _Target:
        with self._target_lock:
            if self._target is None:
                self._target = _resolve(self._parsed, self._key, os.environ)
            return self._target

    def _call(self, method: str, *args: Any) -> Any:
        target = self._resolved()
        engine = engine_thread()
        return engine.call(_in_session, engine, target, method, *args)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = fsspec.utils.stringify_path(path)
        for prefix in ("ctera://", "ctera::"):
            if text.startswith(prefix):
                text = text[len(prefix) :]
        return text.strip("/")

    @staticmethod
    def _store_path(path: str) -> str:
        """A stripped fsspec path as the Source API takes it; EINVAL for ``..``, empty names and the like."""
        if path and not all(valid_name(part) for part in path.split("/")):
            raise InvalidArgumentError(f"not a path in the namespace: {path!r}")
        return path

    def _path(self, path: Any) -> str:
        return self._store_path(self._strip_protocol(path))

    def _forget(self, *paths: str) -> None:
        """Drop the cached listings a change of ``paths`` makes stale (theirs and their parents')."""
        for path in paths:
            self.invalidate_cache(path)
            self.invalidate_cache(self._parent(path))

    def invalidate_cache(self, path: str | None = None) -> None:
        if path is None:
            self.dircache.clear()
        else:
            self.dircache.pop(self._strip_protocol(path), None)
        super().invalidate_cache(path)

    # --- namespace ---

    def ls(self, path: str, detail: bool = True, refresh: bool = False, **kwargs: Any) -> list[Any]:
        path = self._path(path)
        listing: list[dict[str, Any]] | None = None if refresh else self.dircache.get(path)
        if listing is None and path and not refresh:
            known = next((item for item in self.dircache.get(self._parent(path)) or () if item["name"] == path), None)
            if known is not None and known["type"] == "file":  # a file: fsspec's ls answers it, no listing asked
                return [dict(known) if detail else path]
        if listing is None:
            try:
                entries: list[Entry] = self._call("list_dir", path)
            except NotADirectoryError:
                return [self.info(path) if detail else path]
            listing = [_info(join(path, entry.name), entry) for entry in sorted(entries, key=lambda e: e.name)]
            self.dircache[path] = listing
        return listing if detail else [item["name"] for item in listing]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._path(path)
        if path and not kwargs.get("refresh"):
            listing = self.dircache.get(self._parent(path))  # None once expired (fsspec's DirCache)
            if listing is not None:
                for item in listing:
                    if item["name"] == path:
                        return dict(item)
                raise EntryNotFoundError(filename=path)  # a listing within its expiry time has no such name
        entry: Entry = self._call("stat", path)
        return _info(path, entry)

    def modified(self, path: str) -> datetime:
        mtime = self.info(path).get("mtime")
        if mtime is None:
            raise NoSuchAttributeError(f"the store keeps no modification time for {path!r}")
        return datetime.fromtimestamp(mtime, tz=UTC)

    # --- reads ---

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> io.RawIOBase:
        path = self._path(path)
        if mode == "rb":
            handle_id, entry = self._call("open_file", path)
            return CteraFile(self, path, handle_id, entry)
        if mode in ("wb", "xb"):
            if not self._is_writable():
                raise PermissionDeniedError(f"{self._display_url()} is read-only: cannot write {path}")
            if mode == "xb" and self.exists(path):
                raise _exists(path)
            return CteraWriteFile(self, path, autocommit=autocommit)
        raise WriteNotSupportedError(f"mode {mode!r}: ctera:// files open as rb, wb or xb (a new version each time)")

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        data: bytes = self._call("cat", self._path(path), start, end)
        return data

    def get(
        self,
        rpath: Any,
        lpath: Any,
        recursive: bool = False,
        callback: Any = fsspec.callbacks.DEFAULT_CALLBACK,
        maxdepth: int | None = None,
        files_at_once: int = DEFAULT_FILES_AT_ONCE,
        **kwargs: Any,
    ) -> None:
        """fsspec's ``get`` (same paths, same rules), with the files downloaded ``files_at_once`` at a time: fsspec
        picks the pairs and calls ``get_file`` for each, which only queues them here; then they run together."""
        if files_at_once < 1:
            raise InvalidArgumentError(f"files_at_once must be at least 1, not {files_at_once}")
        batch: list[tuple[str, str]] = []
        token = _get_batch.set(batch)
        try:
            super().get(rpath, lpath, recursive=recursive, callback=callback, maxdepth=maxdepth, **kwargs)
        finally:
            _get_batch.reset(token)
        if batch:
            self._call("download", batch, files_at_once, DEFAULT_BLOCKS_AT_ONCE)

    def get_file(self, rpath: Any, lpath: Any, callback: Any = None, outfile: Any = None, **kwargs: Any) -> None:
        if outfile is not None or fsspec.utils.isfilelike(lpath):
            super().get_file(rpath, lpath, outfile=outfile, **kwargs)  # a stream the caller owns
            return
        path = self._path(rpath)
        local = os.fspath(lpath)
        if self.isdir(path):
            os.makedirs(local, exist_ok=True)
            return
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        batch = _get_batch.get()
        if batch is not None:
            batch.append((path, local))
        else:
            self._call("download", [(path, local)], 1, DEFAULT_BLOCKS_AT_ONCE)

    # --- writes ---

    def _is_writable(self) -> bool:
        return bool(self._call("writable"))

    def _display_url(self) -> str:
        return str(self._call("display_url"))

    def put_file(self, lpath: Any, rpath: Any, callback: Any = None, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._path(rpath)
        local = os.fspath(lpath)
        if os.path.isdir(local):
            self.makedirs(path, exist_ok=True)
            return
        if mode == "create" and self.exists(path):
            raise _exists(path)
        parent = self._parent(path)
        if parent and not self._is_dir_quietly(parent):  # fsspec's put_file makes the parents too
            self.makedirs(parent, exist_ok=True)
        with open(local, "rb") as handle:
            info = os.fstat(handle.fileno())
            self._call("upload", path, handle.fileno(), info.st_size, info.st_mtime_ns)
        self._forget(path)

    def cp_file(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        dest = self._path(path2)
        self._call("copy", self._path(path1), dest)
        self._forget(dest)

    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._path(path)
        if create_parents and "/" in path:
            self._call("make_dirs", self._parent(path), True)
        self._call("make_dir", path)
        self._forget(path)

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        path = self._path(path)
        self._call("make_dirs", path, exist_ok)
        self._forget(path)

    def rmdir(self, path: Any) -> None:
        path = self._path(path)
        self._call("remove", path, True)
        self._forget(path)

    def rm_file(self, path: Any) -> None:
        path = self._path(path)
        self._call("remove", path, False)
        self._forget(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        for item in reversed(paths):  # sorted: a folder's entries come after it, so they go first
            item = self._path(item)
            self._call("remove", item, None)
            self._forget(item)

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        """One path: the store's move (a folder with everything in it; ``CrossDeviceError`` where the store cannot
        move folders). A list or a glob: fsspec's copy and remove."""
        single = isinstance(path1, str) and isinstance(path2, str) and not any(char in path1 for char in "*?[")
        if not single:
            super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
            return
        old, new = self._path(path1), self._path(path2)
        if path2.endswith("/") or (new != old and self._is_dir_quietly(new)):
            new = join(new, old.rsplit("/", 1)[-1])
        if new == old:
            return
        self._call("rename", old, new)
        self._forget(old, new)

    def _is_dir_quietly(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "directory")
        except FileNotFoundError:
            return False


class CteraFile(io.RawIOBase):
    """A file of the store opened ``rb``: seekable, every read through the session's engine (cache, read-ahead,
    one block GET for a small random read). Small reads are served from the last ``MIN_READ_BYTES`` asked for."""

    def __init__(self, fs: CteraFileSystem, path: str, handle_id: int, entry: Entry) -> None:
        super().__init__()
        self.fs = fs
        self.path = path
        self.mode = "rb"
        self.size = entry.size
        self.details = _info(path, entry)
        self.loc = 0
        self._handle_id = handle_id
        self._buffer = b""
        self._buffer_start = 0

    def __repr__(self) -> str:
        return f"<CteraFile ctera://{self.path} size={self.size}>"

    def info(self) -> dict[str, Any]:
        return dict(self.details)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self.loc

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self.loc + offset
        elif whence == io.SEEK_END:
            position = self.size + offset
        else:
            raise InvalidArgumentError(f"invalid whence {whence}")
        if position < 0:
            raise InvalidArgumentError(f"negative seek position {position}")
        self.loc = position
        return position

    def _check_open(self) -> None:
        if self.closed:
            raise InvalidArgumentError(f"I/O operation on closed file ctera://{self.path}")

    def _fill(self, size: int) -> None:
        """Have the buffer start at ``loc`` and hold at least ``size`` bytes (fewer at EOF)."""
        offset = self.loc - self._buffer_start
        if offset >= 0 and offset + size <= len(self._buffer):
            return
        self._buffer = self.fs._call("read", self._handle_id, self.loc, size, MIN_READ_BYTES - size)
        self._buffer_start = self.loc

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        if size is None or size < 0:
            size = max(0, self.size - self.loc)
        if size == 0 or self.loc >= self.size:
            return b""
        if size >= MIN_READ_BYTES:  # large: straight from the engine, no copy into the buffer
            offset = self.loc - self._buffer_start
            if offset >= 0 and offset + size <= len(self._buffer):
                data = self._buffer[offset : offset + size]
            else:
                data = self.fs._call("read", self._handle_id, self.loc, size)
        else:
            self._fill(size)
            offset = self.loc - self._buffer_start
            data = self._buffer[offset : offset + size]
        self.loc += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def peek(self, size: int = 1) -> bytes:
        """The bytes from the position on, without moving it (at least one unless at EOF); io.IOBase.readline uses
        it, so lines cost one engine call per ``MIN_READ_BYTES``."""
        self._check_open()
        if self.loc >= self.size:
            return b""
        self._fill(max(size, 1))
        offset = self.loc - self._buffer_start
        return self._buffer[offset:]

    def close(self) -> None:
        if not self.closed:
            self._buffer = b""
            engine = _engine
            try:
                if engine is not None and engine.alive:  # at interpreter exit the engine may be gone already
                    self.fs._call("close_file", self._handle_id)
            finally:
                super().close()


class CteraWriteFile(io.RawIOBase):
    """A file opened ``wb``: written to a local spool (an unnamed temporary file), sent as one new version when
    closed (``commit``), or dropped (``discard``: a ``with`` block left by an exception, or a failed transaction).
    Under an fsspec transaction (``autocommit`` False) the transaction commits it."""

    def __init__(self, fs: CteraFileSystem, path: str, *, autocommit: bool) -> None:
        super().__init__()
        self.fs = fs
        self.path = path
        self.mode = "wb"
        self.autocommit = autocommit
        self._spool: Any = tempfile.TemporaryFile()  # noqa: SIM115  # closed by commit() or discard()
        self._size = 0

    def __repr__(self) -> str:
        return f"<CteraWriteFile ctera://{self.path}>"

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def write(self, data: Any) -> int:
        if self.closed:
            raise InvalidArgumentError(f"write to closed file ctera://{self.path}")
        written: int = self._spool.write(data)
        self._size += written
        return written

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.autocommit:
            self.commit()

    def commit(self) -> None:
        """Send the spooled bytes as the file's new content (raises what the store answered), then drop the spool."""
        if self._spool is None:
            return
        try:
            self._spool.flush()
            self.fs._call("upload", self.path, self._spool.fileno(), self._size, None)
            self.fs._forget(self.path)
        finally:
            self.discard()

    def discard(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()
        if not self.closed:
            super().close()

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is not None:
            self.discard()  # an exception inside the block: nothing is sent
        else:
            self.close()


__all__ = ["KNOWN_OPTIONS", "CteraFile", "CteraFileSystem", "CteraWriteFile"]
