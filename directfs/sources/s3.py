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

Concurrency: one httpx client per source; credentials are resolved under a ``trio.Lock`` so concurrent first
requests resolve them once.
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET  # only for types and ParseError; parsing goes through defusedxml
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import parse_qs, quote, unquote, unquote_plus, urlsplit

import defusedxml.ElementTree as SafeET
import trio

from ..errors import (
    ConfigError,
    EntryNotFoundError,
    IsADirectory,
    MalformedListingError,
    NotADirectory,
    PermissionDeniedError,
)
from ..http import RetryPolicy, is_loopback_host, namespace_status_error, redact_url
from ..values import parse_decimal
from .base import Credentials, Entry, OpenFile, SourceOptions, valid_name
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

    async def _signed_headers(self, method: str, url: str) -> dict[str, str]:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        credentials = await self._frozen_credentials()
        aws_request = AWSRequest(method=method, url=url, headers={})
        S3SigV4Auth(credentials, "s3", self._region).add_auth(aws_request)
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


def create(url: str, options: SourceOptions) -> S3Source:
    return S3Source(url, options)
