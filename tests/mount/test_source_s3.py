"""s3:// source against a real SeaweedFS (SigV4 enforced) on 127.0.0.1; scripted nearline replies via MockTransport."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from directfs.errors import (
    ConfigError,
    DataNotOnlineError,
    EntryNotFoundError,
    NotADirectory,
    PermissionDeniedError,
    StaleFileError,
)
from directfs.sources.s3 import create
from directfs.transfer import BlockingGetter
from tests.support.mountd import mounted
from tests.support.seaweed import SeaweedFS, start_seaweed
from tests.support.sourcetree import BLOCK, check_mounted_tree, check_tree, make_tree, needs_fuse, options, read_all

BUCKET = "directfs-test"
PAGING_KEYS = 25


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedFS, dict[str, bytes]]]:
    import botocore.session

    workdir = tmp_path_factory.mktemp("weed")
    with start_seaweed(workdir, buckets=(BUCKET,)) as s3:
        session = botocore.session.Session()
        session.set_credentials(s3.access_key, s3.secret_key)
        client: Any = session.create_client("s3", endpoint_url=s3.endpoint, region_name=s3.region)
        tree = workdir / "tree"
        files = make_tree(tree)
        files["plus+and space.txt"] = b"S3 url-encodes keys in listings: '+' and ' ' must survive\n"
        for rel, data in files.items():
            client.put_object(Bucket=BUCKET, Key=f"data/{rel}", Body=data)
        client.put_object(Bucket=BUCKET, Key="data/sub dir/", Body=b"")  # a console-made folder marker
        for i in range(PAGING_KEYS):
            client.put_object(Bucket=BUCKET, Key=f"paging/key-{i:03d}", Body=b"%d" % i)
        for i in range(3):
            client.put_object(Bucket=BUCKET, Key=f"paging/sub-{i}/x", Body=b"x")
        yield s3, files


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weed: tuple[SeaweedFS, dict[str, bytes]]) -> SeaweedFS:
    """Only the variables under test: no ~/.aws files, no instance metadata lookups."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for key, value in weed[0].env().items():
        monkeypatch.setenv(key, value)
    return weed[0]


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


def test_url_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    aws = create("s3://my-bucket/some/prefix", options())
    assert aws._base == "https://my-bucket.s3.eu-west-1.amazonaws.com/"  # virtual-host style on AWS
    assert aws.display_url == "s3://my-bucket/some/prefix"
    dotted = create("s3://my.bucket", options())
    assert dotted._base == "https://s3.eu-west-1.amazonaws.com/my.bucket/"  # dots break TLS wildcards: path style
    custom = create("s3://b1", options(endpoint_url="http://127.0.0.1:9000"))
    assert custom._base == "http://127.0.0.1:9000/b1/"
    forced = create("s3://b1?addressing_style=virtual", options(endpoint_url="https://s3.example.org"))
    assert forced._base == "https://b1.s3.example.org/"
    with pytest.raises(ConfigError, match="loopback"):
        create("s3://b1", options(endpoint_url="http://s3.example.org"))
    with pytest.raises(ConfigError):
        create("s3://b1?style=x", options())
    with pytest.raises(ConfigError):
        create("s3://key:secret@b1", options())


INVALID_OBJECT_STATE = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidObjectState</Code>'
    b"<Message>The operation is not valid for the object's storage class</Message></Error>"
)


@pytest.fixture
def fake_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def archive_transport(data: bytes, offline_gets: int) -> tuple[httpx.MockTransport, list[int]]:
    """An archive-tier object: the first ``offline_gets`` GETs answer 403 InvalidObjectState (scripted edge case)."""
    statuses: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data)), "ETag": '"abc"'})
        if len(statuses) < offline_gets:
            statuses.append(403)
            return httpx.Response(
                403, stream=httpx.ByteStream(INVALID_OBJECT_STATE), headers={"Content-Type": "application/xml"}
            )
        start, end = (int(x) for x in request.headers["range"].removeprefix("bytes=").split("-"))
        statuses.append(206)
        return httpx.Response(
            206,
            stream=httpx.ByteStream(data[start : end + 1]),
            headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"},
        )

    return httpx.MockTransport(handler), statuses


async def test_invalid_object_state_waits_for_staging(fake_keys: None, autojump_clock: trio.abc.Clock) -> None:
    data = random.Random(3).randbytes(BLOCK + 10)
    transport, statuses = archive_transport(data, offline_gets=4)
    source = create("s3://archive", options(endpoint_url="https://s3.example.org"))
    source._client = httpx.AsyncClient(transport=transport)
    try:
        entry = await source.stat("tape.bin")
        handle = await source.open("tape.bin", entry)
        start = trio.current_time()
        assert await read_all(handle) == data
        assert statuses == [403, 403, 403, 403, 206, 206]
        assert trio.current_time() - start >= 1 + 2 + 4 + 8  # polled with backoff, no Retry-After to go by
    finally:
        await source.aclose()


async def test_invalid_object_state_past_deadline(fake_keys: None, autojump_clock: trio.abc.Clock) -> None:
    transport, _ = archive_transport(b"z" * 100, offline_gets=10**6)
    source = create("s3://archive", options(endpoint_url="https://s3.example.org", staging_deadline_seconds=120))
    source._client = httpx.AsyncClient(transport=transport)
    try:
        handle = await source.open("tape.bin", await source.stat("tape.bin"))
        start = trio.current_time()
        with pytest.raises(DataNotOnlineError) as caught:
            await handle.fetch_block(0)
        assert caught.value.errno == errno.ETIMEDOUT
        assert trio.current_time() - start <= 120
    finally:
        await source.aclose()


@needs_fuse
@pytest.mark.mount
def test_mount_bucket_prefix(aws_env: SeaweedFS, weed: tuple[SeaweedFS, dict[str, bytes]]) -> None:
    env = {**aws_env.env(), "AWS_EC2_METADATA_DISABLED": "true"}
    with mounted(f"s3://{BUCKET}/data", env=env, extra_args=["--endpoint-url", aws_env.endpoint]) as m:
        check_mounted_tree(m.mountpoint, weed[1])
        assert sorted(os.listdir(m.mountpoint / "sub dir")) == ["deeper", "na me #1%.txt"]  # marker not shown
