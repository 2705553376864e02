"""A tree of awkward files for the store-kind tests (http, s3, WebDAV, the CLI): build it, check it through a
``Source``, check it through a mount; and that tree in a bucket of a real S3 server (``s3_bucket``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directfs.sources.base import Entry, OpenFile, Source, SourceOptions

from .mountd import fuse_available
from .seaweed import SeaweedFS, start_seaweed

BLOCK = 64 * 1024  # small blocks: every file of the tree crosses block edges
SIZES = {"empty": 0, "one": 1, "block-1": BLOCK - 1, "block": BLOCK, "block+1": BLOCK + 1, "many.bin": 5 * BLOCK + 7}


def make_tree(root: Path) -> dict[str, bytes]:
    """Awkward sizes, a sub-folder, names that need quoting. Returns path -> content."""
    rng = random.Random(6)
    files: dict[str, bytes] = {}
    for name, size in SIZES.items():
        files[name] = rng.randbytes(size)
    files["sub dir/na me #1%.txt"] = b"hello, quoted world\n"
    files["sub dir/deeper/x"] = rng.randbytes(3 * BLOCK)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def options(**kwargs: object) -> SourceOptions:
    return SourceOptions(block_size_bytes=BLOCK, **kwargs)  # type: ignore[arg-type]


async def read_all(handle: OpenFile) -> bytes:
    return b"".join([bytes(await handle.fetch_block(i)) for i in range(handle.layout.block_count)])


async def pread(handle: OpenFile, offset: int, length: int) -> bytes:
    layout = handle.layout
    end = min(offset + length, layout.size)
    out = bytearray()
    pos = offset
    while pos < end:
        index = layout.block_at(pos)
        block = await handle.fetch_block(index)
        start = layout.block_start(index)
        out += block[pos - start : min(end - start, len(block))]
        pos = start + len(block)
    return bytes(out)


async def walk(source: Source, path: str = "") -> dict[str, Entry]:
    found: dict[str, Entry] = {}
    async for entry in source.list_dir(path):
        child = f"{path}/{entry.name}" if path else entry.name
        found[child] = entry
        if entry.is_dir:
            found.update(await walk(source, child))
    return found


async def check_tree(source: Source, files: dict[str, bytes]) -> None:
    """Listing, stat and exact bytes of every file, plus a seeded pread oracle."""
    entries = await walk(source)
    assert {p for p, e in entries.items() if not e.is_dir} == set(files)
    assert {p for p, e in entries.items() if e.is_dir} == {"sub dir", "sub dir/deeper"}
    rng = random.Random(42)
    for path, data in files.items():
        entry = entries[path]
        assert entry.size == len(data)
        assert (await source.stat(path)).version == entry.version
        handle = await source.open(path, entry)
        try:
            assert hashlib.sha256(await read_all(handle)).digest() == hashlib.sha256(data).digest()
            for _ in range(20):
                offset = rng.randrange(0, len(data) + 2)
                length = rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK])
                if offset < len(data):
                    assert await pread(handle, offset, length) == data[offset : offset + length]
        finally:
            await handle.aclose()


needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root")


def check_mounted_tree(mnt: Path, files: dict[str, bytes]) -> None:
    """``ls -lR``, sha256 of every file, and a seeded pread oracle with several fds open at once."""
    listing = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, timeout=60, check=True).stdout
    for rel, data in files.items():
        assert rel.rpartition("/")[2] in listing
        path = mnt / rel
        assert path.stat().st_size == len(data)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    rng = random.Random(7)
    big = [rel for rel, data in files.items() if len(data) > BLOCK]
    fds = {rel: os.open(mnt / rel, os.O_RDONLY) for rel in big}
    try:
        for _ in range(200):
            rel = rng.choice(big)
            data = files[rel]
            offset = rng.randrange(0, len(data) + 10)
            length = rng.choice([1, 100, 4096, BLOCK - 1, BLOCK + 1, 2 * BLOCK])
            assert os.pread(fds[rel], length, offset) == data[offset : offset + length]
    finally:
        for fd in fds.values():
            os.close(fd)


S3_PAGING_KEYS = 25


@contextlib.contextmanager
def s3_bucket(workdir: Path, bucket: str) -> Iterator[tuple[SeaweedFS, dict[str, bytes]]]:
    """SeaweedFS with ``make_tree`` under ``data/`` (plus a key with '+' and ' ', and a console-made folder marker
    ``data/sub dir/``), and ``S3_PAGING_KEYS`` keys and three sub-prefixes under ``paging/``. Yields the server and
    the files of ``data/`` (path -> content)."""
    with start_seaweed(workdir, buckets=(bucket,)) as s3:
        client: Any = s3.client()
        files = make_tree(workdir / "tree")
        files["plus+and space.txt"] = b"S3 url-encodes keys in listings: '+' and ' ' must survive\n"
        for rel, data in files.items():
            client.put_object(Bucket=bucket, Key=f"data/{rel}", Body=data)
        client.put_object(Bucket=bucket, Key="data/sub dir/", Body=b"")  # a console-made folder marker
        for i in range(S3_PAGING_KEYS):
            client.put_object(Bucket=bucket, Key=f"paging/key-{i:03d}", Body=b"%d" % i)
        for i in range(3):
            client.put_object(Bucket=bucket, Key=f"paging/sub-{i}/x", Body=b"x")
        yield s3, files


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: SeaweedFS) -> SeaweedFS:
    """Only the variables under test, for this process and the daemons it starts: ``s3``'s keys, no ~/.aws files,
    no instance metadata lookups."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3
