"""WebDAV PROPFIND: the request body and a defensive parser of the multistatus reply.

Shared by the CTERA source (the Portal's ``/ServicesPortal/webdav/``) and plain WebDAV stores. Replies are untrusted:
the XML is parsed with defusedxml (no entity expansion, no external entities), hrefs are unquoted and resolved
against the folder that was asked for, and any name that is empty, ``.``, ``..``, or holds ``/`` or NUL is skipped
with a warning (``docs/ctera-direct-io.md`` §14), as are duplicates and entries outside the folder.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import xml.etree.ElementTree as ET  # only for types and ParseError; parsing goes through defusedxml
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape as xml_escape

import defusedxml.ElementTree as SafeET

from ..errors import MalformedListingError
from .base import valid_name

log = logging.getLogger(__name__)

DAV = "DAV:"
CTERA_NS = "http://www.ctera.com/ns"

PROPFIND_BODY = (
    '<?xml version="1.0" encoding="utf-8"?>'
    f'<D:propfind xmlns:D="DAV:" xmlns:C="{CTERA_NS}"><D:prop>'
    "<D:resourcetype/><D:getcontentlength/><D:getlastmodified/><D:getetag/><D:displayname/><C:fileid/><C:guid/>"
    "</D:prop></D:propfind>"
).encode()

# A hostile server must not make one listing allocate without bound. 512 MiB of XML is ~1 M entries.
MAX_PROPFIND_BODY_BYTES = 512 * 1024 * 1024
# One <response> is a dozen elements and an href of a few KiB. Without a bound a hostile one could hold any amount:
# parsed, XML costs up to ~40 bytes per byte (one-letter nested elements), so one 512 MiB <response> would be 20 GB.
MAX_RESPONSE_ITEMS = 10_000  # elements plus attributes in one <response>
MAX_RESPONSE_TEXT_CHARS = 1024 * 1024  # characters of text in one <response>
# No token of a real reply (a tag with its attributes, a comment) comes near 1 MiB. A longer one is refused: expat
# before 2.6 re-parses a token that spans fed pieces from its start at every piece (CVE-2023-52425; 8 MiB of one
# attribute fed in 64 KiB pieces took 2.8 s, and the time grows with the square), and a start tag's attributes cost
# ~30 bytes per byte once parsed. feed() hands expat at most _FEED_PIECE_BYTES at a time so the bound is checked.
MAX_TOKEN_BYTES = 1024 * 1024
_FEED_PIECE_BYTES = 64 * 1024
# st_size is a signed 64-bit off_t: a larger getcontentlength could never be shown (pyfuse3 raises OverflowError).
MAX_SIZE_BYTES = 2**63 - 1
# What the XML parser raises for a reply it cannot read: expat's errors, defusedxml's refusals (ValueError subclasses),
# and LookupError for an XML declaration naming an encoding Python has no text codec for ("rot13", "hex", "nope").
_XML_ERRORS = (ET.ParseError, ValueError, LookupError)


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
    guid: str | None = None  # ctera:guid: how the Portal's change feed names the item (docs/ctera-direct-io.md §8.3)


def _tag(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


def normalize_path(path: str) -> str:
    """An absolute, already unquoted path in the form ``href_path`` produces (no trailing slash, no ``.``)."""
    path = posixpath.normpath(path) if path else "/"
    return "/" if path in ("", ".", "//") else path.rstrip("/") or "/"


def href_path(href: str) -> str:
    """The unquoted absolute path of an href (which may be a full URL), normalised without a trailing slash."""
    return normalize_path(unquote(urlsplit(href.strip()).path, errors="strict"))


@functools.lru_cache(maxsize=4096)  # the files of one folder often share a time: 5 us a parse, 0.1 us a hit
def _parse_mtime_ns(text: str | None) -> int | None:
    """The mtime of an HTTP date (or an ISO-8601 one), None when there is none we can read: absurd fields overflow
    (``OverflowError``) and a date without a zone near year 1 has no local timestamp (``ValueError``)."""
    if not text:
        return None
    try:
        moment: datetime = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        try:  # some servers use ISO-8601 (creationdate style) here
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    try:
        return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
    except (ValueError, OverflowError, OSError):
        return None


def _parse_size(text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    value = text.strip()
    # ASCII digits only (str.isdigit() accepts "²", which int() refuses); rejects "-1", "1e9", "0x10", absurd sizes.
    if not value.isascii() or not value.isdigit() or len(value) > 19 or int(value) > MAX_SIZE_BYTES:
        raise ValueError(f"invalid getcontentlength {value[:32]!r}")
    return int(value)


class MultistatusParser:
    """Incremental parser of a 207 body: ``feed`` chunks as they arrive and get back the ``<response>``s they
    completed; ``close`` at the end. Memory stays proportional to one ``<response>`` (plus the resources the caller
    keeps), not to the body: a folder of a million entries is never held as one XML tree.

    Parsing goes through defusedxml's expat parser (entity declarations and external references are refused); the
    root must be ``DAV:multistatus``; more than ``MAX_PROPFIND_BODY_BYTES`` is refused, as is a ``<response>`` over
    ``MAX_RESPONSE_ITEMS`` or ``MAX_RESPONSE_TEXT_CHARS`` and a token over ``MAX_TOKEN_BYTES``. Every failure is
    ``MalformedListingError``.
    """

    def __init__(self) -> None:
        self._collector = _ResponseCollector()
        self._parser = SafeET.XMLParser(target=self._collector)
        # defusedxml's parser is ElementTree's pure-Python one: it hands every start and end tag through Python
        # methods that rewrite names (``{ns}name``) before the target sees them. The collector takes expat's events
        # directly instead (a third of the parse); defusedxml's own handlers (entities, external references) and
        # ElementTree's default handler (undefined entities) stay as they were set.
        expat = self._parser.parser
        expat.StartElementHandler = self._collector.start
        expat.EndElementHandler = self._collector.end
        self._fed_bytes = 0
        self._quiet_bytes = 0  # fed since the parser last reported anything: the token it is inside is this long

    def feed(self, data: bytes | bytearray | memoryview) -> list[DavResource]:
        self._fed_bytes += len(data)
        if self._fed_bytes > MAX_PROPFIND_BODY_BYTES:
            raise MalformedListingError(f"PROPFIND reply exceeds the limit of {MAX_PROPFIND_BODY_BYTES} bytes")
        view = memoryview(data)
        try:
            for start in range(0, len(view), _FEED_PIECE_BYTES):
                piece = view[start : start + _FEED_PIECE_BYTES]
                events = self._collector.events
                self._parser.feed(piece)
                self._quiet_bytes = self._quiet_bytes + len(piece) if self._collector.events == events else 0
                if self._quiet_bytes > MAX_TOKEN_BYTES:
                    raise MalformedListingError(f"PROPFIND reply has a tag or comment over {MAX_TOKEN_BYTES} bytes")
        except _XML_ERRORS as exc:
            raise MalformedListingError(f"PROPFIND reply is not valid XML: {exc}") from exc
        return self._collector.take()

    def close(self) -> list[DavResource]:
        try:
            self._parser.close()
        except _XML_ERRORS as exc:
            raise MalformedListingError(f"PROPFIND reply is not valid XML: {exc}") from exc
        return self._collector.take()


def _expat_name(ns: str, name: str) -> str:
    """A name as expat hands it to the collector: namespace and local name joined by the ``}`` separator that
    ElementTree's parser asks expat for (no leading ``{``: that is ElementTree's own rewriting, which is skipped)."""
    return f"{ns}}}{name}"


_MULTISTATUS = _expat_name(DAV, "multistatus")
_RESPONSE = _expat_name(DAV, "response")
_HREF = _expat_name(DAV, "href")
_PROPSTAT = _expat_name(DAV, "propstat")
_STATUS = _expat_name(DAV, "status")
_PROP = _expat_name(DAV, "prop")
_RESOURCETYPE = _expat_name(DAV, "resourcetype")
_COLLECTION = _expat_name(DAV, "collection")
_GETCONTENTLENGTH = _expat_name(DAV, "getcontentlength")
_GETLASTMODIFIED = _expat_name(DAV, "getlastmodified")
_GETETAG = _expat_name(DAV, "getetag")
_DISPLAYNAME = _expat_name(DAV, "displayname")
_FILEID = _expat_name(CTERA_NS, "fileid")
_GUID = _expat_name(CTERA_NS, "guid")


class _ResponseCollector:
    """Parser target: reads each ``<response>`` straight from the parser's events into a ``DavResource``, keeping only
    the texts it needs (no element tree: building one cost two thirds of a listing's parse, 50 us per entry).

    What it reads is what an element tree would give: the text of the first ``href`` of the response (up to its first
    child element, as ``Element.text``), and of each property of the first ``prop`` of every ``propstat`` whose
    ``status`` says 200 (a later propstat's property replaces an earlier one's); ``resourcetype`` is a collection when a
    ``collection`` element is among its children. Depths: multistatus 0, response 1, href/propstat 2, status/prop 3,
    a property 4, its children 5."""

    def __init__(self) -> None:
        self._depth = 0
        self._done: list[DavResource] = []
        self.events = 0  # callbacks so far (MultistatusParser.feed watches it for overlong tokens)
        self._items = 0  # elements and attributes of the <response> being read
        self._text_chars = 0  # and its characters of text
        self._in_response = False
        self._href: str | None = None
        self._props: dict[str, str | None] = {}  # property tag -> its text, from the 200 propstats so far
        self._collection = False  # the resourcetype of those names a collection
        self._in_propstat = False
        self._status: str | None = None
        self._propstat_props: dict[str, str | None] | None = None  # the properties of this propstat's first prop
        self._propstat_collection = False
        self._prop_seen = False
        self._in_prop = False
        self._property: str | None = None  # the property (depth 4) being read
        self._capture: list[str] | None = None  # the text of the element being read (href, status, a property)
        self._capture_open = False  # until that element's first child: Element.text ends there
        self._capture_depth = 0

    def take(self) -> list[DavResource]:
        done, self._done = self._done, []
        return done

    def start(self, tag: str, attrib: list[str]) -> None:
        """expat's StartElementHandler (``ordered_attributes``: names and values alternate in ``attrib``)."""
        self.events += 1
        depth = self._depth
        self._depth = depth + 1
        self._capture_open = False  # a child element ends the text of its parent (Element.text)
        if depth == 0:
            if tag != _MULTISTATUS:
                raise MalformedListingError(f"PROPFIND reply is not a multistatus (root {tag[:64]!r})")
            return
        if depth == 1:
            if tag == _RESPONSE:
                self._in_response = True
                self._items = self._text_chars = 0
                self._href = None
                self._props = {}
                self._collection = False
            return
        if not self._in_response:
            return
        self._items += 1 + len(attrib) // 2
        if self._items > MAX_RESPONSE_ITEMS:
            raise MalformedListingError(
                f"PROPFIND reply has a response of over {MAX_RESPONSE_ITEMS} elements and attributes"
            )
        if depth == 2:
            if tag == _HREF and self._href is None:
                self._begin_capture(depth)
            elif tag == _PROPSTAT:
                self._in_propstat = True
                self._status = None
                self._propstat_props = None
                self._propstat_collection = False
                self._prop_seen = False
        elif depth == 3 and self._in_propstat:
            if tag == _STATUS and self._status is None:
                self._begin_capture(depth)
            elif tag == _PROP and not self._prop_seen:
                self._prop_seen = self._in_prop = True
                self._propstat_props = {}
        elif depth == 4 and self._in_prop:
            self._property = tag
            assert self._propstat_props is not None
            self._propstat_props[tag] = None
            self._begin_capture(depth)
        elif depth == 5 and self._property == _RESOURCETYPE and tag == _COLLECTION:
            self._propstat_collection = True

    def _begin_capture(self, depth: int) -> None:
        self._capture = []
        self._capture_open = True
        self._capture_depth = depth

    def end(self, tag: str) -> None:
        self.events += 1
        self._depth = depth = self._depth - 1
        capture = self._capture
        if capture is not None and depth == self._capture_depth:
            self._capture = None
            self._capture_open = False
            self._captured(depth, "".join(capture) if capture else None)
        if not self._in_response:
            return
        if depth == 4:
            self._property = None
        elif depth == 3:
            self._in_prop = False
        elif depth == 2 and self._in_propstat:
            self._in_propstat = False
            if self._propstat_props is not None and " 200 " in f" {self._status or ''} ":
                self._props.update(self._propstat_props)
                if _RESOURCETYPE in self._propstat_props:
                    self._collection = self._propstat_collection
        elif depth == 1:
            self._in_response = False
            resource = _resource_of(self._href, self._props, self._collection)
            if resource is not None:
                self._done.append(resource)

    def _captured(self, depth: int, text: str | None) -> None:
        if depth == 2:
            self._href = text if text is not None else ""
        elif depth == 3:
            self._status = text
        elif depth == 4 and self._propstat_props is not None and self._property is not None:
            self._propstat_props[self._property] = text

    def data(self, text: str) -> None:
        self.events += 1
        if self._in_response:
            self._text_chars += len(text)
            if self._text_chars > MAX_RESPONSE_TEXT_CHARS:
                raise MalformedListingError(
                    f"PROPFIND reply has a response of over {MAX_RESPONSE_TEXT_CHARS} characters"
                )
            if self._capture_open:
                assert self._capture is not None
                self._capture.append(text)

    def close(self) -> None:
        if self._depth != 0:
            raise MalformedListingError("PROPFIND reply ends inside an element (truncated?)")


def parse_multistatus(body: bytes) -> Iterator[DavResource]:
    """Every response of a whole 207 body (see ``MultistatusParser`` for the incremental form)."""
    parser = MultistatusParser()
    yield from parser.feed(body)
    yield from parser.close()


def _resource_of(href: str | None, props: dict[str, str | None], is_collection: bool) -> DavResource | None:
    if not href:
        log.warning("PROPFIND: skipping a response without href")
        return None
    try:
        path = href_path(href)
    except ValueError:  # urlsplit's (an unclosed "[", a netloc NFKC changes), or UnicodeDecodeError from unquote
        log.warning("PROPFIND: skipping an href that is not a URL, or not valid UTF-8 once unquoted")
        return None
    try:
        size = _parse_size(props.get(_GETCONTENTLENGTH))
    except ValueError as exc:
        log.warning("PROPFIND: skipping %r: %s", path, exc)
        return None
    file_id = props.get(_FILEID)
    guid = props.get(_GUID)
    return DavResource(
        path=path,
        is_collection=is_collection,
        size=size,
        mtime_ns=_parse_mtime_ns(props.get(_GETLASTMODIFIED)),
        etag=props.get(_GETETAG),
        file_id=file_id.strip() if file_id and file_id.strip() else None,
        display_name=props.get(_DISPLAYNAME),
        guid=guid.strip() if guid and guid.strip() else None,
    )


class Children:
    """The direct children of ``folder_path`` (an unquoted absolute path) in a Depth-1 reply, a page at a time:
    ``take(resources)`` gives (name, resource) pairs; the folder itself is kept as ``itself``, and entries elsewhere,
    invalid names and duplicates (across pages too) are dropped, the latter three with a warning."""

    def __init__(self, folder_path: str) -> None:
        self._folder = normalize_path(folder_path)
        self._seen: set[str] = set()
        self.itself: DavResource | None = None
        self.resources = 0  # every resource taken, the folder itself and the dropped ones included

    def take(self, resources: Iterable[DavResource]) -> list[tuple[str, DavResource]]:
        folder, seen = self._folder, self._seen
        out = []
        for resource in resources:
            self.resources += 1
            if resource.path == folder:
                self.itself = resource
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
            out.append((name, resource))
        return out


def proppatch_body(ns: str, name: str, value: str) -> bytes:
    """A ``PROPPATCH`` request body that sets property ``{ns}name`` to ``value`` (XML-escaped)."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<D:propertyupdate xmlns:D="DAV:" xmlns:P="{xml_escape(ns, {chr(34): "&quot;"})}"><D:set><D:prop>'
        f"<P:{name}>{xml_escape(value)}</P:{name}>"
        "</D:prop></D:set></D:propertyupdate>"
    ).encode()


def propstat_status(body: bytes, ns: str, name: str) -> int | None:
    """The status a multistatus (a ``PROPPATCH`` reply) gives property ``{ns}name``: that of the first ``propstat``
    naming it; None when none does or the reply cannot be read (nothing then says the property was set). The body
    is a few hundred bytes, bounded by the caller; parsed with defusedxml like every reply."""
    try:
        root = SafeET.fromstring(body)
    except _XML_ERRORS:
        log.debug("PROPPATCH reply is not valid XML")
        return None
    if root.tag != _tag(DAV, "multistatus"):
        return None
    wanted = _tag(ns, name)
    for response in root.iterfind(_tag(DAV, "response")):
        for propstat in response.iterfind(_tag(DAV, "propstat")):
            prop = propstat.find(_tag(DAV, "prop"))
            if prop is not None and prop.find(wanted) is not None:
                return _status_code(propstat.findtext(_tag(DAV, "status")) or "")
    return None


def _status_code(status_line: str) -> int | None:
    """The code of a DAV status line (``HTTP/1.1 409 Conflict``); None when it has none."""
    parts = status_line.split()
    if len(parts) >= 2 and parts[1].isascii() and parts[1].isdigit() and len(parts[1]) == 3:
        return int(parts[1])
    return None
