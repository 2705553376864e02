"""Process lifecycle of ``directfs serve``: open the index, ingest, listen, announce, rescan, stop on a signal.

Startup contract (test fixtures rely on it): after the first scan has finished *and* the socket listens, exactly one
line goes to stdout, ``directfs serve: listening on http(s)://HOST:PORT``, and stdout is flushed. Everything else
goes to stderr. SIGTERM and SIGINT exit 0 promptly; SIGHUP asks for a rescan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import ssl
import sys

from aiohttp import web

from .app import Portal, RedactingAccessLogger, make_app
from .config import ServeConfig
from .index import Index
from .store import BlockStore, LocalBlockStore, S3BlockStore, UrlSigner

log = logging.getLogger("directfs.server")

# Seconds the server waits for in-flight requests after SIGTERM. Long-polls are cancelled, not awaited; 2 s lets a
# block GET that is nearly done finish without making "stop promptly" slow.
SHUTDOWN_GRACE_SECONDS = 2.0


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


async def serve(config: ServeConfig) -> int:
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = _open_store(config)
    index = Index(
        root=config.root,
        state_dir=config.state_dir,
        store=store,
        rules=config.encoding,
        secret_access_key=config.credentials.secret_access_key,
        workers=config.ingest_workers,
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

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    rescan_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, rescan_requested.set)

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

    rescanner = asyncio.ensure_future(rescan_loop())
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await portal.stop()
        rescanner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rescanner
        await runner.cleanup()
        if portal.scan_lock.locked():
            # A scan thread is mid-file and cannot be interrupted; waiting for it could take minutes. Committed
            # batches are consistent, so leave now (the exit status is still 0: we were asked to stop).
            log.info("a rescan was running; exiting without waiting for it")
            sys.stderr.flush()
            os._exit(0)
        index.close()
    return 0
