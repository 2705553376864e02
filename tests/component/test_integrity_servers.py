"""Integrity against real servers on 127.0.0.1: the reference portal's block ETags are the MD5 of the object, and
its ``--fault-corrupt-blocks-rate`` (bytes damaged on the wire under the true ETag) is caught; SeaweedFS's presigned
GETs carry MD5 ETags. The layers themselves, through scripted storage: tests/unit/test_integrity.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import trio

from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import BlockDigestError
from directfs.sources.ctera.client import storage_md5
from tests.support.blockserver import FAST_RETRY, payload
from tests.support.portal import start_portal
from tests.support.seaweed import start_seaweed

BLOCK = 64 * 1024


def md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


@pytest.mark.expected_logs(r"object does not match its")
def test_portal_block_etag_is_the_md5_and_wire_corruption_is_caught(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "native.bin").write_bytes(payload(2 * BLOCK, seed=5))
    args = ["--block-size", "64K", "--native", "*.bin"]
    with start_portal(tree, extra_args=args) as portal:
        fid = portal.file_id("native.bin")

        async def block_urls() -> list[str]:
            async with DirectIO(portal.url, portal.access_key_id, portal.secret_access_key) as dio:
                return [chunk.url for chunk in (await dio.metadata(fid)).chunks]

        for url in trio.run(block_urls):
            reply = httpx.get(url)
            assert reply.headers["ETag"] == f'"{hashlib.md5(reply.content).hexdigest()}"'

    with start_portal(tree, extra_args=[*args, "--fault-corrupt-blocks-rate", "1", "--fault-seed", "3"]) as portal:

        async def read_corrupted() -> None:
            settings = DirectIOSettings(retry=FAST_RETRY)
            async with DirectIO(portal.url, portal.access_key_id, portal.secret_access_key, settings=settings) as dio:
                opened = await dio.open(portal.file_id("native.bin"))
                with pytest.raises(BlockDigestError):
                    await opened.fetch_block(0)

        trio.run(read_corrupted)
        assert portal.stderr_text().count("fault: corrupted byte") >= 2  # damaged on the wire, twice


def test_seaweedfs_presigned_gets_carry_md5_etags(tmp_path: Path) -> None:
    with start_seaweed(tmp_path / "weed", buckets=("etags",)) as s3:
        client = s3.client()
        obj = payload(300_000, seed=9)
        client.put_object(Bucket="etags", Key="blocks/aa/object", Body=obj)
        url = client.generate_presigned_url("get_object", Params={"Bucket": "etags", "Key": "blocks/aa/object"})
        reply = httpx.get(url)
        assert reply.status_code == 200
        assert storage_md5(reply.headers) == (md5(obj), "ETag")
