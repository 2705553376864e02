"""http:// and https:// sources against a real HTTP server on 127.0.0.1 (tests/support/httpfiles.py). Index-page
parsing and URL rules without a server: tests/unit/test_source_http_urls.py; through a real mount:
tests/mount/test_source_http_mount.py."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from directfs.errors import (
    DataNotOnlineError,
    EntryNotFoundError,
    NamespaceConnectionError,
    NotADirectory,
    PermissionDeniedError,
)
from directfs.sources.base import Credentials
from directfs.sources.web import create
from tests.support.httpfiles import HTTPFiles, serve_files
from tests.support.sourcetree import (
    BLOCK,
    SIZES,
    check_tree,
    make_tree,
    options,
    read_all,
)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "www"
    root.mkdir()
    return root, make_tree(root)


@pytest.fixture
def server(tree: tuple[Path, dict[str, bytes]]) -> Iterator[HTTPFiles]:
    with serve_files(tree[0]) as files:
        yield files


async def test_folder_listing_stat_and_bytes(server: HTTPFiles, tree: tuple[Path, dict[str, bytes]]) -> None:
    source = create(server.url, options())
    try:
        await check_tree(source, tree[1])
        root = await source.stat("")
        assert root.is_dir
        assert (await source.stat("sub dir")).is_dir
        with pytest.raises(EntryNotFoundError):
            await source.stat("nope")
        with pytest.raises(NotADirectory):
            async for _ in source.list_dir("one"):
                pass
    finally:
        await source.aclose()


async def test_single_file_url(server: HTTPFiles, tree: tuple[Path, dict[str, bytes]]) -> None:
    source = create(server.url + "sub%20dir/na%20me%20%231%25.txt", options())
    try:
        names = [e.name async for e in source.list_dir("")]
        assert names == ["na me #1%.txt"]
        entry = await source.stat("na me #1%.txt")
        handle = await source.open("na me #1%.txt", entry)
        assert await read_all(handle) == tree[1]["sub dir/na me #1%.txt"]
        with pytest.raises(EntryNotFoundError):
            await source.stat("other")
    finally:
        await source.aclose()


async def test_sizes_from_content_range_when_head_has_no_length(
    server: HTTPFiles, tree: tuple[Path, dict[str, bytes]]
) -> None:
    server.no_length_on_head = True
    source = create(server.url, options())
    try:
        assert (await source.stat("many.bin")).size == SIZES["many.bin"]
        assert (await source.stat("empty")).size == 0
        assert (await source.stat("one")).size == 1
    finally:
        await source.aclose()


async def test_tls_needs_the_ca(tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    with serve_files(tree[0], tls=True) as server:
        source = create(server.url, options())
        try:
            with pytest.raises(NamespaceConnectionError, match="not trusted"):
                await source.stat("")
        finally:
            await source.aclose()
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(server.ca_pem)
        source = create(server.url, options(ca_file=str(ca_file)))
        try:
            await check_tree(source, tree[1])
        finally:
            await source.aclose()


async def test_basic_auth(server: HTTPFiles, tree: tuple[Path, dict[str, bytes]]) -> None:
    server.basic = ("alice", "s3cret")
    anonymous = create(server.url, options())
    try:
        with pytest.raises(PermissionDeniedError):
            await anonymous.stat("one")
    finally:
        await anonymous.aclose()
    source = create(server.url, options(credentials=Credentials(username="alice", password="s3cret")))
    try:
        await check_tree(source, tree[1])
    finally:
        await source.aclose()


async def test_token_file_rotation(server: HTTPFiles, tree: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("token-one\n")
    server.tokens = {"token-one"}
    source = create(server.url, options(credentials=Credentials(token_file=str(token_file))))
    data = tree[1]["many.bin"]
    try:
        entry = await source.stat("many.bin")
        handle = await source.open("many.bin", entry)
        assert await handle.fetch_block(0) == data[:BLOCK]
        # Rotation as an OIDC agent does it: a new file renamed over the old one; the old token stops working.
        (tmp_path / "token.new").write_text("token-two\n")
        os.replace(tmp_path / "token.new", token_file)
        server.tokens = {"token-two"}
        assert await handle.fetch_block(1) == data[BLOCK : 2 * BLOCK]
        # A rewrite the stat check cannot see (same inode, size and mtime): the 401 forces one re-read.
        st = token_file.stat()
        with open(token_file, "r+") as f:
            f.write("token-3rd\n")
        os.utime(token_file, ns=(st.st_atime_ns, st.st_mtime_ns))
        server.tokens = {"token-3rd"}
        assert await handle.fetch_block(2) == data[2 * BLOCK : 3 * BLOCK]
        assert (await source.stat("one")).size == 1
        assert ("GET", "/many.bin", "Bearer") in server.requests
    finally:
        await source.aclose()


@pytest.fixture
def slow_autojump() -> trio.testing.MockClock:
    # Jumps only after 0.3 s of real idleness: the loopback server answers in milliseconds, so only the staging
    # sleeps (Retry-After) are skipped, never an HTTP timeout.
    return trio.testing.MockClock(autojump_threshold=0.3)


async def test_staging_waits_then_reads(
    server: HTTPFiles, tree: tuple[Path, dict[str, bytes]], slow_autojump: trio.testing.MockClock
) -> None:
    source = create(server.url, options())
    try:
        entry = await source.stat("many.bin")
        handle = await source.open("many.bin", entry)
        server.retry_after = 20
        server.staging["many.bin"] = 3
        start = trio.current_time()
        assert await read_all(handle) == tree[1]["many.bin"]
        assert trio.current_time() - start >= 60  # three Retry-After: 20 answers were honoured
        assert server.staging["many.bin"] == 0
    finally:
        await source.aclose()


async def test_staging_past_the_deadline_is_etimedout(
    server: HTTPFiles, tree: tuple[Path, dict[str, bytes]], slow_autojump: trio.testing.MockClock
) -> None:
    source = create(server.url, options(staging_deadline_seconds=100))
    try:
        entry = await source.stat("one")
        handle = await source.open("one", entry)
        server.retry_after = 30
        server.staging["one"] = 1000
        start = trio.current_time()
        with pytest.raises(DataNotOnlineError) as caught:
            await handle.fetch_block(0)
        assert caught.value.errno == errno.ETIMEDOUT
        assert 90 <= trio.current_time() - start <= 100  # waited 3 x 30 s, then gave up before passing 100 s
    finally:
        await source.aclose()
