"""The ctera:// fsspec filesystem (directfs/fsspec_ctera.py) against the real reference portal on 127.0.0.1: listings,
exact bytes (ranges at block edges, past EOF), the engine's cache seen from the server's request counts, pandas and
pyarrow on ctera:// URLs, the configuration fallbacks, errors as builtin OSError subclasses, and calls from threads,
asyncio and trio programs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import trio

from directfs.errors import ConfigError
from directfs.fsspec_ctera import CteraFileSystem
from tests.support.httpfiles import serve_files
from tests.support.isolation import isolate_directfs_env
from tests.support.portal import UNICODE_NAME, Portal, make_tree, start_portal

BLOCK = 64 * 1024
BLOCKS = "/blocks/"  # where the reference portal serves block GETs (its presigned storage URLs)


def frame(part: int) -> pd.DataFrame:
    return pd.DataFrame({"x": range(part * 100, part * 100 + 100), "y": [f"r{part}-{i}" for i in range(100)]})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Portal, dict[str, str]]]:
    tree = tmp_path_factory.mktemp("fsspec-tree")
    hashes = make_tree(tree, BLOCK, few_mib=1)
    (tree / "tables").mkdir()
    for part in range(3):
        frame(part).to_csv(tree / "tables" / f"part{part}.csv", index=False)
        pq.write_table(pa.Table.from_pandas(frame(part), preserve_index=False), tree / "tables" / f"part{part}.parquet")
    (tree / "cache").mkdir()
    (tree / "cache" / "cold.bin").write_bytes(random.Random(7).randbytes(5 * BLOCK + 17))
    with start_portal(tree, extra_args=["--block-size", "64K"]) as portal:
        yield portal, hashes


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DIRECTFS_* of the developer's shell, and an empty config file instead of /etc/directfs's."""
    isolate_directfs_env(monkeypatch, tmp_path)


def options_for(portal: Portal, **extra: Any) -> dict[str, Any]:
    return {
        "portal_url": portal.url,
        "access_key_id": portal.access_key_id,
        "secret_access_key": portal.secret_access_key,
        "username": portal.username,
        "password": portal.password,
        **extra,
    }


def local(portal: Portal, path: str) -> bytes:
    return (portal.tree / path).read_bytes()


# --- namespace ---------------------------------------------------------------------------------------------------


def test_ls_info_find_walk_glob_match_the_tree(served: tuple[Portal, dict[str, str]]) -> None:
    portal, hashes = served
    fs = fsspec.filesystem("ctera", **options_for(portal))
    assert isinstance(fs, CteraFileSystem)
    top = {item["name"]: item for item in fs.ls("", detail=True)}
    assert {"a", "big", "empty.bin", "one-byte.bin", "sizes", "tables", "empty folder"} <= set(top)
    assert top["a"]["type"] == "directory" and top["one-byte.bin"]["type"] == "file"
    assert top["one-byte.bin"]["size"] == 1 and top["one-byte.bin"]["file_id"] == portal.file_id("one-byte.bin")
    stat = (portal.tree / "one-byte.bin").stat()
    assert top["one-byte.bin"]["mtime"] == pytest.approx(stat.st_mtime, abs=1.0)
    assert fs.ls("sizes", detail=False) == ["sizes/block-minus-1.bin", "sizes/block-plus-1.bin", "sizes/block.bin"]

    info = fs.info("ctera://big/few-mib.bin")
    assert info["name"] == "big/few-mib.bin" and info["type"] == "file"
    assert info["size"] == len(local(portal, "big/few-mib.bin"))
    assert info["file_id"] == portal.file_id("big/few-mib.bin")
    assert fs.info("a/b")["type"] == "directory"
    assert fs.info("")["type"] == "directory"
    assert fs.ls("one-byte.bin", detail=False) == ["one-byte.bin"]  # ls of a file: the file (fsspec convention)

    files = set(fs.find(""))
    assert files == set(hashes) | {f"tables/part{p}.{kind}" for p in range(3) for kind in ("csv", "parquet")} | {
        "cache/cold.bin"
    }
    walked = {root: (sorted(dirs), sorted(names)) for root, dirs, names in fs.walk("a")}
    assert walked == {"a": (["b"], []), "a/b": (["c"], ["sibling 2.bin"]), "a/b/c": ([], ["deep.txt"])}
    assert fs.glob("tables/*.csv") == [f"tables/part{p}.csv" for p in range(3)]
    assert fs.glob("ctera://unicode/*") == [UNICODE_NAME]
    assert fs.isdir("empty folder") and fs.ls("empty folder") == []
    assert fs.exists("a/b/c/deep.txt") and not fs.exists("a/nothing")


def test_every_file_reads_byte_exact(served: tuple[Portal, dict[str, str]]) -> None:
    portal, hashes = served
    fs = fsspec.filesystem("ctera", **options_for(portal))
    for path, digest in hashes.items():
        assert hashlib.sha256(fs.cat_file(path)).hexdigest() == digest, path
        with fs.open(path, "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == digest, path


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 1),
        (BLOCK - 1, BLOCK),
        (BLOCK - 1, BLOCK + 1),  # across a block edge
        (BLOCK, 2 * BLOCK),  # exactly one block
        (BLOCK - 5, 3 * BLOCK + 5),  # spanning four blocks
        (-10, None),  # the last 10 bytes
        (-(BLOCK + 1), -1),
        (None, 100),
        (0, 10**9),  # past EOF: clipped
        (10**9, None),  # starts past EOF: nothing
        (500, 500),  # empty
        (700, 600),  # end before start: nothing
    ],
)
def test_cat_file_ranges_at_block_edges_and_past_eof(
    served: tuple[Portal, dict[str, str]], start: int | None, end: int | None
) -> None:
    portal, _ = served
    fs = fsspec.filesystem("ctera", **options_for(portal))
    data = local(portal, "big/few-mib.bin")
    assert fs.cat_file("big/few-mib.bin", start=start, end=end) == data[start:end]


def test_open_is_seekable_and_reads_exactly(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served
    fs = fsspec.filesystem("ctera", **options_for(portal))
    data = local(portal, "big/few-mib.bin")
    rng = random.Random(3)
    with fs.open("ctera://big/few-mib.bin", "rb") as handle:
        assert handle.seekable() and handle.readable() and handle.size == len(data)
        for _ in range(300):
            offset = rng.randrange(0, len(data) + 10)
            size = rng.choice([1, 100, 4096, BLOCK, 3 * BLOCK + 1])
            assert handle.seek(offset) == offset
            assert handle.read(size) == data[offset : offset + size]
            assert handle.tell() == min(offset + size, max(offset, len(data)))
        handle.seek(-3, os.SEEK_END)
        assert handle.read() == data[-3:] and handle.read() == b""
        handle.seek(0)
        buffer = bytearray(1000)
        assert handle.readinto(buffer) == 1000 and bytes(buffer) == data[:1000]
    with pytest.raises(OSError, match="closed"):
        handle.read(1)
    lorem = local(portal, "text/lorem.txt").decode()
    with fs.open("text/lorem.txt", "r", encoding="utf-8") as text:
        assert text.readline() == lorem.splitlines(keepends=True)[0]
        assert text.read() == "".join(lorem.splitlines(keepends=True)[1:])
    with fs.open("text/lorem.txt", "rb") as binary:
        assert list(binary) == lorem.encode().splitlines(keepends=True)


def test_a_second_read_of_a_cached_range_sends_no_get(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served
    # cache_size makes these options (so the session and its cache) this test's own: nothing read it before.
    fs = fsspec.filesystem("ctera", **options_for(portal, cache_size="16M"))
    data = local(portal, "cache/cold.bin")
    before = portal.request_count("GET", BLOCKS)
    assert fs.cat_file("cache/cold.bin", 2 * BLOCK + 10, 2 * BLOCK + 110) == data[2 * BLOCK + 10 : 2 * BLOCK + 110]
    after_first = portal.request_count("GET", BLOCKS)
    assert after_first == before + 1, "a small random read costs one block GET"
    assert fs.cat_file("cache/cold.bin", 2 * BLOCK + 10, 2 * BLOCK + 110) == data[2 * BLOCK + 10 : 2 * BLOCK + 110]
    with fs.open("cache/cold.bin") as handle:  # another handle, another offset of the same block
        handle.seek(3 * BLOCK - 50)
        assert handle.read(50) == data[3 * BLOCK - 50 : 3 * BLOCK]
    assert portal.request_count("GET", BLOCKS) == after_first, "the cached block served both reads"
    assert fs.cat_file("cache/cold.bin") == data
    assert portal.request_count("GET", BLOCKS) == after_first + 5, "the 5 other blocks, each once"


# --- pandas, pyarrow ---------------------------------------------------------------------------------------------


def test_pandas_reads_csv_and_parquet_of_the_namespace(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served
    options = options_for(portal)
    csv = pd.read_csv("ctera://tables/part1.csv", storage_options=options)
    pd.testing.assert_frame_equal(csv, pd.read_csv(portal.tree / "tables" / "part1.csv"))
    parquet = pd.read_parquet("ctera://tables/part2.parquet", storage_options=options)
    pd.testing.assert_frame_equal(parquet, pd.read_parquet(portal.tree / "tables" / "part2.parquet"))
    with fsspec.open("ctera://tables/part0.csv", "rt", **options) as handle:
        pd.testing.assert_frame_equal(pd.read_csv(handle), frame(0))


def test_pyarrow_dataset_over_a_glob_of_parquet_files(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served
    fs = fsspec.filesystem("ctera", **options_for(portal))
    files = fs.glob("tables/*.parquet")
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("x").to_pylist()) == list(range(300))
    assert pq.read_table("tables/part1.parquet", filesystem=fs).to_pandas().equals(frame(1))


# --- configuration -----------------------------------------------------------------------------------------------


def test_options_fall_back_to_the_environment(
    served: tuple[Portal, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    portal, _ = served
    monkeypatch.setenv("DIRECTFS_PORTAL_URL", portal.url)
    monkeypatch.setenv("DIRECTFS_ACCESS_KEY_ID", portal.access_key_id)
    monkeypatch.setenv("DIRECTFS_SECRET_ACCESS_KEY", portal.secret_access_key)
    monkeypatch.setenv("DIRECTFS_USERNAME", portal.username)
    monkeypatch.setenv("DIRECTFS_PASSWORD", portal.password)
    fs = fsspec.filesystem("ctera", skip_instance_cache=True)
    assert fs.cat_file("a/b/c/deep.txt") == b"deep inside\n"
    # A storage option beats its variable: a wrong password given here is used, and refused by the Portal.
    wrong = fsspec.filesystem("ctera", password="not-the-password", skip_instance_cache=True)
    with pytest.raises(PermissionError) as refused:
        wrong.ls("a")
    assert "not-the-password" not in str(refused.value) and portal.password not in str(refused.value)


def test_portal_url_may_name_a_source_of_the_config_file(
    served: tuple[Portal, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    portal, _ = served
    secret = tmp_path / "secret"
    secret.write_text(portal.secret_access_key + "\n")
    secret.chmod(0o600)
    config = tmp_path / "directfs.toml"
    config.write_text(
        f'[source.projects]\nurl = "ctera+{portal.url}/a"\nusername = "{portal.username}"\n'
        f'password = "{portal.password}"\naccess_key_id = "{portal.access_key_id}"\n'
        f'secret_access_key_file = "{secret}"\n'
    )
    config.chmod(0o600)
    monkeypatch.setenv("DIRECTFS_CONFIG", str(config))
    fs = fsspec.filesystem("ctera", portal_url="projects")
    assert fs.ls("", detail=False) == ["b"]  # the source's sub-folder is the root
    assert fs.cat_file("b/c/deep.txt") == b"deep inside\n"
    with pytest.raises(ConfigError, match=r"no \[source\.elsewhere\]"):
        fsspec.filesystem("ctera", portal_url="elsewhere").ls("")


def test_missing_settings_and_bad_paths_are_clear_oserrors(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served
    fs = fsspec.filesystem("ctera", **options_for(portal))
    with pytest.raises(FileNotFoundError):
        fs.info("a/nothing")
    with pytest.raises(FileNotFoundError):
        fs.ls("nothing")
    with pytest.raises(FileNotFoundError):
        fs.cat_file("a/nothing.bin")
    with pytest.raises(IsADirectoryError):
        fs.open("a/b", "rb")
    with pytest.raises(OSError, match="not a path in the namespace"):
        fs.cat_file("a/../big/few-mib.bin")
    no_keys = fsspec.filesystem("ctera", portal_url=portal.url, username=portal.username, password=portal.password)
    assert no_keys.ls("a", detail=False) == ["a/b"]  # listing needs only the WebDAV login
    with pytest.raises(ConfigError, match="access_key_id= and secret_access_key="):
        no_keys.cat_file("one-byte.bin")
    with pytest.raises(ConfigError, match="needs a username and password"):
        fsspec.filesystem("ctera", portal_url=portal.url).ls("")


def test_writes_to_a_portal_that_refuses_them_raise_permission_error(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served  # started without --writable
    fs = fsspec.filesystem("ctera", **options_for(portal))
    with pytest.raises(PermissionError):
        fs.pipe_file("new.txt", b"hello")
    with pytest.raises(OSError):  # the portal answers DELETE 405, which the WebDAV store reports as EIO
        fs.rm("one-byte.bin")
    assert not (portal.tree / "new.txt").exists() and (portal.tree / "one-byte.bin").exists()


def test_a_store_without_writes_raises_permission_error_before_any_request(tmp_path: Path) -> None:
    root = tmp_path / "web"
    root.mkdir()
    (root / "f.txt").write_bytes(b"plain http\n")
    config = tmp_path / "web.toml"
    with serve_files(root) as web:
        config.write_text(f'[source.web]\nurl = "{web.url}"\n')
        config.chmod(0o600)
        fs = fsspec.filesystem("ctera", portal_url="web", config=str(config))
        assert fs.cat_file("f.txt") == b"plain http\n"  # any store of the config file reads the same way
        seen = len(web.requests)
        with pytest.raises(PermissionError, match="read-only"):
            fs.open("g.txt", "wb")
        with pytest.raises(PermissionError, match="read-only"):
            fs.rm("f.txt")
        assert len(web.requests) == seen


def test_pickles_by_its_options(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served
    fs = fsspec.filesystem("ctera", **options_for(portal))
    shown = repr(fs)
    for secret in (portal.password, portal.secret_access_key, portal.access_key_id):
        assert secret not in shown
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.storage_options == fs.storage_options
    assert clone.cat_file("a/b/c/deep.txt") == b"deep inside\n"


# --- threads, asyncio, trio ----------------------------------------------------------------------------------------


def test_usable_from_threads_asyncio_and_trio_programs(served: tuple[Portal, dict[str, str]]) -> None:
    portal, _ = served
    options = options_for(portal)
    data = local(portal, "big/few-mib.bin")
    offsets = list(range(0, len(data), 100_003))

    def read_at(offset: int) -> bytes:
        return fsspec.filesystem("ctera", **options).cat_file("big/few-mib.bin", offset, offset + 5000)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(read_at, offsets)) == [data[o : o + 5000] for o in offsets]

    async def asyncio_main() -> list[bytes]:
        direct = read_at(0)  # a sync call inside a running asyncio loop
        in_threads = await asyncio.gather(*(asyncio.to_thread(read_at, o) for o in offsets[:4]))
        return [direct, *in_threads]

    assert asyncio.run(asyncio_main()) == [data[:5000]] + [data[o : o + 5000] for o in offsets[:4]]

    async def trio_main() -> tuple[bytes, bytes]:
        direct = read_at(1)  # from a trio task: trio.from_thread would refuse this thread
        threaded = await trio.to_thread.run_sync(read_at, 2)
        return direct, threaded

    assert trio.run(trio_main) == (data[1:5001], data[2:5002])
