"""ctera:// downloads and writes against a writable reference portal (``--writable``): get (recursive, several files
at once, part files), open("wb"), put, mkdir/makedirs, rm, mv, copy; what the store holds is checked on its disk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from tests.support.isolation import isolate_directfs_env
from tests.support.portal import Portal, make_tree, start_portal

BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tree = tmp_path_factory.mktemp("fsspec-writes")
    make_tree(tree, BLOCK, few_mib=1)
    with start_portal(tree, extra_args=["--block-size", "64K"], writable=True) as served:
        yield served


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_directfs_env(monkeypatch, tmp_path)


def filesystem(portal: Portal) -> Any:
    return fsspec.filesystem(
        "ctera",
        portal_url=portal.url,
        access_key_id=portal.access_key_id,
        secret_access_key=portal.secret_access_key,
        username=portal.username,
        password=portal.password,
    )


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in root.rglob("*")
        if path.is_file()
    }


def test_get_downloads_a_tree_byte_exact(portal: Portal, tmp_path: Path) -> None:
    fs = filesystem(portal)
    dest = tmp_path / "out"
    fs.get("a", str(dest), recursive=True, files_at_once=3)
    assert digests(dest) == digests(portal.tree / "a")
    fs.get("big/few-mib.bin", str(tmp_path / "one.bin"))
    assert (tmp_path / "one.bin").read_bytes() == (portal.tree / "big" / "few-mib.bin").read_bytes()
    assert not list(tmp_path.rglob("*.part")), "part files are renamed into place"
    with pytest.raises(FileNotFoundError):
        fs.get("a/nothing.bin", str(tmp_path / "nothing.bin"))
    assert not (tmp_path / "nothing.bin").exists()


def test_a_write_into_a_missing_folder_fails_at_close(portal: Portal) -> None:
    fs = filesystem(portal)
    handle = fs.open("no such folder/new.bin", "wb")
    handle.write(b"data")
    with pytest.raises(FileNotFoundError):
        handle.close()
    assert not (portal.tree / "no such folder").exists()


def test_writes_reach_the_store(portal: Portal, tmp_path: Path) -> None:
    fs = filesystem(portal)
    fs.makedirs("w/deep/er", exist_ok=True)
    assert (portal.tree / "w" / "deep" / "er").is_dir()
    with pytest.raises(FileExistsError):
        fs.makedirs("w/deep")
    payload = os.urandom(3 * BLOCK + 5)
    with fs.open("w/new.bin", "wb") as handle:
        handle.write(payload[:100])
        handle.write(payload[100:])
    assert (portal.tree / "w" / "new.bin").read_bytes() == payload
    assert fs.cat_file("w/new.bin") == payload and fs.info("w/new.bin")["size"] == len(payload)
    with pytest.raises(RuntimeError), fs.open("w/never.bin", "wb") as handle:
        handle.write(b"half")
        raise RuntimeError("the writer failed")
    assert not (portal.tree / "w" / "never.bin").exists(), "a with block left by an exception sends nothing"

    fs.pipe_file("w/new.bin", b"replaced")  # a new version of an existing file
    assert fs.cat_file("w/new.bin") == b"replaced"

    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "x.txt").write_bytes(b"x" * 1000)
    (local / "y.bin").write_bytes(os.urandom(BLOCK + 1))
    fs.put(str(local), "w/up", recursive=True)
    assert digests(portal.tree / "w" / "up") == digests(local)
    fs.put_file(str(local / "y.bin"), "w/made/on/the/way.bin")  # missing parents are made, as fsspec does
    assert (portal.tree / "w" / "made" / "on" / "the" / "way.bin").read_bytes() == (local / "y.bin").read_bytes()

    fs.mkdir("w/folder")
    fs.mv("w/up/y.bin", "w/folder/")  # into a folder
    assert (portal.tree / "w" / "folder" / "y.bin").read_bytes() == (local / "y.bin").read_bytes()
    fs.mv("w/up", "w/moved")  # a folder, with everything in it
    assert digests(portal.tree / "w" / "moved") == {"sub/x.txt": hashlib.sha256(b"x" * 1000).hexdigest()}
    assert not fs.exists("w/up")
    fs.copy("w/moved/sub/x.txt", "w/copy.txt")
    assert fs.cat_file("w/copy.txt") == b"x" * 1000

    fs.rm("w/copy.txt")
    assert not (portal.tree / "w" / "copy.txt").exists()
    fs.rm("w/moved", recursive=True)
    assert not (portal.tree / "w" / "moved").exists()
    with pytest.raises(FileNotFoundError):
        fs.rm("w/moved/sub/x.txt")
    with pytest.raises(OSError):  # ENOTEMPTY: not recursive
        fs.rmdir("w/deep")
    fs.rmdir("w/deep/er")
    assert not (portal.tree / "w" / "deep" / "er").exists()
    with pytest.raises(OSError, match="mode 'ab'"):
        fs.open("w/new.bin", "ab")


def test_a_transaction_sends_its_files_at_the_end(portal: Portal) -> None:
    fs = filesystem(portal)
    with fs.transaction:
        with fs.open("late.txt", "wb") as handle:
            handle.write(b"at the end")
        assert not (portal.tree / "late.txt").exists()
    assert (portal.tree / "late.txt").read_bytes() == b"at the end"
