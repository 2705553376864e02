"""Direct IO client against a real HTTP server on 127.0.0.1 (tests/support/blockserver.py): metadata parsing, status
mapping, retries, paging, URL refresh, deadlines, TLS. Scripted httpx.MockTransport edge cases (no socket):
tests/unit/test_directio_mock.py."""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import (
    AuthorizationError,
    BlockListConnectionError,
    BlockListTimeout,
    BlocksNotFoundError,
    DecryptBlockError,
    DecryptKeyError,
    DirectFSError,
    DownloadConnectionError,
    DownloadError,
    DownloadTimeout,
    InvalidRequest,
    MalformedMetadataError,
    ObjectNotFoundError,
    StaleFileError,
    UnsupportedStorageError,
)
from directfs.http import HTTPSettings, RetryPolicy
from directfs.sources.ctera import codec
from tests.support.blockserver import FAST_RETRY, SECRET, BlockServer, Fault, client, payload, read_all


@pytest.fixture
def server() -> Iterator[BlockServer]:
    with BlockServer(SECRET) as s:
        yield s


DATA = payload(300_000)


# --- metadata ----------------------------------------------------------------------------------------------------


async def test_metadata_parses_chunks_and_sends_bearer(server: BlockServer) -> None:
    server.add_file("42", DATA, block_size=100_000)
    async with client(server) as dio:
        meta = await dio.metadata(42)
    assert server.stats.authorization == [f"Bearer {server.access_key_id}"]
    assert meta.file_id == "42" and meta.encrypted and meta.size == len(DATA) and not meta.azure
    assert meta.compression is codec.Compression.SNAPPY
    assert [(c.number, c.offset, c.length) for c in meta.chunks] == [
        (1, 0, 100_000),
        (2, 100_000, 100_000),
        (3, 200_000, 100_000),
    ]
    assert meta.file_key == server.files["42"].key
    shown = repr(meta)
    assert "Signature" not in shown and "file_key" not in shown and "sig0" not in shown


@pytest.mark.parametrize(
    ("compression", "encrypted"),
    [
        (codec.Compression.SNAPPY, True),
        (codec.Compression.SNAPPY_RAW, True),
        (codec.Compression.GZIP, True),
        (codec.Compression.NONE, True),
        (codec.Compression.NONE, False),
        (codec.Compression.SNAPPY, False),
    ],
)
async def test_every_format_round_trips(server: BlockServer, compression: codec.Compression, encrypted: bool) -> None:
    server.add_file("1", DATA, block_size=70_000, compression=compression, encrypted=encrypted)
    async with client(server) as dio:
        assert await read_all(dio, "1") == DATA


@pytest.mark.parametrize(
    ("fault", "exc_type", "err"),
    [
        (Fault(status=400), ObjectNotFoundError, errno.ENOENT),
        (Fault(status=401), AuthorizationError, errno.EACCES),
        (Fault(status=403), AuthorizationError, errno.EACCES),
        (Fault(status=422), UnsupportedStorageError, errno.ENOTSUP),
        (Fault(status=404), InvalidRequest, errno.EIO),
    ],
)
async def test_portal_status_mapping_without_retries(
    server: BlockServer, fault: Fault, exc_type: type[DirectFSError], err: int
) -> None:
    server.add_file("5", DATA)
    server.metadata_faults = [fault] * 5
    async with client(server) as dio:
        with pytest.raises(exc_type) as info:
            await dio.metadata("5")
    assert info.value.errno == err
    assert info.value.filename == "5"
    assert len(server.stats.metadata_requests) == 1  # cterasdk retries these 3 times; we do not


async def test_unknown_file_id_is_enoent(server: BlockServer) -> None:
    async with client(server) as dio:
        with pytest.raises(ObjectNotFoundError):
            await dio.metadata(999)


async def test_wrong_access_key_is_eacces(server: BlockServer) -> None:
    server.add_file("5", DATA)
    async with DirectIO(server.url, "wrong-key", SECRET, settings=DirectIOSettings(retry=FAST_RETRY)) as dio:
        with pytest.raises(AuthorizationError):
            await dio.metadata(5)


async def test_portal_500_is_retried_then_invalid_request(server: BlockServer) -> None:
    server.add_file("5", DATA)
    server.metadata_faults = [Fault(status=500)] * 10
    async with client(server) as dio:
        with pytest.raises(InvalidRequest) as info:
            await dio.metadata(5)
    assert info.value.errno == errno.EIO
    assert len(server.stats.metadata_requests) == FAST_RETRY.max_attempts


async def test_portal_503_with_retry_after_then_success(server: BlockServer) -> None:
    server.add_file("5", DATA)
    server.metadata_faults = [Fault(status=503, retry_after="0"), Fault(status=429, retry_after="0")]
    async with client(server) as dio:
        meta = await dio.metadata(5)
    assert meta.size == len(DATA)
    assert len(server.stats.metadata_requests) == 3


async def test_connection_refused_is_enetreset() -> None:
    with trio.socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = DirectIOSettings(retry=RetryPolicy(max_attempts=2, base_delay_seconds=0.0))
    async with DirectIO(f"http://127.0.0.1:{port}", "AK", SECRET, settings=settings) as dio:
        with pytest.raises(BlockListConnectionError) as info:
            await dio.metadata(1)
    assert info.value.errno == errno.ENETRESET


async def test_metadata_deadline(server: BlockServer, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.05  # jump only when the client is idle: the real server answers faster
    server.add_file("5", DATA)
    server.metadata_faults = [Fault(hang=True)] * 5
    start = trio.current_time()
    async with client(server) as dio:
        with pytest.raises(BlockListTimeout) as info:
            await dio.metadata(5)
    assert info.value.errno == errno.ETIMEDOUT
    assert trio.current_time() - start <= FAST_RETRY.total_budget_seconds + 0.5
    assert len(server.stats.metadata_requests) >= 2  # a read timeout is retried within the budget


async def test_wrong_secret_is_decrypt_key_error(server: BlockServer) -> None:
    server.add_file("5", DATA)
    other = "A" * 40
    async with DirectIO(server.url, server.access_key_id, other, settings=DirectIOSettings(retry=FAST_RETRY)) as dio:
        with pytest.raises(DecryptKeyError) as info:
            await dio.metadata(5)
    assert other not in str(info.value)


async def test_empty_chunk_list(server: BlockServer) -> None:
    server.add_file("5", b"", [])
    async with client(server) as dio:
        with pytest.raises(BlocksNotFoundError) as info:
            await dio.metadata(5)
        assert info.value.errno == errno.ENODATA
        opened = await dio.open(5)  # the filesystem reads a reply of no chunks as an empty file
        assert opened.layout.size == 0 and opened.layout.block_count == 0
        with pytest.raises(StaleFileError):
            await dio.open(5, expected_size=10)


async def test_one_zero_length_chunk_reads_as_empty(server: BlockServer) -> None:
    server.add_file("5", b"", [0])
    async with client(server) as dio:
        opened = await dio.open(5)
        assert opened.layout.size == 0
        meta = await dio.metadata(5)
        assert meta.size == 0 and len(meta.chunks) == 1


async def test_expected_size_zero_needs_no_portal_call(server: BlockServer) -> None:
    async with client(server) as dio:
        opened = await dio.open(77, expected_size=0)
    assert opened.layout.size == 0
    assert server.stats.metadata_requests == []


async def test_expected_size_mismatch_is_stale(server: BlockServer) -> None:
    server.add_file("5", DATA)
    async with client(server) as dio:
        with pytest.raises(StaleFileError):
            await dio.open(5, expected_size=len(DATA) + 1)
        opened = await dio.open(5, expected_size=len(DATA), version="v1")
    assert opened.layout.version == "v1"


# --- paging of partial block lists ------------------------------------------------------------------------------


@pytest.mark.parametrize("exclusive", [False, True])
async def test_partial_block_lists_are_paged(server: BlockServer, exclusive: bool) -> None:
    lengths = [50_000, 30_000, 70_000, 10_000, 90_000, 50_000]
    server.add_file("9", DATA, lengths, page_bytes=100_000, range_end_exclusive=exclusive)
    async with client(server) as dio:
        meta = await dio.metadata(9)
        assert [c.length for c in meta.chunks] == lengths
        assert [c.offset for c in meta.chunks] == [0, 50_000, 80_000, 150_000, 160_000, 250_000]
        assert await read_all(dio, "9") == DATA
    first, *rest = server.stats.metadata_requests[:4]
    assert first == {}
    assert rest[0] == {"rangeStart": "80000", "rangeEnd": str(len(DATA) - 1)}
    assert rest[1]["rangeStart"] == "160000"


# --- malformed replies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{not json", b'{"chunks": NaN}', b"\xff\xfe", b"[" * 100_000])
async def test_unparseable_json(server: BlockServer, raw: bytes) -> None:
    server.metadata_faults = [Fault(json=raw)]
    async with client(server) as dio:
        with pytest.raises(MalformedMetadataError):
            await dio.metadata(1)


async def test_metadata_body_size_is_capped(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=1000)
    settings = DirectIOSettings(retry=FAST_RETRY, max_metadata_bytes=10_000)
    async with client(server, settings) as dio:
        with pytest.raises(MalformedMetadataError, match="larger than"):
            await dio.metadata(5)


async def test_chunk_count_is_capped(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=1000)
    async with client(server, DirectIOSettings(retry=FAST_RETRY, max_chunks=100)) as dio:
        with pytest.raises(MalformedMetadataError, match="chunks"):
            await dio.metadata(5)


# --- block fetches ----------------------------------------------------------------------------------------------


async def test_block_5xx_and_truncation_are_retried(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=100_000)
    server.block_faults[("5", 2)] = [Fault(status=503, retry_after="0"), Fault(truncate=True)]
    async with client(server) as dio:
        assert await read_all(dio, "5") == DATA
    assert server.stats.block_requests[("5", 2)] == 3


async def test_block_404_is_download_error_with_block_info(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=100_000)
    server.block_faults[("5", 2)] = [Fault(status=404)]
    async with client(server) as dio:
        opened = await dio.open(5)
        with pytest.raises(DownloadError) as info:
            await opened.fetch_block(1)
    assert info.value.block is not None
    assert (info.value.block.number, info.value.block.offset, info.value.block.length) == (2, 100_000, 100_000)
    assert server.stats.block_requests[("5", 2)] == 1
    assert "sig0" not in str(info.value) and "SECRETCRED" not in str(info.value)


async def test_corrupt_block_is_a_codec_error_never_bytes(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=100_000, compression=codec.Compression.NONE)
    server.block_faults[("5", 3)] = [Fault(corrupt=True)]
    async with client(server) as dio:
        opened = await dio.open(5)
        with pytest.raises(DecryptBlockError) as info:
            await opened.fetch_block(2)
    assert info.value.block is not None and info.value.block.number == 3
    assert server.stats.block_requests[("5", 3)] == 1  # codec failures are not retried


async def test_block_deadline(server: BlockServer, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.05
    server.add_file("5", DATA, block_size=100_000)
    server.block_faults[("5", 1)] = [Fault(hang=True)] * 10
    async with client(server) as dio:
        opened = await dio.open(5)
        start = trio.current_time()
        with pytest.raises(DownloadTimeout) as info:
            await opened.fetch_block(0)
    assert info.value.errno == errno.ETIMEDOUT
    assert trio.current_time() - start <= FAST_RETRY.total_budget_seconds + 0.5


# --- URL refresh ------------------------------------------------------------------------------------------------


async def test_expired_url_refreshes_metadata_once(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=100_000)
    async with client(server) as dio:
        opened = await dio.open(5)
        server.expire_urls()
        assert await opened.fetch_block(0) == DATA[:100_000]
        assert await opened.fetch_block(1) == DATA[100_000:200_000]  # the fresh URLs serve the rest
    assert len(server.stats.metadata_requests) == 2
    assert server.stats.block_requests[("5", 1)] == 2 and server.stats.block_requests[("5", 2)] == 1


async def test_concurrent_expired_urls_cause_one_refresh(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=10_000)
    async with client(server) as dio:
        opened = await dio.open(5)
        server.expire_urls()
        results: dict[int, bytes | bytearray] = {}

        async def fetch(index: int) -> None:
            results[index] = await opened.fetch_block(index)

        async with trio.open_nursery() as nursery:
            for index in range(opened.layout.block_count):
                nursery.start_soon(fetch, index)
    assert b"".join(results[i] for i in sorted(results)) == DATA
    assert len(server.stats.metadata_requests) == 2  # open + exactly one refresh


async def test_url_refused_after_refresh_is_download_error(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=100_000)
    server.block_faults[("5", 1)] = [Fault(status=403), Fault(status=400)]
    async with client(server) as dio:
        opened = await dio.open(5)
        with pytest.raises(DownloadError, match="freshly issued"):
            await opened.fetch_block(0)
    assert len(server.stats.metadata_requests) == 2  # refreshed once, not in a loop


async def test_refresh_of_a_changed_file_is_stale(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=100_000)
    async with client(server) as dio:
        opened = await dio.open(5)
        server.add_file("5", DATA + b"more", block_size=100_000)
        server.expire_urls()
        with pytest.raises(StaleFileError) as info:
            await opened.fetch_block(0)
    assert info.value.errno == errno.ESTALE


# --- secrets ----------------------------------------------------------------------------------------------------


async def test_no_secret_in_logs_or_errors(server: BlockServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    served = server.add_file("5", DATA, block_size=100_000)
    server.block_faults[("5", 1)] = [Fault(status=503), Fault(status=404)]
    messages = []
    async with client(server) as dio:
        opened = await dio.open(5)
        server.expire_urls()
        await opened.fetch_block(1)
        try:
            await opened.fetch_block(0)
        except DownloadError as exc:
            messages.append(str(exc))
            messages.append(repr(exc))
    text = caplog.text + "\n".join(messages)
    assert "/blocks/5/2" in caplog.text  # the URL path is logged...
    wrapped = codec.wrap_file_key(served.key or b"", SECRET)
    for secret in ("X-Amz-Signature", "sig0", "sig1", "SECRETCRED", SECRET, f"Bearer {server.access_key_id}"):
        assert secret not in text  # ...its query and the credentials are not
    assert wrapped[:20] not in text


# --- TLS ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Any) -> Iterator[tuple[BlockServer, str]]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with BlockServer(SECRET, ssl_context=context) as s:
        s.add_file("5", DATA, block_size=100_000)
        yield s, str(ca_file)


async def test_tls_with_ca_file(tls_server: tuple[BlockServer, str]) -> None:
    server, ca_file = tls_server
    settings = DirectIOSettings(
        portal=HTTPSettings(ca_file=ca_file), storage=HTTPSettings(ca_file=ca_file), retry=FAST_RETRY
    )
    async with DirectIO(server.url, server.access_key_id, SECRET, settings=settings) as dio:
        assert await read_all(dio, "5") == DATA


async def test_tls_untrusted_certificate_fails_at_once(tls_server: tuple[BlockServer, str]) -> None:
    server, _ = tls_server
    async with DirectIO(server.url, server.access_key_id, SECRET, settings=DirectIOSettings(retry=FAST_RETRY)) as dio:
        with pytest.raises(BlockListConnectionError, match="certificate verification failed"):
            await dio.metadata(5)
    assert server.stats.metadata_requests == []  # refused in the handshake, and not retried


async def test_tls_verification_is_switchable_per_client(tls_server: tuple[BlockServer, str]) -> None:
    server, ca_file = tls_server
    # Portal verified with the CA, storage unverified: works.
    settings = DirectIOSettings(
        portal=HTTPSettings(ca_file=ca_file), storage=HTTPSettings(verify_tls=False), retry=FAST_RETRY
    )
    async with DirectIO(server.url, server.access_key_id, SECRET, settings=settings) as dio:
        assert await read_all(dio, "5") == DATA
    # Portal verified, storage verified without the CA: the block fetch fails, the metadata call does not.
    settings = DirectIOSettings(portal=HTTPSettings(ca_file=ca_file), retry=FAST_RETRY)
    async with DirectIO(server.url, server.access_key_id, SECRET, settings=settings) as dio:
        opened = await dio.open(5)
        with pytest.raises(DownloadConnectionError, match="certificate"):
            await opened.fetch_block(0)


async def test_a_failed_refresh_is_shared_by_concurrent_fetches(server: BlockServer) -> None:
    server.add_file("5", DATA, block_size=10_000)
    async with client(server) as dio:
        opened = await dio.open(5)
        server.expire_urls()
        server.metadata_faults = [Fault(status=401)] * 100
        errors: list[BaseException] = []

        async def fetch(index: int) -> None:
            try:
                await opened.fetch_block(index)
            except AuthorizationError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for index in range(opened.layout.block_count):
                nursery.start_soon(fetch, index)
    assert len(errors) == opened.layout.block_count
    assert len(server.stats.metadata_requests) == 2  # open + one failed refresh, not one per block
