"""CTERA Direct IO client: block lists from the Portal, blocks straight from object storage.

``DirectIOClient`` is the protocol: ``metadata(file_id)`` (the block list, paged, with the unwrapped file key) and
``open(file_id)`` (a :class:`DirectIOFile`, the ``OpenFile`` the block engine reads). The public Python API
(``directfs.api.DirectIO``: Blocks and Streamer over the engine) builds on it; the mount's CTERA source uses it
directly. Protocol: ``docs/ctera-direct-io.md`` §2 (metadata), §5 (block GETs) and §11 (defects of cterasdk we do
not copy: no retries of 400/401/403/422, 403 from storage refreshes the URLs, reads past EOF are empty).

Concurrency rules (trio):

* One client owns two httpx clients (Portal, storage) and one :class:`~directfs.transfer.BlockingGetter` (block GETs
  in worker threads); every task of the run may share them.
* Every request runs under ``RetryPolicy.total_budget_seconds`` (see ``directfs.http.send_with_retries``) on top of
  the per-socket connect/read timeouts: no network call is without a deadline. A block job in a worker thread gets
  what is left of that budget as its own deadline, so a job abandoned by a cancelled caller still ends in time.
* ``DirectIOFile`` holds one metadata snapshot at a time. A block fetch reads the snapshot once and uses its URL and
  key together. URL refresh (storage 403/400) is single-flight: a lock plus a generation counter, so N fetches that
  hit an expired URL at once cause one Portal call; a fetch refreshes at most once.
* Per block attempt, one job in a worker thread (``directfs.workers.run_job``): GET, the storage digest check, then
  decrypt + decompress + length check (``_block_job``). The trio thread schedules it and is woken once. With
  ``block_transfer="httpx"`` the GET runs on the trio thread and digest + decode as one codec job.
* ``__aenter__`` builds the HTTP clients and the getter in worker threads (their TLS setup loads the CA bundle).
  The allocator tuning is the engine's (``directfs.engine.allocator``), applied by the API and the mount.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeGuard, TypeVar
from urllib.parse import SplitResult, urlsplit

import cachetools
import httpx
import trio

from ...errors import (
    AuthorizationError,
    BlockDigestError,
    BlockError,
    BlockInfo,
    BlocksNotFoundError,
    ConfigError,
    DirectFSError,
    DownloadError,
    InvalidArgumentError,
    InvalidRequest,
    MalformedMetadataError,
    ObjectNotFoundError,
    StaleFileError,
    UnsupportedStorageError,
    raise_single,
)
from ...http import (
    BadBody,
    BodyTooLarge,
    HTTPSettings,
    RetryPolicy,
    StatusReply,
    build_client,
    is_loopback_host,
    open_stream,
    read_body,
    redact_url,
    send_with_retries,
    transport_error,
)
from ...transfer import BlockingGetter
from ...workers import run_codec, run_job
from ..base import BlockLayout, SourceOptions
from . import codec

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
Plaintext = bytes | bytearray  # a decoded block, as codec.decode_block returns it
AZURE_HOST_SUFFIX: Final = ".core.windows.net"
R = TypeVar("R", bound=StatusReply)


@dataclass(frozen=True)
class DirectIOSettings:
    """Everything tunable about the Direct IO client; each default has its reason beside it."""

    portal: HTTPSettings = field(default_factory=HTTPSettings)
    storage: HTTPSettings = field(default_factory=HTTPSettings)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # A block list is ~150 bytes per chunk; 64 MiB covers ~400k chunks per reply and still bounds a hostile body.
    max_metadata_bytes: int = 64 * MiB
    # 4 Mi chunks: a 2 TiB file at CTERA's default 512 KiB average block. Bounds memory for the chunk table.
    max_chunks: int = 4 * 1024 * 1024
    # CTERA blocks default to 512 KiB (variable) or 4 MiB (fixed); 64 MiB leaves room for custom folder groups
    # and bounds what one block may make us allocate.
    max_block_bytes: int = 64 * MiB
    # The Portal may return partial block lists (docs/ctera-direct-io.md §2.4); bounded so a loop cannot hang us.
    max_metadata_pages: int = 10_000
    # All pages of one block list together (max_chunks and this are running totals, checked page by page): max_chunks
    # at ~500 bytes of JSON per chunk (a presigned URL with its query), so the largest file we accept still fits, while
    # a Portal that pages forever stops at the first page past it instead of after max_metadata_pages.
    max_metadata_total_bytes: int = 2048 * MiB
    allow_plain_http: bool = False  # a Bearer key over plain HTTP only to loopback, unless the user insists
    # Block URLs are https:// to a host that is not this machine unless the Portal itself is a loopback http:// one
    # (tests, `directfs serve` demos): blocks carry no MAC, and a Portal should not point us at local services.
    # True accepts http:// and loopback block URLs from any Portal. Link-local and cloud metadata hosts are refused
    # whatever this says (``BlockURLPolicy``).
    allow_insecure_storage: bool = False
    # CTERA blocks carry no MAC: with AES-CBC a flipped bit inside a snappy literal decodes to wrong bytes of the
    # right length. Where the storage sends an MD5 of the object (Content-MD5, x-goog-hash md5, or the ETag of an S3
    # single-part object) we check it before decoding; ~700 MB/s per core, run through the codec threads. On by
    # default because it is the only integrity signal we get; off only for a store whose ETag looks like an MD5 but
    # is not one (a mismatch names this setting).
    verify_storage_digest: bool = True
    # Block lists of opened versions are kept this long: a program that opens the same file again and again costs one
    # Portal call per 10 minutes, and during a Portal outage of that length re-opening a file whose blocks are cached
    # keeps working. Safe because the key is the listing's version token (a changed file is a new key) and expired
    # URLs are refreshed on 403 as usual. 0 turns it off.
    metadata_cache_seconds: float = 600.0
    # Bound of that cache in chunks (~400 bytes each with the URL): 100k chunks is ~40 MiB at worst and covers
    # 50 GB of files at CTERA's 512 KiB average block.
    metadata_cache_chunks: int = 100_000
    # How block objects are fetched. "curl": one job per block in a worker thread (libcurl GET, digest, decrypt,
    # decompress; directfs.transfer), which holds the GIL ~0.26 ms per 512 KiB GET against httpx's ~1 ms on the trio
    # thread (docs/testbed.md §8). "httpx": on the trio thread, decoding in a codec thread: what a storage_transport
    # (httpx.MockTransport in tests) needs, always used when one is given.
    block_transfer: str = "curl"
    # Keep freed block buffers in the process (glibc mallopt, see directfs.engine.allocator): fresh memory costs more
    # here than decrypting and decompressing it, and this took the Streamer from ~330 to ~450 MB/s. Process-wide, so an
    # application that tunes malloc itself turns it off.
    tune_allocator: bool = True

    def __post_init__(self) -> None:
        if self.block_transfer not in ("curl", "httpx"):
            raise ConfigError(f"block_transfer must be 'curl' or 'httpx', not {self.block_transfer!r}")

    @classmethod
    def from_options(cls, options: SourceOptions, *, retry: RetryPolicy | None = None) -> DirectIOSettings:
        """Settings from the command layer's store-independent options (TLS, CA, timeouts)."""
        return cls(
            portal=options.http_settings(),
            storage=options.http_settings(storage=True),
            retry=retry or RetryPolicy(),
            allow_plain_http=options.allow_plain_http,
            allow_insecure_storage=options.allow_insecure_storage,
        )


@dataclass(frozen=True, slots=True)
class Chunk:
    """One block of a file: 1-based ``number`` (as cterasdk), file ``offset``, plaintext ``length``, and the
    presigned ``url`` (bearer-equivalent until it expires: kept out of ``repr``)."""

    number: int
    offset: int
    length: int
    url: str = field(repr=False)


@dataclass(frozen=True)
class FileMetadata:
    """A file's block list as the Portal describes it, with the unwrapped key (never in ``repr``)."""

    file_id: str
    encrypted: bool
    compression: codec.Compression
    chunks: tuple[Chunk, ...]
    size: int
    file_key: bytes | None = field(default=None, repr=False)
    azure: bool = False  # blocks carry a 16-byte MD5 prefix (Azure Blob storage nodes)

    def layout(self, version: str) -> BlockLayout:
        return BlockLayout.from_lengths(version, [c.length for c in self.chunks])

    def same_content_shape(self, other: FileMetadata) -> bool:
        """Whether ``other`` can describe the same file version (used after a URL refresh)."""
        return self.size == other.size and [c.length for c in self.chunks] == [c.length for c in other.chunks]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _file_id_text(file_id: int | str) -> str:
    text = str(file_id) if _is_int(file_id) else file_id
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 30:
        raise ObjectNotFoundError(f"invalid file id {str(file_id)[:40]!r}: expected a decimal number")
    return text


# --- which block URLs we fetch ----------------------------------------------------------------------------------

# Cloud metadata services hand out instance credentials to whoever asks from the machine: a block URL must never make
# us ask (an answer would only fail to decode, but the request alone may be the attack: IMDSv1 needs no token).
# AWS, GCP, Azure, OCI, DigitalOcean: 169.254.169.254 (inside link-local, refused anyway); AWS over IPv6:
# fd00:ec2::254; Alibaba: 100.100.100.200; Azure's WireServer: 168.63.129.16.
_METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
_METADATA_NAMES: Final = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the low 32 bits are an IPv4 address
_NUMERIC_HOST: Final = frozenset("0123456789abcdefxABCDEFX.")
_BROADCAST: Final = ipaddress.ip_address("255.255.255.255")


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a URL's host names literally, as the resolver would read it, or None for a DNS name.

    Besides dotted quads and IPv6 literals (a zone id allowed), the numeric forms of ``inet_aton`` that getaddrinfo
    and libcurl accept: ``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``, ``169.254.43518``. An IPv4-mapped or
    NAT64 IPv6 address counts as the IPv4 address inside it."""
    text = host.strip("[]").rstrip(".")
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
        if text and set(text) <= _NUMERIC_HOST and any(c.isdigit() for c in text):
            with contextlib.suppress(OSError):
                address = ipaddress.IPv4Address(socket.inet_aton(text))
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.scope_id:
            return ipaddress.IPv6Address(text.partition("%")[0])
    return address


@dataclass(frozen=True, slots=True)
class BlockURLPolicy:
    """Which block URLs of a block list we fetch (issue 13 M3). Decided on the URL's literal host, never by resolving
    it: a DNS name that resolves to a link-local or metadata address is *not* caught here (that needs a check at
    connect time; see the README's Security section).

    Always refused: link-local hosts (169.254.0.0/16, fe80::/10), cloud metadata services (``_METADATA_ADDRESSES``,
    ``_METADATA_NAMES``), multicast and broadcast addresses, and URLs with userinfo or a backslash in the authority
    (parsers disagree on where such a host ends). ``plain_http``: http:// accepted; ``loopback``: this machine
    (127.0.0.0/8, ::1, 0.0.0.0, ``localhost``, ``*.localhost``) accepted. Both hold only for a Portal that is itself
    on loopback (``plain_http`` only over http://), or with ``allow_insecure_storage``."""

    plain_http: bool = False
    loopback: bool = False

    @classmethod
    def for_portal(cls, portal_url: str | httpx.URL, *, allow_insecure_storage: bool) -> BlockURLPolicy:
        url = httpx.URL(portal_url)
        local = is_loopback_host(url.host)
        return cls(
            plain_http=allow_insecure_storage or (local and url.scheme == "http"),
            loopback=allow_insecure_storage or local,
        )

    def refusal(self, parts: SplitResult) -> str | None:
        """Why the URL split into ``parts`` may not be fetched, naming its host (never its query); None if it may."""
        host = (parts.hostname or "").rstrip(".")
        shown = repr(host[:100])
        if parts.username is not None or parts.password is not None or "\\" in parts.netloc:
            return f"block URL to {shown} has userinfo or a backslash in its authority"
        address = _literal_address(host)
        if host in _METADATA_NAMES or address in _METADATA_ADDRESSES:
            return f"block URL to {shown} refused: a cloud metadata service"
        if address is not None and address.is_link_local:
            return f"block URL to {shown} refused: a link-local address"
        if address is not None and (address.is_multicast or address == _BROADCAST):
            return f"block URL to {shown} refused: not a unicast address"
        local = host in ("localhost", "localhost.localdomain") or host.endswith(".localhost")
        if address is not None:
            local = address.is_loopback or address.is_unspecified
        if local and not self.loopback:
            return (
                f"block URL to {shown} refused: this machine, named by a Portal that is not on it "
                "(--allow-insecure-storage accepts it)"
            )
        if parts.scheme.lower() == "http" and not self.plain_http:
            return (
                f"block URL to {shown} refused: plain http:// (blocks carry no MAC: the storage must use https, "
                "or pass --allow-insecure-storage)"
            )
        return None


STRICT_BLOCK_URLS: Final = BlockURLPolicy()  # a Portal that is not on this machine, no --allow-insecure-storage


# --- metadata parsing -----------------------------------------------------------------------------------------


@dataclass
class _Page:
    encrypted: bool
    wrapped_key: str | None
    compression: codec.Compression
    lengths: list[int]
    urls: list[str]
    file_size: int | None  # from actual_blocks_range, when present
    range_start: int | None
    range_end: int | None
    azure: bool  # a chunk lives on Azure Blob storage (objects carry a 16-byte MD5 prefix)


def _malformed(file_id: str, why: str) -> MalformedMetadataError:
    return MalformedMetadataError(f"Malformed Direct IO metadata: {why}", filename=file_id)


def parse_metadata_page(
    file_id: str, body: bytes | bytearray, settings: DirectIOSettings, *, block_urls: BlockURLPolicy = STRICT_BLOCK_URLS
) -> _Page:
    """One 200 reply of ``GET /directio/{file_id}`` (the raw body) as a page of the block list, or
    ``MalformedMetadataError``. Pure: the fuzz target of tests/unit/test_fuzz_replies.py calls it on hostile bytes."""
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise _malformed(file_id, "the reply is not valid JSON") from exc
    return _parse_page(file_id, document, settings, block_urls=block_urls)


_UNSAFE_URL_CHARACTER: Final = re.compile(r"[\x00-\x20\x7f]")
# Scheme and authority as urlsplit reads them (the authority ends at the first "/", "?" or "#").
_URL_ORIGIN: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def _block_url_host(file_id: str, position: int, url: str, block_urls: BlockURLPolicy) -> str:
    """The host of chunk ``position``'s URL, or ``MalformedMetadataError`` if we may not fetch it."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise _malformed(file_id, f"chunk {position} has an unparseable url") from exc
    if parts.scheme.lower() not in ("https", "http") or not host:
        raise _malformed(file_id, f"chunk {position} has no absolute http(s) url")
    refused = block_urls.refusal(parts)
    if refused is not None:
        raise _malformed(file_id, f"chunk {position}: {refused}")
    return host


def _parse_page(
    file_id: str, body: Any, settings: DirectIOSettings, *, block_urls: BlockURLPolicy = STRICT_BLOCK_URLS
) -> _Page:
    if not isinstance(body, dict):
        raise _malformed(file_id, "the reply is not a JSON object")
    info = body.get("encrypt_info")
    if not isinstance(info, dict):
        hint = " (a Portal older than 8.3?)" if "wrapped_key" in body else ""
        raise _malformed(file_id, f"missing or invalid encrypt_info{hint}")
    encrypted = info.get("data_encrypted")
    if not isinstance(encrypted, bool):
        raise _malformed(file_id, "encrypt_info.data_encrypted is not a boolean")
    wrapped = info.get("wrapped_key")
    if encrypted and (not isinstance(wrapped, str) or not wrapped):
        raise _malformed(file_id, "encrypted file without encrypt_info.wrapped_key")
    compression_type = body.get("compression_type")
    if compression_type is not None and not isinstance(compression_type, str):
        raise _malformed(file_id, "compression_type is not a string")
    chunks = body.get("chunks")
    if chunks is None:
        chunks = []
    if not isinstance(chunks, list):
        raise _malformed(file_id, "chunks is not a list")
    if len(chunks) > settings.max_chunks:
        raise _malformed(file_id, f"more than {settings.max_chunks} chunks")
    lengths: list[int] = []
    urls: list[str] = []
    azure = False
    # Every check of a URL but the character one depends only on its scheme and authority, which the chunks of one
    # file share: each origin is judged once (256 presigned URLs took ~5 ms of a cold open judged one by one).
    hosts: dict[str, str] = {}
    for position, chunk in enumerate(chunks):
        if not isinstance(chunk, dict):
            raise _malformed(file_id, f"chunk {position} is not an object")
        length, url = chunk.get("len"), chunk.get("url")
        if not _is_int(length) or not 0 <= length <= settings.max_block_bytes:
            raise _malformed(file_id, f"chunk {position} has an invalid len (an integer 0..{settings.max_block_bytes})")
        if not isinstance(url, str):
            raise _malformed(file_id, f"chunk {position} has no url")
        if _UNSAFE_URL_CHARACTER.search(url):  # NUL, CR/LF, spaces: refused here, not at fetch time
            raise _malformed(file_id, f"chunk {position} has control characters or spaces in its url")
        origin = _URL_ORIGIN.match(url)
        host = hosts.get(origin.group(0)) if origin is not None else None
        if host is None:
            host = _block_url_host(file_id, position, url, block_urls)
            if origin is not None:
                hosts[origin.group(0)] = host
        azure = azure or host.endswith(AZURE_HOST_SUFFIX)
        lengths.append(length)
        urls.append(url)
    file_size = range_start = range_end = None
    blocks_range = body.get("actual_blocks_range")
    if blocks_range is not None:
        if not isinstance(blocks_range, dict):
            raise _malformed(file_id, "actual_blocks_range is not an object")
        file_size = blocks_range.get("file_size")
        if not _is_int(file_size) or file_size < 0:
            raise _malformed(file_id, "actual_blocks_range.file_size is not an integer >= 0")
        text = blocks_range.get("range")
        if text is not None:
            if not isinstance(text, str):
                raise _malformed(file_id, "actual_blocks_range.range is not a string")
            start_text, sep, end_text = text.strip().partition("-")
            # ASCII digits of an int64 only: str.isdigit() accepts "²" and 5000 digits, which int() refuses.
            if not sep or not all(t.isascii() and t.isdigit() and len(t) <= 18 for t in (start_text, end_text)):
                raise _malformed(file_id, "actual_blocks_range.range is not START-END")
            range_start, range_end = int(start_text), int(end_text)
    return _Page(
        encrypted=encrypted,
        wrapped_key=wrapped if encrypted else None,
        compression=codec.Compression.parse(compression_type),
        lengths=lengths,
        urls=urls,
        file_size=file_size,
        range_start=range_start,
        range_end=range_end,
        azure=azure,
    )


# --- the client -----------------------------------------------------------------------------------------------


class DirectIOClient:
    """Async context manager holding the Portal and storage clients of one Direct IO account.

    ``secret_access_key`` only unwraps file keys locally; it is never sent, logged or shown in ``repr``.
    ``portal_transport``/``storage_transport`` replace the network (``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        portal_url: str,
        access_key_id: str,
        secret_access_key: str,
        *,
        settings: DirectIOSettings | None = None,
        portal_transport: httpx.AsyncBaseTransport | None = None,
        storage_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings or DirectIOSettings()
        try:
            url = httpx.URL(portal_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigError("invalid Portal URL") from exc
        if url.scheme not in ("https", "http") or not url.host:
            raise ConfigError(f"Portal URL must be https://HOST[:PORT], not {redact_url(url)}")
        if url.scheme == "http" and not (self.settings.allow_plain_http or is_loopback_host(url.host)):
            raise ConfigError(
                f"plain http:// sends the access key in clear text; only loopback may use it ({url.host})"
            )
        if not access_key_id or not secret_access_key:
            raise ConfigError("Direct IO needs an access key id and a secret access key")
        # /directio sits at the host root, whatever path the user gave (docs/ctera-direct-io.md §2.1).
        self.portal_url = str(url.copy_with(path="/", query=None, fragment=None, username=None, password=None))
        self._block_urls = BlockURLPolicy.for_portal(url, allow_insecure_storage=self.settings.allow_insecure_storage)
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._transports = (portal_transport, storage_transport)
        self._portal: httpx.AsyncClient | None = None
        self._storage: httpx.AsyncClient | None = None
        self._getter: BlockingGetter | None = None  # block GETs in worker threads (block_transfer="curl")
        # (file id, version) -> block list of an opened version; touched only from the trio thread, between awaits.
        self._opened: cachetools.TTLCache[tuple[str, str], FileMetadata] | None = None
        if self.settings.metadata_cache_seconds > 0 and self.settings.metadata_cache_chunks > 0:
            self._opened = cachetools.TTLCache(
                maxsize=self.settings.metadata_cache_chunks,
                ttl=self.settings.metadata_cache_seconds,
                getsizeof=lambda meta: max(1, len(meta.chunks)),
            )

    def __repr__(self) -> str:
        return f"DirectIO({self.portal_url!r})"

    async def __aenter__(self) -> DirectIOClient:
        portal = partial(
            build_client,
            self.settings.portal,
            headers={"Authorization": f"Bearer {self._access_key_id}", "Accept": "application/json"},
            transport=self._transports[0],
        )
        # identity: we read raw bytes (no decoding pass) and compare sizes against the block length.
        storage = partial(
            build_client, self.settings.storage, headers={"Accept-Encoding": "identity"}, transport=self._transports[1]
        )
        # Each client loads the system CA bundle into its TLS context (~25 ms of CPU each). In worker threads, side by
        # side: a mount opens its first file here, and the trio thread keeps answering other requests meanwhile.
        # Not cancellable (to_thread's default), so both clients always exist once this returns or raises.
        try:
            async with trio.open_nursery() as nursery:

                async def build_portal() -> None:
                    self._portal = await trio.to_thread.run_sync(portal)

                nursery.start_soon(build_portal)
                self._storage = await trio.to_thread.run_sync(storage)
                self._getter = await trio.to_thread.run_sync(self._block_getter)  # loads the CA paths: a thread too
        except BaseExceptionGroup as group:
            with trio.CancelScope(shield=True):
                await self.aclose()  # the client that was built
            raise_single(group)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _block_getter(self) -> BlockingGetter | None:
        """The worker-thread GET engine for block objects, or None for the httpx path (see ``block_transfer``)."""
        if self.settings.block_transfer != "curl" or self._transports[1] is not None:
            return None
        return BlockingGetter(self.settings.storage, headers={"Accept-Encoding": "identity"})

    async def aclose(self) -> None:
        clients = [c for c in (self._portal, self._storage) if c is not None]
        self._portal = self._storage = None
        getter, self._getter = self._getter, None
        if getter is not None:
            getter.close()
        for client in clients:
            await client.aclose()

    def _clients(self) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
        if self._portal is None or self._storage is None:
            raise RuntimeError("use DirectIO as an async context manager (async with DirectIO(...) as dio)")
        return self._portal, self._storage

    # --- metadata ---

    async def metadata(self, file_id: int | str) -> FileMetadata:
        """The file's block list, with the unwrapped file key. Paged transparently when the Portal returns a
        partial list. Raises a ``DirectIOAPIError`` (status mapping in ``directfs.errors``) or ``DecryptKeyError``."""
        return await self._metadata(_file_id_text(file_id), empty_ok=False)

    async def _metadata(self, file_id: str, *, empty_ok: bool) -> FileMetadata:
        # Chunks and reply bytes are running totals over the pages (issue 13 M5): a Portal that pages a block list
        # past max_chunks or max_metadata_total_bytes is stopped at the first page over, not after the last.
        first, spent_bytes = await self._metadata_page(file_id, None, spent_bytes=0)
        pages = [first]
        chunk_count = len(first.lengths)
        if first.file_size and first.range_start is not None:
            covered = self._check_page(file_id, first, 0)
            while covered < first.file_size:
                if len(pages) >= self.settings.max_metadata_pages:
                    raise _malformed(file_id, f"block list not complete after {len(pages)} pages")
                page, page_bytes = await self._metadata_page(
                    file_id, (covered, first.file_size - 1), spent_bytes=spent_bytes
                )
                spent_bytes += page_bytes
                chunk_count += len(page.lengths)
                if chunk_count > self.settings.max_chunks:
                    raise _malformed(
                        file_id, f"more than {self.settings.max_chunks} chunks after {len(pages) + 1} pages"
                    )
                if (page.encrypted, page.wrapped_key, page.compression, page.file_size) != (
                    first.encrypted,
                    first.wrapped_key,
                    first.compression,
                    first.file_size,
                ):
                    raise _malformed(file_id, "pages of the block list disagree (file changed while paging?)")
                covered = self._check_page(file_id, page, covered)
                pages.append(page)
            if covered != first.file_size:
                raise _malformed(file_id, f"block list covers {covered} bytes of a {first.file_size}-byte file")
        lengths = [n for page in pages for n in page.lengths]
        urls = [u for page in pages for u in page.urls]
        size = sum(lengths)
        if first.file_size is not None and first.file_size != size:
            raise _malformed(file_id, f"chunks sum to {size} bytes, file_size says {first.file_size}")
        if not lengths and not empty_ok and first.file_size != 0:
            raise BlocksNotFoundError(filename=file_id)
        file_key = None
        if first.encrypted:
            assert first.wrapped_key is not None
            try:
                file_key = codec.unwrap_file_key(first.wrapped_key, self._secret_access_key)
            except DirectFSError as exc:
                exc.filename = file_id
                raise
        chunks: list[Chunk] = []
        offset = 0
        for number, (length, url) in enumerate(zip(lengths, urls, strict=True), start=1):
            chunks.append(Chunk(number=number, offset=offset, length=length, url=url))
            offset += length
        return FileMetadata(
            file_id=file_id,
            encrypted=first.encrypted,
            compression=first.compression,
            chunks=tuple(chunks),
            size=size,
            file_key=file_key,
            azure=any(page.azure for page in pages),
        )

    @staticmethod
    def _check_page(file_id: str, page: _Page, covered: int) -> int:
        """Verify a partial page continues exactly where the last one ended; return the new coverage."""
        if page.range_start is None or page.range_end is None:
            raise _malformed(file_id, "a partial block list page without actual_blocks_range.range")
        if page.range_start != covered:
            kind = "overlaps" if page.range_start < covered else "leaves a gap after"
            raise _malformed(file_id, f"block list page starting at {page.range_start} {kind} byte {covered}")
        page_bytes = sum(page.lengths)
        if not page.lengths or page_bytes == 0:
            raise _malformed(file_id, f"block list page at {covered} holds no data")
        # End inclusive per cterasdk's WIP; Cyberduck's sample reads as exclusive. Accept both, nothing else.
        if page.range_end not in (page.range_start + page_bytes - 1, page.range_start + page_bytes):
            raise _malformed(file_id, f"range {page.range_start}-{page.range_end} does not match its chunks")
        assert page.file_size is not None
        if covered + page_bytes > page.file_size:
            raise _malformed(file_id, "block list runs past file_size")
        return covered + page_bytes

    async def _metadata_page(
        self, file_id: str, byte_range: tuple[int, int] | None, *, spent_bytes: int
    ) -> tuple[_Page, int]:
        """One page of the block list and the size of its reply; ``spent_bytes`` were read for earlier pages (the
        reply may have what is left of ``max_metadata_total_bytes``, at most ``max_metadata_bytes``)."""
        portal, _ = self._clients()
        url = httpx.URL(self.portal_url).join(f"/directio/{file_id}")
        if byte_range is not None:
            url = url.copy_merge_params({"rangeStart": str(byte_range[0]), "rangeEnd": str(byte_range[1])})
        what = f"GET {redact_url(url)}"
        total = self.settings.max_metadata_total_bytes
        limit = max(0, min(self.settings.max_metadata_bytes, total - spent_bytes))

        async def attempt() -> _Reply:
            async with open_stream(portal, "GET", url) as response:
                # Error bodies are never read: only the status matters, and a hostile body costs nothing.
                body = await read_body(response, limit) if response.status_code == 200 else bytearray()
                return _Reply(response.status_code, response.headers, body)

        try:
            reply = await send_with_retries(attempt, policy=self.settings.retry, what=what)
        except BodyTooLarge:
            if limit < self.settings.max_metadata_bytes:
                raise _malformed(file_id, f"block list larger than {total} bytes over all its pages") from None
            raise _malformed(file_id, f"reply larger than {limit} bytes") from None
        except BadBody as exc:
            raise _malformed(file_id, str(exc)) from None
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject="block list", what=what, filename=file_id) from exc
        status = reply.status_code
        if status != 200:
            log.debug("%s: HTTP %d", what, status)
            if status == 400:
                raise ObjectNotFoundError(filename=file_id)
            if status in (401, 403):
                raise AuthorizationError(f"Not authorized (HTTP {status}): check the access key id", filename=file_id)
            if status == 422:
                raise UnsupportedStorageError(filename=file_id)
            raise InvalidRequest(f"Portal answered HTTP {status} for the block list", filename=file_id)
        return parse_metadata_page(file_id, reply.body, self.settings, block_urls=self._block_urls), len(reply.body)

    # --- files ---

    async def open(
        self, file_id: int | str, *, version: str | None = None, expected_size: int | None = None
    ) -> DirectIOFile:
        """Open a file for block reads. ``expected_size`` (from the listing) is checked against the block list
        (``StaleFileError`` on a mismatch); 0 opens an empty file without asking the Portal."""
        text = _file_id_text(file_id)
        cache_key = (text, version) if version is not None else None
        cached = self._opened.get(cache_key) if self._opened is not None and cache_key is not None else None
        if expected_size == 0:
            meta = FileMetadata(text, encrypted=False, compression=codec.Compression.NONE, chunks=(), size=0)
        elif cached is not None and (expected_size is None or cached.size == expected_size):
            await trio.lowlevel.checkpoint()
            meta = cached
        else:
            meta = await self._metadata(text, empty_ok=True)
            if expected_size is not None and meta.size != expected_size:
                raise StaleFileError(
                    f"The file changed on the server: {meta.size} bytes, the listing said {expected_size}",
                    filename=text,
                )
            self._remember(cache_key, meta)
        opened = DirectIOFile(self, meta, version if version is not None else f"directio:{text}:{meta.size}")
        opened.cache_key = cache_key
        return opened

    def _remember(self, cache_key: tuple[str, str] | None, meta: FileMetadata) -> None:
        if self._opened is None or cache_key is None or not meta.chunks:
            return
        with contextlib.suppress(ValueError):  # one block list larger than the whole cache: not kept
            self._opened[cache_key] = meta

    async def _get_block(
        self, chunk: Chunk, info: BlockInfo, decode: Callable[[bytearray], Plaintext]
    ) -> Plaintext | None:
        """``decode(object)`` of ``chunk``'s stored object, checked first against a size bound and, when the storage
        sent one, against its MD5; or None when storage refused the URL with 403/400 (an expired presigned URL: the
        caller refreshes the block list).

        With the curl transfer, GET, digest check and ``decode`` run as *one* job in a worker thread per attempt
        (``_block_job``): the trio thread schedules it and wakes once. With httpx, the GET runs on the trio thread
        and the digest check plus ``decode`` as one codec job. Either way the digest is checked before a single byte
        is decoded. A digest mismatch downloads the object once more (a damaged transfer is usually transient) and
        then raises ``BlockDigestError``: a damaged object is never decoded, so never cached."""
        what = f"GET {redact_url(chunk.url)}"
        verify = self.settings.verify_storage_digest
        source = "digest"
        for attempt_number in (1, 2):
            if self._getter is not None:
                job = await self._download_job(chunk, info, what, decode)
                if job is None:
                    return None
                if job.data is not None:
                    return job.data
                source = job.digest_source or source
            else:
                reply = await self._download(chunk, info, what)
                if reply is None:
                    return None
                expected = storage_md5(reply.headers) if verify else None
                body = reply.body
                if expected is None:
                    return await run_codec(partial(decode, body), input_bytes=len(body))
                digest, source = expected
                decoded = await run_codec(partial(_verified_decode, body, digest, decode), input_bytes=len(body))
                if decoded is not None:
                    return decoded
            log.warning("%s: object does not match its %s (attempt %d)", what, source, attempt_number)
        raise BlockDigestError(
            f"downloaded object does not match its {source} twice ({what}); if this store's ETag is not an MD5, "
            "turn off verify_storage_digest",
            block=info,
        )

    async def _download_job(
        self, chunk: Chunk, info: BlockInfo, what: str, decode: Callable[[bytearray], Plaintext]
    ) -> _JobResult | None:
        """One block through worker-thread jobs, retried like every request (``send_with_retries``): the job's
        result, or None for 403/400 (expired URL)."""
        getter = self._getter
        assert getter is not None
        limit = _object_limit(chunk)
        policy = self.settings.retry
        deadline = trio.current_time() + policy.total_budget_seconds
        verify = self.settings.verify_storage_digest

        async def attempt() -> _JobResult:
            # The thread's own deadline is what is left of the operation's budget: an abandoned job ends with it.
            remaining = max(0.001, deadline - trio.current_time())
            return await run_job(partial(_block_job, getter, chunk.url, limit, remaining, verify, decode))

        return await self._storage_reply(attempt, info, what)

    async def _storage_reply(self, attempt: Callable[[], Awaitable[R]], info: BlockInfo, what: str) -> R | None:
        """``send_with_retries(attempt)`` for a block object: the 200 reply, None for 400/403 (an expired presigned
        URL: the caller refreshes the block list), ``DownloadError`` for any other status, and transport failures
        mapped to the block errors of the tree."""
        try:
            reply = await send_with_retries(attempt, policy=self.settings.retry, what=what)
        except BodyTooLarge as exc:
            raise DownloadError(f"object of {exc.size}+ bytes is too large for this block", block=info) from None
        except BadBody as exc:
            raise DownloadError(f"unreadable object ({exc})", block=info) from None
        except httpx.HTTPError as exc:
            raise transport_error(exc, subject="block", what=what, block=info) from exc
        if reply.status_code in (400, 403):
            log.debug("%s: HTTP %d (expired URL?)", what, reply.status_code)
            return None
        if reply.status_code != 200:
            raise DownloadError(f"storage answered HTTP {reply.status_code} ({what})", block=info)
        return reply

    async def _download(self, chunk: Chunk, info: BlockInfo, what: str) -> _Reply | None:
        """The object over httpx on the trio thread (``block_transfer="httpx"``), or None for 403/400."""
        _, storage = self._clients()
        limit = _object_limit(chunk)

        async def attempt() -> _Reply:
            async with open_stream(storage, "GET", chunk.url) as response:
                if response.status_code != 200:
                    return _Reply(response.status_code, response.headers, bytearray())
                return _Reply(200, response.headers, await read_body(response, limit))

        return await self._storage_reply(attempt, info, what)


@dataclass(frozen=True, slots=True)
class _Reply:
    status_code: int
    headers: httpx.Headers
    body: bytearray


@dataclass(frozen=True, slots=True)
class _JobResult:
    """What one block job hands back to the trio thread: the reply's status and headers (for the retry loop), and
    the decoded block, or the name of the digest the object failed (``data`` None then)."""

    status_code: int
    headers: httpx.Headers
    data: Plaintext | None = None
    digest_source: str | None = None


def _object_limit(chunk: Chunk) -> int:
    """Upper bound of an honest object: snappy's worst case is 32 + n + n/6, gzip's is smaller, plus the 1-byte
    header, IV, PKCS#7 block and Azure MD5. Anything longer is not this block."""
    return chunk.length + chunk.length // 5 + 4096


def _block_job(
    getter: BlockingGetter,
    url: str,
    limit: int,
    timeout_seconds: float,
    verify_digest: bool,
    decode: Callable[[bytearray], Plaintext],
) -> _JobResult:
    """One attempt at one block, in a worker thread: GET, digest check, decode. Raises what ``getter.get`` raises
    (httpx exception classes, ``BodyTooLarge``) and the codec's ``BlockError`` subclasses."""
    reply = getter.get(url, limit_bytes=limit, timeout_seconds=timeout_seconds)
    if reply.status_code != 200:
        return _JobResult(reply.status_code, reply.headers)
    expected = storage_md5(reply.headers) if verify_digest else None
    if expected is not None and _md5(reply.body) != expected[0]:
        return _JobResult(200, reply.headers, digest_source=expected[1])
    return _JobResult(200, reply.headers, decode(reply.body))


def _md5(data: bytes | bytearray) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _verified_decode(body: bytearray, digest: bytes, decode: Callable[[bytearray], Plaintext]) -> Plaintext | None:
    """``decode(body)`` if ``body`` matches ``digest``, else None (runs in a codec thread)."""
    if _md5(body) != digest:
        return None
    return decode(body)


def _decoder(meta: FileMetadata, chunk: Chunk) -> Callable[[bytearray], Plaintext]:
    """The codec call that turns ``chunk``'s stored object into its plaintext (pure; runs in a codec thread)."""
    return partial(
        codec.decode_block,
        key=meta.file_key,
        compression=meta.compression,
        expected_length=chunk.length,
        azure_md5_prefix=meta.azure,
    )


def _as_fetched(meta: FileMetadata, chunk: Chunk) -> Callable[[bytearray], Plaintext]:
    """The "decoder" of ``fetch_object``: the object as fetched (its digest is checked before a decoder is called)."""
    return _same_bytes


def _same_bytes(body: bytearray) -> bytearray:
    return body


# S3 server-side encryption with KMS or customer keys makes the ETag something other than the MD5 of the object.
_SSE_OPAQUE_ETAG: Final = ("aws:kms", "aws:kms:dsse")


def storage_md5(headers: httpx.Headers) -> tuple[bytes, str] | None:
    """The MD5 the storage vouches for the whole object, and where it came from; None when it sends none.

    Checked in this order: ``Content-MD5`` (RFC 1864; Azure sends it for blobs uploaded with one, many S3-compatible
    stores too), ``x-ms-blob-content-md5`` (Azure's whole-blob MD5), ``x-goog-hash: md5=`` (GCS), then the ``ETag``
    when it has the shape of an S3 single-part ETag (32 hex digits: a multipart ETag ends in ``-N``, Azure's are
    ``0x...``) and the object is not SSE-KMS / SSE-C encrypted (their ETags are not MD5s). A malformed value is
    ignored rather than trusted."""
    for name in ("content-md5", "x-ms-blob-content-md5"):
        value = headers.get(name)
        if value:
            digest = _b64_md5(value)
            if digest is not None:
                return digest, name
    for part in headers.get("x-goog-hash", "").split(","):
        algorithm, _, value = part.strip().partition("=")
        if algorithm.lower() == "md5":
            digest = _b64_md5(value)
            if digest is not None:
                return digest, "x-goog-hash md5"
    etag = headers.get("etag", "").strip()
    if etag.startswith('"') and etag.endswith('"') and len(etag) == 34:
        text = etag[1:-1]
        sse = headers.get("x-amz-server-side-encryption", "").lower()
        if (
            all(c in "0123456789abcdefABCDEF" for c in text)
            and sse not in _SSE_OPAQUE_ETAG
            and "x-amz-server-side-encryption-customer-algorithm" not in headers
        ):
            return bytes.fromhex(text), "ETag"
    return None


def _b64_md5(value: str) -> bytes | None:
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest if len(digest) == 16 else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class DirectIOFile:
    """One opened file (implements ``directfs.sources.base.OpenFile``). Fetches may run concurrently."""

    def __init__(self, client: DirectIOClient, meta: FileMetadata, version: str) -> None:
        self._client = client
        self._meta = meta
        self._generation = 0
        self._refresh_lock = trio.Lock()
        self._refresh_failure: tuple[int, DirectFSError] | None = None
        self.layout = meta.layout(version)
        self.refreshes = 0  # block-list refreshes done (observable in tests and stats)
        self.cache_key: tuple[str, str] | None = None  # where the client keeps this version's block list

    @property
    def metadata(self) -> FileMetadata:
        return self._meta

    @property
    def size(self) -> int:
        return self._meta.size

    async def fetch_block(self, index: int) -> bytes | bytearray:
        return await self._fetch(index, _decoder)

    # Not named as base.RawBlocks's methods on purpose: that capability says "these objects may be stored as fetched",
    # true only of encrypted files, which sources.ctera.source.CipherFile wraps (a native file's objects are plaintext).
    async def fetch_object(self, index: int) -> bytes | bytearray:
        """Block ``index``'s stored object as fetched, its storage digest checked and nothing decoded (the disk
        cache keeps it: ``sources.ctera.source.CipherFile``); ``decode_object`` turns it into the plaintext."""
        return await self._fetch(index, _as_fetched)

    def decode_object(self, index: int, raw: bytes | bytearray | memoryview) -> bytes | bytearray:
        """The plaintext of block ``index`` from its object as ``fetch_object`` gave it (CPU-heavy: a codec job)."""
        meta = self._meta
        chunk = meta.chunks[index]
        try:
            return codec.decode_block(
                raw,
                key=meta.file_key,
                compression=meta.compression,
                expected_length=chunk.length,
                azure_md5_prefix=meta.azure,
            )
        except BlockError as exc:
            clone = exc.with_block(BlockInfo(meta.file_id, chunk.number, chunk.offset, chunk.length))
            raise clone from exc

    async def _fetch(
        self, index: int, decoder_of: Callable[[FileMetadata, Chunk], Callable[[bytearray], Plaintext]]
    ) -> bytes | bytearray:
        if not 0 <= index < len(self._meta.chunks):
            raise InvalidArgumentError(
                f"block index {index} outside 0..{len(self._meta.chunks) - 1}", filename=self._meta.file_id
            )
        meta, generation = self._meta, self._generation
        chunk = meta.chunks[index]
        info = BlockInfo(meta.file_id, chunk.number, chunk.offset, chunk.length)
        try:
            data = await self._client._get_block(chunk, info, decoder_of(meta, chunk))
            if data is None:
                await self._refresh(generation)
                meta = self._meta
                chunk = meta.chunks[index]
                data = await self._client._get_block(chunk, info, decoder_of(meta, chunk))
                if data is None:
                    raise DownloadError("storage refused a freshly issued URL (HTTP 403/400)", block=info)
        except BlockError as exc:
            if exc.block is not None:
                raise
            clone = exc.with_block(info)
            raise clone from clone.__cause__
        return data

    async def _refresh(self, seen_generation: int) -> None:
        """Fetch a new block list unless another task already did since ``seen_generation`` (single-flight)."""
        async with self._refresh_lock:
            if self._generation != seen_generation:
                return
            if self._refresh_failure is not None and self._refresh_failure[0] == seen_generation:
                # The refresh for these URLs already failed: waiters share that answer instead of queueing N
                # more Portal calls (each up to a whole retry budget) behind the lock.
                raise self._refresh_failure[1]
            try:
                fresh = await self._client._metadata(self._meta.file_id, empty_ok=True)
                if not self._meta.same_content_shape(fresh):
                    raise StaleFileError(
                        f"The file changed on the server: now {fresh.size} bytes in {len(fresh.chunks)} blocks",
                        filename=self._meta.file_id,
                    )
            except DirectFSError as exc:
                self._refresh_failure = (seen_generation, exc)
                raise
            self._meta = fresh
            self._client._remember(self.cache_key, fresh)  # later opens get the fresh URLs too
            self._generation += 1
            self.refreshes += 1
            log.debug("refreshed the block list of file %s", self._meta.file_id)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


__all__ = [
    "Chunk",
    "DirectIOClient",
    "DirectIOFile",
    "DirectIOSettings",
    "FileMetadata",
    "storage_md5",
]
