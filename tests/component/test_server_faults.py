"""The portal's test-only fault knobs do what their names say (later fault tests of the client rely on them)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from directfs.errors import BlockError
from directfs.sources.ctera import codec
from directfs.sources.ctera.codec import Compression
from tests.support.portal import start_portal
from tests.support.portalclients import directio_json


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "data.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, one block
    return root


def first_block_url(portal_url: str, reply: dict[str, object]) -> str:
    chunks = reply["chunks"]
    assert isinstance(chunks, list)
    url = chunks[0]["url"]
    assert isinstance(url, str)
    return url


def test_error_rate_and_status_on_blocks_only_by_default(tree: Path) -> None:
    with start_portal(tree, extra_args=["--fault-error-rate", "1", "--fault-status", "503"]) as portal:
        reply = directio_json(portal, portal.file_id("data.bin"))  # the portal itself is not faulted
        assert httpx.get(first_block_url(portal.url, reply)).status_code == 503


def test_error_rate_on_the_portal(tree: Path) -> None:
    args = ["--fault-error-rate", "1", "--fault-status", "500", "--fault-target", "portal"]
    with start_portal(tree, extra_args=args) as portal:
        headers = {"Authorization": f"Bearer {portal.access_key_id}"}
        assert httpx.get(f"{portal.url}/directio/1001", headers=headers).status_code == 500


def test_expired_urls_and_corrupted_blocks(tree: Path) -> None:
    with start_portal(tree, extra_args=["--fault-url-ttl", "-1"]) as portal:
        reply = directio_json(portal, portal.file_id("data.bin"))
        assert httpx.get(first_block_url(portal.url, reply)).status_code == 403  # already expired
    with start_portal(tree, extra_args=["--fault-corrupt-blocks-rate", "1", "--fault-seed", "7"]) as portal:
        reply = directio_json(portal, portal.file_id("data.bin"))
        obj = httpx.get(first_block_url(portal.url, reply)).content
        key = codec.unwrap_file_key(reply["encrypt_info"]["wrapped_key"], portal.secret_access_key)
        with pytest.raises(BlockError):
            codec.decode_block(obj, key=key, compression=Compression.SNAPPY, expected_length=1024 * 1024)


def test_drop_mid_body(tree: Path) -> None:
    with start_portal(tree, extra_args=["--fault-drop-mid-body-rate", "1"]) as portal:
        reply = directio_json(portal, portal.file_id("data.bin"))
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(first_block_url(portal.url, reply))


def test_latency(tree: Path) -> None:
    with start_portal(tree, extra_args=["--fault-latency-ms", "300", "--fault-target", "portal"]) as portal:
        response = httpx.get(f"{portal.url}/directio/1", headers={"Authorization": "Bearer x"})
        assert response.status_code == 401
        assert response.elapsed.total_seconds() >= 0.3
