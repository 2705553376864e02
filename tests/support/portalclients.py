"""Independent clients of the reference portal's Direct IO API: the real ``cterasdk`` client, and raw httpx plus
directfs's block codec."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from directfs.sources.ctera import codec
from directfs.sources.ctera.codec import Compression

from .portal import Portal


async def _sdk_download(portal: Portal, file_id: str, byte_range: tuple[int, int] | None = None) -> bytes:
    from cterasdk.direct.client import DirectIO
    from cterasdk.direct.types import ByteRange

    async with DirectIO(portal.url, portal.access_key_id, portal.secret_access_key) as client:
        if byte_range is not None:  # Streamer only with an explicit range (defect 11.3)
            streamer = await client.streamer(int(file_id), byte_range=ByteRange(*byte_range), max_workers=4)
            return b"".join([bytes(fragment.data) async for fragment in streamer.start()])
        tasks = await client.blocks(int(file_id), max_workers=8)
        parts: dict[int, bytes] = {}
        for task in asyncio.as_completed(tasks):
            block = await task
            parts[block.offset] = bytes(block.data)
    out = bytearray()
    for offset in sorted(parts):
        assert offset == len(out), f"gap or overlap at {offset}"
        out += parts[offset]
    return bytes(out)


def sdk_download(portal: Portal, file_id: str, byte_range: tuple[int, int] | None = None) -> bytes:
    return asyncio.run(_sdk_download(portal, file_id, byte_range))


def directio_json(portal: Portal, file_id: str, **params: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {portal.access_key_id}"}
    response = httpx.get(f"{portal.url}/directio/{file_id}", headers=headers, params=params)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def download_with_codec(portal: Portal, reply: dict[str, Any]) -> bytes:
    info = reply["encrypt_info"]
    key = codec.unwrap_file_key(info["wrapped_key"], portal.secret_access_key) if info["data_encrypted"] else None
    compression = Compression.parse(reply["compression_type"])
    out = bytearray()
    with httpx.Client() as client:
        for chunk in reply["chunks"]:
            obj = client.get(chunk["url"]).raise_for_status().content
            out += codec.decode_block(obj, key=key, compression=compression, expected_length=chunk["len"])
    return bytes(out)
