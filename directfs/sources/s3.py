"""``s3://bucket[/prefix]``: a bucket (or a prefix in it) on AWS S3 or any S3-compatible server.

* Endpoint: ``SourceOptions.endpoint_url`` (``--endpoint-url``), else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
  else AWS (``https://s3.{region}.amazonaws.com``). Plain ``http://`` endpoints only on loopback unless
  ``allow_plain_http``: SigV4 keeps the secret off the wire, but session tokens and the data travel in clear.
* Addressing: ``?addressing_style=path|virtual`` in the URL, else the profile's ``s3.addressing_style``, else
  virtual-host style on AWS (DNS-compatible bucket names) and path style on custom endpoints (an S3-compatible server
  on an IP:port has no per-bucket DNS names).
* Credentials and region: botocore's own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE``, ``~/.aws/credentials`` and ``~/.aws/config``, SSO, instance roles...), region from
  ``AWS_REGION``/``AWS_DEFAULT_REGION``/the profile, else ``us-east-1``. Resolution can block (files, instance
  metadata), so it runs in a worker thread, once, and again only when botocore says refreshable credentials need it.
* Signing: botocore's ``S3SigV4Auth`` signs each attempt just before it is sent (a retry minutes later still carries
  a fresh signature); httpx sends it. Nothing of SigV4 is written here. ``Range`` and ``If-Match`` are added after
  signing: SigV4 lets unsigned headers through.
* Listing: ``ListObjectsV2`` with ``delimiter=/``, ``encoding-type=url`` (keys with characters XML cannot hold) and
  continuation tokens; each page is parsed with defusedxml and yielded before the next is asked for. Folder markers
  (a key equal to the folder prefix) are skipped; a name that is both an object and a prefix keeps the object.
* Stat: ``HEAD`` of the key; if absent, a one-key listing of ``key/`` decides whether it is a folder.
* Version: ETag + size (mtime is not in it: the listing has milliseconds, HEAD has seconds). Reads send ``If-Match``
  with the ETag, so a replaced object answers 412 and the read fails with ``StaleFileError`` instead of mixing data.
* Nearline: ``InvalidObjectState`` (archive tiers) and 503 + Retry-After make a read wait for staging (``nearline``).

Writes (``Writable``, ``--rw``): a file of up to ``PART_SIZE_BYTES`` (8 MiB) is one ``PutObject``; a larger one is a
multipart upload of 8 MiB parts (the last one shorter), begun when ``part_ready`` first announces more than one part
and sent while the spool is still being written, at most ``PARTS_IN_FLIGHT`` parts at once (peak memory 4 x 8 MiB
per upload: a part is read only once it may be sent). Every PUT and part carries ``Content-MD5`` and is signed with
its payload's SHA-256 (both computed in the worker thread that reads the spool); every attempt is signed afresh, and
the body is the same bytes on each retry. ``CompleteMultipartUpload`` (and ``CopyObject``) may answer 200 with an
``<Error>`` document: that is a failure (retried like a 500). Any failure, and a cancelled commit, ends in
``AbortMultipartUpload``, so no half-written object and no pending upload is left; the old object, if any, stays
until the new one is complete. Limits: at most 10,000 parts, so the largest file is ``MAX_UPLOAD_BYTES`` (78.1 GiB;
a larger one is ENOSPC, as S3's ``EntityTooLarge``). The mtime is not kept (it is the upload time: ``set_mtime``
answers False without a request). Folders: ``mkdir`` writes a ``name/`` marker object, so empty folders exist;
``rmdir`` deletes it (a folder that exists only through its keys vanishes with its last entry, and its rmdir then
succeeds). Renames: a file is ``CopyObject`` then ``DeleteObject`` (not atomic: for a moment both names exist; above
``COPY_PART_BYTES`` the copy is ``UploadPartCopy`` in ranges, so objects over CopyObject's 5 GiB move too); a folder
has no rename on S3: ``CrossDeviceError`` (EXDEV), and ``mv`` copies it. S3 has no real parent folders: a PUT
below a folder that is gone recreates it (never ENOENT). Statuses map through ``http.write_status_error``; a
multipart upload that vanished (``NoSuchUpload``) is EIO, not ENOENT. A CreateMultipartUpload whose answer was lost
(retried, or cut by a cancellation) may leave an empty upload without parts: a bucket lifecycle rule for incomplete
multipart uploads removes those (AWS recommends one anyway).

Concurrency: one httpx client per source; credentials are resolved under a ``trio.Lock`` so concurrent first
requests resolve them once.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import os
import re
import xml.etree.ElementTree as ET  # only for types and ParseError; parsing goes through defusedxml
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, NoReturn
from urllib.parse import parse_qs, quote, unquote, unquote_plus, urlsplit
from xml.sax.saxutils import escape as xml_escape

import defusedxml.ElementTree as SafeET
import httpx
import trio

from ..errors import (
    ConfigError,
    CrossDeviceError,
    DirectFSError,
    DirectoryNotEmptyError,
    EntryExistsError,
    EntryNotFoundError,
    InvalidArgumentError,
    IsADirectory,
    MalformedListingError,
    NoSpaceError,
    NotADirectory,
    PermissionDeniedError,
    UploadError,
    replay_error,
    unwrap_error,
)
from ..http import (
    BadBody,
    RetryPolicy,
    is_loopback_host,
    namespace_status_error,
    open_stream,
    read_body,
    redact_url,
    send_with_retries,
    transport_error,
    write_status_error,
)
from ..values import parse_decimal
from .base import Credentials, Entry, OpenFile, SourceOptions, WriteFeatures, valid_name
from .httpstore import HTTPAuth, Reply, StoreClients, http_mtime_ns, plain_file, request
from .nearline import StagingPolicy

log = logging.getLogger(__name__)

S3_NS: Final = "{http://s3.amazonaws.com/doc/2006-03-01/}"
# Keys per listing page: S3's maximum, so a folder of n entries costs ceil(n / 1000) round trips.
LIST_PAGE_KEYS: Final = 1000
# One listing page of 1000 keys of 1 KiB names is ~1.5 MB of XML; 32 MiB bounds a hostile or broken server.
MAX_LIST_BODY_BYTES: Final = 32 * 1024 * 1024
# st_size is a signed 64-bit off_t: a larger object size could never be shown (pyfuse3 raises OverflowError).
MAX_SIZE_BYTES: Final = 2**63 - 1
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

# --- writes ---
# The one home of the upload part size, and the largest file sent as one PUT. 8 MiB: well above S3's 5 MiB minimum
# part, the block size reads measured best at (base.py, SourceOptions.block_size_bytes), and what aws-cli and
# mountpoint-s3 use; S3 allows 10,000 parts, so it bounds the largest file (MAX_UPLOAD_BYTES) at 78.1 GiB, as in
# mountpoint-s3 with its default part size.
PART_SIZE_BYTES: Final = 8 * 1024 * 1024
MAX_PARTS: Final = 10_000  # S3's most parts per multipart upload
MAX_UPLOAD_BYTES: Final = PART_SIZE_BYTES * MAX_PARTS
# Parts of one upload on the wire at once. Measured against SeaweedFS on loopback (128 MiB, 2 cores shared with the
# server and other work; two runs of 3): 1 in flight 36-51 MB/s, 2: 57-85, 4: 56-115, 8: 48-121. One at a time idles
# the link while a part is read, hashed and answered; past 2 this box's CPU is the limit. Over a WAN each part is one
# TCP stream bound by window and RTT, so more in flight help there. 4 keeps one upload's memory at 4 x 8 MiB = 32 MiB
# (a part's bytes are read only once it may be sent, and h11 sends the bytes object without a copy) and leaves most
# of the client's 16 connections (HTTPSettings.max_connections) to reads and other uploads.
PARTS_IN_FLIGHT: Final = 4
# A copy (rename) larger than this is UploadPartCopy of ranges of this size, at PARTS_IN_FLIGHT at once. CopyObject
# copies at most 5 GiB and answers only when done; 512 MiB keeps each copy request to a few seconds of server time
# (inside the per-read timeout while the server works), and 10,000 of them reach 5 TiB, S3's largest object.
COPY_PART_BYTES: Final = 512 * 1024 * 1024
# Retries of one write request (a PUT of one part): the usual attempts and backoff, but a budget for 8 MiB bodies:
# 120 s lets an 8 MiB part through at ~70 kB/s (a stalled connection is cut sooner by the per-read/write timeouts).
WRITE_RETRY: Final = RetryPolicy(total_budget_seconds=120.0)
# Write replies are an upload id, an ETag, or an error document: a few hundred bytes. 1 MiB bounds a broken server;
# the body is read (to its end, within this) so the connection goes back to the pool.
MAX_WRITE_REPLY_BYTES: Final = 1024 * 1024
# An abort after a failure or a cancelled commit gets this long (shielded from the cancellation that caused it):
# one DELETE with its retries, not the full write budget, so a shutdown is not held up by a dead store.
ABORT_DEADLINE_SECONDS: Final = 30.0
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
FEATURES: Final = WriteFeatures(folder_rename=False, keeps_mtime=False, empty_folders=True)
# Error codes of a 200 reply's <Error> document that deserve another attempt, as a 503 or 500 would.
_SLOW_DOWN_CODES: Final = frozenset({"SlowDown", "ServiceUnavailable"})


@dataclass(frozen=True)
class _Page:
    files: list[tuple[str, int, int, str]]  # (key, size, mtime_ns, etag)
    prefixes: list[str]
    next_token: str | None


def _error_code(body: bytes) -> str:
    """The ``<Code>`` of an S3 error document (safe to show: no secrets), or ""."""
    match = re.search(rb"<Code>([A-Za-z0-9.]{1,64})</Code>", body)
    return match.group(1).decode() if match else ""


def _iso_mtime_ns(text: str | None) -> int:
    """Seconds-resolution mtime from a listing's ``LastModified`` (ISO 8601), to match HEAD's HTTP date."""
    if not text:
        return 0
    try:
        return int(datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()) * 1_000_000_000
    except ValueError:
        return 0


@dataclass(frozen=True)
class _Body:
    """A request body with the digests every attempt needs: ``Content-MD5`` (base64) and the SigV4 payload hash."""

    data: bytes | None  # None: no body at all (DELETE, POST ?uploads)
    md5: bytes  # raw digest (the multipart ETag is the MD5 of the parts' raw digests)
    sha256_hex: str

    @property
    def md5_base64(self) -> str:
        return base64.b64encode(self.md5).decode("ascii")


def _body(data: bytes) -> _Body:
    """Digests of ``data``: ~20 ms of CPU for 8 MiB, so large bodies are made in a worker thread (``_read_spool``)."""
    return _Body(data, hashlib.md5(data, usedforsecurity=False).digest(), hashlib.sha256(data).hexdigest())


_NO_BODY: Final = _Body(None, hashlib.md5(b"", usedforsecurity=False).digest(), EMPTY_SHA256)
_EMPTY_BODY: Final = _body(b"")  # a 0-byte PUT: a folder marker


def _read_spool(fd: int, offset: int, length: int) -> _Body:
    """``length`` bytes of the spool from ``offset``, with their digests (worker thread: pread and hashing)."""
    pieces: list[bytes] = []
    got = 0
    try:
        while got < length:
            piece = os.pread(fd, length - got, offset + got)
            if not piece:
                raise InvalidArgumentError(
                    f"the spool ends at {offset + got} bytes, before the {offset + length} announced"
                )
            pieces.append(piece)
            got += len(piece)
    except OSError as exc:
        if isinstance(exc, DirectFSError):
            raise
        raise UploadError(f"reading the spool failed: {exc.strerror}") from exc
    return _body(pieces[0] if len(pieces) == 1 else b"".join(pieces))


@functools.cache
def _payload_signer() -> Any:
    """botocore's S3 SigV4 signer with the payload hash given, not computed: botocore would hash an 8 MiB body on the
    trio thread on every attempt; ours is computed once, in the thread that read it (imported late, like botocore)."""
    from botocore.auth import S3SigV4Auth

    class PayloadSigner(S3SigV4Auth):  # type: ignore[misc]
        def __init__(self, credentials: Any, region: str, payload_sha256: str) -> None:
            super().__init__(credentials, "s3", region)
            self._payload_sha256 = payload_sha256

        def payload(self, request: Any) -> str:
            return self._payload_sha256

    return PayloadSigner


def _xml_root(body: bytes) -> ET.Element | None:
    """The root of an XML reply, None if it is not XML. Leading whitespace is dropped: S3 sends spaces while a long
    CompleteMultipartUpload or copy runs, to keep the connection alive, and an XML declaration must come first."""
    try:
        root: ET.Element = SafeET.fromstring(body.lstrip())
    except (ET.ParseError, ValueError, LookupError):
        return None
    return root


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def _child_text(root: ET.Element, name: str) -> str | None:
    for child in root:
        if _local_name(child.tag) == name:
            return (child.text or "").strip()
    return None


def multipart_etag(md5s: list[bytes]) -> str:
    """The ETag S3 gives a multipart object (without server-side KMS encryption): the MD5 of the parts' raw MD5s,
    then ``-`` and the part count, quoted as HEAD shows it."""
    return f'"{hashlib.md5(b"".join(md5s), usedforsecurity=False).hexdigest()}-{len(md5s)}"'


@dataclass(frozen=True)
class _WriteReply:
    status_code: int  # 500 or 503 for a 200 whose body is an <Error> document (``embedded_error``)
    headers: httpx.Headers
    body: bytes
    embedded_error: bool = False


def parse_list_page(body: bytes, *, url_encoded: bool) -> _Page:
    """One ``ListBucketResult`` (ListObjectsV2). Raises ``MalformedListingError`` for anything else."""
    try:
        root = SafeET.fromstring(body)
    # ValueError: defusedxml's refusals (entities, external references). LookupError: an XML declaration naming an
    # encoding Python has no text codec for ("rot13", "hex", "nope").
    except (ET.ParseError, ValueError, LookupError) as exc:
        raise MalformedListingError(f"ListObjectsV2 reply is not valid XML: {exc}") from exc
    if root.tag != f"{S3_NS}ListBucketResult":
        raise MalformedListingError(f"ListObjectsV2 reply has root {root.tag[:64]!r}")
    decode = unquote_plus if url_encoded else (lambda text: text)

    def text(element: ET.Element, name: str) -> str | None:
        return element.findtext(f"{S3_NS}{name}")

    files: list[tuple[str, int, int, str]] = []
    for item in root.iterfind(f"{S3_NS}Contents"):
        key, size = text(item, "Key"), (text(item, "Size") or "").strip()
        # ASCII digits only: str.isdigit() accepts "²", and 5000 digits, which int() refuses.
        if key is None or not size.isascii() or not size.isdigit() or len(size) > 19 or int(size) > MAX_SIZE_BYTES:
            raise MalformedListingError("ListObjectsV2 entry without a key or a valid size")
        etag = (text(item, "ETag") or "").strip()
        files.append((decode(key), int(size), _iso_mtime_ns(text(item, "LastModified")), etag))
    prefixes = [decode(p.findtext(f"{S3_NS}Prefix") or "") for p in root.iterfind(f"{S3_NS}CommonPrefixes")]
    truncated = (text(root, "IsTruncated") or "").strip().lower() == "true"
    token = text(root, "NextContinuationToken")
    if truncated and not token:
        raise MalformedListingError("ListObjectsV2 reply is truncated but has no continuation token")
    return _Page(files, prefixes, token if truncated else None)


class S3Source(StoreClients):
    """A bucket or prefix. Create with :func:`create`; ``aclose`` releases connections."""

    def __init__(self, url: str, options: SourceOptions) -> None:
        import botocore.session

        parts = urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ConfigError(f"an S3 source URL is s3://bucket[/prefix], not {redact_url(url)}")
        if "@" in parts.netloc or parts.fragment:
            raise ConfigError("put S3 credentials in AWS_* variables or a profile, not in the source URL")
        self._bucket = parts.netloc
        if not _BUCKET.match(self._bucket):
            raise ConfigError(f"invalid bucket name {self._bucket[:80]!r}")
        prefix = unquote(parts.path).strip("/")
        if any(not valid_name(part) for part in prefix.split("/") if prefix):
            raise ConfigError(f"invalid prefix {prefix[:80]!r}")
        self._prefix = prefix
        if options.block_size_bytes <= 0:
            raise ConfigError(f"block size must be positive, not {options.block_size_bytes}")
        style: str | None = None
        for key, values in parse_qs(parts.query, keep_blank_values=True).items():
            if key != "addressing_style" or values[-1] not in ("path", "virtual", "auto"):
                raise ConfigError("the only s3:// URL option is addressing_style=path|virtual|auto")
            style = values[-1]
        self._session: Any = botocore.session.get_session()
        scoped: dict[str, Any] = self._session.get_scoped_config() or {}
        s3_config = scoped.get("s3") if isinstance(scoped.get("s3"), dict) else {}
        style = style or (s3_config or {}).get("addressing_style") or "auto"
        self._region: str = self._session.get_config_variable("region") or "us-east-1"
        endpoint = (
            options.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or f"https://s3.{self._region}.amazonaws.com"
        )
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname or ep.query or ep.path.strip("/"):
            raise ConfigError(f"--endpoint-url wants http(s)://HOST[:PORT], not {redact_url(endpoint)}")
        if ep.scheme == "http" and not (options.allow_plain_http or is_loopback_host(ep.hostname)):
            raise ConfigError("a plain http:// S3 endpoint is only accepted on loopback (data and tokens in clear)")
        custom = bool(options.endpoint_url or endpoint != f"https://s3.{self._region}.amazonaws.com")
        if style == "auto":
            style = "path" if custom or not _DNS_BUCKET.match(self._bucket) else "virtual"
        netloc = ep.netloc
        if style == "virtual":
            self._base = f"{ep.scheme}://{self._bucket}.{netloc}/"
        else:
            self._base = f"{ep.scheme}://{netloc}/{quote(self._bucket, safe='')}/"
        super().__init__(options.http_settings())
        self._options = options
        self._retry = RetryPolicy()
        self._staging = StagingPolicy(deadline_seconds=options.staging_deadline_seconds)
        self._credentials: Any = None  # botocore Credentials, resolved on first use
        self._frozen: Any = None
        self._credentials_lock = trio.Lock()
        self._no_auth = HTTPAuth(Credentials())  # S3 signs each request instead (see _signed_headers)
        self.list_page_keys = LIST_PAGE_KEYS  # tests lower it to force paging
        self.write_retry = WRITE_RETRY  # tests shorten it
        self.copy_part_bytes = COPY_PART_BYTES  # tests lower it to copy in ranges
        self.display_url = f"s3://{self._bucket}/{quote(prefix)}" if prefix else f"s3://{self._bucket}"
        self.endpoint_display = redact_url(self._base)

    # --- plumbing ---

    def _key(self, path: str) -> str:
        return f"{self._prefix}/{path}" if self._prefix and path else self._prefix or path

    def _object_url(self, key: str) -> str:
        return self._base + quote(key, safe="/")

    def _list_url(self, prefix: str, token: str | None, max_keys: int) -> str:
        params = [
            ("list-type", "2"),
            ("delimiter", "/"),
            ("encoding-type", "url"),
            ("max-keys", str(max_keys)),
            ("prefix", prefix),
        ]
        if token is not None:
            params.append(("continuation-token", token))
        # RFC 3986 encoding as SigV4's canonical query wants it; httpx sends it unchanged.
        return self._base + "?" + "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in sorted(params))

    async def _frozen_credentials(self) -> Any:
        async with self._credentials_lock:
            if self._credentials is None:
                self._credentials = await trio.to_thread.run_sync(self._session.get_credentials)
                if self._credentials is None:
                    raise ConfigError(
                        "s3:// needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                    )
            refresh_needed = getattr(self._credentials, "refresh_needed", None)
            if self._frozen is None or (refresh_needed is not None and refresh_needed()):
                self._frozen = await trio.to_thread.run_sync(self._credentials.get_frozen_credentials)
            return self._frozen

    async def _signed_headers(
        self, method: str, url: str, headers: dict[str, str] | None = None, payload_sha256: str = EMPTY_SHA256
    ) -> dict[str, str]:
        """SigV4 headers for one attempt: ``headers`` (signed too) plus X-Amz-Date, X-Amz-Content-SHA256 (the body's
        SHA-256, so the store refuses a body changed on the way even over plain http) and Authorization."""
        from botocore.awsrequest import AWSRequest

        credentials = await self._frozen_credentials()
        aws_request = AWSRequest(method=method, url=url, headers=dict(headers or {}))
        _payload_signer()(credentials, self._region, payload_sha256).add_auth(aws_request)
        return {k: v for k, v in aws_request.headers.items()}

    async def _send(self, method: str, url: str, path: str, *, read_body: bool, max_body: int = 0) -> Reply:
        # Signed once per call; the retries inside reuse it, well within SigV4's 15-minute validity.
        return await request(
            self._http(),
            method,
            url,
            auth=self._no_auth,
            policy=self._retry,
            path=path or "/",
            headers=await self._signed_headers(method, url),
            read_body_if=lambda status: read_body or status >= 400,
            max_body_bytes=max(max_body, 64 * 1024),
        )

    def _raise(self, reply: Reply, what: str, path: str) -> None:
        code = _error_code(reply.body)
        hint = "check the AWS credentials and region"
        raise namespace_status_error(reply.status_code, what=what, filename=path or "/", hint=hint, code=code or None)

    def _query_url(self, key: str, params: dict[str, str]) -> str:
        # RFC 3986 encoding, sorted: what SigV4's canonical query wants, sent unchanged by httpx (as _list_url).
        query = "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
        return f"{self._object_url(key)}?{query}"

    async def _write_request(
        self,
        method: str,
        url: str,
        path: str,
        *,
        what: str,
        body: _Body = _NO_BODY,
        headers: dict[str, str] | None = None,
        error_in_200: bool = False,
    ) -> _WriteReply:
        """One write request through ``send_with_retries`` (the retry path of every request), each attempt signed
        afresh just before it is sent, with the same body bytes. The reply body is read (within
        ``MAX_WRITE_REPLY_BYTES``) so the connection is reused. ``error_in_200``: a 200 whose body is an ``<Error>``
        document counts as a 500 (503 for SlowDown), so it is retried and then mapped like one. Transport failures
        become write errors (EIO, ETIMEDOUT); statuses are the caller's to map (``_write_failure``)."""
        what = f"{what} {redact_url(url)}"
        signed_extra = dict(headers or {})
        if body.data is not None:
            signed_extra["Content-MD5"] = body.md5_base64

        async def attempt() -> _WriteReply:
            signed = await self._signed_headers(method, url, signed_extra, body.sha256_hex)
            async with open_stream(self._http(), method, url, headers=signed, content=body.data) as response:
                try:
                    data = bytes(await read_body(response, MAX_WRITE_REPLY_BYTES, prefix=True))
                except BadBody as exc:
                    raise UploadError(f"{what}: {exc}", filename=path or "/") from None
                status = response.status_code
                if error_in_200 and status == 200:
                    root = _xml_root(data)
                    if root is None or _local_name(root.tag) == "Error":
                        code = _error_code(data)
                        return _WriteReply(503 if code in _SLOW_DOWN_CODES else 500, response.headers, data, True)
                return _WriteReply(status, response.headers, data)

        try:
            return await send_with_retries(attempt, policy=self.write_retry, what=what)
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject="write", what=what, filename=path or "/") from exc

    def _write_failure(self, reply: _WriteReply, what: str, path: str) -> DirectFSError:
        """The error for a refused write (``http.write_status_error``), with the S3 error code."""
        code = _error_code(reply.body) or None
        if reply.embedded_error:
            what += " (HTTP 200 with an error document)" if code else " (HTTP 200 without a valid XML reply)"
        if code == "NoSuchUpload":  # the multipart upload vanished (aborted elsewhere, a lifecycle rule): not ENOENT
            return UploadError(f"{what}: HTTP {reply.status_code} {code}", filename=path or "/")
        hint = "check the AWS credentials and the bucket policy"
        return write_status_error(reply.status_code, what=what, filename=path or "/", hint=hint, code=code)

    # --- namespace ---

    async def _list_page(self, prefix: str, token: str | None, max_keys: int, path: str) -> _Page:
        # Signed per page: a long listing may outlive one signature's validity.
        url = self._list_url(prefix, token, max_keys)
        reply = await self._send("GET", url, path, read_body=True, max_body=MAX_LIST_BODY_BYTES)
        if reply.status_code != 200:
            self._raise(reply, f"ListObjectsV2 {redact_url(url)}", path)
        return parse_list_page(reply.body, url_encoded=True)

    def _entries(self, page: _Page, prefix: str, seen: set[str]) -> Iterator[Entry]:
        for full, size, mtime_ns, etag in page.files:
            name = full[len(prefix) :]
            if not full.startswith(prefix) or name == "":
                continue  # a folder marker ("dir/" itself) or a key outside what we asked for
            if not valid_name(name) or name in seen:
                log.warning("s3: skipping %r in %r (invalid or duplicate name)", name[:80], prefix)
                continue
            seen.add(name)
            yield self._file_entry(name, size, mtime_ns, etag)
        for full in page.prefixes:
            name = full[len(prefix) :].removesuffix("/")
            if not full.startswith(prefix) or not valid_name(name):
                log.warning("s3: skipping prefix %r in %r (invalid name)", full[:80], prefix)
                continue
            if name in seen:
                log.warning("s3: %r is both an object and a prefix in %r; showing the object", name[:80], prefix)
                continue
            seen.add(name)
            yield Entry(name=name, is_dir=True, size=0, mtime_ns=0, version="s3-dir")

    @staticmethod
    def _file_entry(name: str, size: int, mtime_ns: int, etag: str) -> Entry:
        return Entry(
            name=name,
            is_dir=False,
            size=size,
            mtime_ns=mtime_ns,
            version=f"s3:{etag or '-'}:{size}",
            xattrs=(("user.etag", etag.encode()),) if etag else (),
        )

    def _folder_prefix(self, path: str) -> str:
        key = self._key(path)
        return f"{key}/" if key else ""

    async def list_dir(self, path: str) -> AsyncIterator[Entry]:
        # Pages are fetched one at a time, each yielded before the next is asked for (no nested generator: an
        # abandoned listing then leaves nothing half-run behind).
        prefix = self._folder_prefix(path)
        seen: set[str] = set()
        token: str | None = None
        while True:
            page = await self._list_page(prefix, token, self.list_page_keys, path)
            for entry in self._entries(page, prefix, seen):
                yield entry
            if page.next_token is None:
                break
            token = page.next_token
        if not seen and path:
            # Nothing under "path/": a file, or nothing at all (S3 has no empty folders, except markers).
            if (await self._head(path)).status_code == 200:
                raise NotADirectory(filename=path)
            if not await self._has_children(path):
                raise EntryNotFoundError(filename=path)

    async def _head(self, path: str) -> Reply:
        return await self._send("HEAD", self._object_url(self._key(path)), path, read_body=False)

    async def _has_children(self, path: str) -> bool:
        page = await self._list_page(self._folder_prefix(path), None, 1, path)
        return bool(page.files or page.prefixes)

    async def stat(self, path: str) -> Entry:
        if not path:
            await self._has_children("")  # checks bucket, endpoint, TLS and credentials up front
            return Entry(name="", is_dir=True, size=0, mtime_ns=0, version="s3-dir")
        name = path.rpartition("/")[2]
        reply = await self._head(path)
        if reply.status_code == 200:
            length = parse_decimal(reply.headers.get("content-length", ""))
            if length is None:
                raise MalformedListingError("HEAD without a valid Content-Length", filename=path)
            return self._file_entry(
                name, length, http_mtime_ns(reply.headers.get("last-modified")), reply.headers.get("etag", "")
            )
        if reply.status_code not in (403, 404):
            self._raise(reply, f"HEAD {redact_url(self._object_url(self._key(path)))}", path)
        # 404, or 403 (what S3 answers for a missing key without s3:ListBucket): maybe a folder.
        if await self._has_children(path):
            return Entry(name=name, is_dir=True, size=0, mtime_ns=0, version="s3-dir")
        if reply.status_code == 403:
            raise PermissionDeniedError("HEAD: HTTP 403 (check the AWS credentials and region)", filename=path)
        raise EntryNotFoundError(filename=path)

    # --- data ---

    async def open(self, path: str, entry: Entry) -> OpenFile:
        if entry.is_dir:
            await trio.lowlevel.checkpoint()
            raise IsADirectory(filename=path)
        getter = await self._data_getter()
        url = self._object_url(self._key(path))

        async def headers() -> dict[str, str]:
            return await self._signed_headers("GET", url)

        return plain_file(
            self._http(),
            url,
            entry,
            path=path,
            block_size_bytes=self._options.block_size_bytes,
            policy=self._retry,
            auth=None,
            staging=self._staging,
            headers=headers,
            getter=getter,
        )

    # --- writes (Writable) ---

    @property
    def write_features(self) -> WriteFeatures:
        return FEATURES

    def begin_upload(self, path: str) -> S3Upload:
        if not path:
            raise IsADirectory(filename="/")
        return S3Upload(self, path)

    async def _put(self, path: str, key: str, body: _Body, *, what: str = "PutObject") -> _WriteReply:
        url = self._object_url(key)
        reply = await self._write_request("PUT", url, path, what=what, body=body)
        if reply.status_code != 200:
            raise self._write_failure(reply, f"{what} {redact_url(url)}", path)
        return reply

    async def _delete(self, path: str, key: str, *, what: str = "DeleteObject") -> None:
        url = self._object_url(key)
        reply = await self._write_request("DELETE", url, path, what=what)
        if reply.status_code not in (200, 204):
            raise self._write_failure(reply, f"{what} {redact_url(url)}", path)

    async def _entry_after_upload(self, path: str) -> Entry:
        """The entry of the object just written, as ``stat`` shows it (the read side sees one version)."""
        reply = await self._head(path)
        if reply.status_code != 200:
            raise UploadError(f"HEAD after the upload: HTTP {reply.status_code}", filename=path)
        length = parse_decimal(reply.headers.get("content-length", ""))
        if length is None:
            raise MalformedListingError("HEAD without a valid Content-Length", filename=path)
        name = path.rpartition("/")[2]
        return self._file_entry(
            name, length, http_mtime_ns(reply.headers.get("last-modified")), reply.headers.get("etag", "")
        )

    async def _put_file(self, path: str, body: _Body) -> Entry:
        """One ``PutObject``. The entry: the PUT's ETag (what HEAD and listings show for the same object) and size,
        and the reply's Date for the mtime (seconds, as Last-Modified); a reply without an ETag costs a HEAD."""
        reply = await self._put(path, self._key(path), body)
        etag = reply.headers.get("etag", "")
        assert body.data is not None
        if not etag:
            return await self._entry_after_upload(path)
        name = path.rpartition("/")[2]
        return self._file_entry(name, len(body.data), http_mtime_ns(reply.headers.get("date")), etag)

    async def _create_multipart(self, path: str, key: str) -> str:
        url = f"{self._object_url(key)}?uploads"
        what = "CreateMultipartUpload"
        reply = await self._write_request("POST", url, path, what=what)
        if reply.status_code != 200:
            raise self._write_failure(reply, f"{what} {redact_url(url)}", path)
        root = _xml_root(reply.body)
        upload_id = _child_text(root, "UploadId") if root is not None else None
        if not upload_id or len(upload_id) > 1024 or not upload_id.isascii() or not upload_id.isprintable():
            raise UploadError(f"{what} {redact_url(url)}: the reply has no valid UploadId", filename=path)
        return upload_id

    async def _upload_part(self, path: str, key: str, upload_id: str, number: int, body: _Body) -> str:
        url = self._query_url(key, {"partNumber": str(number), "uploadId": upload_id})
        what = f"UploadPart {number}"
        reply = await self._write_request("PUT", url, path, what=what, body=body)
        if reply.status_code != 200:
            raise self._write_failure(reply, f"{what} {redact_url(url)}", path)
        etag: str = reply.headers.get("etag", "")
        if not etag:
            raise UploadError(f"{what} {redact_url(url)}: the reply has no ETag", filename=path)
        return etag

    def _copy_source(self, key: str) -> str:
        # "bucket/key", URL-encoded (keys may hold spaces, '+', '%', '#', any UTF-8), as botocore sends it.
        return quote(f"{self._bucket}/{key}", safe="/-_.~")

    async def _upload_part_copy(
        self, path: str, key: str, upload_id: str, number: int, source_key: str, start: int, end: int
    ) -> str:
        url = self._query_url(key, {"partNumber": str(number), "uploadId": upload_id})
        what = f"UploadPartCopy {number}"
        headers = {
            "x-amz-copy-source": self._copy_source(source_key),
            "x-amz-copy-source-range": f"bytes={start}-{end - 1}",
        }
        reply = await self._write_request("PUT", url, path, what=what, headers=headers, error_in_200=True)
        if reply.status_code != 200:
            raise self._write_failure(reply, f"{what} {redact_url(url)}", path)
        root = _xml_root(reply.body)
        etag = _child_text(root, "ETag") if root is not None else None
        if not etag:
            raise UploadError(f"{what} {redact_url(url)}: the reply has no ETag", filename=path)
        return etag

    async def _complete_multipart(
        self, path: str, key: str, upload_id: str, etags: dict[int, str], expected_etag: str | None
    ) -> None:
        url = self._query_url(key, {"uploadId": upload_id})
        what = "CompleteMultipartUpload"
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{xml_escape(etags[n])}</ETag></Part>" for n in sorted(etags)
        )
        xml = f'<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUpload xmlns="{S3_NS[1:-1]}">{parts}'
        body = _body(f"{xml}</CompleteMultipartUpload>".encode())
        reply = await self._write_request("POST", url, path, what=what, body=body, error_in_200=True)
        if reply.status_code == 200:
            return
        if expected_etag is not None and _error_code(reply.body) == "NoSuchUpload":
            # An earlier attempt may have completed it and its answer was lost: the object then has our ETag.
            head = await self._head(path)
            if head.status_code == 200 and head.headers.get("etag", "") == expected_etag:
                return
        raise self._write_failure(reply, f"{what} {redact_url(url)}", path)

    async def _abort_multipart(self, path: str, key: str, upload_id: str) -> None:
        url = self._query_url(key, {"uploadId": upload_id})
        what = "AbortMultipartUpload"
        reply = await self._write_request("DELETE", url, path, what=what)
        if reply.status_code in (200, 204) or _error_code(reply.body) == "NoSuchUpload":
            return  # aborted now, or gone already: nothing of it is left either way
        raise self._write_failure(reply, f"{what} {redact_url(url)}", path)

    async def make_dir(self, path: str) -> Entry:
        if not path or (await self._head(path)).status_code == 200 or await self._has_children(path):
            raise EntryExistsError(filename=path or "/")
        await self._put(path, self._folder_prefix(path), _EMPTY_BODY, what="PutObject (folder marker)")
        return Entry(name=path.rpartition("/")[2], is_dir=True, size=0, mtime_ns=0, version="s3-dir")

    async def remove_file(self, path: str) -> None:
        entry = await self.stat(path)  # S3 answers a DELETE of a missing key with 204: ENOENT must come from here
        if entry.is_dir:
            raise IsADirectory(filename=path or "/")
        await self._delete(path, self._key(path))

    async def remove_dir(self, path: str) -> None:
        if not path:
            raise InvalidArgumentError("the root of the source cannot be removed", filename="/")
        prefix = self._folder_prefix(path)
        page = await self._list_page(prefix, None, 2, path)  # the marker sorts first, so 2 keys tell empty or not
        if page.prefixes or any(key != prefix for key, *_ in page.files):
            raise DirectoryNotEmptyError(filename=path)
        if page.files:
            await self._delete(path, prefix, what="DeleteObject (folder marker)")
        elif (await self._head(path)).status_code == 200:
            raise NotADirectory(filename=path)
        # else: no marker and no keys: an implicit folder that vanished with its last entry; it is gone, as asked.

    async def rename(self, old: str, new: str, *, is_dir: bool) -> None:
        if is_dir:
            await trio.lowlevel.checkpoint()
            raise CrossDeviceError("S3 has no folder rename (mv copies instead)", filename=old or "/")
        if not old or not new:
            raise IsADirectory(filename="/")
        entry = await self.stat(old)
        if entry.is_dir:
            raise CrossDeviceError("S3 has no folder rename (mv copies instead)", filename=old)
        if old == new:
            return  # POSIX: renaming a file onto itself does nothing (a copy onto itself then a delete would lose it)
        if await self._has_children(new):
            raise IsADirectory(filename=new)
        old_key, new_key = self._key(old), self._key(new)
        if entry.size <= self.copy_part_bytes:
            what = "CopyObject"
            url = self._object_url(new_key)
            headers = {"x-amz-copy-source": self._copy_source(old_key)}
            reply = await self._write_request("PUT", url, new, what=what, headers=headers, error_in_200=True)
            if reply.status_code != 200:
                raise self._write_failure(reply, f"{what} {redact_url(url)}", new)
        else:
            await S3Upload(self, new).copy_from(old_key, entry.size, part_bytes=self.copy_part_bytes)
        await self._delete(old, old_key)

    async def set_mtime(self, path: str, mtime_ns: int) -> bool:
        # S3 keeps no settable mtime (Last-Modified is the upload time; rewriting metadata would copy the object).
        # No request: the caller resolved ``path`` already, and a HEAD per utimens (cp -a, tar -x, rsync -a call it
        # for every file) would only be thrown away.
        await trio.lowlevel.checkpoint()
        return False


_PartSender = Callable[[int], Awaitable[tuple[str, bytes | None]]]  # part number -> (ETag, raw MD5 or None)


class S3Upload:
    """One upload (``base.Upload``) of ``path``: a ``PutObject`` up to ``PART_SIZE_BYTES``, else a multipart upload
    whose complete parts ``part_ready`` sends while the spool grows. ``part_ready`` returns once the parts it found
    are sent; it may run in several tasks at once (a background sender): each part is claimed by one of them, and
    ``PARTS_IN_FLIGHT`` bounds the parts of the upload on the wire (and in memory) together. ``commit`` sends what is
    left, waits for the parts in flight and completes; any failure aborts (``abort``: idempotent, never raises), a
    cancelled commit too (shielded, within ``ABORT_DEADLINE_SECONDS``).

    Also the multipart copy of ``rename`` (``copy_from``: UploadPartCopy of ranges)."""

    def __init__(self, source: S3Source, path: str) -> None:
        self._source = source
        self._path = path
        self._key = source._key(path)
        self._upload_id: str | None = None
        self._create_lock = trio.Lock()
        self._etags: dict[int, str] = {}  # parts sent: number (1-based) -> ETag
        self._md5s: dict[int, bytes] = {}  # their raw MD5s, for the ETag a lost Complete answer is checked against
        self._claimed: set[int] = set()  # parts some task is sending now
        self._scopes: set[trio.CancelScope] = set()  # requests in flight, cancelled by a failure or abort
        self._changed = trio.Event()  # set (and replaced) whenever a request in flight ends
        self._limiter = trio.CapacityLimiter(PARTS_IN_FLIGHT)
        self._announced = 0  # the largest ``end`` of part_ready so far
        self._failure: DirectFSError | None = None
        self._finished = False  # commit returned, or abort began

    # --- state ---

    def _check_open(self) -> None:
        if self._failure is not None:
            raise replay_error(self._failure)
        if self._finished:
            raise InvalidArgumentError("this upload is finished (committed or aborted)", filename=self._path)

    def _fail(self, error: DirectFSError) -> None:
        if self._failure is None:
            self._failure = error
        for scope in list(self._scopes):
            scope.cancel()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[trio.CancelScope]:
        scope = trio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)
            self._changed.set()
            self._changed = trio.Event()

    async def _settle(self) -> None:
        """Until no request of this upload is in flight."""
        while self._scopes:
            await self._changed.wait()

    async def _ensure_created(self) -> str:
        async with self._create_lock:
            if self._upload_id is None:
                if self._failure is not None or self._finished:  # failed or aborted while this task waited
                    raise replay_error(self._failure) if self._failure else self._aborted_error()
                with self._tracked() as scope:
                    self._upload_id = await self._source._create_multipart(self._path, self._key)
                if scope.cancelled_caught or self._upload_id is None:
                    raise replay_error(self._failure) if self._failure else self._aborted_error()
            return self._upload_id

    def _aborted_error(self) -> UploadError:
        return UploadError("the upload was aborted", filename=self._path)

    # --- parts ---

    async def _part(self, number: int, send: _PartSender) -> None:
        try:
            with self._tracked():
                async with self._limiter:
                    etag, md5 = await send(number)
                self._etags[number] = etag
                if md5 is not None:
                    self._md5s[number] = md5
        except Exception as exc:  # ours, or a bug (logged once by unwrap_error): either way the upload has failed
            self._fail(unwrap_error(exc, context=f"uploading part {number} of {self._path!r}"))
        finally:
            self._claimed.discard(number)

    async def _send(self, numbers: list[int], send: _PartSender) -> None:
        """Send parts ``numbers`` (claimed by the caller), at most PARTS_IN_FLIGHT of this upload at once."""
        try:
            await self._ensure_created()
        except BaseException:
            self._claimed.difference_update(numbers)
            raise
        async with trio.open_nursery() as nursery:
            for number in numbers:
                nursery.start_soon(self._part, number, send)
        if self._failure is not None:
            raise replay_error(self._failure)
        if self._finished:
            raise self._aborted_error()  # abort() cancelled the parts

    def _claim(self, count: int) -> list[int]:
        numbers = [n for n in range(1, count + 1) if n not in self._etags and n not in self._claimed]
        self._claimed.update(numbers)
        return numbers

    def _spool_sender(self, spool_fd: int, size: int) -> _PartSender:
        async def send(number: int) -> tuple[str, bytes | None]:
            offset = (number - 1) * PART_SIZE_BYTES
            length = min(PART_SIZE_BYTES, size - offset)
            body = await trio.to_thread.run_sync(_read_spool, spool_fd, offset, length)
            upload_id = self._upload_id
            assert upload_id is not None
            return await self._source._upload_part(self._path, self._key, upload_id, number, body), body.md5

        return send

    def _too_large(self, size: int) -> NoSpaceError:
        return NoSpaceError(
            f"{size} bytes is more than the {MAX_UPLOAD_BYTES} an S3 upload of {MAX_PARTS} parts of "
            f"{PART_SIZE_BYTES} bytes holds",
            filename=self._path,
        )

    # --- Upload ---

    async def part_ready(self, spool_fd: int, end: int) -> None:
        self._check_open()
        if end > MAX_UPLOAD_BYTES:
            await self._fail_and_abort(self._too_large(end))
        self._announced = max(self._announced, end)
        # Up to one part the file may still end as a single PUT; past it, the complete parts below ``end`` go now.
        numbers = self._claim(end // PART_SIZE_BYTES) if end > PART_SIZE_BYTES else []
        if not numbers:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._send(numbers, self._spool_sender(spool_fd, end))
        except DirectFSError as exc:
            await self._fail_and_abort(exc)

    async def commit(self, spool_fd: int, size: int, *, mtime_ns: int | None = None) -> Entry:
        self._check_open()
        try:
            if size < self._announced:
                raise InvalidArgumentError(
                    f"commit of {size} bytes after {self._announced} were announced final", filename=self._path
                )
            if size > MAX_UPLOAD_BYTES:
                raise self._too_large(size)
            if self._upload_id is None and not self._claimed and size <= PART_SIZE_BYTES:
                with self._tracked() as scope:
                    body = await trio.to_thread.run_sync(_read_spool, spool_fd, 0, size)
                    entry = await self._source._put_file(self._path, body)
                if scope.cancelled_caught:
                    raise replay_error(self._failure) if self._failure else self._aborted_error()
                self._finished = True
                return entry
            count = -(-size // PART_SIZE_BYTES)
            send = self._spool_sender(spool_fd, size)
            while True:
                numbers = self._claim(count)
                if numbers:
                    await self._send(numbers, send)
                await self._settle()  # parts another task's part_ready is sending
                if self._failure is not None:
                    raise replay_error(self._failure)
                if self._finished:
                    raise self._aborted_error()
                if all(n in self._etags for n in range(1, count + 1)):
                    break  # else a cancelled part_ready gave parts back: send them
            await self._complete(multipart_etag([self._md5s[n] for n in range(1, count + 1)]))
            return await self._source._entry_after_upload(self._path)
        except DirectFSError as exc:
            await self._fail_and_abort(exc)
        except BaseException:  # cancelled (a shutdown past its drain timeout): leave nothing behind
            await self._shielded_abort()
            raise

    async def _complete(self, expected_etag: str | None) -> None:
        upload_id = await self._ensure_created()
        with self._tracked() as scope:
            await self._source._complete_multipart(self._path, self._key, upload_id, self._etags, expected_etag)
        if scope.cancelled_caught:
            raise replay_error(self._failure) if self._failure else self._aborted_error()
        self._finished = True
        self._upload_id = None  # completed: nothing for an abort to drop any more

    async def _shielded_abort(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(ABORT_DEADLINE_SECONDS):
            await self.abort()

    async def _fail_and_abort(self, error: DirectFSError) -> NoReturn:
        self._fail(error)
        await self._shielded_abort()
        raise error

    async def abort(self) -> None:
        self._finished = True
        for scope in list(self._scopes):
            scope.cancel()
        await self._settle()  # a cancelled part's request ends at once (its connection closes): abort after them
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:  # nothing was sent, or completed, or aborted already
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._source._abort_multipart(self._path, self._key, upload_id)
        except DirectFSError as exc:
            log.warning(
                "s3: could not abort the multipart upload of %s (%s); its parts stay on the store until a lifecycle "
                "rule for incomplete uploads removes them",
                redact_url(self._source._object_url(self._key)),
                exc.strerror,
            )

    # --- rename ---

    async def copy_from(self, source_key: str, size: int, *, part_bytes: int) -> None:
        """Copy ``source_key`` (``size`` bytes) to this upload's key in ranges of ``part_bytes`` (UploadPartCopy)."""
        part_bytes = max(part_bytes, -(-size // MAX_PARTS))

        async def send(number: int) -> tuple[str, bytes | None]:
            start = (number - 1) * part_bytes
            end = min(size, start + part_bytes)
            upload_id = self._upload_id
            assert upload_id is not None
            etag = await self._source._upload_part_copy(
                self._path, self._key, upload_id, number, source_key, start, end
            )
            return etag, None

        try:
            await self._send(self._claim(-(-size // part_bytes)), send)
            await self._complete(None)
        except DirectFSError as exc:
            await self._fail_and_abort(exc)
        except BaseException:
            await self._shielded_abort()
            raise


def create(url: str, options: SourceOptions) -> S3Source:
    return S3Source(url, options)
