"""The CTERA source: the namespace over the Portal's WebDAV, file data over Direct IO (docs/ctera-direct-io.md §14).

URL: ``ctera+https://HOST[:PORT][/sub/folder]`` (``ctera+http://`` only for loopback unless explicitly allowed).
The mount root is ``/ServicesPortal/webdav/`` or the named sub-folder; a URL that already spells out
``/ServicesPortal/webdav/...`` means the same.

* Listing: ``PROPFIND`` Depth 1 (folders) and Depth 0 (one entry) with the standard DAV properties,
  ``ctera:fileid`` and ``ctera:guid`` (on ``Entry.guid``: what the change feed names); HTTP Basic
  (``username``/``password``) or Bearer (``token``, or a rotating ``token_file``) auth, the plain stores'
  ``HTTPAuth``.
* Change feed (``base.ChangeFeed``): ``change_follower`` builds the Notification Service follower (``.feed``) for
  the cloud folder holding the mount root (``cloud_folder_ids``: the top-level folder's ``ctera:fileid``, or every
  folder when the root is the top).
* Data: every regular file's ``fileid`` is its Direct IO id (``.client``). A file whose blocks are not on a
  Direct-mode storage node (Portal 422), or that has no ``fileid`` in the listing, is read with ranged WebDAV GETs
  instead, as Cyberduck does (the plain stores' ``plain_file``, in worker threads); a warning says so once per
  file. The WebDAV connections are the plain stores' ``StoreClients``, built on first use.
* Versions: ``fileid``, size, mtime and ETag together are the version token; a change of any of them is a new
  version, so cached blocks of the old one are never served for it.

Writes (``Writable``): through the Portal's WebDAV, as Cyberduck uploads, with the plain WebDAV source's code
(``httpstore.DavStore``: PUT streamed from the spool, MKCOL, DELETE, MOVE, PROPPATCH of ``getlastmodified``). The
Portal gives a changed file a new ``fileid``; the entry after an upload is a PROPFIND, so it carries the new id, and
the new blocks are read through Direct IO like any other file's. ``keeps_mtime``: the Portal takes the PROPPATCH
(the reference portal does); errors name the Portal credentials.

Disk cache (``base.RawBlocks``, docs/disk-cache.md): an *encrypted* Direct IO file opens as a :class:`CipherFile`,
which can hand out a block's stored object as fetched (``fetch_raw``: the storage digest checked, nothing decoded) and
decode such an object later (``decode_raw``: the codec with the file key the Portal gave at open). The disk cache keeps
that ciphertext, so what lies on disk is protected by the per-file key, which lives only in memory. Native
(unencrypted) files open as plain ``DirectIOFile``s and are sealed by the disk cache with its own key.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from urllib.parse import quote, unquote, urlsplit

import trio

from ...errors import (
    ConfigError,
    MalformedListingError,
    UnsupportedStorageError,
)
from ...http import (
    RetryPolicy,
    is_loopback_host,
    namespace_status_error,
    redact_url,
)
from .. import davxml
from ..base import BlockLayout, Entry, OpenFile, SourceOptions
from ..httprange import RangeFile
from ..httpstore import DavStore, HTTPAuth, dav_children, plain_file, propfind
from .client import DirectIOClient, DirectIOFile, DirectIOSettings, FileMetadata
from .feed import FeedSettings, PortalFeed

log = logging.getLogger(__name__)

WEBDAV_ROOT = "/ServicesPortal/webdav"
# Block size of the WebDAV-GET fallback: 4 MiB is CTERA's fixed-block default, so read-ahead behaves the same.
FALLBACK_BLOCK_SIZE_BYTES = 4 * 1024 * 1024


def create(url: str, options: SourceOptions) -> CteraSource:
    return CteraSource(url, options)


def _entry_version(resource: davxml.DavResource, size: int, mtime_ns: int) -> str:
    return f"ctera:{resource.file_id or '-'}:{size}:{mtime_ns}:{resource.etag or '-'}"


class CteraSource(DavStore):
    """A CTERA Portal's global namespace. Create with :func:`create`; ``aclose`` releases connections."""

    _write_hint = "check the Portal credentials"
    _keeps_mtime = True  # the Portal accepts PROPPATCH of getlastmodified

    def __init__(self, url: str, options: SourceOptions) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("ctera+https", "ctera+http") or not parts.hostname:
            raise ConfigError("a CTERA source URL is ctera+https://HOST[:PORT][/sub/folder]")
        if parts.username or parts.password or parts.query:
            raise ConfigError("put credentials in DIRECTFS_* variables or --*-file flags, not in the source URL")
        http_scheme = scheme.removeprefix("ctera+")
        if http_scheme == "http" and not (options.allow_plain_http or is_loopback_host(parts.hostname)):
            raise ConfigError("ctera+http:// sends credentials in clear text; only loopback may use it")
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # IPv6 literal
            netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        self._origin = f"{http_scheme}://{netloc}"
        sub = unquote(parts.path).strip("/")
        if sub == WEBDAV_ROOT.strip("/") or sub.startswith(WEBDAV_ROOT.strip("/") + "/"):
            sub = sub[len(WEBDAV_ROOT.strip("/")) :].strip("/")
        self._root = f"{WEBDAV_ROOT}/{sub}" if sub else WEBDAV_ROOT
        self._options = options
        self._auth = HTTPAuth(options.credentials)
        super().__init__(options.http_settings())
        self._retry = RetryPolicy()
        self._dio: DirectIOClient | None = None
        self._dio_lock = trio.Lock()
        self._warned_fallback: set[str] = set()
        self.display_url = f"ctera+{self._origin}{quote(self._root)}"

    # --- plumbing ---

    async def _direct_io(self) -> DirectIOClient:
        async with self._dio_lock:
            if self._dio is None:
                credentials = self._options.credentials
                if not credentials.access_key_id or not credentials.secret_access_key:
                    raise ConfigError(
                        "reading CTERA files needs DIRECTFS_ACCESS_KEY_ID and DIRECTFS_SECRET_ACCESS_KEY "
                        "(or --access-key-id and --secret-access-key-file)"
                    )
                settings = DirectIOSettings.from_options(self._options)
                dio = DirectIOClient(
                    self._origin, credentials.access_key_id, credentials.secret_access_key, settings=settings
                )
                self._dio = await dio.__aenter__()
            return self._dio

    async def prepare(self) -> None:
        """Build the Direct IO client (its HTTP clients and TLS contexts, ~0.1 s of CPU) before the first open."""
        await self._direct_io()

    def _url(self, path: str, *, collection: bool = False) -> str:
        full = f"{self._root}/{path}" if path else self._root
        if collection:
            full += "/"
        return self._origin + quote(full, safe="/")

    def _dav_path(self, path: str) -> str:
        return f"{self._root}/{path}" if path else self._root

    async def aclose(self) -> None:
        await super().aclose()
        if self._dio is not None:
            await self._dio.aclose()
            self._dio = None

    # --- namespace ---

    async def _propfind(self, path: str, depth: int) -> list[davxml.DavResource]:
        url = self._url(path, collection=depth == 1)
        reply, resources = await propfind(
            self._http(), url, depth=depth, auth=self._auth, policy=self._retry, path=path or "/"
        )
        if reply.status_code == 207:
            return resources
        what = f"PROPFIND {redact_url(url)}"
        raise namespace_status_error(
            reply.status_code, what=what, filename=path or "/", hint="check the Portal credentials"
        )

    def _entry(self, name: str, resource: davxml.DavResource) -> Entry:
        mtime_ns = resource.mtime_ns or 0
        if resource.is_collection:
            return Entry(
                name=name,
                is_dir=True,
                size=0,
                mtime_ns=mtime_ns,
                version=f"dir:{resource.etag or ''}",
                guid=resource.guid,
            )
        size = resource.size if resource.size is not None else 0
        return Entry(
            name=name,
            is_dir=False,
            size=size,
            mtime_ns=mtime_ns,
            version=_entry_version(resource, size, mtime_ns),
            file_id=resource.file_id,
            xattrs=(("user.etag", resource.etag.encode()),) if resource.etag else (),
            guid=resource.guid,
        )

    async def stat(self, path: str) -> Entry:
        resources = await self._propfind(path, 0)
        wanted = davxml.normalize_path(f"{self._root}/{path}" if path else self._root)
        for resource in resources:
            if resource.path == wanted:
                return self._entry(path.rsplit("/", 1)[-1], resource)
        raise MalformedListingError(f"PROPFIND Depth 0 of {path or '/'!r} did not describe it")

    async def list_dir(self, path: str) -> AsyncIterator[Entry]:
        # Streamed: entries reach the reader as the reply is parsed (httpstore.propfind_pages).
        folder = f"{self._root}/{path}" if path else self._root
        hint = "check the Portal credentials"
        url = self._url(path, collection=True)
        pages = dav_children(
            self._http(), url, folder, auth=self._auth, policy=self._retry, path=path or "/", hint=hint
        )
        async with contextlib.aclosing(pages):
            async for page in pages:
                for name, resource in page:
                    yield self._entry(name, resource)

    # --- change feed (base.ChangeFeed) ---

    def change_follower(self, settings: FeedSettings | None = None) -> PortalFeed:
        """A follower of this Portal's Notification Service for the folders under the mount root (``.feed``). Its
        requests carry the WebDAV credentials (Basic or Bearer: docs/ctera-direct-io.md §14) on a client
        of their own, so a parked long-poll never holds one of the listing connections."""
        return PortalFeed(
            self._origin,
            self._auth,
            self._options.http_settings(),
            folder_ids=self.cloud_folder_ids,
            settings=settings,
            display_url=self.display_url,
        )

    async def cloud_folder_ids(self) -> list[int]:
        """The Notification Service's ``folder_ids`` covering the mount root: ``[]`` (every cloud folder) when the root
        is the top of the namespace; else the id (``ctera:fileid``) of the top-level folder the root lies in, the
        cloud folder that holds it. ``[]`` as well when that folder has no numeric id: the feed then reports every
        folder, which costs bandwidth, never correctness (events of unknown items are ignored)."""
        top = self._root[len(WEBDAV_ROOT) :].strip("/").split("/", 1)[0]
        if not top:
            return []
        url = self._origin + quote(f"{WEBDAV_ROOT}/{top}", safe="/")
        reply, resources = await propfind(self._http(), url, depth=0, auth=self._auth, policy=self._retry, path=top)
        if reply.status_code != 207:
            raise namespace_status_error(
                reply.status_code, what=f"PROPFIND {redact_url(url)}", filename=top, hint="check the Portal credentials"
            )
        wanted = davxml.normalize_path(f"{WEBDAV_ROOT}/{top}")
        for resource in resources:
            file_id = resource.file_id
            if resource.path == wanted and file_id is not None and file_id.isascii() and file_id.isdigit():
                return [int(file_id)]
        log.debug("the cloud folder %r has no numeric id; the change feed will report every folder", top)
        return []

    # --- data ---

    async def open(self, path: str, entry: Entry) -> OpenFile:
        if entry.size == 0 or entry.file_id is None:
            if entry.size and path not in self._warned_fallback:
                self._warned_fallback.add(path)
                log.warning("%s has no Direct IO file id: reading it over WebDAV", path)
            return await self._webdav_file(path, entry)
        dio = await self._direct_io()
        try:
            return raw_capable(await dio.open(entry.file_id, version=entry.version, expected_size=entry.size))
        except UnsupportedStorageError:
            if path not in self._warned_fallback:
                self._warned_fallback.add(path)
                log.warning("%s is not on a Direct-mode storage node (Portal 422): reading it over WebDAV", path)
            return await self._webdav_file(path, entry)

    async def _webdav_file(self, path: str, entry: Entry) -> RangeFile:
        return plain_file(
            self._http(),
            self._url(path),
            entry,
            path=path,
            block_size_bytes=FALLBACK_BLOCK_SIZE_BYTES,
            policy=self._retry,
            auth=self._auth,
            staging=None,
            getter=await self._data_getter(),
        )


# --- the disk cache's view of an encrypted file (base.RawBlocks) --------------------------------------------------


def raw_capable(opened: DirectIOFile) -> OpenFile:
    """``opened`` as a :class:`CipherFile` when its objects are encrypted (they may then be cached as fetched), else
    as it is (a native file's objects are plaintext: the disk cache seals those itself)."""
    meta = opened.metadata
    if meta.encrypted and meta.file_key is not None and meta.chunks:
        return CipherFile(opened)
    return opened


class CipherFile:
    """An encrypted Direct IO file (``OpenFile`` + ``RawBlocks``): ``fetch_block`` is the file's own; ``fetch_raw``
    and ``decode_raw`` are its two halves (``DirectIOFile.fetch_object`` and ``decode_object``), so the disk cache can
    keep the object in between. Only encrypted files are wrapped: ``RawBlocks`` is what tells the disk cache their
    objects may be stored as fetched."""

    def __init__(self, inner: DirectIOFile) -> None:
        self._inner = inner
        self.layout: BlockLayout = inner.layout

    @property
    def metadata(self) -> FileMetadata:
        return self._inner.metadata

    async def fetch_block(self, index: int) -> bytes | bytearray:
        return await self._inner.fetch_block(index)

    async def fetch_raw(self, index: int) -> bytes | bytearray:
        return await self._inner.fetch_object(index)

    def decode_raw(self, index: int, raw: bytes | bytearray | memoryview) -> bytes | bytearray:
        return self._inner.decode_object(index, raw)

    async def aclose(self) -> None:
        await self._inner.aclose()
