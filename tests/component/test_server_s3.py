"""The reference portal with its block store in a real S3 server (SeaweedFS ``weed mini``, SigV4 enforced)."""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.portal import UNICODE_NAME, make_tree, start_portal
from tests.support.portalclients import directio_json, download_with_codec, sdk_download
from tests.support.seaweed import SeaweedFS, start_seaweed

BUCKET = "directfs-blocks"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with start_seaweed(tmp_path_factory.mktemp("weed"), buckets=(BUCKET,)) as s3:
        yield s3


def test_cterasdk_downloads_from_s3_block_store(seaweed: SeaweedFS, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    hashes = make_tree(root, 128 * 1024, few_mib=4)
    args = ["--block-size", "128K", "--store", f"s3://{BUCKET}/portal-a", "--store-endpoint", seaweed.endpoint]
    with start_portal(root, extra_args=args, env=seaweed.env()) as portal:
        for rel, expected in hashes.items():
            if rel == "empty.bin":
                continue  # "chunks": [] -> cterasdk BlocksNotFoundError (see test_server_portal)
            data = sdk_download(portal, portal.file_id(rel))
            assert hashlib.sha256(data).hexdigest() == expected, rel

        reply = directio_json(portal, portal.file_id(UNICODE_NAME))
        url = urllib.parse.urlsplit(reply["chunks"][0]["url"])
        assert url.netloc == urllib.parse.urlsplit(seaweed.endpoint).netloc
        assert url.path.startswith(f"/{BUCKET}/portal-a/blocks/")
        query = dict(urllib.parse.parse_qsl(url.query))
        assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-Expires"] == "86400"
        assert hashlib.sha256(download_with_codec(portal, reply)).hexdigest() == hashes[UNICODE_NAME]

        # SeaweedFS enforces the signature: a tampered or missing one is refused.
        sig = query["X-Amz-Signature"]
        tampered = {**query, "X-Amz-Signature": ("0" if sig[0] != "0" else "1") + sig[1:]}
        assert (
            httpx.get(urllib.parse.urlunsplit(url._replace(query=urllib.parse.urlencode(tampered)))).status_code == 403
        )
        assert httpx.get(urllib.parse.urlunsplit(url._replace(query=""))).status_code == 403


def test_s3_store_without_credentials_fails_clearly(seaweed: SeaweedFS, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    args = ["--store", f"s3://{BUCKET}", "--store-endpoint", seaweed.endpoint]
    with (
        pytest.raises(RuntimeError, match=r"needs credentials|cannot use bucket"),
        start_portal(tmp_path, extra_args=args, env=env),
    ):
        pass
