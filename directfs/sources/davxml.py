"""WebDAV PROPFIND: the request body and a defensive parser of the multistatus reply.

Shared by the CTERA source (the Portal's ``/ServicesPortal/webdav/``) and plain WebDAV stores. Replies are untrusted:
the XML is parsed with defusedxml (no entity expansion, no external entities), hrefs are unquoted and resolved
against the folder that was asked for, and any name that is empty, ``.``, ``..``, or holds ``/`` or NUL is skipped
with a warning (protocol notes section 14), as are duplicates and entries outside the folder.
"""

from __future__ import annotations

import logging
import posixpath
import xml.etree.ElementTree as ET  # only for types and ParseError; parsing goes through defusedxml
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlsplit

import defusedxml.ElementTree as SafeET

from ..errors import MalformedListingError
from .base import valid_name

log = logging.getLogger(__name__)

DAV = "DAV:"
CTERA_NS = "http://www.ctera.com/ns"

PROPFIND_BODY = (
    '<?xml version="1.0" encoding="utf-8"?>'
    f'<D:propfind xmlns:D="DAV:" xmlns:C="{CTERA_NS}"><D:prop>'
    "<D:resourcetype/><D:getcontentlength/><D:getlastmodified/><D:getetag/><D:displayname/><C:fileid/>"
    "</D:prop></D:propfind>"
).encode()

# A hostile server must not make one listing allocate without bound. 512 MiB of XML is ~1 M entries.
MAX_PROPFIND_BODY_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DavResource:
    """One ``<response>``: ``path`` is the unquoted absolute path of its href, without a trailing slash."""

    path: str
    is_collection: bool
    size: int | None
    mtime_ns: int | None
    etag: str | None
    file_id: str | None
    display_name: str | None


def _tag(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


def normalize_path(path: str) -> str:
    """An absolute, already unquoted path in the form ``href_path`` produces (no trailing slash, no ``.``)."""
    path = posixpath.normpath(path) if path else "/"
    return "/" if path in ("", ".", "//") else path.rstrip("/") or "/"


def href_path(href: str) -> str:
    """The unquoted absolute path of an href (which may be a full URL), normalised without a trailing slash."""
    return normalize_path(unquote(urlsplit(href.strip()).path, errors="strict"))


def _parse_mtime_ns(text: str | None) -> int | None:
    if not text:
        return None
    try:
        moment: datetime = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        try:  # some servers use ISO-8601 (creationdate style) here
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def _parse_size(text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    value = text.strip()
    if not value.isdigit() or len(value) > 19:  # rejects "-1", "1e9", "0x10", absurd sizes
        raise ValueError(f"invalid getcontentlength {value[:32]!r}")
    return int(value)


def parse_multistatus(body: bytes) -> Iterator[DavResource]:
    """Yield every response of a 207 body. Raises ``MalformedListingError`` when the body is not a multistatus."""
    if len(body) > MAX_PROPFIND_BODY_BYTES:
        raise MalformedListingError(f"PROPFIND reply of {len(body)} bytes exceeds the limit")
    try:
        root = SafeET.fromstring(body)
    except (ET.ParseError, ValueError) as exc:  # defusedxml raises ValueError subclasses for entity attacks
        raise MalformedListingError(f"PROPFIND reply is not valid XML: {exc}") from exc
    if root.tag != _tag(DAV, "multistatus"):
        raise MalformedListingError(f"PROPFIND reply is not a multistatus (root {root.tag[:64]!r})")
    for response in root.iterfind(_tag(DAV, "response")):
        href = response.findtext(_tag(DAV, "href"))
        if not href:
            log.warning("PROPFIND: skipping a response without href")
            continue
        try:
            path = href_path(href)
        except UnicodeDecodeError:
            log.warning("PROPFIND: skipping an href that is not valid UTF-8 once unquoted")
            continue
        props: dict[str, ET.Element] = {}
        for propstat in response.iterfind(_tag(DAV, "propstat")):
            status = propstat.findtext(_tag(DAV, "status")) or ""
            if " 200 " not in f" {status} ":
                continue
            prop = propstat.find(_tag(DAV, "prop"))
            if prop is not None:
                for child in prop:
                    props[child.tag] = child
        resourcetype = props.get(_tag(DAV, "resourcetype"))
        is_collection = resourcetype is not None and resourcetype.find(_tag(DAV, "collection")) is not None
        try:
            size = _parse_size(_text(props, DAV, "getcontentlength"))
        except ValueError as exc:
            log.warning("PROPFIND: skipping %r: %s", path, exc)
            continue
        file_id = _text(props, CTERA_NS, "fileid")
        yield DavResource(
            path=path,
            is_collection=is_collection,
            size=size,
            mtime_ns=_parse_mtime_ns(_text(props, DAV, "getlastmodified")),
            etag=_text(props, DAV, "getetag"),
            file_id=file_id.strip() if file_id and file_id.strip() else None,
            display_name=_text(props, DAV, "displayname"),
        )


def _text(props: dict[str, ET.Element], ns: str, name: str) -> str | None:
    element = props.get(_tag(ns, name))
    return element.text if element is not None else None


def children_of(folder_path: str, resources: Iterator[DavResource]) -> Iterator[tuple[str, DavResource]]:
    """The direct children of ``folder_path`` (an unquoted absolute path) in a Depth-1 reply, as (name, resource):
    the folder itself, entries elsewhere, invalid names and duplicates are dropped (the latter three with a warning)."""
    folder = normalize_path(folder_path)
    seen: set[str] = set()
    for resource in resources:
        if resource.path == folder:
            continue
        parent, name = posixpath.split(resource.path)
        if (parent or "/") != folder:
            log.warning("PROPFIND: skipping %r, not a direct child of %r", resource.path, folder)
            continue
        if not valid_name(name):
            log.warning("PROPFIND: skipping invalid name %r in %r", name[:80], folder)
            continue
        if name in seen:
            log.warning("PROPFIND: skipping duplicate name %r in %r", name[:80], folder)
            continue
        seen.add(name)
        yield name, resource
