"""s3:// source against a real SeaweedFS (SigV4 enforced) on 127.0.0.1. URL forms and scripted nearline replies
(MockTransport) without a server: tests/unit/test_source_s3_offline.py; through a real mount:
tests/mount/test_source_s3_mount.py."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directfs.errors import (
    ConfigError,
    EntryNotFoundError,
    NotADirectory,
    PermissionDeniedError,
    StaleFileError,
)
from directfs.sources.s3 import create
from directfs.transfer import BlockingGetter
from tests.support.seaweed import SeaweedFS
from tests.support.sourcetree import BLOCK, S3_PAGING_KEYS, check_tree, isolate_aws_env, options, s3_bucket

BUCKET = "directfs-test"
PAGING_KEYS = S3_PAGING_KEYS


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedFS, dict[str, bytes]]]:
    with s3_bucket(tmp_path_factory.mktemp("weed"), BUCKET) as it:
        yield it


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weed: tuple[SeaweedFS, dict[str, bytes]]) -> SeaweedFS:
    return isolate_aws_env(monkeypatch, tmp_path, weed[0])


async def test_listing_stat_and_bytes(aws_env: SeaweedFS, weed: tuple[SeaweedFS, dict[str, bytes]]) -> None:
    source = create(f"s3://{BUCKET}/data", options(endpoint_url=aws_env.endpoint))
    try:
        await check_tree(source, weed[1])
        assert isinstance(source._getter, BlockingGetter)  # the bytes above came through worker-thread GETs (libcurl)
        assert (await source.stat("")).is_dir
        assert (await source.stat("sub dir")).is_dir
        assert (await source.stat("sub dir/deeper")).is_dir
        entry = await source.stat("plus+and space.txt")
        assert dict(entry.xattrs)["user.etag"].startswith(b'"')
        with pytest.raises(EntryNotFoundError):
            await source.stat("missing")
        with pytest.raises(EntryNotFoundError):
            async for _ in source.list_dir("missing"):
                pass
        with pytest.raises(NotADirectory):
            async for _ in source.list_dir("one"):
                pass
    finally:
        await source.aclose()


async def test_listing_pages(aws_env: SeaweedFS) -> None:
    source = create(f"s3://{BUCKET}/paging/", options(endpoint_url=aws_env.endpoint))
    source.list_page_keys = 7  # 25 keys + 3 prefixes: 4 pages with continuation tokens
    pages: list[str] = []
    list_url = source._list_url

    def counting(prefix: str, token: str | None, max_keys: int) -> str:
        pages.append(token or "")
        return list_url(prefix, token, max_keys)

    source._list_url = counting  # type: ignore[method-assign]
    try:
        names = [e.name async for e in source.list_dir("")]
        expected_files = [f"key-{i:03d}" for i in range(PAGING_KEYS)]
        assert sorted(names) == sorted([*expected_files, "sub-0", "sub-1", "sub-2"])
        assert len(pages) == 4 and pages[0] == "" and all(pages[1:])
    finally:
        await source.aclose()


async def test_profile_from_shared_credentials_file(
    aws_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n"
        f"[weed]\naws_access_key_id = {aws_env.access_key}\naws_secret_access_key = {aws_env.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "weed")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", aws_env.endpoint)  # endpoint from the environment this time
    source = create(f"s3://{BUCKET}/paging", options())
    try:
        assert (await source.stat("key-003")).size == 1
    finally:
        await source.aclose()


async def test_bad_or_missing_credentials(aws_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    source = create(f"s3://{BUCKET}/data", options(endpoint_url=aws_env.endpoint))
    try:
        with pytest.raises(PermissionDeniedError):
            await source.stat("")
    finally:
        await source.aclose()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    source = create(f"s3://{BUCKET}/data", options(endpoint_url=aws_env.endpoint))
    try:
        with pytest.raises(ConfigError, match="needs credentials"):
            await source.stat("")
    finally:
        await source.aclose()


async def test_replaced_object_is_stale(aws_env: SeaweedFS) -> None:
    import botocore.session

    session = botocore.session.Session()
    client: Any = session.create_client("s3", endpoint_url=aws_env.endpoint, region_name=aws_env.region)
    original = random.Random(1).randbytes(3 * BLOCK)
    client.put_object(Bucket=BUCKET, Key="stale/obj", Body=original)
    source = create(f"s3://{BUCKET}/stale", options(endpoint_url=aws_env.endpoint))
    try:
        entry = await source.stat("obj")
        handle = await source.open("obj", entry)
        assert await handle.fetch_block(0) == original[:BLOCK]
        client.put_object(Bucket=BUCKET, Key="stale/obj", Body=bytes(reversed(original)))  # same size
        with pytest.raises(StaleFileError):
            await handle.fetch_block(1)
    finally:
        await source.aclose()
