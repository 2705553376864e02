"""The metrics HTTP endpoint on 127.0.0.1: valid exposition scraped over HTTP while files are read, and a busy port
refused with a clear error. Everything else about metrics (counters, the control socket, ``directfs stats``) runs
without the network: tests/unit/test_metrics.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from directfs import metrics
from directfs.errors import ConfigError
from tests.support.metricsfs import BLOCK, Mounted, metered_fs, read_whole, value


@pytest.fixture
async def mounted(tmp_path: Path) -> AsyncIterator[Mounted]:
    async with metered_fs(tmp_path) as it:
        yield it


async def test_http_endpoint_serves_valid_exposition(mounted: Mounted) -> None:
    server = metrics.start_metrics_server("127.0.0.1", 0, mounted.registry, allow_remote=False)  # type: ignore[arg-type]
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"

        def scrape() -> str:
            reply = httpx.get(url, timeout=5)
            reply.raise_for_status()
            return reply.text

        first = await trio.to_thread.run_sync(scrape)
        await read_whole(mounted.fs, "b.bin")
        second = await trio.to_thread.run_sync(scrape)
    finally:
        server.close()
    assert value(first, "directfs_read_bytes_served_total") == 0
    assert value(second, "directfs_read_bytes_served_total") == 3 * BLOCK


def test_busy_port_is_a_config_error() -> None:
    registry = metrics.build_registry(metrics.Sources())
    server = metrics.start_metrics_server("127.0.0.1", 0, registry, allow_remote=False)
    try:
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{server.port}: cannot listen"):
            metrics.start_metrics_server("127.0.0.1", server.port, registry, allow_remote=False)
    finally:
        server.close()
