"""``directfs cp`` uploads (``cp LOCAL URL``, ``cp -r LOCAL_DIR URL``) and store-to-store copies (``cp URL URL``) into
real stores on 127.0.0.1: file:// (always), s3:// against SeaweedFS and webdav:// against nginx (when their
``Writable`` is there). Every result is checked from the server side (the folder itself, boto3 ``get_object``, a
WebDAV GET), never through directfs. The commands run in-process (``directfs.cli.main``), so these tests are sync.
The file:// store's own write rules: tests/unit/test_local_writes.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from directfs.sources.base import SourceOptions, Writable
from directfs.sources.registry import create_source
from tests.support.commands import isolate_cli_env, local_tree, run, sha, use_s3_keys
from tests.support.nginx import start_nginx
from tests.support.seaweed import SeaweedFS, start_seaweed
from tests.support.sourcetree import make_tree

BUCKET = "uploads"
STORES = ("file", "s3", "webdav")


@pytest.fixture(autouse=True)
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_cli_env(monkeypatch, tmp_path)


@dataclass
class Store:
    """One store a test writes into: ``base`` is the URL of the test's own (empty) folder, ``args`` the flags it
    needs, ``files`` what the server holds below it (path -> bytes, read on the server side), ``make_folder`` makes a
    folder there behind directfs's back, ``refusing`` a URL of the same store that refuses writes, the environment
    that makes it refuse them, and what the error says."""

    kind: str
    base: str
    files: Callable[[], dict[str, bytes]]
    make_folder: Callable[[str], None]
    args: list[str] = field(default_factory=list)
    refusing: tuple[str, dict[str, str], str] | None = None

    def url(self, rel: str = "") -> str:
        return self.base + quote(rel)

    def cp(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        return run(capsys, "cp", *argv, *self.args)


def disk_files(root: Path) -> dict[str, bytes]:
    return local_tree(root) if root.exists() else {}


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with start_seaweed(tmp_path_factory.mktemp("weed"), buckets=(BUCKET,)) as s3:
        yield s3


def require_writable(url: str, options: SourceOptions) -> None:
    assert isinstance(create_source(url, options), Writable), f"{url}: every store cp uploads to is Writable"


@contextlib.contextmanager
def open_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Store]:
    if kind == "file":
        root = tmp_path / "store"
        root.mkdir()
        yield Store(
            kind,
            root.as_uri() + "/",
            lambda: disk_files(root),
            lambda rel: (root / rel).mkdir(parents=True),
            refusing=None,
        )
    elif kind == "s3":
        s3: SeaweedFS = request.getfixturevalue("weed")
        use_s3_keys(request.getfixturevalue("monkeypatch"), s3)
        prefix = f"{request.node.name}/".replace("[", "-").replace("]", "")
        require_writable(f"s3://{BUCKET}/", SourceOptions(endpoint_url=s3.endpoint))
        client: Any = s3.client()

        def files() -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if not key.endswith("/"):  # folder markers
                        found[key[len(prefix) :]] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            return found

        def make_folder(rel: str) -> None:
            client.put_object(Bucket=BUCKET, Key=f"{prefix}{rel}/inner", Body=b"in the way")

        args = ["--endpoint-url", s3.endpoint]
        yield Store(
            kind,
            f"s3://{BUCKET}/{quote(prefix)}",
            files,
            make_folder,
            args,
            refusing=(f"s3://{BUCKET}/{quote(prefix)}", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "Permission denied"),
        )
    else:
        root = tmp_path / "dav"
        (root / "data").mkdir(parents=True)
        with start_nginx(tmp_path / "nginx", root) as nginx:
            base = f"webdav://{nginx.host}/rw/data/"
            require_writable(base, SourceOptions())

            def dav_files() -> dict[str, bytes]:
                found = {}
                for rel in disk_files(root / "data"):  # the names from the disk, the bytes by WebDAV GET
                    reply = httpx.get(f"http://{nginx.host}/rw/data/{quote(rel)}", timeout=10)
                    assert reply.status_code == 200, (rel, reply.status_code)
                    found[rel] = reply.content
                return found

            yield Store(
                kind,
                base,
                dav_files,
                lambda rel: (root / "data" / rel).mkdir(parents=True),
                # /open/ serves the same tree without PUT, MKCOL or DELETE (405)
                refusing=(f"webdav://{nginx.host}/open/data/", {}, "405"),
            )


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with open_store(str(request.param), tmp_path, request) as it:
        yield it


# file:// cannot refuse a write here (root ignores file modes): its refusal is test_a_full_file_system_fails_with_enospc
@pytest.fixture(params=[kind for kind in STORES if kind != "file"])
def refusing_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with open_store(str(request.param), tmp_path, request) as it:
        yield it


@pytest.fixture
def local(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A local tree to upload: the awkward sizes of ``make_tree``, a few MiB, nested folders, quoted names."""
    root = tmp_path / "local"
    files = make_tree(root)
    big = os.urandom(3 * 1024 * 1024 + 5)
    (root / "sub dir" / "deeper" / "big.bin").write_bytes(big)
    files["sub dir/deeper/big.bin"] = big
    return root, files


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {rel: sha(data) for rel, data in files.items()}


# --- every store ------------------------------------------------------------------------------------------------


def test_upload_files_of_0_1_and_a_few_mib_bytes(
    capsys: pytest.CaptureFixture[str], store: Store, local: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = local
    status, _, err = store.cp(capsys, str(root / "empty"), store.url("empty"))
    assert status == 0, err
    status, _, err = store.cp(capsys, str(root / "one"), store.base)  # into the folder, under its own name
    assert status == 0, err
    status, _, err = store.cp(capsys, str(root / "sub dir" / "deeper" / "big.bin"), store.url("big copy.bin"))
    assert status == 0, err
    expected = {"empty": b"", "one": files["one"], "big copy.bin": files["sub dir/deeper/big.bin"]}
    assert digests(store.files()) == digests(expected)


def test_upload_a_tree_then_skip_existing_files_unless_forced(
    capsys: pytest.CaptureFixture[str], store: Store, local: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = local
    status, _, err = store.cp(capsys, "-r", str(root), store.url("tree"), "--max-workers", "3")
    assert status == 0, err
    assert digests(store.files()) == digests({f"tree/{rel}": data for rel, data in files.items()})
    # Again: every file exists, so every one is reported and skipped; that is no failure.
    (root / "one").write_bytes(b"changed")
    status, _, err = store.cp(capsys, "-r", str(root), store.url("tree"))
    assert status == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(files)
    assert f"skipped {root}/one: {store.url('tree').rstrip('/')}/one exists (use --force to replace it)" in skipped
    assert f"0 copied, {len(files)} skipped, 0 failed" in err
    status, _, err = store.cp(capsys, str(root / "one"), store.url("tree/one"))  # one file: the same
    assert status == 0 and "skipped" in err and "--force" in err
    assert store.files()["tree/one"] == files["one"]
    # --force replaces.
    status, _, err = store.cp(capsys, "--force", str(root / "one"), store.url("tree/one"))
    assert status == 0 and not err
    assert store.files()["tree/one"] == b"changed"
    (root / "block").write_bytes(b"changed too")
    status, _, err = store.cp(capsys, "-r", "--force", str(root), store.url("tree"))
    assert status == 0 and "skipped" not in err, err
    assert store.files()["tree/block"] == b"changed too"


def test_a_file_where_the_store_has_a_folder_fails_and_the_rest_is_copied(
    capsys: pytest.CaptureFixture[str], store: Store, local: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = local
    store.make_folder("tree/one")
    status, _, err = store.cp(capsys, "-r", str(root), store.url("tree"))
    assert status == 1
    assert f"failed {root}/one: Is a directory" in err
    held = store.files()
    assert digests({rel: data for rel, data in held.items() if not rel.startswith("tree/one/")}) == digests(
        {f"tree/{rel}": data for rel, data in files.items() if rel != "one"}
    )


def test_a_store_that_refuses_writes_fails_with_its_reason(
    capsys: pytest.CaptureFixture[str],
    refusing_store: Store,
    local: tuple[Path, dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = refusing_store
    assert store.refusing is not None
    root, _ = local
    url, env, says = store.refusing
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        status, _, one_err = store.cp(capsys, str(root / "one"), url + "one")
        tree_status, _, tree_err = store.cp(capsys, "-r", str(root / "sub dir"), url + "tree")
    assert status == 1 and says in one_err, one_err
    assert tree_status == 1 and (says in tree_err or "refused to make folder" in tree_err), tree_err
    if not env:  # the store answered the stat, then refused the upload: reported per file
        assert one_err.startswith(f"failed {root}/one: "), one_err
    assert "wrong" not in one_err + tree_err
    assert store.files() == {}


def test_cp_url_url_copies_between_stores_through_the_engine(
    capsys: pytest.CaptureFixture[str], store: Store, local: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, files = local
    os.utime(root / "many.bin", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    # file:// -> the store: read through the block engine (tiny blocks: many edges), spooled, uploaded
    status, _, err = store.cp(capsys, "-r", root.as_uri(), store.url("copied"), "--block-size", "64K")
    assert status == 0, err
    assert digests(store.files()) == digests({f"copied/{rel}": data for rel, data in files.items()})
    # ... and back into another file:// folder, one file and a tree
    back = tmp_path / "back"
    back.mkdir()
    status, _, err = store.cp(capsys, store.url("copied/many.bin"), (back / "one copy").as_uri())
    assert status == 0, err
    assert (back / "one copy").read_bytes() == files["many.bin"]
    if store.kind == "file":  # file:// keeps times
        assert (back / "one copy").stat().st_mtime_ns == 1_600_000_000_000_000_000
    status, _, err = store.cp(capsys, "-r", store.url("copied"), (back / "tree").as_uri(), "--block-size", "64K")
    assert status == 0, err
    assert digests(local_tree(back / "tree")) == digests(files)


# --- file:// and the local side ---------------------------------------------------------------------------------


@pytest.fixture
def file_store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Store]:
    with open_store("file", tmp_path, request) as it:
        yield it


def test_uploads_keep_mtimes_on_file_stores(
    capsys: pytest.CaptureFixture[str], file_store: Store, local: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, _ = local
    os.utime(root / "many.bin", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))
    os.utime(root / "sub dir", ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_000))
    status, _, err = file_store.cp(capsys, "-r", str(root), file_store.url("t"))
    assert status == 0, err
    target = tmp_path / "store" / "t"
    assert (target / "many.bin").stat().st_mtime_ns == 1_500_000_000_000_000_001
    assert (target / "sub dir").stat().st_mtime_ns == 1_400_000_000_000_000_000
    assert not [p for p in target.rglob("*") if p.name.endswith(".tmp")]


def test_local_links_are_followed_as_cp_rL_without_loops(
    capsys: pytest.CaptureFixture[str], file_store: Store, tmp_path: Path
) -> None:
    root = tmp_path / "links"
    (root / "real").mkdir(parents=True)
    (root / "real" / "data.txt").write_bytes(b"data")
    (root / "file-link").symlink_to("real/data.txt")  # a file
    (root / "folder-link").symlink_to("real")  # a folder
    (root / "real" / "loop").symlink_to("..")  # holds itself: skipped
    (root / "dangling").symlink_to("nowhere")  # fails
    os.mkfifo(root / "fifo")  # skipped (never opened: it would block)
    status, _, err = file_store.cp(capsys, "-r", str(root), file_store.url("t"))
    assert status == 1
    assert f"failed {root}/dangling: No such file or directory" in err
    assert f"skipped {root}/fifo: not a regular file or folder" in err
    assert f"skipped {root}/real/loop: a link to a folder that holds it (a loop); not followed" in err
    assert f"skipped {root}/folder-link/loop: a link to a folder that holds it (a loop); not followed" in err
    assert "3 copied, 3 skipped, 1 failed" in err
    assert file_store.files() == {"t/file-link": b"data", "t/folder-link/data.txt": b"data", "t/real/data.txt": b"data"}


def test_bad_sources_and_targets_are_clear_errors(
    capsys: pytest.CaptureFixture[str], file_store: Store, local: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, _ = local
    status, _, err = file_store.cp(capsys, str(root), file_store.url("t"))
    assert status == 1 and "Is a directory" in err and "-r" in err
    status, _, err = file_store.cp(capsys, str(tmp_path / "nope"), file_store.url("t"))
    assert status == 1 and "No such file or directory" in err
    status, _, err = file_store.cp(capsys, str(root / "one"), file_store.url("no/such/folder/x"))
    assert status == 1 and "No such file or directory" in err
    status, _, err = file_store.cp(capsys, str(root / "one"), file_store.url("x"))
    assert status == 0, err
    status, _, err = file_store.cp(capsys, "-r", str(root), file_store.url("x"))  # a file: no folder to fill
    assert status == 1 and "Not a directory" in err
    # https:// has no Writable: refused before any request (nothing listens on port 9)
    status, _, err = run(capsys, "cp", str(root / "one"), "https://127.0.0.1:9/upload/one")
    assert status == 1 and "Read-only file system" in err and "https://" in err
    assert file_store.files() == {"x": (root / "one").read_bytes()}


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (a real ENOSPC); skipped where this process may not mount."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_file_system_fails_with_enospc(
    capsys: pytest.CaptureFixture[str], tiny_fs: Path, local: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = local
    # One file at a time: the failed big file frees its space before the next one starts.
    status, _, err = run(capsys, "cp", "-r", str(root), tiny_fs.as_uri() + "/t", "--max-workers", "1")
    assert status == 1
    assert f"failed {root}/sub dir/deeper/big.bin: No space left on device" in err
    assert "big.bin" not in os.listdir(tiny_fs / "t" / "sub dir" / "deeper")
    assert not [p for p in tiny_fs.rglob("*") if p.name.endswith(".tmp")]  # no temp file left behind
    assert local_tree(tiny_fs / "t") == {rel: data for rel, data in files.items() if not rel.endswith("big.bin")}
