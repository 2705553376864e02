"""WebDAV PROPFIND for the portal: parse the request body, render a standard ``207 Multi-Status``.

``href``s are absolute paths under ``/ServicesPortal/webdav/``, every segment percent-encoded as UTF-8 with nothing
left safe (so space, ``%``, ``#``, ``?`` and non-ASCII all arrive intact); folders end with ``/``. The XML is built
with ElementTree (escaping is its job, not ours) and request bodies are parsed with defusedxml (no entity expansion).
"""

from __future__ import annotations

import email.utils
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import Final

import defusedxml.ElementTree as SafeET

from .index import Node

DAV: Final = "DAV:"
CTERA: Final = "http://www.ctera.com/ns"
WEBDAV_ROOT: Final = "/ServicesPortal/webdav"

ET.register_namespace("D", DAV)
ET.register_namespace("ctera", CTERA)


class BadPropfind(ValueError):
    """The PROPFIND body is not XML we understand (answered 400)."""


def href_for(node: Node) -> str:
    quoted = "/".join(urllib.parse.quote(part, safe="") for part in node.path.split("/")) if node.path else ""
    href = f"{WEBDAV_ROOT}/{quoted}"
    if node.is_dir and not href.endswith("/"):
        href += "/"
    return href


def _http_date(ns: int) -> str:
    return email.utils.formatdate(ns / 1e9, usegmt=True)


def _iso_date(ns: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resourcetype(node: Node, el: ET.Element) -> None:
    if node.is_dir:
        ET.SubElement(el, f"{{{DAV}}}collection")


def _text(fn: Callable[[Node], str | None]) -> Callable[[Node, ET.Element], bool]:
    def render(node: Node, el: ET.Element) -> bool:
        value = fn(node)
        if value is None:
            return False
        el.text = value
        return True

    return render


def _tree(fn: Callable[[Node, ET.Element], None]) -> Callable[[Node, ET.Element], bool]:
    def render(node: Node, el: ET.Element) -> bool:
        fn(node, el)
        return True

    return render


# (namespace, local name) -> renderer; a renderer returning False means "not defined for this resource" (404 propstat).
PROPERTIES: Final[dict[tuple[str, str], Callable[[Node, ET.Element], bool]]] = {
    (DAV, "resourcetype"): _tree(_resourcetype),
    (DAV, "displayname"): _text(lambda n: n.name),
    (DAV, "getcontentlength"): _text(lambda n: None if n.is_dir else str(n.size)),
    (DAV, "getlastmodified"): _text(lambda n: _http_date(n.mtime_ns)),
    (DAV, "creationdate"): _text(lambda n: _iso_date(n.mtime_ns)),
    (DAV, "getetag"): _text(lambda n: n.etag),
    (DAV, "getcontenttype"): _text(lambda n: None if n.is_dir else "application/octet-stream"),
    (CTERA, "fileid"): _text(lambda n: str(n.id)),
    (CTERA, "guid"): _text(lambda n: n.guid),
    # Read-only namespace: the ACL flags Cyberduck asks for, answered as a read-only share would.
    (CTERA, "readpermission"): _text(lambda n: "true"),
    (CTERA, "writepermission"): _text(lambda n: "false"),
    (CTERA, "executepermission"): _text(lambda n: "false"),
    (CTERA, "deletepermission"): _text(lambda n: "false"),
    (CTERA, "createdirectoriespermission"): _text(lambda n: "false"),
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
            names = []
            for prop in child:
                if not isinstance(prop.tag, str) or not prop.tag.startswith("{"):
                    raise BadPropfind("properties must be namespaced")
                ns, _, local = prop.tag[1:].partition("}")
                names.append((ns, local))
            return "prop", names
    raise BadPropfind("propfind names no allprop, propname or prop")


def _qname(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}" if ns else local


def multistatus(nodes: Iterable[Node], mode: str, requested: list[tuple[str, str]]) -> bytes:
    root = ET.Element(f"{{{DAV}}}multistatus")
    for node in nodes:
        response = ET.SubElement(root, f"{{{DAV}}}response")
        ET.SubElement(response, f"{{{DAV}}}href").text = href_for(node)
        found = ET.Element(f"{{{DAV}}}prop")
        missing = ET.Element(f"{{{DAV}}}prop")
        names = list(PROPERTIES) if mode in ("allprop", "propname") else requested
        for ns, local in names:
            renderer = PROPERTIES.get((ns, local))
            el = ET.Element(_qname(ns, local))
            if renderer is None:
                missing.append(el)
            elif mode == "propname" or renderer(node, el):
                found.append(el)
            elif mode == "prop":
                missing.append(el)
        for prop, status in ((found, "HTTP/1.1 200 OK"), (missing, "HTTP/1.1 404 Not Found")):
            if len(prop):
                propstat = ET.SubElement(response, f"{{{DAV}}}propstat")
                propstat.append(prop)
                ET.SubElement(propstat, f"{{{DAV}}}status").text = status
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def finite_depth_error() -> bytes:
    """The RFC 4918 precondition body servers send with 403 for ``Depth: infinity``."""
    root = ET.Element(f"{{{DAV}}}error")
    ET.SubElement(root, f"{{{DAV}}}propfind-finite-depth")
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))
