"""WebDAV PROPFIND for the portal: parse the request body, render a standard ``207 Multi-Status``.

``href``s are absolute paths under ``/ServicesPortal/webdav/``, every segment percent-encoded as UTF-8 with nothing
left safe (so space, ``%``, ``#``, ``?`` and non-ASCII all arrive intact); folders end with ``/``. Request bodies are
parsed with defusedxml (no entity expansion). The reply is written as text a response at a time, every value escaped
by ``xml.sax.saxutils`` (escaping is its job, not ours; ElementTree or XMLGenerator per element is several times
slower), and handed out in pieces (:func:`multistatus_chunks`), so a reply for a folder of 10,000 files never sits in
memory whole. Each entry's ``<D:response>`` is kept once rendered (:class:`ResponseCache`): a folder listed again, by
the same kind of request, costs a join of strings, not a render (10,000 entries: ~170 ms rendered, ~15 ms again).

Bounds (issue 13 M6: a 79 KB request once made a 31 MB reply and blocked the event loop): a request names at most
``MAX_PROPFIND_PROPERTIES`` distinct properties (repeats are answered once), each name at most
``MAX_PROPERTY_NAME_CHARS``, in a body of at most ``MAX_PROPFIND_BODY_BYTES``; the server checks the body size.

PROPPATCH (``--writable``, docs/serve-writes.md): :func:`parse_proppatch` reads a ``DAV:propertyupdate`` under the
same bounds; the only property a client may set is ``DAV:getlastmodified`` (the mtime). :func:`proppatch_multistatus`
renders the answer.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from typing import Final
from xml.sax.saxutils import escape, quoteattr

import defusedxml.ElementTree as SafeET

from .index import Node

DAV: Final = "DAV:"
CTERA: Final = "http://www.ctera.com/ns"
WEBDAV_ROOT: Final = "/ServicesPortal/webdav"

# Real clients ask for 5 to 20 properties (Windows, macOS, Cyberduck, cterasdk ask for fewer than 20). 64 leaves room,
# and with the name limit bounds one response element to ~20 KiB whatever the request.
MAX_PROPFIND_PROPERTIES: Final = 64
# Namespace URI plus local name; real ones are under 60 characters.
MAX_PROPERTY_NAME_CHARS: Final = 256
# 64 properties of 256 characters with their namespace declarations fit in ~40 KiB.
MAX_PROPFIND_BODY_BYTES: Final = 64 * 1024
# The multistatus is handed out in pieces of about this size: memory per reply stays bounded, and rendering one
# piece takes a few milliseconds, so the event loop is never held for long.
MULTISTATUS_CHUNK_BYTES: Final = 256 * 1024
# Rendered responses kept: every entry of the 50,000-entry benchmark trees twice over (two kinds of request), at
# ~500 bytes each (~1 KB for allprop) about 100 MB at most; emptied whole when full.
RESPONSE_CACHE_ENTRIES: Final = 200_000

ET.register_namespace("D", DAV)
ET.register_namespace("ctera", CTERA)
_XML_NS: Final = "http://www.w3.org/XML/1998/namespace"
_PREFIXES: Final = {DAV: "D", CTERA: "ctera"}  # the prefixes the reply always used; clients should not care


class BadPropfind(ValueError):
    """The PROPFIND body is not XML we understand, or asks for too much (answered 400)."""


class BadProppatch(ValueError):
    """The PROPPATCH body is not a ``DAV:propertyupdate`` we understand, or asks for too much (answered 400)."""


def href_for(node: Node) -> str:
    return href_for_path(node.path, is_dir=node.is_dir)


def href_for_path(path: str, *, is_dir: bool) -> str:
    quoted = "/".join(urllib.parse.quote(part, safe="") for part in path.split("/")) if path else ""
    href = f"{WEBDAV_ROOT}/{quoted}"
    if is_dir and not href.endswith("/"):
        href += "/"
    return href


def _http_date(ns: int) -> str:
    return email.utils.formatdate(ns / 1e9, usegmt=True)


def _iso_date(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# A property's value: text, or the empty child elements it holds (resourcetype's DAV:collection, the only one).
_Value = str | tuple[tuple[str, str], ...]


def _resourcetype(node: Node) -> _Value:
    return ((DAV, "collection"),) if node.is_dir else ()


# (namespace, local name) -> value; None means "not defined for this resource" (404 propstat when asked for by name).
PROPERTIES: Final[dict[tuple[str, str], Callable[[Node], _Value | None]]] = {
    (DAV, "resourcetype"): _resourcetype,
    (DAV, "displayname"): lambda n: n.name,
    (DAV, "getcontentlength"): lambda n: None if n.is_dir else str(n.size),
    (DAV, "getlastmodified"): lambda n: _http_date(n.mtime_ns),
    (DAV, "creationdate"): lambda n: _iso_date(n.mtime_ns),
    (DAV, "getetag"): lambda n: n.etag,
    (DAV, "getcontenttype"): lambda n: None if n.is_dir else "application/octet-stream",
    (CTERA, "fileid"): lambda n: str(n.id),
    (CTERA, "guid"): lambda n: n.guid,
    # The ACL flags Cyberduck asks for, answered as a read-only share would; "true" with --writable (WRITE_FLAGS).
    (CTERA, "readpermission"): lambda n: "true",
    (CTERA, "writepermission"): lambda n: "false",
    (CTERA, "executepermission"): lambda n: "false",
    (CTERA, "deletepermission"): lambda n: "false",
    (CTERA, "createdirectoriespermission"): lambda n: "false",
}
# What a writable portal lets its user do: the flags answered "true" there.
WRITE_FLAGS: Final = frozenset(
    {(CTERA, "writepermission"), (CTERA, "deletepermission"), (CTERA, "createdirectoriespermission")}
)
LASTMODIFIED: Final = (DAV, "getlastmodified")
# A real PROPPATCH sets a handful of properties (Windows sends four); 64 as for PROPFIND, each value at most 1 KiB.
MAX_PROPPATCH_PROPERTIES: Final = 64
MAX_PROPERTY_VALUE_CHARS: Final = 1024
MAX_PROPPATCH_BODY_BYTES: Final = 128 * 1024


def parse_http_date(text: str) -> int | None:
    """An HTTP date with its zone (RFC 1123: ``Tue, 15 Nov 1994 12:45:26 GMT``) as nanoseconds since the epoch, or
    None. Whole seconds, as the format has; a date without a zone, or before 1970, is refused."""
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    seconds = int(when.timestamp())
    return seconds * 10**9 if seconds >= 0 else None


def parse_proppatch(body: bytes) -> list[tuple[str, tuple[str, str], str | None]]:
    """The instructions of a ``DAV:propertyupdate``, in order: ("set", (ns, name), text) or ("remove", (ns, name),
    None). BadProppatch when malformed, empty or too big."""
    try:
        root = SafeET.fromstring(body)
    except Exception as exc:  # defusedxml raises ParseError or its own DefusedXmlException subclasses
        raise BadProppatch(f"not well-formed XML: {exc}") from None
    if root.tag != f"{{{DAV}}}propertyupdate":
        raise BadProppatch("the body is not a DAV:propertyupdate")
    found: list[tuple[str, tuple[str, str], str | None]] = []
    for instruction in root:
        action = {f"{{{DAV}}}set": "set", f"{{{DAV}}}remove": "remove"}.get(str(instruction.tag))
        if action is None:
            raise BadProppatch("a propertyupdate holds only DAV:set and DAV:remove")
        for prop_block in instruction:
            if prop_block.tag != f"{{{DAV}}}prop":
                raise BadProppatch(f"DAV:{action} holds DAV:prop")
            for prop in prop_block:
                if not isinstance(prop.tag, str) or not prop.tag.startswith("{"):
                    raise BadProppatch("properties must be namespaced")
                if len(prop.tag) - 2 > MAX_PROPERTY_NAME_CHARS:
                    raise BadProppatch(f"a property name is longer than {MAX_PROPERTY_NAME_CHARS} characters")
                text = "".join(prop.itertext()) if action == "set" else None
                if text is not None and len(text) > MAX_PROPERTY_VALUE_CHARS:
                    raise BadProppatch(f"a property value is longer than {MAX_PROPERTY_VALUE_CHARS} characters")
                ns, _, local = prop.tag[1:].partition("}")
                found.append((action, (ns, local), text))
                if len(found) > MAX_PROPPATCH_PROPERTIES:
                    raise BadProppatch(f"too many properties: at most {MAX_PROPPATCH_PROPERTIES}")
    if not found:
        raise BadProppatch("the propertyupdate sets or removes nothing")
    return found


_REASONS: Final = {200: "OK", 403: "Forbidden", 409: "Conflict", 424: "Failed Dependency"}


def proppatch_multistatus(href: str, results: list[tuple[tuple[str, str], int]]) -> bytes:
    """The ``207`` answer of a PROPPATCH: one propstat per status, naming its properties (each once)."""
    by_status: dict[int, dict[tuple[str, str], None]] = {}
    for name, status in results:
        by_status.setdefault(status, {})[name] = None
    prefixes = _prefixes(name for name, _ in results)
    declarations = "".join(f" xmlns:{prefix}={quoteattr(ns)}" for ns, prefix in prefixes.items())
    parts = [f'<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus{declarations}><D:response>']
    parts.append(f"<D:href>{escape(href)}</D:href>")
    for status, names in by_status.items():
        props = "".join(f"<{_qname(prefixes, *name)}/>" for name in names)
        parts.append(
            f"<D:propstat><D:prop>{props}</D:prop>"
            f"<D:status>HTTP/1.1 {status} {_REASONS.get(status, '')}</D:status></D:propstat>"
        )
    parts.append("</D:response></D:multistatus>")
    return "".join(parts).encode()


def parse_propfind(body: bytes) -> tuple[str, list[tuple[str, str]]]:
    """("allprop", []), ("propname", []) or ("prop", [(ns, name), ...]). An empty body means allprop (RFC 4918)."""
    if not body.strip():
        return "allprop", []
    try:
        root = SafeET.fromstring(body)
    except Exception as exc:  # defusedxml raises ParseError or its own DefusedXmlException subclasses
        raise BadPropfind(f"not well-formed XML: {exc}") from None
    if root.tag != f"{{{DAV}}}propfind":
        raise BadPropfind("the body is not a DAV:propfind")
    for child in root:
        if child.tag == f"{{{DAV}}}allprop":
            return "allprop", []
        if child.tag == f"{{{DAV}}}propname":
            return "propname", []
        if child.tag == f"{{{DAV}}}prop":
            names: dict[tuple[str, str], None] = {}  # insertion-ordered set: a repeated name is answered once
            for prop in child:
                if not isinstance(prop.tag, str) or not prop.tag.startswith("{"):
                    raise BadPropfind("properties must be namespaced")
                if len(prop.tag) - 2 > MAX_PROPERTY_NAME_CHARS:
                    raise BadPropfind(f"a property name is longer than {MAX_PROPERTY_NAME_CHARS} characters")
                ns, _, local = prop.tag[1:].partition("}")
                names[(ns, local)] = None
                if len(names) > MAX_PROPFIND_PROPERTIES:
                    raise BadPropfind(f"too many properties: at most {MAX_PROPFIND_PROPERTIES} distinct names")
            return "prop", list(names)
    raise BadPropfind("propfind names no allprop, propname or prop")


def _prefixes(names: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Namespace URI -> prefix: ours for DAV: and CTERA, ``ns0``, ``ns1``... for the others a request names."""
    prefixes = dict(_PREFIXES)
    for ns, _ in names:
        if ns and ns not in prefixes and ns != _XML_NS:  # the xml prefix is predeclared and must not be rebound
            prefixes[ns] = f"ns{len(prefixes) - len(_PREFIXES)}"
    return prefixes


def _qname(prefixes: dict[str, str], ns: str, local: str) -> str:
    # Local names and namespaces come from our table or from a request defusedxml parsed, so they are valid XML
    # names; only text and attribute values need escaping (done by xml.sax.saxutils below).
    if not ns:
        return local
    return f"{'xml' if ns == _XML_NS else prefixes[ns]}:{local}"


class ResponseCache:
    """Rendered ``<D:response>`` elements, keyed by everything that goes into one: the request's kind (mode, the names
    asked for, in order, which fix the prefixes too; and whether the portal is writable) and the node's path, id,
    guid, kind, size and mtime (a new version has a new id or stat, so it is never answered from an old entry). A
    plain dict emptied when full: a lookup and a store are each atomic under the GIL, so the worker threads that
    render replies share it without a lock."""

    def __init__(self, max_entries: int = RESPONSE_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[object, ...], str] = {}
        self._kinds: dict[tuple[object, ...], int] = {}

    def kind(self, mode: str, names: list[tuple[str, str]], writable: bool) -> int:
        """A small number for a kind of request (so the per-entry keys do not hash the names again)."""
        key = (mode, tuple(names), writable)
        found = self._kinds.get(key)
        if found is None:
            if len(self._kinds) >= self.max_entries:  # a client inventing request kinds: start over
                self._kinds.clear()
                self._entries.clear()
            found = self._kinds.setdefault(key, len(self._kinds))
        return found

    def get(self, key: tuple[object, ...]) -> str | None:
        return self._entries.get(key)

    def put(self, key: tuple[object, ...], value: str) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = value


def multistatus_chunks(
    nodes: Iterable[Node],
    mode: str,
    requested: list[tuple[str, str]],
    *,
    chunk_bytes: int = MULTISTATUS_CHUNK_BYTES,
    writable: bool = False,
    cache: ResponseCache | None = None,
) -> Iterator[bytes]:
    """The ``207`` body for ``nodes``, in pieces of about ``chunk_bytes`` (their concatenation is the document).
    ``writable``: the portal accepts writes, and its ACL flags say so. ``cache``: rendered responses to reuse."""
    names = list(PROPERTIES) if mode in ("allprop", "propname") else list(dict.fromkeys(requested))
    prefixes = _prefixes(names)
    tags = {name: _qname(prefixes, *name) for name in names}
    declarations = "".join(f" xmlns:{prefix}={quoteattr(ns)}" for ns, prefix in prefixes.items())
    parts = [f'<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus{declarations}>']
    size = len(parts[0])
    kind = cache.kind(mode, names, writable) if cache is not None else 0
    for node in nodes:
        key = (kind, node.path, node.id, node.guid, node.is_dir, node.size, node.mtime_ns)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            parts.append(cached)
            size += len(cached)
            if size >= chunk_bytes:
                yield "".join(parts).encode()
                parts, size = [], 0
            continue
        found: list[str] = []
        missing: list[str] = []
        for name in names:
            tag = tags[name]
            render = PROPERTIES.get(name)
            if render is None:
                missing.append(f"<{tag}/>")
                continue
            if mode == "propname":
                found.append(f"<{tag}/>")
                continue
            value = "true" if writable and name in WRITE_FLAGS else render(node)
            if value is None:
                if mode == "prop":  # asked for by name: say it is not defined here; allprop just leaves it out
                    missing.append(f"<{tag}/>")
            elif isinstance(value, str):
                found.append(f"<{tag}>{escape(value)}</{tag}>")
            else:
                children = "".join(f"<{_qname(prefixes, *child)}/>" for child in value)
                found.append(f"<{tag}>{children}</{tag}>" if children else f"<{tag}/>")
        piece = f"<D:response><D:href>{escape(href_for(node))}</D:href>"
        if found:
            piece += f"<D:propstat><D:prop>{''.join(found)}</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>"
        if missing:
            piece += (
                f"<D:propstat><D:prop>{''.join(missing)}</D:prop>"
                "<D:status>HTTP/1.1 404 Not Found</D:status></D:propstat>"
            )
        piece += "</D:response>"
        if cache is not None:
            cache.put(key, piece)
        parts.append(piece)
        size += len(piece)
        if size >= chunk_bytes:
            yield "".join(parts).encode()
            parts, size = [], 0
    parts.append("</D:multistatus>")
    yield "".join(parts).encode()


def multistatus(nodes: Iterable[Node], mode: str, requested: list[tuple[str, str]]) -> bytes:
    """The whole ``207`` body (for small replies and tests; the server streams :func:`multistatus_chunks`)."""
    return b"".join(multistatus_chunks(nodes, mode, requested))


def finite_depth_error() -> bytes:
    """The RFC 4918 precondition body servers send with 403 for ``Depth: infinity``."""
    root = ET.Element(f"{{{DAV}}}error")
    ET.SubElement(root, f"{{{DAV}}}propfind-finite-depth")
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))
