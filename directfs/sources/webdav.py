"""``webdav://`` and ``webdavs://`` sources: any WebDAV server (dCache, nginx dav-ext, Apache mod_dav, ...).

URL: ``webdavs://HOST[:PORT]/path`` (HTTPS) or ``webdav://HOST[:PORT]/path`` (plain HTTP: with credentials only to
loopback, unless ``SourceOptions.allow_plain_http``). The mount root is ``/path``.

* Listing: ``PROPFIND`` ``Depth: 1`` for a folder, ``Depth: 0`` for one entry, parsed by ``davxml`` (defusedxml;
  names that are empty, ``.``, ``..``, or hold ``/``/NUL are skipped with a warning, as are duplicates).
* Data: fixed-size blocks (``SourceOptions.block_size_bytes``) read with strict ranged GETs (``httprange``), with
  ``If-Match`` when the server gives a strong ETag (Apache does; nginx dav-ext gives none, and then the
  ``Content-Range`` total still catches a size change).
* Version: ETag, size and mtime together: nginx gives no ETag, so size + mtime must carry the change (and, for
  files this source wrote, its write mark: ``httpstore.DavStore.version_mark``).
* Credentials (see ``web``): a Bearer token file re-read when it changes and once more after a 401, a Bearer token,
  Basic, and an X.509 client certificate (mutual TLS, e.g. a grid proxy certificate for dCache).
* Nearline: dCache answers a read of a file still on tape with 503 + Retry-After; reads wait within
  ``SourceOptions.staging_deadline_seconds`` (``nearline``).

Writes (``Writable``, ``--rw`` and ``directfs cp`` uploads; the code is ``httpstore.DavStore``, shared with the CTERA
source): a file is one PUT streamed from the spool at commit, with ``Content-Length``; from 1 MiB on it carries
``Expect: 100-continue`` and its body really waits for the ``100`` (up to 1 s), so a refusal (401, 507) costs no body
and dCache redirects it to a pool. A 307/308 (dCache's door to a pool) is followed with the same body, credentials only
to the source's own origin. Retries resend the whole body, each with the current token (a rotated token file is read
per attempt). The new entry is a PROPFIND after the PUT (as ``stat`` gives it). ``mkdir`` is MKCOL, ``unlink``
DELETE after a check that it is a file, ``rmdir`` DELETE after a PROPFIND Depth 1 found the folder empty (a WebDAV
DELETE of a collection takes everything in it), ``rename`` MOVE (folders too: ``WriteFeatures.folder_rename``) that
never overwrites anything POSIX would not. Modification times: PROPPATCH of ``getlastmodified``, which RFC 4918 makes
a protected property: nginx answers 405 and Apache 409, so ``keeps_mtime`` is False and ``set_mtime`` reports per call
(a store that refused once is not asked again). Limits seen on nginx: no ETags, so a file replaced by another client
with one of the same size within the same second keeps its version (size + mtime; replacements by this source get a
write mark); a MOVE into a missing folder creates it.

Concurrency: as ``web.HTTPSource`` (one shared client), plus a client for uploads that wait for ``100 Continue``;
the few facts the write side remembers (``httpstore.DavStore``) change only on the trio thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote

from ..errors import MalformedListingError
from ..http import redact_url
from ..values import parse_decimal
from . import davxml
from .base import Entry, SourceOptions
from .httpstore import (
    DavStore,
    PlainHTTPStore,
    Reply,
    check_url,
    dav_children,
    http_mtime_ns,
    propfind,
    raise_for_status,
    request,
)


class WebDAVSource(PlainHTTPStore, DavStore):
    """A folder tree on a WebDAV server. Create with :func:`create`; ``aclose`` releases connections."""

    _marks_versions = True  # nginx gives no ETags: versions of what this source wrote carry its marks

    def __init__(self, url: str, options: SourceOptions) -> None:
        super().__init__(options)
        self._origin, root = check_url(url, {"webdav": "http", "webdavs": "https"}, options, self._auth)
        self._root = root.rstrip("/")  # "" for the server's root
        scheme = "webdavs" if self._origin.startswith("https:") else "webdav"
        self.display_url = f"{scheme}://{self._origin.split('://', 1)[1]}{quote(root)}"

    def _abs(self, path: str) -> str:
        return f"{self._root}/{path}" if path else self._root or "/"

    def _dav_path(self, path: str) -> str:
        return self._abs(path)

    def _url(self, path: str, *, collection: bool = False) -> str:
        full = self._abs(path)
        if collection and not full.endswith("/"):
            full += "/"
        return self._origin + quote(full, safe="/")

    def _file_url(self, path: str) -> str:
        return self._url(path)

    async def _propfind(self, path: str, depth: int) -> list[davxml.DavResource]:
        # Folders are asked with their trailing slash (the root always is: a server may only know "/root/"); one
        # entry of unknown kind without, following a redirect to the slashed form (a folder, as Apache answers).
        collection = depth == 1 or not path
        reply, resources = await self._propfind_once(path, depth, collection)
        if reply.status_code in (301, 302, 307, 308) and not collection:
            collection = True
            reply, resources = await self._propfind_once(path, depth, collection)
        if reply.status_code != 207:
            raise_for_status(reply, f"PROPFIND {redact_url(self._url(path, collection=collection))}", path or "/")
        return resources

    async def _propfind_once(self, path: str, depth: int, collection: bool) -> tuple[Reply, list[davxml.DavResource]]:
        url = self._url(path, collection=collection)
        return await propfind(self._http(), url, depth=depth, auth=self._auth, policy=self._retry, path=path or "/")

    async def _entry(self, path: str, name: str, resource: davxml.DavResource) -> Entry:
        mtime_ns = resource.mtime_ns or 0
        if resource.is_collection:
            return Entry(name=name, is_dir=True, size=0, mtime_ns=mtime_ns, version=f"dav-dir:{resource.etag or ''}")
        etag = resource.etag
        size = resource.size
        if size is None:  # a server that omits getcontentlength: ask HEAD rather than guess
            url = self._url(path)
            reply = await request(self._http(), "HEAD", url, auth=self._auth, policy=self._retry, path=path)
            length = parse_decimal(reply.headers.get("content-length", ""))
            if reply.status_code != 200:
                raise_for_status(reply, f"HEAD {redact_url(url)}", path)
            if length is None:
                raise MalformedListingError("the server gives no size for the file", filename=path)
            size = length
            etag = etag or reply.headers.get("etag")
            mtime_ns = mtime_ns or http_mtime_ns(reply.headers.get("last-modified"))
        return Entry(
            name=name,
            is_dir=False,
            size=size,
            mtime_ns=mtime_ns,
            version=f"dav:{etag}:{size}:{mtime_ns}" if etag else f"dav:-:{size}:{mtime_ns}{self.version_mark(path)}",
            xattrs=(("user.etag", etag.encode()),) if etag else (),
        )

    async def stat(self, path: str) -> Entry:
        wanted = davxml.normalize_path(self._abs(path))  # unquoted, as davxml gives resource paths
        for resource in await self._propfind(path, 0):
            if resource.path == wanted:
                return await self._entry(path, path.rpartition("/")[2], resource)
        raise MalformedListingError(f"PROPFIND Depth 0 of {path or '/'!r} did not describe it", filename=path or "/")

    async def list_dir(self, path: str) -> AsyncIterator[Entry]:
        # Streamed: entries reach the reader as the reply is parsed (httpstore.propfind_pages).
        url = self._url(path, collection=True)
        pages = dav_children(
            self._http(),
            url,
            self._abs(path),
            auth=self._auth,
            policy=self._retry,
            path=path or "/",
            empty_is_missing=True,
        )
        async with contextlib.aclosing(pages):
            async for page in pages:
                for name, resource in page:
                    yield await self._entry(f"{path}/{name}" if path else name, name, resource)


def create(url: str, options: SourceOptions) -> WebDAVSource:
    return WebDAVSource(url, options)
