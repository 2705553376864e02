"""Hostile or broken input, without a server: scripted httpx.MockTransport replies and XML bodies parsed directly.

* Wrong JSON types and values in the block list, a JSON nesting bomb: ``MalformedMetadataError`` (EIO), never a crash.
* XML entity expansion and invalid or duplicate names in PROPFIND replies: refused, or the entry skipped.

A 2 GB JSON body from a real server, and the 100k-entry memory bound: tests/component/test_bad_input.py.
"""

from __future__ import annotations

import errno
import json

import pytest

from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import DirectFSError, MalformedListingError, MalformedMetadataError
from directfs.sources import davxml
from tests.support.blockserver import FAST_RETRY, SECRET, json_response, mock_file, payload


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b["chunks"][0].update(len=-1),
        lambda b: b["chunks"][0].update(len=10**18),
        lambda b: b["chunks"][0].update(len="65536"),
        lambda b: b["chunks"][0].update(len=65536.0),
        lambda b: b["chunks"][0].update(len=True),
        lambda b: b["chunks"][0].pop("len"),
        lambda b: b["chunks"][0].pop("url"),
        lambda b: b["chunks"][0].update(url="file:///etc/passwd"),
        lambda b: b["chunks"][0].update(url="https://\x00host/x"),
        lambda b: b.update(chunks={"0": {}}),
        lambda b: b.update(encrypt_info=[]),
        lambda b: b["encrypt_info"].update(data_encrypted="yes"),
        lambda b: b["encrypt_info"].pop("wrapped_key"),
        lambda b: b.update(compression_type=7),
        lambda b: b.update(actual_blocks_range={"file_size": -5}),
    ],
)
async def test_wrong_json_types_and_values_are_a_clear_error(mutate: object) -> None:
    import httpx

    body, _ = mock_file(payload(2 * 65536), [65536, 65536])
    mutate(body)  # type: ignore[operator]

    async def portal(request: httpx.Request) -> httpx.Response:
        return json_response(body)

    settings = DirectIOSettings(retry=FAST_RETRY)
    async with DirectIO(
        "https://portal.test", "AKID", SECRET, settings=settings, portal_transport=httpx.MockTransport(portal)
    ) as dio:
        with pytest.raises(DirectFSError) as info:
            await dio.metadata(1)
    assert isinstance(info.value, MalformedMetadataError) and info.value.errno == errno.EIO


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<D:multistatus xmlns:D="DAV:"><D:response><D:href>/ServicesPortal/webdav/&lol4;</D:href></D:response></D:multistatus>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>
<D:multistatus xmlns:D="DAV:"><D:response><D:href>&e;</D:href></D:response></D:multistatus>"""


@pytest.mark.parametrize("body", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["entity-expansion", "external-entity"])
def test_xml_entity_attacks_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedListingError):
        list(davxml.parse_multistatus(body))


@pytest.mark.expected_logs(r"PROPFIND: skipping")
def test_duplicate_and_invalid_names_are_skipped() -> None:
    body = b"".join(
        [
            b'<?xml version="1.0"?><D:multistatus xmlns:D="DAV:">',
            *(
                f"<D:response><D:href>/ServicesPortal/webdav/d/{href}</D:href><D:propstat><D:prop><D:resourcetype/>"
                f"<D:getcontentlength>1</D:getcontentlength></D:prop><D:status>HTTP/1.1 200 OK</D:status>"
                f"</D:propstat></D:response>".encode()
                for href in ("ok", "ok", "a%2Fb", "..", ".", "nul%00x", "x" * 300)
            ),
            b"</D:multistatus>",
        ]
    )
    names = [name for name, _ in davxml.Children("/ServicesPortal/webdav/d").take(davxml.parse_multistatus(body))]
    assert names == ["ok"] or names == ["ok", "x" * 300]


def test_json_nesting_bomb_is_a_clear_error() -> None:
    import trio

    deep = b"[" * 100_000 + b"]" * 100_000

    async def run() -> None:
        import httpx

        async def portal(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=deep)

        async with DirectIO("https://portal.test", "AKID", SECRET, portal_transport=httpx.MockTransport(portal)) as dio:
            with pytest.raises(MalformedMetadataError):
                await dio.metadata(1)

    trio.run(run)
    assert json.dumps([1])  # the json module is intact after the RecursionError path
