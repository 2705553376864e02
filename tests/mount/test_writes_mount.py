"""``directfs mount --rw`` (issue 14) through real FUSE mounts, checked from the server side: the scenarios of
tests/support/writes.py on every writable store, what close() answers when an upload fails, what is kept in the
spool's failed/ folder, SIGTERM in the middle of a write, and a killed daemon's spool found at the next mount.
The write-back rules without FUSE: tests/unit/test_vfs_writes.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.commands import isolate_cli_env
from tests.support.faultproxy import ctera_env
from tests.support.mountd import directfs_command, mounted, teardown
from tests.support.nginx import NginxDav, start_nginx
from tests.support.portal import Portal, start_portal
from tests.support.portalclients import sdk_download
from tests.support.seaweed import SeaweedFS, start_seaweed
from tests.support.sourcetree import isolate_aws_env, needs_fuse
from tests.support.writes import (
    FORTY_MIB,
    ServerView,
    check_copies,
    check_namespace_changes,
    check_reader_sees_old_until_close,
    check_tar_and_rsync,
    random_bytes,
)

pytestmark = needs_fuse


@pytest.fixture(autouse=True)
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_cli_env(monkeypatch, tmp_path)


def local_view(root: Path) -> ServerView:
    return ServerView(
        read=lambda rel: (root / rel).read_bytes(),
        exists=lambda rel: os.path.lexists(root / rel),
        is_dir=lambda rel: (root / rel).is_dir(),
    )


def rw_args(spool: Path) -> list[str]:
    return ["--rw", "--write-spool-dir", str(spool)]


# --- file:// ----------------------------------------------------------------------------------------------------


@pytest.fixture
def local_store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    (root / "kept.txt").write_bytes(b"kept\n")
    return root


@pytest.fixture
def local_mount(local_store: Path, tmp_path: Path) -> Iterator[Path]:
    with mounted(f"file://{local_store}", extra_args=rw_args(tmp_path / "spool")) as m:
        yield m.mountpoint


def test_file_store_copies(local_mount: Path, local_store: Path, tmp_path: Path) -> None:
    check_copies(local_mount, local_view(local_store), "copies", tmp_path)


def test_file_store_tar_and_rsync(local_mount: Path, local_store: Path, tmp_path: Path) -> None:
    check_tar_and_rsync(local_mount, local_view(local_store), "trees", tmp_path)


def test_file_store_namespace_changes(local_mount: Path, local_store: Path) -> None:
    check_namespace_changes(local_mount, local_view(local_store), "ns")


def test_file_store_reader_sees_the_old_bytes_until_close(local_mount: Path, local_store: Path) -> None:
    check_reader_sees_old_until_close(local_mount, local_view(local_store), "rw")


def test_without_rw_every_write_is_erofs(local_store: Path) -> None:
    with mounted(f"file://{local_store}") as m:
        for attempt in (
            lambda: (m.mountpoint / "new").write_bytes(b"x"),
            lambda: (m.mountpoint / "d").mkdir(),
            lambda: (m.mountpoint / "kept.txt").unlink(),
        ):
            with pytest.raises(OSError) as refused:
                attempt()
            assert refused.value.errno == errno.EROFS
    assert sorted(p.name for p in local_store.iterdir()) == ["kept.txt"]


def test_symlinks_and_xattrs_are_eopnotsupp_on_a_writable_mount(local_mount: Path) -> None:
    with pytest.raises(OSError) as link:
        os.symlink("kept.txt", local_mount / "link")
    assert link.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as xattr:
        os.setxattr(local_mount / "kept.txt", "user.x", b"1")
    assert xattr.value.errno == errno.EOPNOTSUPP


# --- s3:// (SeaweedFS) ------------------------------------------------------------------------------------------

BUCKET = "directfs-writes"


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with start_seaweed(tmp_path_factory.mktemp("weed"), buckets=(BUCKET,)) as s3:
        yield s3


def s3_view(s3: SeaweedFS, prefix: str) -> ServerView:
    client = s3.client()

    def key(rel: str) -> str:
        return f"{prefix}/{rel}"

    def read(rel: str) -> bytes:
        body: bytes = client.get_object(Bucket=BUCKET, Key=key(rel))["Body"].read()
        return body

    def exists(rel: str) -> bool:
        found = client.list_objects_v2(Bucket=BUCKET, Prefix=key(rel), MaxKeys=10).get("Contents", [])
        return any(o["Key"] in (key(rel), key(rel) + "/") or o["Key"].startswith(key(rel) + "/") for o in found)

    def is_dir(rel: str) -> bool:
        found = client.list_objects_v2(Bucket=BUCKET, Prefix=key(rel) + "/", MaxKeys=1).get("Contents", [])
        return bool(found)

    return ServerView(read=read, exists=exists, is_dir=is_dir)


@pytest.fixture
def s3_mount(
    weed: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Path, ServerView]]:
    isolate_aws_env(monkeypatch, tmp_path, weed)
    prefix = request.node.name.replace("[", "-").replace("]", "")
    weed.client().put_object(Bucket=BUCKET, Key=f"{prefix}/", Body=b"")
    args = [*rw_args(tmp_path / "spool"), "--endpoint-url", weed.endpoint]
    with mounted(f"s3://{BUCKET}/{prefix}", extra_args=args, env=weed.env()) as m:
        yield m.mountpoint, s3_view(weed, prefix)


def test_s3_copies(s3_mount: tuple[Path, ServerView], tmp_path: Path) -> None:
    check_copies(*s3_mount, "copies", tmp_path)


def test_s3_tar_and_rsync(s3_mount: tuple[Path, ServerView], tmp_path: Path) -> None:
    check_tar_and_rsync(*s3_mount, "trees", tmp_path)


def test_s3_namespace_changes(s3_mount: tuple[Path, ServerView]) -> None:
    check_namespace_changes(*s3_mount, "ns")


def test_s3_reader_sees_the_old_bytes_until_close(s3_mount: tuple[Path, ServerView]) -> None:
    check_reader_sees_old_until_close(*s3_mount, "rw")


def test_s3_folder_rename_is_exdev_and_mv_copies(s3_mount: tuple[Path, ServerView]) -> None:
    mnt, view = s3_mount
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"in a folder")
    with pytest.raises(OSError) as refused:
        os.rename(mnt / "d", mnt / "e")
    assert refused.value.errno == errno.EXDEV
    subprocess.run(["mv", str(mnt / "d"), str(mnt / "e")], check=True, capture_output=True, timeout=60)
    assert view.read("e/f") == b"in a folder"
    assert not view.exists("d/f")


# --- webdav:// (nginx) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NginxDav, Path]]:
    root = tmp_path_factory.mktemp("dav-root")
    with start_nginx(tmp_path_factory.mktemp("nginx"), root) as server:
        yield server, root


def dav_view(server: NginxDav, root: Path) -> ServerView:
    """nginx's side: a WebDAV GET for bytes (what the server serves), its folder for names."""
    import httpx

    def read(rel: str) -> bytes:
        reply = httpx.get(f"http://{server.host}/rw/{rel}", timeout=30)
        reply.raise_for_status()
        return reply.content

    return ServerView(
        read=read,
        exists=lambda rel: os.path.lexists(root / rel),
        is_dir=lambda rel: (root / rel).is_dir(),
    )


@pytest.fixture
def dav_mount(
    nginx: tuple[NginxDav, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Path, ServerView]]:
    server, root = nginx
    prefix = request.node.name.replace("[", "-").replace("]", "")
    (root / prefix).mkdir()
    with mounted(f"webdav://{server.host}/rw/{prefix}/", extra_args=rw_args(tmp_path / "spool")) as m:
        yield m.mountpoint, _under(dav_view(server, root), prefix)


def test_webdav_copies(dav_mount: tuple[Path, ServerView], tmp_path: Path) -> None:
    check_copies(*dav_mount, "copies", tmp_path)


def test_webdav_tar_and_rsync(dav_mount: tuple[Path, ServerView], tmp_path: Path) -> None:
    check_tar_and_rsync(*dav_mount, "trees", tmp_path)


def test_webdav_namespace_changes(dav_mount: tuple[Path, ServerView]) -> None:
    check_namespace_changes(*dav_mount, "ns")


def test_webdav_reader_sees_the_old_bytes_until_close(dav_mount: tuple[Path, ServerView]) -> None:
    check_reader_sees_old_until_close(*dav_mount, "rw")


# --- ctera+http:// (the reference portal, --writable) ------------------------------------------------------------


def portal_view(portal: Portal) -> ServerView:
    """The portal's side: PROPFIND for names, the real cterasdk's Direct IO download for bytes."""

    def entry(rel: str) -> object | None:
        try:
            (found,) = portal.propfind(rel, depth="0")
        except AssertionError:  # 404
            return None
        return found

    def read(rel: str) -> bytes:
        return sdk_download(portal, portal.file_id(rel)) if portal.propfind(rel, depth="0")[0].size else b""

    return ServerView(
        read=read,
        exists=lambda rel: entry(rel) is not None,
        is_dir=lambda rel: bool(getattr(entry(rel), "is_dir", False)),
    )


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tree = tmp_path_factory.mktemp("portal-tree")
    (tree / "kept.txt").write_bytes(b"kept\n")
    with start_portal(tree, writable=True, extra_args=["--chunking", "cdc"]) as it:
        yield it


@pytest.fixture
def ctera_mount(portal: Portal, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, ServerView]]:
    prefix = request.node.name.replace("[", "-").replace("]", "")
    (portal.tree / prefix).mkdir()
    portal.rescan()
    deadline = time.monotonic() + 10
    while not any(e.relpath == prefix for e in portal.propfind("")):
        assert time.monotonic() < deadline, "the portal did not pick up the test folder"
        time.sleep(0.05)
    with mounted(f"ctera+{portal.url}/{prefix}", extra_args=rw_args(tmp_path / "spool"), env=ctera_env(portal)) as m:
        yield m.mountpoint, _under(portal_view(portal), prefix)


def _under(view: ServerView, prefix: str) -> ServerView:
    return ServerView(
        read=lambda rel: view.read(f"{prefix}/{rel}"),
        exists=lambda rel: view.exists(f"{prefix}/{rel}"),
        is_dir=lambda rel: view.is_dir(f"{prefix}/{rel}"),
    )


def test_ctera_copies(ctera_mount: tuple[Path, ServerView], tmp_path: Path) -> None:
    check_copies(*ctera_mount, "copies", tmp_path)


def test_ctera_tar_and_rsync(ctera_mount: tuple[Path, ServerView], tmp_path: Path) -> None:
    check_tar_and_rsync(*ctera_mount, "trees", tmp_path)


def test_ctera_namespace_changes(ctera_mount: tuple[Path, ServerView]) -> None:
    check_namespace_changes(*ctera_mount, "ns")


def test_ctera_reader_sees_the_old_bytes_until_close(ctera_mount: tuple[Path, ServerView]) -> None:
    check_reader_sees_old_until_close(*ctera_mount, "rw")


def test_ctera_folder_rename_is_a_real_move(ctera_mount: tuple[Path, ServerView]) -> None:
    mnt, view = ctera_mount
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"moved with its folder")
    os.rename(mnt / "d", mnt / "e")
    assert view.read("e/f") == b"moved with its folder"
    assert not view.exists("d")
    assert (mnt / "e" / "f").read_bytes() == b"moved with its folder"


# --- a store that fails uploads: close() says so, the bytes are kept, nothing half-written on the server ---------


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (["--fault-put-status", "500"], errno.EIO),
        (["--fault-put-status", "507"], errno.ENOSPC),
        (["--fault-put-status", "401"], errno.EACCES),
        (["--fault-put-drop"], errno.EIO),
    ],
    ids=["500", "507", "401", "cut-body"],
)
def test_a_failing_store_makes_close_fail_and_keeps_the_bytes(tmp_path: Path, fault: list[str], code: int) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    spool = tmp_path / "spool"
    data = random_bytes(3 * 1024 * 1024 + 5, 3)
    with (
        start_portal(tree, writable=True, extra_args=fault) as portal,
        mounted(f"ctera+{portal.url}", extra_args=rw_args(spool), env=ctera_env(portal)) as m,
    ):
        fd = os.open(m.mountpoint / "out.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        with pytest.raises(OSError) as failed:
            os.close(fd)  # the upload's result
        assert failed.value.errno == code, m.stderr()
        # dd and cp see it as their exit status
        source = tmp_path / "in.bin"
        source.write_bytes(b"small")
        copy = subprocess.run(["cp", str(source), str(m.mountpoint / "cp.bin")], capture_output=True, timeout=60)
        assert copy.returncode != 0 and os.strerror(code).encode() in copy.stderr, copy.stderr
        assert "failed" in m.stderr() and str(spool / "failed") in m.stderr()
        # nothing half-written on the server side, in its folder or its listing
        assert sorted(p.name for p in tree.iterdir()) == []
        assert [e.relpath for e in portal.propfind("")] == [""]
    kept = {p.read_bytes() for p in (spool / "failed").glob("*.data")}
    assert kept == {data, b"small"}
    for sidecar in (spool / "failed").glob("*.json"):
        meta = json.loads(sidecar.read_text())
        assert meta["target"] in ("out.bin", "cp.bin") and meta["errno"] == errno.errorcode[code]
        assert meta["store"].startswith("ctera+http://127.0.0.1")


def test_a_retried_upload_succeeds_after_a_transient_500(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    args = ["--fault-put-status", "500", "--fault-put-count", "1"]
    with (
        start_portal(tree, writable=True, extra_args=args) as portal,
        mounted(f"ctera+{portal.url}", extra_args=rw_args(tmp_path / "spool"), env=ctera_env(portal)) as m,
    ):
        (m.mountpoint / "f").write_bytes(b"after one 500")
        assert (tree / "f").read_bytes() == b"after one 500"
    assert list((tmp_path / "spool" / "failed").glob("*")) == []


# --- SIGTERM and kill -9: nothing lost --------------------------------------------------------------------------


def _start_rw(source_url: str, mnt: Path, spool: Path, stderr: Path, *extra: str) -> subprocess.Popen[bytes]:
    mnt.mkdir(exist_ok=True)
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            directfs_command("mount", source_url, str(mnt), "-f", *rw_args(spool), *extra),
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        assert proc.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, stderr.read_text()
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_mid_write_loses_nothing(local_store: Path, tmp_path: Path, signum: signal.Signals) -> None:
    """SIGTERM: the upload completes (drain) or the bytes are in failed/. kill -9: the next mount finds them."""
    mnt, spool = tmp_path / "mnt", tmp_path / "spool"
    data = random_bytes(FORTY_MIB, 7)
    proc = _start_rw(f"file://{local_store}", mnt, spool, tmp_path / "daemon.log")
    try:
        fd = os.open(mnt / "big.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)  # written, not closed: the upload has not started
        proc.send_signal(signum)
        proc.wait(timeout=60)
        with contextlib.suppress(OSError):  # the mount is gone: the close cannot reach it
            os.close(fd)
    finally:
        teardown(mnt, proc)
    kept = list((spool / "failed").glob("*.data"))
    if signum == signal.SIGTERM:
        uploaded = (local_store / "big.bin").exists() and (local_store / "big.bin").read_bytes() == data
        assert uploaded or [p.read_bytes() for p in kept] == [data], (tmp_path / "daemon.log").read_text()
        return
    assert not (local_store / "big.bin").exists()
    assert [p.name for p in (spool / "active").glob("*.data")], "kill -9 leaves the spool in active/"
    with mounted(f"file://{local_store}", extra_args=rw_args(spool)) as m:
        assert "from a previous mount" in m.stderr()
    [kept_file] = (spool / "failed").glob("*.data")
    assert kept_file.read_bytes() == data
    sidecar = json.loads(kept_file.with_suffix(".json").read_text())
    assert sidecar["target"] == "big.bin"
