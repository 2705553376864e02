"""WebDAV PROPFIND for the portal: parse the request body, render a standard ``207 Multi-Status``.

``href``s are absolute paths under ``/ServicesPortal/webdav/``, every segment percent-encoded as UTF-8 with nothing
left safe (so space, ``%``, ``#``, ``?`` and non-ASCII all arrive intact); folders end with ``/``. Request bodies are
parsed with defusedxml (no entity expansion). The reply is written as text a response at a time, every value escaped
by ``xml.sax.saxutils`` (escaping is its job, not ours; ElementTree or XMLGenerator per element is several times
slower), and handed out in pieces (:func:`multistatus_chunks`), so a reply for a folder of 10,000 files never sits in
memory whole.

Bounds (issue 13 M6: a 79 KB request once made a 31 MB reply and blocked the event loop): a request names at most
``MAX_PROPFIND_PROPERTIES`` distinct properties (repeats are answered once), each name at most
``MAX_PROPERTY_NAME_CHARS``, in a body of at most ``MAX_PROPFIND_BODY_BYTES``; the server checks the body size.
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

ET.register_namespace("D", DAV)
ET.register_namespace("ctera", CTERA)
_XML_NS: Final = "http://www.w3.org/XML/1998/namespace"
_PREFIXES: Final = {DAV: "D", CTERA: "ctera"}  # the prefixes the reply always used; clients should not care


class BadPropfind(ValueError):
    """The PROPFIND body is not XML we understand, or asks for too much (answered 400)."""


def href_for(node: Node) -> str:
    quoted = "/".join(urllib.parse.quote(part, safe="") for part in node.path.split("/")) if node.path else ""
    href = f"{WEBDAV_ROOT}/{quoted}"
    if node.is_dir and not href.endswith("/"):
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
    # Read-only namespace: the ACL flags Cyberduck asks for, answered as a read-only share would.
    (CTERA, "readpermission"): lambda n: "true",
    (CTERA, "writepermission"): lambda n: "false",
    (CTERA, "executepermission"): lambda n: "false",
    (CTERA, "deletepermission"): lambda n: "false",
    (CTERA, "createdirectoriespermission"): lambda n: "false",
}


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


def multistatus_chunks(
    nodes: Iterable[Node],
    mode: str,
    requested: list[tuple[str, str]],
    *,
    chunk_bytes: int = MULTISTATUS_CHUNK_BYTES,
) -> Iterator[bytes]:
    """The ``207`` body for ``nodes``, in pieces of about ``chunk_bytes`` (their concatenation is the document)."""
    names = list(PROPERTIES) if mode in ("allprop", "propname") else list(dict.fromkeys(requested))
    prefixes = _prefixes(names)
    tags = {name: _qname(prefixes, *name) for name in names}
    declarations = "".join(f" xmlns:{prefix}={quoteattr(ns)}" for ns, prefix in prefixes.items())
    parts = [f'<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus{declarations}>']
    size = len(parts[0])
    for node in nodes:
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
            value = render(node)
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
