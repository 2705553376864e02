"""PROPFIND reply parsing: standard replies, awkward names, and hostile XML."""

from __future__ import annotations

import calendar
import logging
from urllib.parse import quote

import pytest

from directfs.errors import MalformedListingError
from directfs.sources import davxml

ROOT = "/ServicesPortal/webdav/My Files"


def response(
    path: str, *, collection: bool = False, size: int | str | None = None, fileid: str | None = None, raw: bool = False
) -> str:
    props = "<D:resourcetype><D:collection/></D:resourcetype>" if collection else "<D:resourcetype/>"
    if size is not None:
        props += f"<D:getcontentlength>{size}</D:getcontentlength>"
    props += '<D:getlastmodified>Sat, 21 Nov 2026 06:00:00 GMT</D:getlastmodified><D:getetag>"e1"</D:getetag>'
    if fileid is not None:
        props += f"<C:fileid>{fileid}</C:fileid>"
    return (
        f"<D:response><D:href>{path if raw else quote(path)}</D:href><D:propstat><D:prop>{props}</D:prop>"
        "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
    )


def multistatus(*responses: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?><D:multistatus xmlns:D="DAV:" xmlns:C="http://www.ctera.com/ns">'
        + "".join(responses)
        + "</D:multistatus>"
    ).encode()


def test_standard_reply() -> None:
    body = multistatus(
        response(ROOT + "/", collection=True),
        response(ROOT + "/a b.txt", size=12, fileid="101"),
        response(ROOT + "/sub/", collection=True),
    )
    children = dict(davxml.Children(ROOT).take(davxml.parse_multistatus(body)))
    assert set(children) == {"a b.txt", "sub"}
    assert children["a b.txt"].size == 12
    assert children["a b.txt"].file_id == "101"
    assert children["a b.txt"].etag == '"e1"'
    assert children["a b.txt"].mtime_ns == calendar.timegm((2026, 11, 21, 6, 0, 0)) * 10**9
    assert children["sub"].is_collection


@pytest.mark.parametrize("name", ["100%.txt", "a#b", "what?", "naïve 日本.txt", "semi;colon", "plus+sign"])
def test_awkward_names_round_trip(name: str) -> None:
    body = multistatus(response(ROOT, collection=True), response(f"{ROOT}/{name}", size=1, fileid="7"))
    assert [n for n, _ in davxml.Children(ROOT).take(davxml.parse_multistatus(body))] == [name]


def test_full_url_hrefs() -> None:
    body = multistatus(
        response(ROOT, collection=True).replace("<D:href>", "<D:href>https://portal.example.com"),
        response(f"{ROOT}/x", size=3).replace("<D:href>", "<D:href>https://portal.example.com"),
    )
    assert [n for n, _ in davxml.Children(ROOT).take(davxml.parse_multistatus(body))] == ["x"]


def test_invalid_names_duplicates_and_strangers_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    body = multistatus(
        response(ROOT, collection=True),
        response(f"{ROOT}/ok", size=1),
        response(f"{ROOT}/ok", size=2),  # duplicate
        response(quote(f"{ROOT}/a") + "%2Fb", size=1, raw=True),  # an encoded slash: "a/b" is not one name
        response(f"{ROOT}/nul\x00", size=1),
        response("/elsewhere/file", size=1),
        response(f"{ROOT}/" + "x" * 300, size=1),  # longer than NAME_MAX
    )
    with caplog.at_level(logging.WARNING):
        children = list(davxml.Children(ROOT).take(davxml.parse_multistatus(body)))
    assert [n for n, _ in children] == ["ok"]
    assert children[0][1].size == 1
    assert len(caplog.records) >= 4


@pytest.mark.expected_logs(r"PROPFIND: skipping .*: invalid getcontentlength")
@pytest.mark.parametrize("size", ["-1", "1e9", "0x10", "12 bytes", "9" * 30])
def test_bad_sizes_skip_the_entry(size: str) -> None:
    body = multistatus(response(ROOT, collection=True), response(f"{ROOT}/f", size=size), response(f"{ROOT}/g", size=5))
    assert [n for n, _ in davxml.Children(ROOT).take(davxml.parse_multistatus(body))] == ["g"]


def test_non_200_propstat_is_ignored() -> None:
    body = multistatus(response(ROOT, collection=True), response(f"{ROOT}/f", size=5, fileid="9")).replace(
        b"HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>",
        b"HTTP/1.1 404 Not Found</D:status></D:propstat></D:response></D:multistatus>",
    )
    (_, resource), *_ = davxml.Children(ROOT).take(davxml.parse_multistatus(body))
    assert resource.size is None and resource.file_id is None


@pytest.mark.parametrize(
    "body",
    [
        b"not xml",
        b"<html><body>login</body></html>",
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        b'<D:multistatus xmlns:D="DAV:"><D:response><D:href>&lol2;</D:href></D:response></D:multistatus>',
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        b'<D:multistatus xmlns:D="DAV:"><D:response><D:href>&e;</D:href></D:response></D:multistatus>',
    ],
    ids=["garbage", "html", "billion-laughs", "external-entity"],
)
def test_hostile_or_wrong_bodies_raise_a_clear_error(body: bytes) -> None:
    with pytest.raises(MalformedListingError):
        list(davxml.parse_multistatus(body))
