"""Integrity: a damaged, truncated, swapped or wrongly keyed block is EIO, never wrong bytes, and never cached.

CTERA blocks have no MAC (docs/ctera-direct-io.md §4.3): the codec catches damage only where the format allows (padding,
compressed structure, length). The fetch layer closes the rest where the storage vouches for the object with an MD5
(Content-MD5, x-goog-hash, an S3 single-part ETag). These tests pin both layers through scripted storage
(``httpx.MockTransport``); the reference portal (whose ``--fault-corrupt-blocks-rate`` damages bytes on the wire only,
under the object's true ETag) and a real S3 server (SeaweedFS: its presigned GETs carry MD5 ETags) are in
tests/component/test_integrity_servers.py.

What no client can detect (README "Guarantees"): a store that serves another valid object of the same length with
its own valid digest (a swapped block of the same size from the same file key) decodes to wrong bytes.
"""

from __future__ import annotations

import base64
import errno
import hashlib
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import trio
import trio.testing

from directfs.api import DirectIO, DirectIOSettings
from directfs.engine.reader import ReadEngine, ReadSettings
from directfs.errors import BlockDigestError, BlockError, BlockValidationError, DirectFSError
from directfs.sources.ctera import codec
from directfs.sources.ctera.client import storage_md5
from tests.support.blockserver import FAST_RETRY, SECRET, json_response, mock_file, payload

PORTAL = "https://portal.test"
BLOCK = 64 * 1024


def md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def flipped(data: bytes, position: int = 100) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= 0x01
    return bytes(damaged)


Headers = Callable[[bytes], dict[str, str]]
DIGEST_STYLES: dict[str, Headers] = {
    "content-md5": lambda obj: {"Content-MD5": base64.b64encode(md5(obj)).decode()},
    "etag": lambda obj: {"ETag": f'"{md5(obj).hex()}"'},
    "x-goog-hash": lambda obj: {"x-goog-hash": f"crc32c=AAAAAA==,md5={base64.b64encode(md5(obj)).decode()}"},
    "azure": lambda obj: {"x-ms-blob-content-md5": base64.b64encode(md5(obj)).decode()},
}


class Storage:
    """Scripted Portal + storage: ``serve[path]`` returns (body, headers) for each GET; counts GETs per path."""

    def __init__(self, meta: dict[str, object], objects: dict[str, bytes], digest: Headers | None) -> None:
        self.meta = meta
        self.objects = objects
        self.digest = digest
        self.damage: dict[str, list[Callable[[bytes], bytes]]] = {}  # per path, consumed one per GET
        self.gets: Counter[str] = Counter()

    async def portal(self, request: httpx.Request) -> httpx.Response:
        return json_response(self.meta)

    async def storage(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.gets[path] += 1
        true_object = self.objects[path]
        body = true_object
        queue = self.damage.get(path)
        if queue:
            body = queue.pop(0)(true_object)
        headers = self.digest(true_object) if self.digest is not None else {}
        return httpx.Response(200, content=body, headers=headers)

    def client(self, **settings: object) -> DirectIO:
        return DirectIO(
            PORTAL,
            "AKID",
            SECRET,
            settings=DirectIOSettings(retry=FAST_RETRY, **settings),  # type: ignore[arg-type]
            portal_transport=httpx.MockTransport(self.portal),
            storage_transport=httpx.MockTransport(self.storage),
        )


def native_storage(digest: Headers | None, size: int = 3 * BLOCK) -> tuple[Storage, bytes]:
    """A native (unencrypted, uncompressed) file: the codec can check nothing but the length, so any flipped byte
    is silent unless a digest catches it. The hardest case, and a real one (Fusion Direct files)."""
    plain = payload(size, seed=11)
    meta, objects = mock_file(plain, [BLOCK] * (size // BLOCK), encrypted=False, compression=codec.Compression.NONE)
    return Storage(meta, objects, digest), plain


# --- the digest itself ---------------------------------------------------------------------------------------------


def test_storage_md5_sources_and_what_is_not_a_digest() -> None:
    digest = md5(b"object")
    b64 = base64.b64encode(digest).decode()
    assert storage_md5(httpx.Headers({"Content-MD5": b64})) == (digest, "content-md5")
    assert storage_md5(httpx.Headers({"ETag": f'"{digest.hex()}"'})) == (digest, "ETag")
    assert storage_md5(httpx.Headers({"x-goog-hash": f"crc32c=n03x6A==, md5={b64}"})) == (digest, "x-goog-hash md5")
    # Content-MD5 wins over the ETag (it is the explicit one).
    both = httpx.Headers({"Content-MD5": b64, "ETag": '"' + "0" * 32 + '"'})
    assert storage_md5(both) == (digest, "content-md5")
    not_digests = [
        {"ETag": f'"{digest.hex()}-3"'},  # multipart upload
        {"ETag": '"0x8DC2A7B5C7E1F00"'},  # Azure
        {"ETag": f'W/"{digest.hex()}"'},  # weak
        {"ETag": f'"{digest.hex()}"', "x-amz-server-side-encryption": "aws:kms"},  # SSE-KMS: ETag is not the MD5
        {"ETag": f'"{digest.hex()}"', "x-amz-server-side-encryption-customer-algorithm": "AES256"},  # SSE-C
        {"Content-MD5": "not base64!"},
        {"Content-MD5": base64.b64encode(b"short").decode()},
        {"ETag": '"' + "z" * 32 + '"'},
        {},
    ]
    for headers in not_digests:
        assert storage_md5(httpx.Headers(headers)) is None, headers


# --- scripted storage ------------------------------------------------------------------------------------------------


@pytest.mark.expected_logs(r"object does not match its")
@pytest.mark.parametrize("style", sorted(DIGEST_STYLES))
async def test_a_silent_flip_is_caught_by_the_storage_digest(style: str) -> None:
    storage, _ = native_storage(DIGEST_STYLES[style])
    storage.damage["/blocks/2"] = [flipped, flipped]  # damaged on both downloads
    async with storage.client() as dio:
        opened = await dio.open(1)
        with pytest.raises(BlockDigestError) as info:
            await opened.fetch_block(1)
    assert info.value.errno == errno.EIO
    assert info.value.block is not None and info.value.block.number == 2
    assert storage.gets["/blocks/2"] == 2  # downloaded once more before giving up


@pytest.mark.expected_logs(r"object does not match its")
async def test_a_transient_flip_is_downloaded_again_and_served_right() -> None:
    storage, plain = native_storage(DIGEST_STYLES["etag"])
    storage.damage["/blocks/1"] = [flipped]  # only the first download is damaged
    async with storage.client() as dio:
        opened = await dio.open(1)
        assert bytes(await opened.fetch_block(0)) == plain[:BLOCK]
    assert storage.gets["/blocks/1"] == 2


async def test_without_a_digest_a_silent_flip_is_the_documented_gap() -> None:
    """Pins the protocol's limit: no digest (or verification off) and no MAC means a flip in a native block is
    served. If this starts failing, something new catches it: update the README Guarantees."""
    for storage, settings in (
        (native_storage(None), {}),
        (native_storage(DIGEST_STYLES["etag"]), {"verify_storage_digest": False}),
    ):
        scripted, plain = storage
        scripted.damage["/blocks/1"] = [flipped]
        async with scripted.client(**settings) as dio:
            opened = await dio.open(1)
            served = bytes(await opened.fetch_block(0))
        assert len(served) == BLOCK and served != plain[:BLOCK]


def encrypted_file(seed: int, lengths: list[int]) -> tuple[dict[str, object], dict[str, bytes], bytes]:
    plain = payload(sum(lengths), seed=seed)
    meta, objects = mock_file(plain, lengths)
    return meta, objects, plain


def damage_cases() -> dict[str, Callable[[], tuple[Storage, int]]]:
    """Each case: scripted storage without any digest (so only the codec can object) and the block to read."""

    def truncated() -> tuple[Storage, int]:
        meta, objects, _ = encrypted_file(1, [BLOCK, BLOCK])
        objects["/blocks/1"] = objects["/blocks/1"][:-1]
        return Storage(meta, objects, None), 0

    def truncated_to_whole_cipher_blocks() -> tuple[Storage, int]:
        meta, objects, _ = encrypted_file(1, [BLOCK, BLOCK])
        obj = objects["/blocks/1"]
        objects["/blocks/1"] = obj[: 17 + ((len(obj) - 17) // 32) * 16]  # valid CBC length, half the data
        return Storage(meta, objects, None), 0

    def swapped_other_length() -> tuple[Storage, int]:
        meta, objects, _ = encrypted_file(2, [BLOCK, BLOCK // 2])
        objects["/blocks/1"], objects["/blocks/2"] = objects["/blocks/2"], objects["/blocks/1"]
        return Storage(meta, objects, None), 0

    def block_of_another_file() -> tuple[Storage, int]:
        meta, objects, _ = encrypted_file(3, [BLOCK, BLOCK])
        _, foreign, _ = encrypted_file(3, [BLOCK, BLOCK])  # same bytes, another file key
        objects["/blocks/1"] = foreign["/blocks/1"]
        return Storage(meta, objects, None), 0

    def len_says_one_more() -> tuple[Storage, int]:
        meta, objects, _ = encrypted_file(4, [BLOCK, BLOCK])
        meta["chunks"][0]["len"] = BLOCK + 1  # type: ignore[index]
        return Storage(meta, objects, None), 0

    def len_says_one_less_native() -> tuple[Storage, int]:
        storage, _ = native_storage(None)
        storage.meta["chunks"][0]["len"] = BLOCK - 1  # type: ignore[index]
        return storage, 0

    return {f.__name__: f for f in (truncated, truncated_to_whole_cipher_blocks, swapped_other_length,
                                    block_of_another_file, len_says_one_more, len_says_one_less_native)}  # fmt: skip


@pytest.mark.parametrize("case", sorted(damage_cases()))
async def test_damaged_blocks_are_eio_never_bytes(case: str) -> None:
    storage, index = damage_cases()[case]()
    async with storage.client() as dio:
        opened = await dio.open(1)
        with pytest.raises(BlockError) as info:
            await opened.fetch_block(index)
    assert info.value.errno == errno.EIO
    if case.startswith("len_says"):
        assert isinstance(info.value, BlockValidationError)


@pytest.mark.expected_logs(r"object does not match its")
async def test_a_failed_block_is_never_cached(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """Through the read engine: the damaged read fails, and the next read (storage healthy again) fetches anew and
    serves the right bytes; nothing of the damaged download was kept."""
    storage, plain = native_storage(DIGEST_STYLES["content-md5"])
    storage.damage["/blocks/1"] = [flipped, flipped]
    engine = ReadEngine(ReadSettings(), nursery)
    async with storage.client() as dio:
        opened = await dio.open(1, version="v1")
        reader = engine.open(opened, ("file", "v1"))
        with pytest.raises(DirectFSError) as info:
            await reader.read(0, 4096)
        assert info.value.errno == errno.EIO
        gets_after_failure = storage.gets["/blocks/1"]
        # The engine may remember a failure for a few seconds (docs/design-notes.md §5); wait past any such memory.
        await trio.sleep(ReadSettings().failed_block_memory_seconds + 0.1)  # autojump: virtual time
        assert bytes(await reader.read(0, BLOCK)) == plain[:BLOCK]
        assert storage.gets["/blocks/1"] > gets_after_failure
        await reader.aclose()
