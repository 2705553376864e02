"""Security against the reference portal over HTTPS (a trustme CA): TLS verification on by default, Portal and
storage separately switchable, and no secret in exception text. Secrets in argv, logs and files of a mount, and
file:// symlinks through a mount: tests/mount/test_security.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import httpx
import pytest
import trustme

from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import BlockListConnectionError, DirectFSError, DownloadConnectionError
from directfs.http import HTTPSettings
from tests.support.blockserver import FAST_RETRY, payload
from tests.support.portal import Portal, start_portal


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_portal(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[tuple[Portal, str]]:
    work = tmp_path_factory.mktemp("tls")
    tree = work / "tree"
    tree.mkdir()
    (tree / "f.bin").write_bytes(payload(200_000, seed=1))
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = work / "cert.pem", work / "key.pem", work / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    args = ["--block-size", "64K", "--tls-cert", str(cert_path), "--tls-key", str(key_path)]
    with start_portal(tree, extra_args=args) as portal:
        assert portal.url.startswith("https://")
        yield portal, str(ca_path)


async def read_first_block(portal: Portal, settings: DirectIOSettings, file_id: str) -> bytes:
    async with DirectIO(portal.url, portal.access_key_id, portal.secret_access_key, settings=settings) as dio:
        opened = await dio.open(file_id)
        return bytes(await opened.fetch_block(0))


async def test_tls_is_verified_by_default_and_switchable_per_endpoint(tls_portal: tuple[Portal, str]) -> None:
    portal, ca_path = tls_portal
    # The portal's own certificate is untrusted by the system store.
    fid = "1"
    with pytest.raises(BlockListConnectionError, match="certificate verification failed") as info:
        await read_first_block(portal, DirectIOSettings(retry=FAST_RETRY), fid)
    assert portal.secret_access_key not in str(info.value) and portal.access_key_id not in str(info.value)

    trusted = HTTPSettings(ca_file=ca_path)
    untrusted_default = HTTPSettings()
    # The file id, over WebDAV, trusting the test CA.
    trust = ssl.create_default_context(cafile=ca_path)
    async with httpx.AsyncClient(base_url=portal.url, auth=portal.auth, verify=trust) as client:
        reply = await client.request("PROPFIND", "/ServicesPortal/webdav/f.bin", headers={"Depth": "0"})
    assert reply.status_code == 207
    fid = reply.text.split("fileid>")[1].split("<")[0]

    assert len(await read_first_block(portal, DirectIOSettings(portal=trusted, storage=trusted, retry=FAST_RETRY), fid))
    # Portal verification off, storage still verified: the Portal answers, the block GET is refused.
    portal_off = DirectIOSettings(portal=HTTPSettings(verify_tls=False), storage=untrusted_default, retry=FAST_RETRY)
    with pytest.raises(DownloadConnectionError, match="certificate verification failed"):
        await read_first_block(portal, portal_off, fid)
    # Storage verification off, Portal verified with the CA: works; both off: works.
    storage_off = DirectIOSettings(portal=trusted, storage=HTTPSettings(verify_tls=False), retry=FAST_RETRY)
    assert len(await read_first_block(portal, storage_off, fid))


async def test_exception_text_never_holds_secrets(tls_portal: tuple[Portal, str]) -> None:
    portal, ca_path = tls_portal
    settings = DirectIOSettings(portal=HTTPSettings(ca_file=ca_path), storage=HTTPSettings(ca_file=ca_path))
    for file_id in ("999999", "1"):
        try:
            await read_first_block(portal, settings, file_id)
        except DirectFSError as exc:
            text = f"{exc!s} {exc!r} {exc.__cause__!r}"
            assert portal.secret_access_key not in text and portal.access_key_id not in text
