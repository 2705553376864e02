"""The write scenarios of issue 14, run through a real ``--rw`` mount of any store and checked from the server side.

A store under test gives a ``ServerView``: how to read a file, list a folder and test a name **on the server**
(the local folder for file://, boto3 for s3://, WebDAV GET/PROPFIND for webdav://, the real cterasdk for ctera+),
never through the mount. Each scenario writes with ordinary tools (``cp``, ``tar -x``, ``rsync -a``, ``mv``, shell
``>>``) into ``mnt/<prefix>`` and compares byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FORTY_MIB = 40 * 1024 * 1024


@dataclass
class ServerView:
    read: Callable[[str], bytes]  # the bytes of a file, from the server; raises on a missing one
    exists: Callable[[str], bool]  # a file or folder of that path is on the server
    is_dir: Callable[[str], bool]
    # Stores where the name of a new empty folder is not kept without an entry (none today: S3 writes a marker)
    settle: Callable[[], None] = lambda: None  # wait until the server shows what was written (rescans, caches)


def run(*argv: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, check=check, timeout=300)


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (a 40 MiB file without 40 MiB of os.urandom per test)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def nested_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha\n",
        "empty": b"",
        "dir1/b.bin": random_bytes(300_000, 1),
        "dir1/dir2/c.txt": b"gamma\n" * 1000,
        "dir1/dir2/dir3/d": b"d",
        "other/e.txt": b"epsilon",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def check_copies(mnt: Path, view: ServerView, prefix: str, local: Path) -> None:
    """cp of a 0-byte, a 1-byte and a 40 MiB file; each read back from the server."""
    (mnt / prefix).mkdir()
    for name, data in (("zero", b""), ("one", b"1"), ("forty", random_bytes(FORTY_MIB, 40))):
        source = local / f"{prefix}-{name}"
        source.write_bytes(data)
        run("cp", str(source), str(mnt / prefix / name))
        view.settle()
        got = view.read(f"{prefix}/{name}")
        assert got == data, f"{name}: server has {len(got)} bytes, wrote {len(data)}"


def check_tar_and_rsync(mnt: Path, view: ServerView, prefix: str, local: Path) -> None:
    tree = local / f"{prefix}-tree"
    files = nested_tree(tree)
    archive = local / f"{prefix}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="t")
    (mnt / prefix).mkdir()
    run("tar", "-xf", str(archive), "-C", str(mnt / prefix))
    run("rsync", "-a", f"{tree}/", str(mnt / prefix / "r"))
    view.settle()
    for rel, data in files.items():
        assert view.read(f"{prefix}/t/{rel}") == data, f"tar -x {rel}"
        assert view.read(f"{prefix}/r/{rel}") == data, f"rsync -a {rel}"
    # rsync's temp files (.name.XXXXXX) were renamed away, none is left on the server
    leftovers = [p.name for p in (mnt / prefix / "r").rglob(".*")]
    assert leftovers == [], leftovers
    # A second rsync after a change sends the changed file again (temp file + rename over the existing one).
    (tree / "a.txt").write_bytes(b"alpha, changed\n")
    run("rsync", "-a", "--checksum", f"{tree}/", str(mnt / prefix / "r"))
    view.settle()
    assert view.read(f"{prefix}/r/a.txt") == b"alpha, changed\n"


def check_namespace_changes(mnt: Path, view: ServerView, prefix: str) -> None:
    """Overwrite, append, mkdir/rmdir, unlink, rename of a file."""
    base = mnt / prefix
    base.mkdir()
    (base / "f.txt").write_bytes(b"first version\n")
    (base / "f.txt").write_bytes(b"second\n")  # open(O_TRUNC) over an existing file
    view.settle()
    assert view.read(f"{prefix}/f.txt") == b"second\n"
    with open(base / "f.txt", "ab") as out:  # an append: the old bytes are read into the spool first
        out.write(b"appended\n")
    view.settle()
    assert view.read(f"{prefix}/f.txt") == b"second\nappended\n"
    (base / "sub").mkdir()
    view.settle()
    assert view.is_dir(f"{prefix}/sub")
    (base / "sub").rmdir()
    view.settle()
    assert not view.exists(f"{prefix}/sub")
    os.rename(base / "f.txt", base / "g.txt")
    view.settle()
    assert view.read(f"{prefix}/g.txt") == b"second\nappended\n"
    assert not view.exists(f"{prefix}/f.txt")
    (base / "g.txt").unlink()
    view.settle()
    assert not view.exists(f"{prefix}/g.txt")
    assert not (base / "g.txt").exists()


def check_reader_sees_old_until_close(mnt: Path, view: ServerView, prefix: str) -> None:
    base = mnt / prefix
    base.mkdir()
    (base / "v").write_bytes(b"old bytes, version one")
    time.sleep(0.05)
    writer = os.open(base / "v", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(writer, b"NEW")
        with open(base / "v", "rb") as reader:
            assert reader.read() == b"old bytes, version one"
    finally:
        os.close(writer)  # the upload: close() returned 0
    with open(base / "v", "rb") as reader:
        assert reader.read() == b"NEW"
    view.settle()
    assert view.read(f"{prefix}/v") == b"NEW"
