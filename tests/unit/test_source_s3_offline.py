"""s3:// without a server: the URL forms (bucket, prefix, addressing style, endpoint) and an archive-tier object
answered by a scripted store (``httpx.MockTransport``): InvalidObjectState polled with backoff, then the data or
ETIMEDOUT. Against a real S3 server: tests/component/test_source_s3.py."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import httpx
import pytest
import trio

from directfs.errors import ConfigError, DataNotOnlineError
from directfs.sources.s3 import create
from tests.support.sourcetree import BLOCK, options, read_all


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
