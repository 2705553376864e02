"""webdav:// and webdavs:// sources against a real nginx with the WebDAV modules on 127.0.0.1. Through a real mount:
tests/mount/test_source_webdav_mount.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from directfs.errors import (
    EntryNotFoundError,
    NamespaceConnectionError,
    NotADirectory,
    PermissionDeniedError,
    StaleFileError,
)
from directfs.sources.base import Credentials
from directfs.sources.webdav import create
from directfs.transfer import BlockingGetter
from tests.support.nginx import NginxDav, start_nginx
from tests.support.sourcetree import BLOCK, check_tree, make_tree, options, read_all


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "dav"
    root.mkdir()
    return root, make_tree(root)


@pytest.fixture
def nginx(tmp_path: Path, tree: tuple[Path, dict[str, bytes]]) -> Iterator[NginxDav]:
    with start_nginx(tmp_path / "nginx", tree[0], tokens=["initial-token"]) as server:
        yield server


async def test_listing_stat_and_bytes(nginx: NginxDav, tree: tuple[Path, dict[str, bytes]]) -> None:
    source = create(f"webdav://{nginx.host}/open/", options())
    try:
        await check_tree(source, tree[1])
        assert isinstance(source._getter, BlockingGetter)  # the bytes above came through worker-thread GETs (libcurl)
        assert (await source.stat("")).is_dir
        assert (await source.stat("sub dir")).is_dir
        assert (await source.stat("many.bin")).size == 5 * BLOCK + 7
        with pytest.raises(EntryNotFoundError):
            await source.stat("missing")
        with pytest.raises(NotADirectory):
            async for _ in source.list_dir("one"):
                pass
        sub = create(f"webdav://{nginx.host}/open/sub%20dir", options())
        try:
            assert sorted([e.name async for e in sub.list_dir("")]) == ["deeper", "na me #1%.txt"]
        finally:
            await sub.aclose()
    finally:
        await source.aclose()


async def test_replaced_file_is_stale_not_wrong_bytes(nginx: NginxDav, tree: tuple[Path, dict[str, bytes]]) -> None:
    source = create(f"webdav://{nginx.host}/open/", options())
    try:
        entry = await source.stat("many.bin")
        handle = await source.open("many.bin", entry)
        (tree[0] / "many.bin").write_bytes(b"x" * (BLOCK * 2))
        with pytest.raises(StaleFileError):
            await handle.fetch_block(0)
    finally:
        await source.aclose()


async def test_basic_auth(nginx: NginxDav, tree: tuple[Path, dict[str, bytes]]) -> None:
    anonymous = create(f"webdav://{nginx.host}/basic/", options())
    try:
        with pytest.raises(PermissionDeniedError):
            await anonymous.stat("")
    finally:
        await anonymous.aclose()
    credentials = Credentials(username=nginx.user, password=nginx.password)
    source = create(f"webdav://{nginx.host}/basic/", options(credentials=credentials))
    try:
        await check_tree(source, tree[1])
    finally:
        await source.aclose()


async def test_bearer_token_file_rotation(nginx: NginxDav, tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    token_file = tmp_path / "oidc-token"
    token_file.write_text("initial-token\n")
    source = create(f"webdav://{nginx.host}/bearer/", options(credentials=Credentials(token_file=str(token_file))))
    data = tree[1]["many.bin"]
    try:
        entry = await source.stat("many.bin")
        handle = await source.open("many.bin", entry)
        assert await handle.fetch_block(0) == data[:BLOCK]
        # The agent writes a new token; the server stops accepting the old one.
        (tmp_path / "t.new").write_text("rotated-token-2\n")
        os.replace(tmp_path / "t.new", token_file)
        nginx.set_tokens(["rotated-token-2"])
        assert await handle.fetch_block(1) == data[BLOCK : 2 * BLOCK]
        assert [e.name async for e in source.list_dir("sub dir/deeper")] == ["x"]
        # Same inode, size and mtime (invisible to the change check): the 401 forces one re-read and a retry.
        st = token_file.stat()
        with open(token_file, "r+") as f:
            f.write("rotated-token-3\n")
        os.utime(token_file, ns=(st.st_atime_ns, st.st_mtime_ns))
        nginx.set_tokens(["rotated-token-3"])
        assert await handle.fetch_block(2) == data[2 * BLOCK : 3 * BLOCK]
        assert (await source.stat("one")).size == 1
    finally:
        await source.aclose()
    static = create(f"webdav://{nginx.host}/bearer/", options(credentials=Credentials(token="rotated-token-3")))
    try:
        assert (await static.stat("one")).size == 1
    finally:
        await static.aclose()


async def test_webdavs_ca_and_client_certificate(
    nginx: NginxDav, tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    untrusted = create(f"webdavs://{nginx.tls_host}/open/", options())
    try:
        with pytest.raises(NamespaceConnectionError, match="not trusted"):
            await untrusted.stat("")
    finally:
        await untrusted.aclose()
    ca_file = str(nginx.write_ca(tmp_path / "ca.pem"))
    no_cert = create(f"webdavs://{nginx.tls_host}/x509/", options(ca_file=ca_file))
    try:
        with pytest.raises(PermissionDeniedError):
            await no_cert.stat("")
    finally:
        await no_cert.aclose()
    credentials = Credentials(client_cert=str(nginx.client_cert_pem))
    source = create(f"webdavs://{nginx.tls_host}/x509/", options(ca_file=ca_file, credentials=credentials))
    try:
        await check_tree(source, tree[1])
        handle = await source.open("block", await source.stat("block"))
        assert await read_all(handle) == tree[1]["block"]
    finally:
        await source.aclose()
