"""Pure pieces of the reference portal: sizes, globs, chunking, URL signing, WebDAV XML."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from directfs.errors import ConfigError
from directfs.http import is_loopback_host
from directfs.server.app import MAX_LONGPOLL_MS, log_safe, longpoll_seconds
from directfs.server.chunking import cdc_spans, fixed_spans
from directfs.server.config import (
    CDC_MAX_BYTES,
    CDC_MIN_BYTES,
    DEMO_SECRET_ACCESS_KEY,
    EncodingRules,
    parse_compression_rule,
)
from directfs.server.index import Node
from directfs.server.store import UrlSigner
from directfs.server.webdav import BadPropfind, href_for, multistatus, parse_propfind
from directfs.units import parse_size


def test_sizes_use_the_shared_parser() -> None:
    # --block-size of the portal means what it means for every other command (directfs.units).
    assert parse_size("4M") == 4 * 1024 * 1024
    assert parse_size("512K") == 512 * 1024
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("65536") == 65536
    for bad in ("", "4X", "-1", "0.3"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_demo_secret_has_the_shape_of_a_ctera_secret() -> None:
    assert len(DEMO_SECRET_ACCESS_KEY) == 40


def test_rules_first_match_wins_and_globs_match_names_or_paths() -> None:
    rules = EncodingRules(
        compression_rules=(parse_compression_rule("*.log=gzip"), parse_compression_rule("logs/*=none")),
        native_globs=("media/*",),
    )
    assert rules.compression_for("deep/x.log").value == "GZIP"
    assert rules.compression_for("logs/x.txt").value == "NONE"
    assert rules.compression_for("x.txt").value == "SNAPPY"
    assert rules.is_native("media/a.mp4") and not rules.is_native("a.mp4")
    with pytest.raises(ConfigError):
        parse_compression_rule("*.log=zstd")
    with pytest.raises(ConfigError):
        parse_compression_rule("gzip")


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_fixed_spans_tile_the_file(size: int) -> None:
    spans = fixed_spans(size, 4096)
    assert sum(length for _, length in spans) == size
    assert all(length <= 4096 for _, length in spans)
    assert [off for off, _ in spans] == list(range(0, size, 4096))


def test_cdc_spans_are_bounded_and_content_defined() -> None:
    data = os.urandom(6 * 1024 * 1024)
    spans = cdc_spans(memoryview(data))
    assert sum(length for _, length in spans) == len(data)
    assert all(CDC_MIN_BYTES <= length <= CDC_MAX_BYTES for _, length in spans[:-1])
    # Content-defined: inserting bytes at the front shifts the data, and most cut points follow it.
    shifted = cdc_spans(memoryview(b"xyz" + data))
    ends = {off + length for off, length in spans}
    shifted_ends = {off + length - 3 for off, length in shifted}
    assert len(ends & shifted_ends) >= len(ends) - 2
    assert cdc_spans(memoryview(b"")) == []


def test_url_signer_refuses_tampering_and_expiry() -> None:
    signer = UrlSigner(b"k" * 32)
    url = signer.sign("/blocks/ab/cd", 60, now=1000)
    path, _, query = url.partition("?")
    params = dict(p.split("=") for p in query.split("&"))
    assert signer.check(path, params["expires"], params["sig"], now=1000) is None
    assert signer.check(path, params["expires"], params["sig"], now=1061) == "expired"
    assert signer.check("/blocks/ab/ce", params["expires"], params["sig"], now=1000) == "bad signature"
    assert signer.check(path, str(int(params["expires"]) + 1), params["sig"], now=1000) == "bad signature"
    assert signer.check(path, "", params["sig"], now=1000) is not None
    assert UrlSigner(b"j" * 32).check(path, params["expires"], params["sig"], now=1000) == "bad signature"


def test_url_signer_refuses_non_ascii_queries_without_raising() -> None:
    # str.isdigit() took "²" (int() then raised) and hmac.compare_digest raises TypeError for non-ASCII str.
    signer = UrlSigner(b"k" * 32)
    url = signer.sign("/blocks/ab/cd", 60, now=1000)
    path, _, query = url.partition("?")
    params = dict(p.split("=") for p in query.split("&"))
    assert signer.check(path, "²", params["sig"], now=1000) == "missing or malformed expires/sig"
    assert signer.check(path, "9" * 5000, params["sig"], now=1000) == "missing or malformed expires/sig"
    assert signer.check(path, params["expires"], "é" * 64, now=1000) == "missing or malformed expires/sig"


def _node(path: str, *, is_dir: bool = False) -> Node:
    return Node(path=path, name=path.rsplit("/", 1)[-1], id=1234, guid="g", is_dir=is_dir, size=5, mtime_ns=10**18)


def test_href_quoting() -> None:
    assert href_for(_node("a b/c%d#e?f")) == "/ServicesPortal/webdav/a%20b/c%25d%23e%3Ff"
    assert href_for(_node("Zürich", is_dir=True)) == "/ServicesPortal/webdav/Z%C3%BCrich/"
    assert href_for(_node("", is_dir=True)) == "/ServicesPortal/webdav/"


def test_propfind_parsing_and_rendering() -> None:
    assert parse_propfind(b"") == ("allprop", [])
    body = b'<propfind xmlns="DAV:" xmlns:c="http://www.ctera.com/ns"><prop><getetag/><c:fileid/></prop></propfind>'
    mode, names = parse_propfind(body)
    assert mode == "prop" and names == [("DAV:", "getetag"), ("http://www.ctera.com/ns", "fileid")]
    for bad in (b"<x", b"<a/>", b'<!DOCTYPE x [<!ENTITY e "boom">]><propfind xmlns="DAV:">&e;</propfind>'):
        with pytest.raises(BadPropfind):
            parse_propfind(bad)
    xml = multistatus([_node("a & <b>")], "prop", [*names, ("DAV:", "nope")])
    root = ET.fromstring(xml)
    ns = {"D": "DAV:", "c": "http://www.ctera.com/ns"}
    assert root.findtext("D:response/D:href", namespaces=ns) == "/ServicesPortal/webdav/a%20%26%20%3Cb%3E"
    assert root.findtext("D:response/D:propstat/D:prop/c:fileid", namespaces=ns) == "1234"
    statuses = [s.text for s in root.iterfind("D:response/D:propstat/D:status", namespaces=ns)]
    assert statuses == ["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found"]


# --- issue 13: pure parts of the serve hardening (the server-level tests are tests/component/test_serve_security.py)


def test_longpoll_timeout_is_a_finite_number_clamped_to_the_cap() -> None:
    assert longpoll_seconds(10000) == 10.0
    assert longpoll_seconds(0) == 0.0
    assert longpoll_seconds(250.5) == 0.2505
    assert longpoll_seconds(MAX_LONGPOLL_MS * 10) == MAX_LONGPOLL_MS / 1000  # clamped, not refused
    assert longpoll_seconds(10**5000) == MAX_LONGPOLL_MS / 1000  # no OverflowError from float()
    assert longpoll_seconds(1e308) == MAX_LONGPOLL_MS / 1000
    for bad in (float("nan"), float("inf"), float("-inf"), -1, -0.5, True, False, None, "10", [10], {"ms": 1}):
        assert longpoll_seconds(bad) is None, bad


def test_log_safe_escapes_what_could_forge_or_recolour_a_line() -> None:
    assert log_safe("/ServicesPortal/webdav/Zürich 東京 ☃.bin") == "/ServicesPortal/webdav/Zürich 東京 ☃.bin"
    assert log_safe('a\r\nb "c" \\d') == 'a\\x0d\\x0ab \\"c\\" \\\\d'
    assert log_safe("\x1b[31m\x7f\x85") == "\\x1b[31m\\x7f\\x85"
    assert log_safe("\u202eevil\u2028\u2029\u200b") == "\\u202eevil\\u2028\\u2029\\u200b"
    assert log_safe("\udcff") == "\\udcff"  # a lone surrogate (undecodable bytes)
    assert log_safe(None) == "None"
    for text in ("x\ny", "\x00", "\u2066", "\U000e0001"):
        escaped = log_safe(text)
        assert escaped.isprintable() and "\n" not in escaped, text


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.org", "localhost.example.org", ""):
        assert not is_loopback_host(host), host
