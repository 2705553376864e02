"""Network faults between the client and a real reference portal: transient ones are retried to success, persistent
ones end in a precise error within a bounded, configured time; the Portal being down does not stop block reads of
files already open.

Topology: the client talks to the Portal through ``portal_proxy`` and to block objects through ``blocks_proxy``
(the portal's ``--public-url`` points block URLs at it), so each side can fail on its own. Deadlines are short
(read timeout 0.5 s, 3 attempts, 4 s budget) so persistent faults end fast; every persistent-fault test measures how
long the caller was blocked and checks it against the bound derived from those settings (``WORST_CASE_SECONDS``).
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import (
    BlockDigestError,
    BlockListConnectionError,
    BlockListTimeout,
    DirectFSError,
    DownloadConnectionError,
    DownloadError,
    DownloadTimeout,
    NamespaceConnectionError,
    NamespaceTimeout,
)
from directfs.http import HTTPSettings, RetryPolicy
from directfs.sources.base import Credentials, SourceOptions
from directfs.sources.ctera import CteraSource
from tests.support.blockserver import SECRET, BlockServer, Fault, payload
from tests.support.blockserver import client as blockserver_client
from tests.support.faultproxy import FaultProxy
from tests.support.portal import Portal, start_portal

BLOCK = 64 * 1024
READ_TIMEOUT_SECONDS = 0.5
RETRY = RetryPolicy(max_attempts=3, base_delay_seconds=0.05, max_delay_seconds=0.2, total_budget_seconds=4.0)
# One operation may not take longer than its retry budget; a block fetch is at most two operations (the download and,
# after a 403, one Portal refresh plus one more download): 3 budgets, plus scheduling slack on a loaded 2-core box.
WORST_CASE_SECONDS = 3 * RETRY.total_budget_seconds + 2.0
MEASURED: dict[str, float] = {}  # fault -> seconds the caller was blocked (printed at the end for the report)


@dataclass
class Setup:
    portal: Portal
    portal_proxy: FaultProxy
    blocks_proxy: FaultProxy
    hashes: dict[str, bytes]

    def dio(self, *, retry: RetryPolicy = RETRY) -> DirectIO:
        http = HTTPSettings(connect_timeout_seconds=READ_TIMEOUT_SECONDS, read_timeout_seconds=READ_TIMEOUT_SECONDS)
        settings = DirectIOSettings(portal=http, storage=http, retry=retry, metadata_cache_seconds=0)
        return DirectIO(
            self.portal_proxy.url, self.portal.access_key_id, self.portal.secret_access_key, settings=settings
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tree = tmp_path_factory.mktemp("tree")
    files = {"four-blocks.bin": payload(4 * BLOCK - 7, seed=1), "one-block.bin": payload(BLOCK, seed=2)}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    with FaultProxy(0) as blocks_proxy:
        args = ["--block-size", "64K", "--public-url", blocks_proxy.url]
        with start_portal(tree, extra_args=args) as portal:
            port = int(portal.url.rsplit(":", 1)[1])
            blocks_proxy.upstream = ("127.0.0.1", port)
            with FaultProxy(port) as portal_proxy:
                yield Setup(portal, portal_proxy, blocks_proxy, files)


@pytest.fixture(autouse=True)
def healthy(setup: Setup) -> Iterator[None]:
    for proxy in (setup.portal_proxy, setup.blocks_proxy):
        proxy.mode, proxy.script, proxy.cut_after_bytes = "pass", [], 20_000
        proxy.corrupt_every_answer = True
    yield
    for proxy in (setup.portal_proxy, setup.blocks_proxy):
        proxy.mode, proxy.script = "pass", []


async def read_all(dio: DirectIO, file_id: str) -> bytes:
    opened = await dio.open(file_id)
    return b"".join([bytes(await opened.fetch_block(i)) for i in range(opened.layout.block_count)])


async def blocked_for(name: str, coro: object) -> tuple[BaseException, float]:
    """Run ``coro`` (an awaitable that must fail), return its exception and how long it blocked."""
    started = time.monotonic()
    with pytest.raises(DirectFSError) as info:
        await coro  # type: ignore[misc]
    elapsed = time.monotonic() - started
    MEASURED[name] = elapsed
    assert elapsed < WORST_CASE_SECONDS, f"{name}: blocked {elapsed:.1f} s"
    return info.value, elapsed


# --- transient faults: retried to success ------------------------------------------------------------------------


@pytest.mark.expected_logs(r"object does not match its")
@pytest.mark.parametrize("fault", ["refuse", "reset_mid_body", "truncate", "corrupt"])
async def test_transient_block_faults_are_retried_to_success(setup: Setup, fault: str) -> None:
    fid = setup.portal.file_id("four-blocks.bin")
    async with setup.dio() as dio:
        opened = await dio.open(fid)
        # The next two connections misbehave (the pool opens a new one after each failure), then all is well. A
        # corrupting connection damages its first answer only: the digest check downloads once more and succeeds.
        setup.blocks_proxy.script = [fault, fault]  # type: ignore[list-item]
        setup.blocks_proxy.corrupt_every_answer = False
        before = len(setup.blocks_proxy.modes_used)
        data = b"".join([bytes(await opened.fetch_block(i)) for i in range(opened.layout.block_count)])
    assert data == setup.hashes["four-blocks.bin"]
    assert fault in setup.blocks_proxy.modes_used[before:]


async def test_portal_reset_then_recovery_during_metadata(setup: Setup) -> None:
    fid = setup.portal.file_id("one-block.bin")
    setup.portal_proxy.script = ["refuse", "reset_mid_body"]
    setup.portal_proxy.cut_after_bytes = 50  # inside the headers of the reply
    async with setup.dio() as dio:
        assert await read_all(dio, fid) == setup.hashes["one-block.bin"]


# --- persistent faults: a precise error within the bound -------------------------------------------------------


@pytest.mark.expected_logs(r"object does not match its")
@pytest.mark.parametrize(
    ("fault", "expected", "errnos"),
    [
        ("hang", DownloadTimeout, {errno.ETIMEDOUT}),
        ("refuse", DownloadConnectionError, {errno.ENETRESET}),
        ("reset_mid_body", DownloadConnectionError, {errno.ENETRESET}),
        ("truncate", DownloadConnectionError, {errno.ENETRESET}),
        ("corrupt", BlockDigestError, {errno.EIO}),  # the portal's ETag is the object's MD5
    ],
)
async def test_persistent_block_faults_end_in_a_bounded_error(
    setup: Setup, fault: str, expected: type[DirectFSError], errnos: set[int]
) -> None:
    fid = setup.portal.file_id("four-blocks.bin")
    async with setup.dio() as dio:
        opened = await dio.open(fid)
        setup.blocks_proxy.mode = fault  # type: ignore[assignment]
        error, _ = await blocked_for(f"block {fault}", opened.fetch_block(1))
    assert isinstance(error, expected), repr(error)
    assert error.errno in errnos


@pytest.mark.parametrize(
    ("fault", "expected", "errnos"),
    [
        ("hang", BlockListTimeout, {errno.ETIMEDOUT}),
        ("refuse", BlockListConnectionError, {errno.ENETRESET}),
    ],
)
async def test_portal_down_during_open_is_a_bounded_error(
    setup: Setup, fault: str, expected: type[DirectFSError], errnos: set[int]
) -> None:
    fid = setup.portal.file_id("four-blocks.bin")
    setup.portal_proxy.mode = fault  # type: ignore[assignment]
    async with setup.dio() as dio:
        error, _ = await blocked_for(f"portal {fault} at open", dio.open(fid))
    assert isinstance(error, expected) and error.errno in errnos


async def test_portal_down_during_reads_does_not_stop_open_files(setup: Setup) -> None:
    fid = setup.portal.file_id("four-blocks.bin")
    async with setup.dio() as dio:
        opened = await dio.open(fid)
        setup.portal_proxy.mode = "refuse"  # the Portal is gone; storage is not
        data = b"".join([bytes(await opened.fetch_block(i)) for i in range(opened.layout.block_count)])
    assert data == setup.hashes["four-blocks.bin"]


async def test_portal_down_during_listing(setup: Setup) -> None:
    portal = setup.portal
    credentials = Credentials(
        access_key_id=portal.access_key_id,
        secret_access_key=portal.secret_access_key,
        username=portal.username,
        password=portal.password,
    )
    options = SourceOptions(
        credentials=credentials, connect_timeout_seconds=READ_TIMEOUT_SECONDS, read_timeout_seconds=0.5
    )
    source = CteraSource("ctera+" + setup.portal_proxy.url, options)
    try:
        names = [entry.name async for entry in source.list_dir("")]
        assert sorted(names) == sorted(setup.hashes)
        for fault, expected in (("refuse", NamespaceConnectionError), ("hang", NamespaceTimeout)):
            setup.portal_proxy.mode = fault  # type: ignore[assignment]
            error, _ = await blocked_for(f"listing {fault}", _drain(source.list_dir("")))
            assert isinstance(error, expected), repr(error)
            # The source's own retry policy (defaults: 4 attempts, 20 s budget) bounds it; read timeout 0.5 s.
        setup.portal_proxy.mode = "pass"
        assert sorted([entry.name async for entry in source.list_dir("")]) == sorted(setup.hashes)
    finally:
        await source.aclose()


async def _drain(listing: object) -> None:
    async for _ in listing:  # type: ignore[attr-defined]
        pass


# --- status faults through the portal's own knobs and scripted servers ------------------------------------------


def test_bursts_of_503_on_blocks_are_retried_and_persistent_ones_are_eio(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    data = payload(6 * BLOCK, seed=3)
    (tree / "f.bin").write_bytes(data)
    # 40% of block GETs fail with 503; 8 attempts make a block fail with p = 0.4**8 = 0.07%; the seed makes it fixed.
    args = ["--block-size", "64K", "--fault-error-rate", "0.4", "--fault-status", "503", "--fault-seed", "1"]
    retry = RetryPolicy(max_attempts=8, base_delay_seconds=0.01, max_delay_seconds=0.05, total_budget_seconds=10)
    with start_portal(tree, extra_args=args) as portal:

        async def read() -> bytes:
            async with DirectIO(
                portal.url, portal.access_key_id, portal.secret_access_key, settings=DirectIOSettings(retry=retry)
            ) as dio:
                return await read_all(dio, portal.file_id("f.bin"))

        assert hashlib.sha256(trio.run(read)).digest() == hashlib.sha256(data).digest()
        assert "fault: answering" in portal.stderr_text()

    with start_portal(tree, extra_args=["--block-size", "64K", "--fault-error-rate", "1"]) as portal:

        async def fail() -> None:
            settings = DirectIOSettings(retry=RETRY)
            async with DirectIO(portal.url, portal.access_key_id, portal.secret_access_key, settings=settings) as dio:
                opened = await dio.open(portal.file_id("f.bin"))
                error, _ = await blocked_for("block 503 forever", opened.fetch_block(0))
                assert isinstance(error, DownloadError) and error.errno == errno.EIO
                assert "503" in str(error)

        trio.run(fail)


async def test_429_with_retry_after_is_honoured_and_an_overlong_one_fails_at_once() -> None:
    with BlockServer(SECRET) as server:
        plain = payload(2 * BLOCK, seed=4)
        server.add_file("7", plain)
        server.block_faults[("7", 1)] = [Fault(status=429, retry_after="1")]
        server.block_faults[("7", 2)] = [Fault(status=429, retry_after="3600")]
        async with blockserver_client(server) as dio:
            opened = await dio.open("7")
            started = time.monotonic()
            assert bytes(await opened.fetch_block(0)) == plain[:BLOCK]
            assert time.monotonic() - started >= 1.0  # waited as asked
            error, elapsed = await blocked_for("429 Retry-After 3600", opened.fetch_block(1))
            assert isinstance(error, DownloadError) and "429" in str(error)
            assert elapsed < 1.0  # not slept: the wait is past the budget


def test_expired_urls_that_stay_expired_are_eio(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f.bin").write_bytes(payload(BLOCK, seed=5))
    with start_portal(tree, extra_args=["--block-size", "64K", "--fault-url-ttl", "-1"]) as portal:

        async def read() -> None:
            settings = DirectIOSettings(retry=RETRY)
            async with DirectIO(portal.url, portal.access_key_id, portal.secret_access_key, settings=settings) as dio:
                opened = await dio.open(portal.file_id("f.bin"))
                error, _ = await blocked_for("expired URLs", opened.fetch_block(0))
                assert isinstance(error, DownloadError) and error.errno == errno.EIO
                assert opened.refreshes == 1  # refreshed once, then refused: no loop

        trio.run(read)


def test_zz_report_measured_worst_cases() -> None:
    """Prints how long each persistent fault blocked its caller (``pytest -s``); the README quotes these."""
    assert MEASURED, "the fault tests above record their timings"
    worst = max(MEASURED.values())
    print("\nblocked seconds per persistent fault:", {k: round(v, 2) for k, v in sorted(MEASURED.items())})
    print(f"worst: {worst:.2f} s (bound {WORST_CASE_SECONDS:.1f} s)")
    assert worst < WORST_CASE_SECONDS
