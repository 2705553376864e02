"""Direct IO client against scripted httpx.MockTransport replies (no socket): paging of partial block lists,
malformed metadata, invalid file ids and URLs, oversized objects and bodies, Azure's MD5 prefix. Against the real
block server on 127.0.0.1: tests/component/test_directio.py.
"""

from __future__ import annotations

import errno
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import ConfigError, DownloadError, MalformedMetadataError, ObjectNotFoundError
from directfs.sources.ctera import codec
from tests.support.blockserver import FAST_RETRY, SECRET, json_response, mock_file, payload, read_all

# --- paging of partial block lists ------------------------------------------------------------------------------


def paged(body: dict[str, Any], start: int, end: int, size: int) -> dict[str, Any]:
    return {**body, "actual_blocks_range": {"file_size": size, "range": f"{start}-{end}"}}


async def portal_script(replies: list[dict[str, Any]]) -> tuple[DirectIO, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return json_response(replies.pop(0) if len(replies) > 1 else replies[0])

    dio = DirectIO(
        "https://portal.test",
        "AK",
        SECRET,
        settings=DirectIOSettings(retry=FAST_RETRY),
        portal_transport=httpx.MockTransport(handler),
    )
    return dio, seen


@pytest.mark.parametrize(
    ("second_range", "why"),
    [
        ((50, 99), "overlaps"),
        ((150, 199), "gap"),
        ((100, 150), "does not match"),
    ],
)
async def test_paging_refuses_overlaps_and_gaps(second_range: tuple[int, int], why: str) -> None:
    body, _ = mock_file(bytes(200), [100])
    first = paged(body, 0, 99, 200)
    second = paged(body, *second_range, 200)
    dio, _ = await portal_script([first, second])
    async with dio:
        with pytest.raises(MalformedMetadataError, match=why):
            await dio.metadata(1)


async def test_paging_without_progress_is_refused() -> None:
    body, _ = mock_file(bytes(100), [100])
    first = paged(body, 0, 99, 200)
    empty = paged({**body, "chunks": []}, 100, 99, 200)
    dio, seen = await portal_script([first, empty])
    async with dio:
        with pytest.raises(MalformedMetadataError):
            await dio.metadata(1)
    assert len(seen) == 2


async def test_paging_pages_must_agree() -> None:
    body, _ = mock_file(bytes(100), [100])
    other, _ = mock_file(bytes(100), [100])  # a different wrapped key: the file changed while paging
    dio, _ = await portal_script([paged(body, 0, 99, 200), paged(other, 100, 199, 200)])
    async with dio:
        with pytest.raises(MalformedMetadataError, match="disagree"):
            await dio.metadata(1)


# --- malformed replies ------------------------------------------------------------------------------------------

GOOD, _ = mock_file(bytes(100), [60, 40])


def variant(**changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        target = body
        *path, last = dotted.split("__")
        for part in path:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is KeyError:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return body


MALFORMED = {
    "list": [1, 2],
    "no encrypt_info": variant(encrypt_info=KeyError),
    "pre-8.3 shape": {"wrapped_key": "x", "chunks": []},
    "encrypted as string": variant(encrypt_info__data_encrypted="true"),
    "no wrapped key": variant(encrypt_info__wrapped_key=KeyError),
    "compression not a string": variant(compression_type=5),
    "chunks not a list": variant(chunks={"url": "x"}),
    "chunk not an object": variant(chunks__0="https://x/y"),
    "negative len": variant(chunks__0__len=-1),
    "bool len": variant(chunks__0__len=True),
    "float len": variant(chunks__0__len=60.0),
    "string len": variant(chunks__0__len="60"),
    "huge len": variant(chunks__0__len=2**62),
    "missing len": variant(chunks__0__len=KeyError),
    "missing url": variant(chunks__1__url=KeyError),
    "ftp url": variant(chunks__1__url="ftp://store.test/x"),
    "relative url": variant(chunks__1__url="/blocks/1"),
    "file_size not int": {**GOOD, "actual_blocks_range": {"file_size": "100", "range": "0-99"}},
    "file_size disagrees": {**GOOD, "actual_blocks_range": {"file_size": 99}},
    "range garbage": {**GOOD, "actual_blocks_range": {"file_size": 100, "range": "zero-99"}},
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_metadata(body: object) -> None:
    dio, _ = await portal_script([body])  # type: ignore[list-item]
    async with dio:
        with pytest.raises(MalformedMetadataError) as info:
            await dio.metadata(1)
    assert info.value.errno == errno.EIO
    assert "SIGSECRET" not in str(info.value)


async def test_invalid_file_ids_and_urls() -> None:
    with pytest.raises(ConfigError):
        DirectIO("http://portal.example.com", "AK", SECRET)  # Bearer key in clear text off loopback
    with pytest.raises(ConfigError):
        DirectIO("ftp://portal.example.com", "AK", SECRET)
    with pytest.raises(ConfigError):
        DirectIO("https://portal.example.com", "", SECRET)
    async with DirectIO("https://portal.example.com", "AK", SECRET) as dio:
        for bad in ("../admin", "1?x=1", "-1", "", "١٢"):
            with pytest.raises(ObjectNotFoundError):
                await dio.metadata(bad)
    assert "AK" not in repr(dio) and SECRET not in repr(dio)


# --- block fetches ----------------------------------------------------------------------------------------------


async def test_overlong_object_is_refused() -> None:
    body, objects = mock_file(bytes(1000), [1000], compression=codec.Compression.NONE, encrypted=False)

    async def storage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=objects[request.url.path] * 10)

    dio = DirectIO(
        "https://portal.test",
        "AK",
        SECRET,
        settings=DirectIOSettings(retry=FAST_RETRY),
        portal_transport=httpx.MockTransport(lambda r: json_response(body)),
        storage_transport=httpx.MockTransport(storage),
    )
    async with dio:
        opened = await dio.open(1)
        with pytest.raises(DownloadError, match=r"too large|larger"):
            await opened.fetch_block(0)


async def test_azure_objects_carry_an_md5_prefix() -> None:
    plain = payload(5000)
    body, objects = mock_file(plain, [3000, 2000], host="acct.blob.core.windows.net", azure=True)
    seen: list[httpx.Request] = []

    async def storage(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=objects[request.url.path])

    dio = DirectIO(
        "https://portal.test",
        "AK",
        SECRET,
        portal_transport=httpx.MockTransport(lambda r: json_response(body)),
        storage_transport=httpx.MockTransport(storage),
    )
    async with dio:
        meta = await dio.metadata(1)
        assert meta.azure
        assert await read_all(dio, "1") == plain
    # The presigned URL is used exactly as given, without our Authorization header.
    assert str(seen[0].url) == body["chunks"][0]["url"]
    assert "authorization" not in seen[0].headers


# Cutting a chunked body short leaves httpx's inner async generators to trio's GC hook, which warns about them.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_chunked_overlong_bodies_are_cut_off() -> None:
    body, _ = mock_file(bytes(1000), [1000], compression=codec.Compression.NONE, encrypted=False)
    sent = []

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(1000):  # no Content-Length: the limit must stop the read, not the end of the body
            sent.append(1)
            yield b"x" * 600

    async def storage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    async def portal(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    dio = DirectIO(
        "https://portal.test",
        "AK",
        SECRET,
        settings=DirectIOSettings(retry=FAST_RETRY, max_metadata_bytes=5000),
        portal_transport=httpx.MockTransport(portal),
        storage_transport=httpx.MockTransport(storage),
    )
    async with dio:
        with pytest.raises(MalformedMetadataError, match="larger than"):
            await dio.metadata(1)
        assert len(sent) < 20
    async with DirectIO(
        "https://portal.test",
        "AK",
        SECRET,
        portal_transport=httpx.MockTransport(lambda r: json_response(body)),
        storage_transport=httpx.MockTransport(storage),
    ) as dio:
        opened = await dio.open(1)
        sent.clear()
        with pytest.raises(DownloadError, match="too large"):
            await opened.fetch_block(0)
        assert len(sent) < 20
