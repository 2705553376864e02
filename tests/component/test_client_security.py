"""Issue 13's client-side findings against real servers on 127.0.0.1 (block servers, plain and TLS with trustme CAs)
and the local file system: block URLs a Portal may not aim us at (M3), CA files that add to the system roots and a
separate one for storage (M4), a paged block list stopped at the first page over its caps (M5), names with control
characters or bidi overrides kept out of the tree (L6), and ``cp``/``get`` never writing through a planted symbolic
link (L7)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from directfs import cli
from directfs.api import DirectIO, DirectIOSettings
from directfs.errors import BlockListConnectionError, DownloadConnectionError, MalformedMetadataError
from directfs.http import HTTPSettings
from directfs.sources.base import SourceOptions
from tests.support.blockserver import FAST_RETRY, SECRET, BlockServer, Fault, payload

DATA = payload(300_000, seed=13)
BLOCK = 64 * 1024
TRANSFERS = pytest.mark.parametrize("transfer", ["curl", "httpx"])


@pytest.fixture(autouse=True)
def no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient DIRECTFS_* variable reaches the commands run here."""
    for name in list(os.environ):
        if name.startswith("DIRECTFS_"):
            monkeypatch.delenv(name)


@dataclasses.dataclass
class CA:
    ca: trustme.CA
    pem: str  # the CA certificate's file, for --ca-file

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.pem)


def make_ca(folder: Path, name: str) -> CA:
    ca = trustme.CA(organization_name=name)
    pem = folder / f"{name}.pem"
    ca.cert_pem.write_to_path(str(pem))
    return CA(ca, str(pem))


@pytest.fixture
def cas(tmp_path: Path) -> tuple[CA, CA]:
    return make_ca(tmp_path, "portal-ca"), make_ca(tmp_path, "storage-ca")


def block_list(storage: BlockServer, file_id: str, verify: ssl.SSLContext | bool = False) -> bytes:
    """``storage``'s own /directio reply for ``file_id``: its block URLs point at its own blocks."""
    reply = httpx.get(
        f"{storage.url}/directio/{file_id}",
        headers={"Authorization": f"Bearer {storage.access_key_id}"},
        verify=verify,
    )
    assert reply.status_code == 200
    return reply.content


def portal_serving(portal: BlockServer, body: bytes, times: int = 20) -> None:
    """``portal`` answers the next ``times`` block-list requests with ``body`` (another server's block URLs)."""
    portal.metadata_faults = [Fault(json=body) for _ in range(times)]


async def read_all(dio: DirectIO, file_id: str) -> bytes:
    opened = await dio.open(file_id)
    return b"".join([bytes(await opened.fetch_block(i)) for i in range(opened.layout.block_count)])


# --- M3: which block URLs a Portal may hand out ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/?X-Amz-Signature=TOPSECRET",
        "http://[fd00:ec2::254]/latest/meta-data/?X-Amz-Signature=TOPSECRET",
        "http://metadata.google.internal/computeMetadata/v1/?X-Amz-Signature=TOPSECRET",
        "https://169.254.170.2/v2/credentials?X-Amz-Signature=TOPSECRET",
        "http://2852039166/latest/meta-data/?X-Amz-Signature=TOPSECRET",
        "https://[fe80::1%25eth0]/x?X-Amz-Signature=TOPSECRET",
    ],
)
@pytest.mark.parametrize("insecure", [False, True], ids=["default", "allow-insecure-storage"])
async def test_link_local_and_metadata_block_urls_are_always_refused(url: str, insecure: bool) -> None:
    with BlockServer(SECRET) as portal:
        portal.add_file("1", DATA, block_size=BLOCK)
        body = json.loads(block_list(portal, "1"))
        body["chunks"][1]["url"] = url
        portal_serving(portal, json.dumps(body).encode())
        settings = DirectIOSettings(retry=FAST_RETRY)
        if insecure:
            settings = dataclasses.replace(settings, allow_insecure_storage=True)
        async with DirectIO(portal.url, portal.access_key_id, SECRET, settings=settings) as dio:
            with pytest.raises(MalformedMetadataError) as info:
                await dio.open(1)
    message = str(info.value)
    assert info.value.errno == errno.EIO
    assert "chunk 1: block URL to" in message and "refused" in message
    host = url.split("://", 1)[1].split("/", 1)[0].strip("[]")
    assert repr(host) in message
    assert "TOPSECRET" not in message and "X-Amz" not in message
    assert portal.stats.started == 0  # no block was asked for anywhere


@TRANSFERS
async def test_plain_http_blocks_need_a_loopback_http_portal_or_the_option(cas: tuple[CA, CA], transfer: str) -> None:
    portal_ca, _ = cas
    with BlockServer(SECRET) as storage, BlockServer(SECRET, ssl_context=portal_ca.server_context()) as portal:
        storage.add_file("1", DATA, block_size=BLOCK)
        # (A loopback http:// Portal, the test and demo case, may hand out http:// block URLs: most tests here.)
        portal_serving(portal, block_list(storage, "1"))
        tls = HTTPSettings(ca_file=portal_ca.pem)
        strict = DirectIOSettings(portal=tls, storage=tls, retry=FAST_RETRY, block_transfer=transfer)
        async with DirectIO(portal.url, portal.access_key_id, SECRET, settings=strict) as dio:
            with pytest.raises(MalformedMetadataError, match=r"'127\.0\.0\.1' refused: plain http://") as info:
                await dio.open(1)
        assert "--allow-insecure-storage" in str(info.value) and "sig0" not in str(info.value)
        assert storage.stats.started == 0
        insecure = dataclasses.replace(strict, allow_insecure_storage=True)
        async with DirectIO(portal.url, portal.access_key_id, SECRET, settings=insecure) as dio:
            assert await read_all(dio, "1") == DATA


def test_get_refuses_plain_http_blocks_from_a_tls_portal_unless_allowed(
    cas: tuple[CA, CA], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    portal_ca, _ = cas
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)  # as an admin would: a readable secret file draws a warning (L5)
    dest = tmp_path / "out.bin"
    with BlockServer(SECRET) as storage, BlockServer(SECRET, ssl_context=portal_ca.server_context()) as portal:
        storage.add_file("1", DATA, block_size=BLOCK)
        portal_serving(portal, block_list(storage, "1"))
        argv = [
            "get",
            f"ctera+https://127.0.0.1:{portal.port}",
            "1",
            str(dest),
            "--access-key-id",
            portal.access_key_id,
            "--secret-access-key-file",
            str(secret_file),
            "--ca-file",
            portal_ca.pem,
        ]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "plain http://" in err and "sig0" not in err and "X-Amz" not in err
        assert not dest.exists()
        assert cli.main([*argv, "--allow-insecure-storage"]) == 0
        assert dest.read_bytes() == DATA


# --- M4: CA files add to the system roots; storage has its own --------------------------------------------------------


@TRANSFERS
async def test_ca_file_adds_to_the_system_roots(
    cas: tuple[CA, CA], monkeypatch: pytest.MonkeyPatch, transfer: str
) -> None:
    system_ca, extra_ca = cas
    # The server's CA is the "system" store (as OpenSSL finds it, and Python and our libcurl options with it); the
    # --ca-file names another CA. Both must be trusted: the file is an addition, not a replacement.
    monkeypatch.setenv("SSL_CERT_FILE", system_ca.pem)
    monkeypatch.setenv("SSL_CERT_DIR", system_ca.pem + ".no-such-dir")
    with BlockServer(SECRET, ssl_context=system_ca.server_context()) as server:
        server.add_file("1", DATA, block_size=BLOCK)
        tls = HTTPSettings(ca_file=extra_ca.pem)
        settings = DirectIOSettings(portal=tls, storage=tls, retry=FAST_RETRY, block_transfer=transfer)
        async with DirectIO(server.url, server.access_key_id, SECRET, settings=settings) as dio:
            assert await read_all(dio, "1") == DATA
    # And the file is trusted: a server of the other CA, with the system store still the first one.
    with BlockServer(SECRET, ssl_context=extra_ca.server_context()) as server:
        server.add_file("1", DATA, block_size=BLOCK)
        async with DirectIO(server.url, server.access_key_id, SECRET, settings=settings) as dio:
            assert await read_all(dio, "1") == DATA


@TRANSFERS
async def test_storage_ca_file_is_trusted_for_storage_only(cas: tuple[CA, CA], transfer: str) -> None:
    portal_ca, storage_ca = cas
    with (
        BlockServer(SECRET, ssl_context=storage_ca.server_context()) as storage,
        BlockServer(SECRET, ssl_context=portal_ca.server_context()) as portal,
    ):
        storage.add_file("1", DATA, block_size=BLOCK)
        portal_serving(portal, block_list(storage, "1", verify=storage_ca.client_context()))

        def settings(ca_file: str, storage_ca_file: str | None = None) -> DirectIOSettings:
            options = SourceOptions(ca_file=ca_file, storage_ca_file=storage_ca_file)
            made = DirectIOSettings.from_options(options, retry=FAST_RETRY)
            return dataclasses.replace(made, block_transfer=transfer, metadata_cache_seconds=0)

        both = settings(ca_file=portal_ca.pem, storage_ca_file=storage_ca.pem)
        async with DirectIO(portal.url, portal.access_key_id, SECRET, settings=both) as dio:
            assert await read_all(dio, "1") == DATA
        # Without it, storage trusts what the Portal trusts: the storage CA is not among it.
        async with DirectIO(portal.url, portal.access_key_id, SECRET, settings=settings(ca_file=portal_ca.pem)) as dio:
            opened = await dio.open(1)
            with pytest.raises(DownloadConnectionError, match="certificate verification failed"):
                await opened.fetch_block(0)
        # And the Portal does not trust the storage CA file.
        only_storage = settings(ca_file=storage_ca.pem, storage_ca_file=storage_ca.pem)
        async with DirectIO(portal.url, portal.access_key_id, SECRET, settings=only_storage) as dio:
            with pytest.raises(BlockListConnectionError, match="certificate verification failed"):
                await dio.open(1)


# --- M5: paged block lists ------------------------------------------------------------------------------------------


async def test_a_paged_block_list_stops_at_the_first_page_over_the_chunk_cap() -> None:
    with BlockServer(SECRET) as server:
        server.add_file("1", payload(40 * 1000), block_size=1000, page_bytes=1000)  # 40 pages of one chunk
        settings = DirectIOSettings(retry=FAST_RETRY, max_chunks=10)
        async with DirectIO(server.url, server.access_key_id, SECRET, settings=settings) as dio:
            with pytest.raises(MalformedMetadataError, match="more than 10 chunks") as info:
                await dio.metadata(1)
        assert len(server.stats.metadata_requests) == 11  # not all 40
        assert "after 11 pages" in str(info.value)
        # Under the cap the same paged list reads whole.
        async with DirectIO(
            server.url, server.access_key_id, SECRET, settings=DirectIOSettings(retry=FAST_RETRY)
        ) as dio:
            assert len((await dio.metadata(1)).chunks) == 40


async def test_a_paged_block_list_stops_at_the_first_page_over_the_byte_bound() -> None:
    with BlockServer(SECRET) as server:
        server.add_file("1", payload(40 * 1000), block_size=1000, page_bytes=1000)
        page_bytes = len(block_list(server, "1"))
        server.stats.metadata_requests.clear()
        settings = DirectIOSettings(retry=FAST_RETRY, max_metadata_total_bytes=5 * page_bytes + page_bytes // 2)
        async with DirectIO(server.url, server.access_key_id, SECRET, settings=settings) as dio:
            with pytest.raises(MalformedMetadataError, match=r"block list larger than \d+ bytes over all its pages"):
                await dio.metadata(1)
        # Pages are about the same size: the sixth runs past the bound while it is read.
        assert 5 <= len(server.stats.metadata_requests) <= 7


# --- L6: names that never enter the tree ----------------------------------------------------------------------------

HOSTILE_NAMES = ["evil\x1b[2Jname", "two\nlines", "bidi\u202etxt.exe", "iso\u2066late", "del\x7f", "csi\x9b1m"]


@pytest.mark.expected_logs(r"skipping an entry with an invalid name")
def test_names_with_controls_or_bidi_overrides_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.txt").write_bytes(b"ok")
    for name in HOSTILE_NAMES:
        (tree / name).write_bytes(b"x")
    assert cli.main(["ls", f"file://{tree}"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == ["ok.txt"]
    copy = tmp_path / "copy"
    assert cli.main(["cp", "-r", f"file://{tree}", str(copy)]) == 0
    assert os.listdir(copy) == ["ok.txt"]


# --- L7: cp and get never write through a planted link ----------------------------------------------------------------


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim" / ".bashrc"
    path.parent.mkdir()
    path.write_bytes(b"the victim's file\n")
    return path


def assert_untouched(victim: Path) -> None:
    assert victim.read_bytes() == b"the victim's file\n"
    assert os.listdir(victim.parent) == [victim.name]


def no_part_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".part") and not p.is_symlink()]


def test_get_never_writes_through_a_planted_link(tmp_path: Path, victim: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)  # as an admin would: a readable secret file draws a warning (L5)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "file.bin"
    (out / "file.bin.part").symlink_to(victim)  # the old fixed part name
    with BlockServer(SECRET) as server:
        server.add_file("1", DATA, block_size=BLOCK)
        argv = ["get", f"ctera+http://127.0.0.1:{server.port}", "1", str(dest), "--access-key-id"]
        argv += [server.access_key_id, "--secret-access-key-file", str(secret_file)]
        assert cli.main(argv) == 0
        assert dest.read_bytes() == DATA and not dest.is_symlink()
        assert_untouched(victim)
        # A link at DEST itself is replaced by the file, never written through.
        dest.unlink()
        dest.symlink_to(victim)
        assert cli.main(argv) == 0
        assert dest.read_bytes() == DATA and not dest.is_symlink()
        assert_untouched(victim)
        # A failed download leaves no part file of ours (and the planted link where it was).
        server.block_faults[("1", 2)] = [Fault(status=404)] * 10
        assert cli.main([*argv[:3], str(out / "failed.bin"), *argv[4:], "--resumes", "0"]) == 1
    assert no_part_files(out) and (out / "file.bin.part").is_symlink()
    assert sorted(os.listdir(out)) == ["file.bin", "file.bin.part"]


def test_cp_never_writes_through_a_planted_link(tmp_path: Path, victim: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "file.bin").write_bytes(DATA)
    out = tmp_path / "out"
    out.mkdir()
    (out / "file.bin.part").symlink_to(victim)
    assert cli.main(["cp", f"file://{source}/file.bin", str(out)]) == 0
    assert (out / "file.bin").read_bytes() == DATA
    assert_untouched(victim)
    (out / "file.bin").unlink()
    (out / "file.bin").symlink_to(victim)
    assert cli.main(["cp", f"file://{source}/file.bin", str(out / "file.bin")]) == 0
    assert (out / "file.bin").read_bytes() == DATA and not (out / "file.bin").is_symlink()
    assert_untouched(victim)
    assert no_part_files(out)


def test_cp_r_refuses_a_subfolder_of_dest_that_is_a_link(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / ".bashrc").write_bytes(b"planted by the store\n")
    (source / "top.bin").write_bytes(DATA)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(victim.parent)  # someone who can write into DEST swapped the folder for a link
    assert cli.main(["cp", "-r", f"file://{source}", str(dest)]) == 1
    assert "symbolic link" in capsys.readouterr().err
    assert_untouched(victim)
