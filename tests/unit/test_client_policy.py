"""Client-side policies of issue 13, pure: which block URLs are fetched (M3), what a CA file adds to the trust store
(M4), which names enter the tree (L6), and the two options that reach them."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import pycurl  # type: ignore[import-untyped]
import pytest
import trustme

from directfs import http
from directfs.commands import common
from directfs.config import flag_settings
from directfs.http import HTTPSettings
from directfs.sources.base import SourceOptions, valid_name
from directfs.sources.ctera.client import BlockURLPolicy, DirectIOSettings
from directfs.transfer import _tls_options

LOOPBACK_HTTP_PORTAL = BlockURLPolicy.for_portal("http://127.0.0.1:8080", allow_insecure_storage=False)
LOOPBACK_HTTPS_PORTAL = BlockURLPolicy.for_portal("https://localhost:8443", allow_insecure_storage=False)
REMOTE_PORTAL = BlockURLPolicy.for_portal("https://portal.example.com", allow_insecure_storage=False)
REMOTE_PORTAL_INSECURE = BlockURLPolicy.for_portal("https://portal.example.com", allow_insecure_storage=True)
ALL = [LOOPBACK_HTTP_PORTAL, LOOPBACK_HTTPS_PORTAL, REMOTE_PORTAL, REMOTE_PORTAL_INSECURE]


def refusal(policy: BlockURLPolicy, url: str) -> str | None:
    return policy.refusal(urlsplit(url))


# --- M3: block URLs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam?X-Amz-Signature=TOPSECRET",
        "https://169.254.170.2/v2/credentials",  # ECS task credentials: link-local
        "http://169.254.1.1/x",
        "http://[fe80::1]/x",
        "http://[fe80::1%25eth0]/x",
        "https://[fd00:ec2::254]/latest",
        "https://100.100.100.200/latest/meta-data",  # Alibaba
        "https://168.63.129.16/machine",  # Azure WireServer
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.Google.Internal./computeMetadata/v1/",
        "http://metadata/computeMetadata/v1/",
        "http://2852039166/latest",  # 169.254.169.254 as one number: getaddrinfo and libcurl read it so
        "http://0xa9.0xfe.0xa9.0xfe/latest",
        "http://0251.0376.0251.0376/latest",
        "http://169.254.43518/latest",
        "http://169.254.169.254./latest",
        "http://[::ffff:169.254.169.254]/latest",
        "http://[64:ff9b::a9fe:a9fe]/latest",  # NAT64
        "https://224.0.0.1/x",
        "https://255.255.255.255/x",
        "https://[ff02::1]/x",
        "https://s3.example.com\\@169.254.169.254/x",  # parsers disagree on where this host ends
        "https://user:pw@s3.example.com/x",
    ],
)
def test_link_local_metadata_and_ambiguous_hosts_are_always_refused(url: str) -> None:
    for policy in ALL:
        why = refusal(policy, url)
        assert why is not None, (policy, url)
        assert "TOPSECRET" not in why and "?" not in why


def test_the_refusal_names_the_host() -> None:
    why = refusal(REMOTE_PORTAL_INSECURE, "http://169.254.169.254/latest?X-Amz-Signature=TOPSECRET")
    assert why == "block URL to '169.254.169.254' refused: a cloud metadata service"
    assert refusal(REMOTE_PORTAL, "https://[fe80::2]/x") == "block URL to 'fe80::2' refused: a link-local address"


@pytest.mark.parametrize(
    "url",
    [
        "https://bucket.s3.amazonaws.com/blocks/1?X-Amz-Signature=s",
        "https://10.0.0.5:9000/bucket/1",  # on-premises object storage on a private network
        "https://192.168.1.20/bucket/1",
        "https://[2001:db8::1]/bucket/1",
        "https://acct.blob.core.windows.net/c/1",
        "https://metadata.example.com/x",  # only the exact metadata names
    ],
)
def test_https_to_other_hosts_is_accepted_from_any_portal(url: str) -> None:
    for policy in ALL:
        assert refusal(policy, url) is None, (policy, url)


@pytest.mark.parametrize(
    "url",
    [
        "http://bucket.s3.amazonaws.com/blocks/1",
        "http://10.0.0.5:9000/bucket/1",
        "HTTP://s3.example.com/x",
    ],
)
def test_plain_http_only_from_a_loopback_http_portal_or_when_allowed(url: str) -> None:
    assert refusal(LOOPBACK_HTTP_PORTAL, url) is None
    assert refusal(REMOTE_PORTAL_INSECURE, url) is None
    for policy in (LOOPBACK_HTTPS_PORTAL, REMOTE_PORTAL):
        why = refusal(policy, url)
        assert why is not None and "plain http://" in why and "--allow-insecure-storage" in why


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:9000/b",
        "https://127.1.2.3/b",
        "https://[::1]/b",
        "https://[::ffff:127.0.0.1]/b",
        "https://localhost/b",
        "https://LOCALHOST./b",
        "https://store.localhost/b",
        "https://0.0.0.0/b",
        "https://2130706433/b",  # 127.0.0.1
        "https://0x7f.1/b",
    ],
)
def test_this_machine_only_from_a_portal_on_it_or_when_allowed(url: str) -> None:
    for policy in (LOOPBACK_HTTP_PORTAL, LOOPBACK_HTTPS_PORTAL, REMOTE_PORTAL_INSECURE):
        assert refusal(policy, url) is None, (policy, url)
    why = refusal(REMOTE_PORTAL, url)
    assert why is not None and "this machine" in why


def test_a_loopback_https_portal_still_needs_https_blocks() -> None:
    assert refusal(LOOPBACK_HTTPS_PORTAL, "https://127.0.0.1:9/b") is None
    assert "plain http://" in (refusal(LOOPBACK_HTTPS_PORTAL, "http://127.0.0.1:9/b") or "")


def test_the_policy_follows_the_settings() -> None:
    assert BlockURLPolicy.for_portal("http://[::1]:80", allow_insecure_storage=False) == BlockURLPolicy(True, True)
    assert BlockURLPolicy.for_portal("https://p.example", allow_insecure_storage=False) == BlockURLPolicy(False, False)
    assert BlockURLPolicy.for_portal("https://p.example", allow_insecure_storage=True) == BlockURLPolicy(True, True)


# --- the options that reach the client ------------------------------------------------------------------------------


def parse(*argv: str) -> SourceOptions:
    parser = argparse.ArgumentParser()
    common.add_credential_arguments(parser)
    common.add_tls_arguments(parser)
    settings = flag_settings(parser.parse_args(argv), {})
    return common.build_source_options(settings, common.resolve_credentials(settings, {}))


def test_allow_insecure_storage_reaches_the_client() -> None:
    assert DirectIOSettings.from_options(parse()).allow_insecure_storage is False
    assert DirectIOSettings.from_options(parse("--allow-insecure-storage")).allow_insecure_storage is True


def test_storage_ca_file_is_for_storage_only(tmp_path: Path) -> None:
    portal_ca, storage_ca = tmp_path / "portal.pem", tmp_path / "storage.pem"
    portal_ca.write_text("-")
    storage_ca.write_text("-")
    both = DirectIOSettings.from_options(parse("--ca-file", str(portal_ca), "--storage-ca-file", str(storage_ca)))
    assert (both.portal.ca_file, both.storage.ca_file) == (str(portal_ca), str(storage_ca))
    only_portal = DirectIOSettings.from_options(parse("--ca-file", str(portal_ca)))
    assert only_portal.storage.ca_file == str(portal_ca)  # unset: as --ca-file
    only_storage = SourceOptions(storage_ca_file=str(storage_ca))
    assert (only_storage.http_settings().ca_file, only_storage.http_settings(storage=True).ca_file) == (
        None,
        str(storage_ca),
    )
    with pytest.raises(common.ConfigError, match="storage-ca-file"):
        parse("--storage-ca-file", str(tmp_path / "missing.pem"))


# --- M4: a CA file adds to the system roots --------------------------------------------------------------------------


@pytest.fixture
def system_and_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """Two CAs: one as the system store (SSL_CERT_FILE, as OpenSSL and so Python find it), one for --ca-file."""
    system, extra = tmp_path / "system.pem", tmp_path / "extra.pem"
    trustme.CA(organization_name="System Root").cert_pem.write_to_path(str(system))
    trustme.CA(organization_name="Extra Root").cert_pem.write_to_path(str(extra))
    monkeypatch.setenv("SSL_CERT_FILE", str(system))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))
    return str(system), str(extra)


def organizations(context: ssl.SSLContext) -> set[str]:
    names = set()
    for cert in context.get_ca_certs():
        for rdn in cert["subject"]:
            for key, value in rdn:
                if key == "organizationName":
                    names.add(value)
    return names


def test_ssl_context_trusts_the_system_roots_and_the_ca_file(system_and_extra: tuple[str, str]) -> None:
    _, extra = system_and_extra
    context = http.ssl_context(HTTPSettings(ca_file=extra))
    assert {"System Root", "Extra Root"} <= organizations(context)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_curl_gets_one_bundle_of_the_system_roots_and_the_ca_file(system_and_extra: tuple[str, str]) -> None:
    system, extra = system_and_extra
    options, unset = _tls_options(HTTPSettings(ca_file=extra))
    values = dict(options)
    bundle = values[pycurl.CAINFO_BLOB]
    assert Path(system).read_bytes().strip() in bundle and Path(extra).read_bytes().strip() in bundle
    assert values[pycurl.CAINFO] == system  # overridden by the blob; kept so no build's default is used
    assert pycurl.CAPATH in unset  # SSL_CERT_DIR names no folder here
    plain, _ = _tls_options(HTTPSettings())
    assert pycurl.CAINFO_BLOB not in dict(plain)


# --- L6: names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "line\nbreak",
        "carriage\rreturn",
        "tab\there",
        "bell\x07",
        "esc\x1b[2Jclear",
        "del\x7f",
        "csi\x9b2J",  # the one-character C1 CSI
        "evil\u202etxt.exe",  # RIGHT-TO-LEFT OVERRIDE: shows as evilexe.txt
        "\u202aembed",
        "\u202dLRO",
        "\u2066isolate\u2069",
        "\u2067rli",
        "\u2068fsi",
        "nul\x00",
        "a/b",
        ".",
        "..",
        "",
        "x" * 256,
        "surrogate\udcff",
    ],
)
def test_names_with_controls_or_bidi_overrides_never_enter_the_tree(name: str) -> None:
    assert not valid_name(name)


@pytest.mark.parametrize(
    "name", ["plain", "Zürich 東京 ☃.bin", "מסמך.txt", "with space", "#%?&", "x" * 255, "é" * 127, "\u200fRLM"]
)
def test_ordinary_names_still_do(name: str) -> None:
    assert valid_name(name)
