"""Process lifecycle of ``directfs serve``: open the index, ingest, listen, announce, rescan, stop on a signal.

Startup contract (test fixtures rely on it): after the first scan has finished *and* the socket listens, exactly one
line goes to stdout, ``directfs serve: listening on http(s)://HOST:PORT``, and stdout is flushed. Everything else
goes to stderr. SIGTERM and SIGINT exit 0 promptly; SIGHUP asks for a rescan; SIGUSR2 resets the change feed (every
cursor handed out so far then answers 410: docs/serve-feed.md).

The state dir holds the index (wrapped file keys), the URL signing key and the block objects: it must be ours and
private. An existing one that is group/other-writable or owned by another user is refused (whoever can write it can
plant keys or objects); a new one is created 0700, and ``index.sqlite3`` is kept 0600.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import ssl
import stat
import sys
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import ConfigError
from ..http import is_loopback_host
from ..sources.ctera.codec import wrap_file_key
from .app import COUNTS_PATH, Portal, RedactingAccessLogger, log_safe, make_app
from .config import ServeConfig
from .index import Index
from .store import BlockStore, LocalBlockStore, S3BlockStore, UrlSigner

log = logging.getLogger("directfs.server")

# Seconds the server waits for in-flight requests after SIGTERM. Long-polls are cancelled, not awaited; 2 s lets a
# block GET that is nearly done finish without making "stop promptly" slow.
SHUTDOWN_GRACE_SECONDS = 2.0
INDEX_FILE: Final = "index.sqlite3"
# Wraps the file keys when no Direct IO key pair is configured (Direct IO is then off): random per state dir, so it is
# never the public demo secret and survives a restart (the files keep their ids).
WRAPPING_SECRET_FILE: Final = "file-key-wrapping.key"  # noqa: S105 - a file name
WRAPPING_SECRET_BYTES: Final = 30  # 40 base64 characters: the shape of a real CTERA secret access key


# Characters of a malformed request kept in its one-line log record: enough to recognise it, bounded however long
# the request line was (aiohttp accepts 8 KiB).
BAD_REQUEST_LOG_CHARS: Final = 200


class BadRequestFilter(logging.Filter):
    """aiohttp logs every malformed request (a bad request line, a control character in a header) as an ERROR with a
    traceback: anyone who can connect could fill the log with them. Such a record becomes one INFO line with the
    parser's message, escaped; errors of our own handlers keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "bad HTTP request from %s: %s"
            record.args = (log_safe(remote), log_safe(" ".join(str(exc.message).split())[:BAD_REQUEST_LOG_CHARS]))
            record.exc_info, record.exc_text = None, None
        return True


def prepare_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` 0700, or accept an existing one only if it is ours and not group/other-writable; then make
    sure the index (wrapped keys) is 0600 before SQLite opens it (its -wal/-shm files inherit the mode)."""
    if not state_dir.exists():
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # a concurrent start made it: checked below like any other
            state_dir.mkdir(mode=0o700)
    try:
        st = os.stat(state_dir)
    except OSError as exc:
        raise ConfigError(f"cannot use the state dir {str(state_dir)!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the state dir {str(state_dir)!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"refusing the state dir {str(state_dir)!r}: it is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.geteuid()}); use a state dir of your own (--state-dir)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"refusing the state dir {str(state_dir)!r}: it is group/other-writable (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); anyone who can write it can plant keys and blocks: chmod 700 it"
        )
    for name in (INDEX_FILE, INDEX_FILE + "-wal", INDEX_FILE + "-shm"):
        path = state_dir / name
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if name == INDEX_FILE else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            continue  # no -wal/-shm yet: SQLite creates them with the index's mode
        except OSError as exc:
            raise ConfigError(f"cannot open {str(path)!r}: {exc.strerror}") from None
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                os.fchmod(fd, 0o600)  # an older version made it 0644
        except OSError as exc:
            raise ConfigError(f"cannot make {str(path)!r} private (0600): {exc.strerror}") from None
        finally:
            os.close(fd)


def wrapping_secret(state_dir: Path) -> str:
    """The per-state-dir secret that wraps file keys when no key pair is configured (created 0600 on first use)."""
    path = state_dir / WRAPPING_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        try:
            value = path.read_text(encoding="ascii").strip()
            wrap_file_key(bytes(32), value)
        except (OSError, UnicodeDecodeError):
            raise ConfigError(f"{path} is damaged: delete it (every file is then re-encoded)") from None
        return value
    value = base64.b64encode(secrets.token_bytes(WRAPPING_SECRET_BYTES)).decode("ascii")
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
    return value


def _bind(host: str, port: int) -> socket.socket:
    """Bind now (the port is known before ingest, for block URLs); the site starts listening after the ingest."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _open_store(config: ServeConfig) -> BlockStore:
    if config.store.kind == "s3":
        return S3BlockStore(config.store)
    return LocalBlockStore(config.state_dir / "objects", UrlSigner.from_state_dir(config.state_dir))


def _warn_about_exposure(config: ServeConfig) -> None:
    if not config.credentials.direct_io:
        log.warning(
            "Direct IO is off: no access key pair is configured (DIRECTFS_ACCESS_KEY_ID, DIRECTFS_SECRET_ACCESS_KEY), "
            "so /directio refuses every request; file keys are wrapped with the random secret in %s",
            config.state_dir / WRAPPING_SECRET_FILE,
        )
    if not config.tls_cert and not is_loopback_host(config.host):
        log.warning(
            "serving plain HTTP on %s, which the network can reach: passwords, tokens and file keys cross it in "
            "clear; use --tls-cert/--tls-key, or listen on 127.0.0.1",
            config.host,
        )


async def serve(config: ServeConfig) -> int:
    prepare_state_dir(config.state_dir)
    _warn_about_exposure(config)
    store = _open_store(config)
    index = Index(
        root=config.root,
        state_dir=config.state_dir,
        store=store,
        rules=config.encoding,
        secret_access_key=config.credentials.secret_access_key or wrapping_secret(config.state_dir),
        workers=config.ingest_workers,
        sweep_upload_leftovers=config.writable,
        feed_retention_events=config.feed_retention_events,
    )
    if isinstance(store, LocalBlockStore):
        index.forget_missing_objects(store.exists)
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    listen_url = f"{config.scheme}://{url_host}:{port}"
    portal = Portal(
        config=config,
        index=index,
        store=store,
        base_url=(config.public_url or listen_url).rstrip("/"),
        # A seed makes fault tests reproducible; without one faults are random per run. Not for security.
        rng=random.Random(config.faults.seed),  # noqa: S311
    )
    if config.faults.active:
        log.warning("TEST FAULT INJECTION IS ON: %s", config.faults)
    if config.faults.count_requests:
        log.info("TEST ONLY: counting requests, answered at %s", COUNTS_PATH)
    if config.writable:
        log.info("writes are on: the portal user may PUT, MKCOL, DELETE, MOVE and PROPPATCH in %s", config.root)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    rescan_requested = asyncio.Event()
    reset_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, rescan_requested.set)
    loop.add_signal_handler(signal.SIGUSR2, reset_requested.set)

    # First scan. A signal during it exits at once: the ingest thread cannot be interrupted, and every committed
    # batch of the index is consistent (objects are written before the rows that name them).
    first = asyncio.ensure_future(portal.rescan())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({first, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("stopped during the initial scan")
        sys.stderr.flush()
        os._exit(0)
    stopper.cancel()
    first.result()

    ssl_context = None
    if config.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(str(config.tls_cert), str(config.tls_key) if config.tls_key else None)
    aiohttp_server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in aiohttp_server_log.filters):
        aiohttp_server_log.addFilter(BadRequestFilter())
    runner = web.AppRunner(make_app(portal), access_log_class=RedactingAccessLogger, handler_cancellation=True)
    await runner.setup()
    site = web.SockSite(runner, sock, ssl_context=ssl_context, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    await site.start()
    print(f"directfs serve: listening on {listen_url}", flush=True)

    async def rescan_loop() -> None:
        interval = config.rescan_interval_seconds or None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rescan_requested.wait(), interval)
            rescan_requested.clear()
            try:
                await portal.rescan()
            except Exception:  # a failed scan keeps the last good snapshot; the next one tries again
                log.exception("rescan failed")

    async def reset_loop() -> None:
        while True:
            await reset_requested.wait()
            reset_requested.clear()
            try:
                await portal.reset_feed()
            except Exception:
                log.exception("resetting the change feed failed")

    rescanner = asyncio.ensure_future(rescan_loop())
    resetter = asyncio.ensure_future(reset_loop())
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await portal.stop()
        for task in (rescanner, resetter):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.cleanup()
        if portal.scan_lock.locked():
            # A scan thread is mid-file and cannot be interrupted; waiting for it could take minutes. Committed
            # batches are consistent, so leave now (the exit status is still 0: we were asked to stop).
            log.info("a rescan was running; exiting without waiting for it")
            sys.stderr.flush()
            os._exit(0)
        index.close()
    return 0
