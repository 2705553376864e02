"""s3:// without a server: the URL forms (bucket, prefix, addressing style, endpoint), an archive-tier object
answered by a scripted store (``httpx.MockTransport``): InvalidObjectState polled with backoff, then the data or
ETIMEDOUT; and writes against a scripted store (signatures per attempt, the status table, transport failures, a
failing abort). Against a real S3 server: tests/component/test_source_s3.py and test_source_s3_writes.py."""

from __future__ import annotations

import base64
import datetime
import errno
import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from directfs.errors import (
    ConfigError,
    DataNotOnlineError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    NoSpaceError,
    QuotaExceededError,
    UploadError,
    UploadTimeout,
    WriteAccessError,
)
from directfs.sources.base import Upload, Writable, WriteFeatures
from directfs.sources.s3 import MAX_UPLOAD_BYTES, PART_SIZE_BYTES, S3Source, create, multipart_etag
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


# --- writes (scripted store) ----------------------------------------------------------------------------------------
#
# The edge cases a real server will not produce on demand: every attempt's signature, the status table, transport
# failures, an abort that fails. Against SeaweedFS: tests/component/test_source_s3_writes.py.


class ScriptedStore:
    """A store answering each request with ``answer(request)`` (None: a plain success for its kind)."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response | None] = lambda request: None) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.read())
        answer = self.answer(request)
        if answer is not None:
            return answer
        if "uploads" in request.url.params:
            return httpx.Response(
                200, content=b"<InitiateMultipartUploadResult><UploadId>up-1</UploadId></InitiateMultipartUploadResult>"
            )
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": "1", "ETag": '"e"'})
        if request.method == "DELETE":
            return httpx.Response(204)
        if request.method == "POST":
            return httpx.Response(200, content=b"<CompleteMultipartUploadResult/>")
        return httpx.Response(200, headers={"ETag": '"etag"'})

    async def source(self) -> S3Source:
        source = create("s3://bucket/pre", options(endpoint_url="https://s3.example.org"))
        source._client = httpx.AsyncClient(transport=httpx.MockTransport(self.handler))
        # Resolved now, not in the first attempt: the autojump clock would skip the budget while the thread runs.
        await source._frozen_credentials()
        return source

    def kinds(self) -> list[str]:
        return [
            f"{r.method} {'?' + '&'.join(sorted(r.url.params)) if r.url.params else r.url.path}" for r in self.requests
        ]


def spool_fd(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "spool"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def xml_error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, content=f"<Error><Code>{code}</Code></Error>".encode())


def test_write_features_and_protocols(fake_keys: None) -> None:
    source = create("s3://bucket", options(endpoint_url="https://s3.example.org"))
    assert isinstance(source, Writable)
    assert source.write_features == WriteFeatures(folder_rename=False, keeps_mtime=False, empty_folders=True)
    assert isinstance(source.begin_upload("a/b"), Upload)
    # One part is 8 MiB; 10,000 of them bound a file at 78.1 GiB (what the README states).
    assert (PART_SIZE_BYTES, MAX_UPLOAD_BYTES) == (8 * 1024 * 1024, 10_000 * 8 * 1024 * 1024)


def test_multipart_etag_is_what_s3_computes() -> None:
    # SeaweedFS (as AWS) answered this ETag for parts of 5 MiB of b"a" and 10 bytes of b"b".
    md5s = [hashlib.md5(b"a" * (5 << 20)).digest(), hashlib.md5(b"b" * 10).digest()]
    assert multipart_etag(md5s) == '"8b0be7847da5564ae08e97af63b60885-2"'


async def test_each_attempt_is_signed_afresh_with_the_same_body(
    fake_keys: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    import botocore.auth

    clock = iter(datetime.datetime(2030, 1, 1, 0, 0, s, tzinfo=datetime.UTC) for s in range(60))
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: next(clock))
    busy = [503, 503]

    def answer(request: httpx.Request) -> httpx.Response | None:
        return httpx.Response(busy.pop()) if busy else None

    store = ScriptedStore(answer)
    source = await store.source()
    data = random.Random(5).randbytes(1000)
    fd = spool_fd(tmp_path, data)
    try:
        entry = await source.begin_upload("f").commit(fd, len(data))
        assert (entry.version, entry.size) == ('s3:"etag":1000', 1000)
        assert len(store.requests) == 3  # 503, 503, then 200
        assert len({r.headers["x-amz-date"] for r in store.requests}) == 3  # each attempt signed when it was sent
        assert len({r.headers["authorization"] for r in store.requests}) == 3
        assert store.bodies == [data] * 3  # the same bytes on every attempt
        for request in store.requests:
            assert request.headers["content-md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()
            assert request.headers["x-amz-content-sha256"] == hashlib.sha256(data).hexdigest()
            assert "content-md5" in request.headers["authorization"]  # signed, so it cannot be swapped on the way
    finally:
        os.close(fd)
        await source.aclose()


@pytest.mark.parametrize(
    ("status", "code", "error_class", "errno_value"),
    [
        (507, "", NoSpaceError, errno.ENOSPC),
        (400, "EntityTooLarge", NoSpaceError, errno.ENOSPC),
        (400, "QuotaExceeded", QuotaExceededError, errno.EDQUOT),
        (403, "AccessDenied", WriteAccessError, errno.EACCES),
        (404, "NoSuchBucket", EntryNotFoundError, errno.ENOENT),
        (404, "NoSuchUpload", UploadError, errno.EIO),  # the multipart upload vanished: EIO, not "no such file"
        (500, "InternalError", UploadError, errno.EIO),
        (400, "BadDigest", UploadError, errno.EIO),
    ],
)
async def test_write_statuses(
    fake_keys: None,
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    status: int,
    code: str,
    error_class: type[Exception],
    errno_value: int,
) -> None:
    store = ScriptedStore(lambda request: xml_error(status, code) if request.method == "PUT" else None)
    source = await store.source()
    fd = spool_fd(tmp_path, b"x" * (PART_SIZE_BYTES + 1))  # multipart: the refused request is a part
    try:
        with pytest.raises(error_class) as caught:
            await source.begin_upload("f").commit(fd, PART_SIZE_BYTES + 1)
        assert caught.value.errno == errno_value  # type: ignore[attr-defined]
        assert "AKIDEXAMPLE" not in str(caught.value) and "wJalrXUtnFEMI" not in str(caught.value)
        assert store.kinds()[-1] == "DELETE ?uploadId"  # aborted
    finally:
        os.close(fd)
        await source.aclose()


@pytest.mark.parametrize(
    ("failure", "error_class", "errno_value"),
    [
        (httpx.ConnectError("refused"), UploadError, errno.EIO),
        (httpx.RemoteProtocolError("cut"), UploadError, errno.EIO),  # may have landed: EIO, not ENETRESET
        (httpx.ReadTimeout("slow"), UploadTimeout, errno.ETIMEDOUT),
    ],
)
async def test_write_transport_failures(
    fake_keys: None,
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    failure: httpx.HTTPError,
    error_class: type[Exception],
    errno_value: int,
) -> None:
    def answer(request: httpx.Request) -> httpx.Response | None:
        raise failure

    source = await ScriptedStore(answer).source()
    fd = spool_fd(tmp_path, b"abc")
    try:
        with pytest.raises(error_class) as caught:
            await source.begin_upload("f").commit(fd, 3)
        assert caught.value.errno == errno_value  # type: ignore[attr-defined]
    finally:
        os.close(fd)
        await source.aclose()


@pytest.mark.expected_logs(r"could not abort the multipart upload of https://s3\.example\.org/bucket/pre/f \(")
async def test_abort_never_raises(fake_keys: None, tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    store = ScriptedStore(lambda request: xml_error(500, "InternalError") if request.method == "DELETE" else None)
    source = await store.source()
    fd = spool_fd(tmp_path, b"y" * (2 * PART_SIZE_BYTES + 1))
    try:
        upload = source.begin_upload("f")
        await upload.part_ready(fd, 2 * PART_SIZE_BYTES + 1)
        assert store.kinds().count("PUT ?partNumber&uploadId") == 2
        await upload.abort()  # 4 attempts of DELETE answered 500: logged, not raised
        assert store.kinds().count("DELETE ?uploadId") == 4
        await upload.abort()
        assert store.kinds().count("DELETE ?uploadId") == 4  # idempotent: no second try
    finally:
        os.close(fd)
        await source.aclose()


async def test_refusals_before_any_request(fake_keys: None, tmp_path: Path) -> None:
    store = ScriptedStore()
    source = await store.source()
    fd = spool_fd(tmp_path, b"z" * 10)
    try:
        with pytest.raises(NoSpaceError):  # beyond 10,000 parts: refused up front, as S3's EntityTooLarge
            await source.begin_upload("huge").commit(fd, MAX_UPLOAD_BYTES + 1)
        with pytest.raises(NoSpaceError):
            await source.begin_upload("huge").part_ready(fd, MAX_UPLOAD_BYTES + 1)
        with pytest.raises(InvalidArgumentError, match="the spool ends at 10 bytes"):  # never a short body
            await source.begin_upload("short").commit(fd, 100)
        with pytest.raises(IsADirectory):
            source.begin_upload("")
        assert store.requests == []
    finally:
        os.close(fd)
        await source.aclose()


async def test_commit_below_the_announced_end_aborts(fake_keys: None, tmp_path: Path) -> None:
    store = ScriptedStore()
    source = await store.source()
    fd = spool_fd(tmp_path, b"w" * (2 * PART_SIZE_BYTES))
    try:
        upload = source.begin_upload("f")
        await upload.part_ready(fd, 2 * PART_SIZE_BYTES)
        with pytest.raises(InvalidArgumentError):
            await upload.commit(fd, PART_SIZE_BYTES)  # the spool was said to be final up to 16 MiB
        assert store.kinds()[-1] == "DELETE ?uploadId"
    finally:
        os.close(fd)
        await source.aclose()


async def test_complete_with_keep_alive_spaces(fake_keys: None, tmp_path: Path) -> None:
    """S3 sends whitespace while a long CompleteMultipartUpload runs: the reply after it is a success, not an error."""

    def answer(request: httpx.Request) -> httpx.Response | None:
        if request.method == "POST" and "uploadId" in request.url.params:
            return httpx.Response(200, content=b"   \n  " + b'<?xml version="1.0"?><CompleteMultipartUploadResult/>')
        return None

    store = ScriptedStore(answer)
    source = await store.source()
    fd = spool_fd(tmp_path, b"v" * (PART_SIZE_BYTES + 1))
    try:
        await source.begin_upload("f").commit(fd, PART_SIZE_BYTES + 1)
        assert store.kinds().count("POST ?uploadId") == 1  # not retried as an error
    finally:
        os.close(fd)
        await source.aclose()
