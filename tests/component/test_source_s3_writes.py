"""Writes of the s3:// source (``Writable``) against a real SeaweedFS (SigV4 enforced) on 127.0.0.1: uploads of every
size class checked byte for byte with botocore's ``get_object``, multipart parts sent while the spool grows, folders,
deletes and renames, and failures (a part answered 500 or 507, a body cut on the wire, a refused Complete, a hang,
refused credentials) that leave no object and no pending multipart upload behind. Requests go through ``Wire``: the
real network, recorded per request, with chosen requests answered, cut or held by the test. Scripted replies
without a server: tests/unit/test_source_s3_offline.py."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from directfs.errors import (
    CrossDeviceError,
    DirectoryNotEmptyError,
    EntryExistsError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    NoSpaceError,
    NotADirectory,
    StaleFileError,
    UploadError,
    UploadTimeout,
    WriteAccessError,
)
from directfs.http import RetryPolicy, build_client
from directfs.sources.base import SourceOptions, Upload, Writable
from directfs.sources.s3 import PART_SIZE_BYTES, PARTS_IN_FLIGHT, S3Source, S3Upload, create
from tests.support.faultproxy import FaultProxy
from tests.support.seaweed import SeaweedFS, start_seaweed
from tests.support.sourcetree import isolate_aws_env, read_all

BUCKET = "directfs-writes"
MiB = 1024 * 1024
PART = PART_SIZE_BYTES
# Retries as in production (4 attempts) with short sleeps: the failure tests wait for every attempt.
FAST_RETRY = RetryPolicy(base_delay_seconds=0.01, max_delay_seconds=0.05, total_budget_seconds=60.0)


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with start_seaweed(tmp_path_factory.mktemp("weed"), buckets=(BUCKET,)) as s3:
        yield s3


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weed: SeaweedFS) -> SeaweedFS:
    return isolate_aws_env(monkeypatch, tmp_path, weed)


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test alone (the server is shared by the module)."""
    return "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]


# --- the wire -------------------------------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    query: dict[str, str]
    headers: httpx.Headers
    body: bytes

    @property
    def kind(self) -> str:
        """The S3 operation, told from method, query and headers."""
        q, m = self.query, self.method
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "partNumber" in q:
            return "UploadPartCopy" if "x-amz-copy-source" in self.headers else "UploadPart"
        if "uploadId" in q:
            return {"POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload"}.get(m, m)
        if m == "PUT":
            return "CopyObject" if "x-amz-copy-source" in self.headers else "PutObject"
        if m == "GET" and "list-type" in q:
            return "ListObjectsV2"
        return {"HEAD": "HeadObject", "GET": "GetObject", "DELETE": "DeleteObject"}.get(m, m)


Fault = Callable[[Seen, httpx.Request], Awaitable[httpx.Response | None]]


class _CutBody(httpx.AsyncByteStream):
    """Sends the first half of a body, then fails the send: the connection closes mid-body, as a dropped link."""

    def __init__(self, data: bytes) -> None:
        self._pieces = [data[: len(data) // 2]]

    def __aiter__(self) -> _CutBody:
        return self

    async def __anext__(self) -> bytes:
        if self._pieces:
            return self._pieces.pop()
        raise httpx.WriteError("the connection dropped mid-body (test)")


@dataclass
class Wire(httpx.AsyncBaseTransport):
    """The real network to the server, seen per request. ``fault`` may answer a request itself (return a response),
    change it (its body, its stream) and return None to forward it, or hold it (sleep)."""

    inner: httpx.AsyncHTTPTransport = field(default_factory=httpx.AsyncHTTPTransport)
    seen: list[Seen] = field(default_factory=list)
    fault: Fault | None = None
    parts_in_flight: int = 0
    max_parts_in_flight: int = 0
    part_delay_seconds: float = 0.0

    def kinds(self) -> list[str]:
        return [s.kind for s in self.seen]

    def count(self, kind: str) -> int:
        return self.kinds().count(kind)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        seen = Seen(request.method, dict(request.url.params), request.headers, body)
        self.seen.append(seen)
        if self.fault is not None:
            answer = await self.fault(seen, request)
            if answer is not None:
                return answer
        if seen.kind != "UploadPart":
            return await self.inner.handle_async_request(request)
        self.parts_in_flight += 1
        self.max_parts_in_flight = max(self.max_parts_in_flight, self.parts_in_flight)
        try:
            await trio.sleep(self.part_delay_seconds)
            return await self.inner.handle_async_request(request)
        finally:
            self.parts_in_flight -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


def s3_error(status: int, code: str) -> httpx.Response:
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>test</Message></Error>'
    return httpx.Response(status, content=body.encode(), headers={"Content-Type": "application/xml"})


def check_content_md5(wire: Wire) -> None:
    """Every PUT with a body carried the right Content-MD5 (copies have no body, so none)."""
    bodies = [s for s in wire.seen if s.method == "PUT" and s.kind in ("PutObject", "UploadPart")]
    assert bodies
    for s in bodies:
        assert s.headers["content-md5"] == base64.b64encode(hashlib.md5(s.body).digest()).decode(), s.kind
        assert s.headers["x-amz-content-sha256"] == hashlib.sha256(s.body).hexdigest()


# --- helpers --------------------------------------------------------------------------------------------------------


def make_source(s3: SeaweedFS, prefix: str, wire: Wire | None = None, **kwargs: Any) -> S3Source:
    options = SourceOptions(block_size_bytes=4 * MiB, endpoint_url=kwargs.pop("endpoint_url", s3.endpoint), **kwargs)
    source = create(f"s3://{BUCKET}/{prefix}", options)
    source.write_retry = FAST_RETRY
    if wire is not None:
        source._client = build_client(source._settings, transport=wire)
    assert isinstance(source, Writable)
    return source


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Callable[[bytes], int]]:
    """Spool files: ``spool(data)`` is a read-only fd of a file holding ``data``; ``os.write`` to the file's path
    grows it (tests that announce parts as it grows open it themselves)."""
    fds: list[int] = []

    def make(data: bytes) -> int:
        path = tmp_path / f"spool-{len(fds)}"
        path.write_bytes(data)
        fds.append(os.open(path, os.O_RDONLY))
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


def get(s3: SeaweedFS, key: str) -> bytes:
    body: bytes = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return body


def missing(s3: SeaweedFS, key: str) -> bool:
    client = s3.client()
    try:
        client.head_object(Bucket=BUCKET, Key=key)
    except client.exceptions.ClientError as exc:
        return str(exc.response["Error"]["Code"]) in ("404", "NoSuchKey", "NotFound")
    return False


def pending_uploads(s3: SeaweedFS, prefix: str) -> list[str]:
    """Keys with a multipart upload in progress (ListMultipartUploads: SeaweedFS lists them)."""
    reply = s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    return [u["Key"] for u in reply.get("Uploads", [])]


def data_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def listed(source: S3Source, folder: str = "") -> dict[str, Any]:
    return {e.name: e async for e in source.list_dir(folder)}


# --- uploads --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, PART, PART + 1, 40 * MiB + 123], ids=["0", "1", "8MiB", "8MiB+1", "40MiB+"])
async def test_upload_is_byte_exact(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int], size: int) -> None:
    data = data_of(size, seed=size)
    wire = Wire()
    source = make_source(aws_env, prefix, wire)
    try:
        upload = source.begin_upload("dir/file.bin")
        assert isinstance(upload, Upload)
        assert wire.seen == []  # begin_upload sends nothing
        entry = await upload.commit(spool(data), size)
        assert hashlib.sha256(get(aws_env, f"{prefix}/dir/file.bin")).digest() == hashlib.sha256(data).digest()
        parts = -(-size // PART)
        if size <= PART:
            assert wire.kinds() == ["PutObject"]
        else:
            assert wire.kinds() == [
                "CreateMultipartUpload",
                *["UploadPart"] * parts,
                "CompleteMultipartUpload",
                "HeadObject",
            ]
            assert sorted(int(s.query["partNumber"]) for s in wire.seen if s.kind == "UploadPart") == list(
                range(1, parts + 1)
            )
            last = next(s for s in wire.seen if s.query.get("partNumber") == str(parts))
            assert len(last.body) == size - (parts - 1) * PART  # the last part holds the rest
        check_content_md5(wire)
        # The read side sees the version the upload returned, and the new bytes.
        assert (entry.name, entry.size, entry.is_dir) == ("file.bin", size, False)
        assert (await source.stat("dir/file.bin")).version == entry.version
        assert (await listed(source, "dir"))["file.bin"].version == entry.version
        handle = await source.open("dir/file.bin", entry)
        try:
            assert await read_all(handle) == data
        finally:
            await handle.aclose()
        assert pending_uploads(aws_env, prefix) == []
    finally:
        await source.aclose()


async def test_parts_go_while_the_spool_grows(aws_env: SeaweedFS, prefix: str, tmp_path: Path) -> None:
    data = data_of(4 * PART + 7, seed=4)
    path = tmp_path / "growing"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    reader = os.open(path, os.O_RDONLY)
    wire = Wire()
    source = make_source(aws_env, prefix, wire)
    client = aws_env.client()
    try:
        upload = source.begin_upload("grown.bin")
        os.write(writer, data[:PART])
        await upload.part_ready(reader, PART)
        assert wire.seen == []  # exactly one part so far: the file may still end as one PUT
        os.write(writer, data[PART : 2 * PART + 10])
        await upload.part_ready(reader, 2 * PART + 10)
        assert wire.kinds() == ["CreateMultipartUpload", "UploadPart", "UploadPart"]
        upload_id = wire.seen[0 + 1].query["uploadId"]
        on_server = client.list_parts(Bucket=BUCKET, Key=f"{prefix}/grown.bin", UploadId=upload_id)["Parts"]
        assert [(p["PartNumber"], p["Size"]) for p in on_server] == [(1, PART), (2, PART)]
        await upload.part_ready(reader, 2 * PART + 10)  # nothing new: nothing sent
        assert wire.count("UploadPart") == 2
        os.write(writer, data[2 * PART + 10 : 3 * PART + 5])
        await upload.part_ready(reader, 3 * PART + 5)
        assert wire.count("UploadPart") == 3
        os.write(writer, data[3 * PART + 5 :])  # never announced: commit sends parts 4 and 5 (7 bytes)
        entry = await upload.commit(reader, len(data))
        assert wire.kinds()[-4:] == ["UploadPart", "UploadPart", "CompleteMultipartUpload", "HeadObject"]
        assert sorted(int(s.query["partNumber"]) for s in wire.seen if s.kind == "UploadPart") == [1, 2, 3, 4, 5]
        check_content_md5(wire)
        assert get(aws_env, f"{prefix}/grown.bin") == data
        assert entry.size == len(data) and (await source.stat("grown.bin")).version == entry.version
        assert pending_uploads(aws_env, prefix) == []
    finally:
        os.close(writer)
        os.close(reader)
        await source.aclose()


async def test_parts_in_flight_are_bounded(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    data = data_of(6 * PART + 1, seed=6)
    fd = spool(data)
    wire = Wire(part_delay_seconds=0.2)  # each part takes a while: the ones sent side by side overlap
    source = make_source(aws_env, prefix, wire)
    try:
        upload = source.begin_upload("wide.bin")
        async with trio.open_nursery() as nursery:  # three background senders announcing the same parts
            for _ in range(3):
                nursery.start_soon(upload.part_ready, fd, 6 * PART)
        assert wire.count("UploadPart") == 6  # each part sent once, by one of them
        assert wire.max_parts_in_flight == PARTS_IN_FLIGHT
        await upload.commit(fd, len(data))
        assert wire.count("UploadPart") == 7 and wire.count("CreateMultipartUpload") == 1
        assert get(aws_env, f"{prefix}/wide.bin") == data
    finally:
        await source.aclose()


async def test_replaced_file_new_version(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    old, new = data_of(100_000, seed=1), data_of(100_000, seed=2)
    source = make_source(aws_env, prefix)  # no wire: reads go through the worker-thread getter
    try:
        first = await source.begin_upload("f").commit(spool(old), len(old))
        handle = await source.open("f", first)
        second = await source.begin_upload("f").commit(spool(new), len(new))
        assert second.version != first.version
        with pytest.raises(StaleFileError):  # a handle of the old version never mixes in new bytes
            await handle.fetch_block(0)
        await handle.aclose()
        fresh = await source.open("f", await source.stat("f"))
        assert await read_all(fresh) == new
        await fresh.aclose()
    finally:
        await source.aclose()


# --- failures leave nothing behind ----------------------------------------------------------------------------------


async def test_failed_part_aborts_and_keeps_the_old_object(
    aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]
) -> None:
    aws_env.client().put_object(Bucket=BUCKET, Key=f"{prefix}/kept", Body=b"old content")

    async def fail_part_3(seen: Seen, request: httpx.Request) -> httpx.Response | None:
        await trio.lowlevel.checkpoint()
        return s3_error(500, "InternalError") if seen.query.get("partNumber") == "3" else None

    wire = Wire(fault=fail_part_3)
    source = make_source(aws_env, prefix, wire)
    try:
        with pytest.raises(UploadError) as caught:
            await source.begin_upload("kept").commit(spool(data_of(5 * PART)), 5 * PART)
        assert caught.value.errno == errno.EIO and "InternalError" in str(caught.value)
        assert [s.query.get("partNumber") for s in wire.seen if s.kind == "UploadPart"].count("3") == 4  # retried
        assert wire.count("AbortMultipartUpload") == 1 and wire.count("CompleteMultipartUpload") == 0
        assert pending_uploads(aws_env, prefix) == []
        assert get(aws_env, f"{prefix}/kept") == b"old content"  # the old object stays until a new one is complete
    finally:
        await source.aclose()


async def test_body_cut_on_the_wire(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    async def cut(seen: Seen, request: httpx.Request) -> httpx.Response | None:
        await trio.lowlevel.checkpoint()
        if seen.kind == "PutObject" or seen.query.get("partNumber") == "2":
            request.stream = _CutBody(seen.body)  # forwarded: the server gets half the body, then the connection ends
        return None

    wire = Wire(fault=cut)
    source = make_source(aws_env, prefix, wire)
    try:
        with pytest.raises(UploadError) as caught:
            await source.begin_upload("multi").commit(spool(data_of(3 * PART)), 3 * PART)
        assert caught.value.errno == errno.EIO and "WriteError" in str(caught.value)
        assert wire.count("AbortMultipartUpload") == 1
        with pytest.raises(UploadError):
            await source.begin_upload("single").commit(spool(data_of(MiB)), MiB)
        assert wire.count("PutObject") == 4  # every attempt cut
        assert pending_uploads(aws_env, prefix) == []
        assert missing(aws_env, f"{prefix}/multi") and missing(aws_env, f"{prefix}/single")
    finally:
        await source.aclose()


async def test_content_md5_is_checked(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    async def flip_a_byte(seen: Seen, request: httpx.Request) -> httpx.Response | None:
        await trio.lowlevel.checkpoint()
        if seen.kind == "PutObject" or seen.query.get("partNumber") == "2":
            damaged = bytearray(seen.body)
            damaged[len(damaged) // 2] ^= 1
            request.stream = httpx.ByteStream(bytes(damaged))  # same length and headers, one bit changed
        return None

    wire = Wire(fault=flip_a_byte)
    source = make_source(aws_env, prefix, wire)
    try:
        with pytest.raises(UploadError) as caught:
            await source.begin_upload("multi").commit(spool(data_of(2 * PART + 1)), 2 * PART + 1)
        assert "BadDigest" in str(caught.value)
        with pytest.raises(UploadError) as caught:
            await source.begin_upload("single").commit(spool(data_of(1000)), 1000)
        assert "BadDigest" in str(caught.value)
        assert pending_uploads(aws_env, prefix) == []
        assert missing(aws_env, f"{prefix}/multi") and missing(aws_env, f"{prefix}/single")
    finally:
        await source.aclose()


async def test_full_store_is_enospc(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    async def full(seen: Seen, request: httpx.Request) -> httpx.Response | None:
        await trio.lowlevel.checkpoint()
        return httpx.Response(507) if seen.query.get("partNumber") == "2" else None

    source = make_source(aws_env, prefix, Wire(fault=full))
    try:
        with pytest.raises(NoSpaceError) as caught:
            await source.begin_upload("big").commit(spool(data_of(2 * PART + 1)), 2 * PART + 1)
        assert caught.value.errno == errno.ENOSPC
        assert pending_uploads(aws_env, prefix) == [] and missing(aws_env, f"{prefix}/big")
    finally:
        await source.aclose()


async def test_error_document_in_a_200_complete(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    refusals_left = [0]

    async def refuse_complete(seen: Seen, request: httpx.Request) -> httpx.Response | None:
        await trio.lowlevel.checkpoint()
        if seen.kind == "CompleteMultipartUpload" and refusals_left[0] > 0:
            refusals_left[0] -= 1
            # Not forwarded: the server never completes it, as S3 when it reports an internal error this way.
            return httpx.Response(200, content=s3_error(200, "InternalError").content)
        return None

    wire = Wire(fault=refuse_complete)
    source = make_source(aws_env, prefix, wire)
    data = data_of(PART + 1)
    try:
        refusals_left[0] = 1
        await source.begin_upload("retried").commit(spool(data), len(data))  # retried like a 500, then done
        assert wire.count("CompleteMultipartUpload") == 2
        assert get(aws_env, f"{prefix}/retried") == data
        refusals_left[0] = 10**6
        with pytest.raises(UploadError) as caught:
            await source.begin_upload("refused").commit(spool(data), len(data))
        assert "HTTP 200 with an error document" in str(caught.value) and "InternalError" in str(caught.value)
        assert pending_uploads(aws_env, prefix) == [] and missing(aws_env, f"{prefix}/refused")
    finally:
        await source.aclose()


async def test_lost_complete_answer(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    """The first Complete lands but its answer is lost; the retry finds the upload gone (NoSuchUpload, as AWS
    answers): the object with our multipart ETag is there, so the upload succeeded."""
    completes = []

    async def lose_answer(seen: Seen, request: httpx.Request) -> httpx.Response | None:
        if seen.kind != "CompleteMultipartUpload":
            await trio.lowlevel.checkpoint()
            return None
        completes.append(seen)
        if len(completes) == 1:
            answer = await wire.inner.handle_async_request(request)
            await answer.aread()
            assert answer.status_code == 200
            return s3_error(503, "SlowDown")  # what the client sees instead of the real answer
        return s3_error(404, "NoSuchUpload")

    wire = Wire(fault=lose_answer)
    source = make_source(aws_env, prefix, wire)
    data = data_of(2 * PART + 5)
    try:
        entry = await source.begin_upload("landed").commit(spool(data), len(data))
        assert len(completes) == 2
        assert get(aws_env, f"{prefix}/landed") == data
        assert (await source.stat("landed")).version == entry.version
    finally:
        await source.aclose()


async def test_cancelled_commit_aborts(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    part_3 = trio.Event()

    async def hold_part_3(seen: Seen, request: httpx.Request) -> httpx.Response | None:
        if seen.query.get("partNumber") == "3":
            part_3.set()
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return None

    wire = Wire(fault=hold_part_3)
    source = make_source(aws_env, prefix, wire)
    try:
        upload = source.begin_upload("cancelled")
        async with trio.open_nursery() as nursery:

            async def committer() -> None:
                await upload.commit(spool(data_of(4 * PART)), 4 * PART)

            nursery.start_soon(committer)
            await part_3.wait()
            nursery.cancel_scope.cancel()  # a shutdown past its drain timeout
        assert wire.count("AbortMultipartUpload") == 1
        assert pending_uploads(aws_env, prefix) == [] and missing(aws_env, f"{prefix}/cancelled")
    finally:
        await source.aclose()


async def test_abort(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    wire = Wire()
    source = make_source(aws_env, prefix, wire)
    try:
        await source.begin_upload("never").abort()  # nothing sent: nothing to drop
        assert wire.seen == []
        upload = source.begin_upload("dropped")
        fd = spool(data_of(3 * PART))
        await upload.part_ready(fd, 3 * PART)
        assert pending_uploads(aws_env, prefix) == [f"{prefix}/dropped"]
        await upload.abort()
        await upload.abort()  # idempotent
        assert wire.count("AbortMultipartUpload") == 1
        assert pending_uploads(aws_env, prefix) == [] and missing(aws_env, f"{prefix}/dropped")
        with pytest.raises(InvalidArgumentError):
            await upload.commit(fd, 3 * PART)
        with pytest.raises(InvalidArgumentError):
            await upload.part_ready(fd, 3 * PART)
    finally:
        await source.aclose()


async def test_refused_credentials(
    aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    aws_env.client().put_object(Bucket=BUCKET, Key=f"{prefix}/existing", Body=b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws_env.reader_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_env.reader_secret_key)
    reader = make_source(aws_env, prefix)  # may read and list, not write: 403 AccessDenied
    try:
        for size in (10, 2 * PART + 1):
            with pytest.raises(WriteAccessError) as caught:
                await reader.begin_upload("new").commit(spool(data_of(size)), size)
            assert caught.value.errno == errno.EACCES and "AccessDenied" in str(caught.value)
            assert aws_env.reader_secret_key not in str(caught.value)
        for attempt in (
            reader.make_dir("folder"),
            reader.remove_file("existing"),
            reader.rename("existing", "moved", is_dir=False),
        ):
            with pytest.raises(PermissionError) as refused:
                await attempt
            assert refused.value.errno == errno.EACCES
        assert get(aws_env, f"{prefix}/existing") == b"x" and missing(aws_env, f"{prefix}/moved")
    finally:
        await reader.aclose()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws_env.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = make_source(aws_env, prefix)
    try:
        with pytest.raises(WriteAccessError) as caught:
            await wrong.begin_upload("new").commit(spool(b"abc"), 3)
        assert "not-the-secret" not in str(caught.value) and "Signature=" not in str(caught.value)
        assert pending_uploads(aws_env, prefix) == [] and missing(aws_env, f"{prefix}/new")
    finally:
        await wrong.aclose()


async def test_network_failures(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    """A store that accepts connections and never answers: ETIMEDOUT within the budget; one that resets every
    connection: EIO after the retries (a write whose connection broke may or may not have landed)."""
    with FaultProxy(int(aws_env.endpoint.rpartition(":")[2])) as proxy:
        source = make_source(aws_env, prefix, endpoint_url=proxy.url, read_timeout_seconds=1.0)
        source.write_retry = RetryPolicy(base_delay_seconds=0.01, max_delay_seconds=0.05, total_budget_seconds=2.0)
        try:
            proxy.mode = "hang"
            with pytest.raises(UploadTimeout) as timed_out:
                await source.begin_upload("hung").commit(spool(b"abc"), 3)
            assert timed_out.value.errno == errno.ETIMEDOUT
            proxy.mode = "refuse"
            with pytest.raises(UploadError) as reset:
                await source.begin_upload("reset").commit(spool(b"abc"), 3)
            assert reset.value.errno == errno.EIO
        finally:
            await source.aclose()
    assert missing(aws_env, f"{prefix}/hung") and missing(aws_env, f"{prefix}/reset")


# --- folders, deletes, renames --------------------------------------------------------------------------------------


async def test_folders(aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]) -> None:
    client = aws_env.client()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/file", Body=b"f")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/implicit/child", Body=b"c")
    source = make_source(aws_env, prefix)
    try:
        entry = await source.make_dir("new")
        assert entry.is_dir and entry.name == "new"
        assert get(aws_env, f"{prefix}/new/") == b""  # the marker
        assert (await source.stat("new")).is_dir and (await listed(source))["new"].is_dir
        assert await listed(source, "new") == {}  # an empty folder lists empty, not ENOENT
        for existing in ("new", "file", "implicit"):
            with pytest.raises(EntryExistsError) as exists:
                await source.make_dir(existing)
            assert exists.value.errno == errno.EEXIST
        await source.make_dir("new/sub")  # below a folder made here
        with pytest.raises(DirectoryNotEmptyError) as not_empty:
            await source.remove_dir("new")
        assert not_empty.value.errno == errno.ENOTEMPTY
        await source.begin_upload("new/sub/x").commit(spool(b"x"), 1)
        await source.remove_file("new/sub/x")
        assert await listed(source, "new/sub") == {}  # the marker keeps the emptied folder
        await source.remove_dir("new/sub")
        await source.remove_dir("new")
        with pytest.raises(EntryNotFoundError):
            await source.stat("new")
        assert missing(aws_env, f"{prefix}/new/")
        with pytest.raises(DirectoryNotEmptyError):
            await source.remove_dir("implicit")  # no marker, one key below it
        with pytest.raises(NotADirectory):
            await source.remove_dir("file")
        # Its last key: on AWS the implicit folder vanishes with it; SeaweedFS keeps its filer directory, listed as
        # a "implicit/" marker. rmdir (rm -r does one) succeeds either way, and then the folder is gone.
        await source.remove_file("implicit/child")
        await source.remove_dir("implicit")
        with pytest.raises(EntryNotFoundError):
            await source.stat("implicit")
        await source.remove_dir("implicit")  # nothing left of it, as on AWS once the last key went: it is gone
    finally:
        await source.aclose()


async def test_remove_file(aws_env: SeaweedFS, prefix: str) -> None:
    client = aws_env.client()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/doomed", Body=b"d")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/folder/x", Body=b"x")
    source = make_source(aws_env, prefix)
    try:
        await source.remove_file("doomed")
        assert missing(aws_env, f"{prefix}/doomed")
        with pytest.raises(EntryNotFoundError) as absent:
            await source.remove_file("doomed")  # S3 would answer 204: ENOENT comes from the HEAD before
        assert absent.value.errno == errno.ENOENT
        with pytest.raises(IsADirectory):
            await source.remove_file("folder")
        assert get(aws_env, f"{prefix}/folder/x") == b"x"
    finally:
        await source.aclose()


async def test_rename_file(aws_env: SeaweedFS, prefix: str) -> None:
    client = aws_env.client()
    odd = "dir a/we+ird %#ü.txt"  # the copy source header is URL-encoded
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{odd}", Body=b"odd bytes")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/a", Body=b"A")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/b", Body=b"B")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/folder/x", Body=b"x")
    source = make_source(aws_env, prefix)
    try:
        await source.rename(odd, "renamed + moved ü", is_dir=False)
        assert get(aws_env, f"{prefix}/renamed + moved ü") == b"odd bytes" and missing(aws_env, f"{prefix}/{odd}")
        await source.rename("a", "b", is_dir=False)  # onto an existing file: replaces it
        assert get(aws_env, f"{prefix}/b") == b"A" and missing(aws_env, f"{prefix}/a")
        await source.rename("b", "b", is_dir=False)  # onto itself: nothing happens, nothing is lost
        assert get(aws_env, f"{prefix}/b") == b"A"
        with pytest.raises(IsADirectory):
            await source.rename("b", "folder", is_dir=False)
        assert get(aws_env, f"{prefix}/b") == b"A"
        for is_dir in (True, False):
            with pytest.raises(CrossDeviceError) as exdev:
                await source.rename("folder", "elsewhere", is_dir=is_dir)
            assert exdev.value.errno == errno.EXDEV
        with pytest.raises(EntryNotFoundError):
            await source.rename("nothing", "c", is_dir=False)
        renamed = await source.stat("renamed + moved ü")
        assert (await listed(source))["renamed + moved ü"].version == renamed.version
    finally:
        await source.aclose()


async def test_rename_copies_large_objects_in_ranges(
    aws_env: SeaweedFS, prefix: str, spool: Callable[[bytes], int]
) -> None:
    data = data_of(2 * PART + 3, seed=9)
    wire = Wire()
    source = make_source(aws_env, prefix, wire)
    source.copy_part_bytes = PART  # production: 512 MiB (CopyObject's 5 GiB limit and its time per request)
    try:
        await source.begin_upload("large").commit(spool(data), len(data))
        wire.seen.clear()
        await source.rename("large", "moved", is_dir=False)
        copies = [s for s in wire.seen if s.kind == "UploadPartCopy"]
        ranges = sorted(s.headers["x-amz-copy-source-range"] for s in copies)
        assert ranges == sorted(
            [f"bytes=0-{PART - 1}", f"bytes={PART}-{2 * PART - 1}", f"bytes={2 * PART}-{2 * PART + 2}"]
        )
        assert wire.count("CompleteMultipartUpload") == 1 and wire.count("CopyObject") == 0
        assert get(aws_env, f"{prefix}/moved") == data and missing(aws_env, f"{prefix}/large")
        assert pending_uploads(aws_env, prefix) == []
    finally:
        await source.aclose()


async def test_set_mtime_is_not_kept(aws_env: SeaweedFS, prefix: str) -> None:
    wire = Wire()
    source = make_source(aws_env, prefix, wire)
    try:
        features = source.write_features
        assert (features.folder_rename, features.keeps_mtime, features.empty_folders) == (False, False, True)
        assert await source.set_mtime("anything", 1_000_000_000) is False
        assert wire.seen == []  # no request: the answer does not depend on the store
        assert isinstance(source.begin_upload("x"), S3Upload)
    finally:
        await source.aclose()
