"""A real mount of python's ``http.server``, which ignores Range (tests/support/norange.py): files read as one stream
from byte 0 (directfs.sources.httprange, "Servers that ignore Range") by ``cat``, ``sha256sum`` and random
``pread``s, a read too far from the stream failing with EOPNOTSUPP and its log line, and the daemon's memory while a
200 MiB file streams. Without FUSE: tests/component/test_web_norange.py."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mountd import mounted
from tests.support.norange import NoRangeServer, serve_no_range
from tests.support.sourcetree import needs_fuse

MiB = 1024 * 1024
BLOCK_ARGS = ["--block-size", "1M"]  # 3 blocks of 1 MiB: every read crosses block edges quickly
FILES = {name: random.Random(seed).randbytes(3 * MiB) for seed, name in enumerate(["cat.bin", "pread.bin", "far.bin"])}
BIG_BYTES = 200 * MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NoRangeServer]:
    root = tmp_path / "www"
    root.mkdir()
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    with serve_no_range(root) as served:
        yield served


def vm_hwm_bytes(pid: int) -> int:
    """The peak resident set of process ``pid`` (``VmHWM`` of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


@needs_fuse
@pytest.mark.mount
def test_cat_sha256sum_and_300_random_preads_are_byte_exact(server: NoRangeServer) -> None:
    with mounted(server.url, extra_args=BLOCK_ARGS) as m:
        cat = subprocess.run(["cat", str(m.mountpoint / "cat.bin")], capture_output=True, check=True, timeout=60)
        assert cat.stdout == FILES["cat.bin"]
        summed = subprocess.run(
            ["sha256sum", str(m.mountpoint / "cat.bin")], capture_output=True, check=True, timeout=60, text=True
        )
        assert summed.stdout.split()[0] == hashlib.sha256(FILES["cat.bin"]).hexdigest()

        data = FILES["pread.bin"]
        rng = random.Random(300)
        fd = os.open(m.mountpoint / "pread.bin", os.O_RDONLY)
        try:
            for _ in range(300):
                offset = rng.randrange(len(data))
                length = rng.choice([1, 512, 4096, 65536, 200_000, MiB + 3])
                assert os.pread(fd, length, offset) == data[offset : offset + length], (offset, length)
        finally:
            os.close(fd)
        # Each file was asked for a range once (a 200, its body unread), then read as streams without Range.
        for name in ("cat.bin", "pread.bin"):
            gets = server.gets(f"/{name}")
            assert None in gets and len(gets) - gets.count(None) <= 9, gets  # at most one burst of first reads


@needs_fuse
@pytest.mark.mount
def test_a_read_past_the_bound_is_eopnotsupp_with_one_clear_log_line(server: NoRangeServer) -> None:
    with mounted(server.url, extra_args=[*BLOCK_ARGS, "--no-range-max-size", "1M"]) as m:
        fd = os.open(m.mountpoint / "far.bin", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as caught:
                os.pread(fd, 4096, 2 * MiB + MiB // 2)  # 2.5 MiB from byte 0, past the 1 MiB bound
            assert caught.value.errno == errno.EOPNOTSUPP
        finally:
            os.close(fd)
        # The daemon said why, one line per failed READ, at WARNING (its subprocess logs are not the test's: read them).
        lines = [line for line in m.stderr().splitlines() if "failed: ENOTSUP" in line]  # = EOPNOTSUPP
        assert lines, m.stderr()
        assert "the server ignores Range" in lines[0] and "--no-range-max-size (1M)" in lines[0], lines[0]
        assert "WARNING" in lines[0], lines[0]
        # In order, a file reads whole past the bound. (Another file: the engine replays the refused block of
        # far.bin for its failed-block memory, 5 s, before it asks the source again.)
        assert (m.mountpoint / "cat.bin").read_bytes() == FILES["cat.bin"]


@needs_fuse
@pytest.mark.mount
def test_peak_daemon_memory_stays_bounded_while_200_mib_stream(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    rng = random.Random(200)
    digest = hashlib.sha256()
    with open(root / "big.bin", "wb") as out:
        for _ in range(BIG_BYTES // (8 * MiB)):
            piece = rng.randbytes(8 * MiB)
            digest.update(piece)
            out.write(piece)
    with serve_no_range(root) as server, mounted(server.url) as m:  # the default 8 MiB blocks and cache
        assert os.path.getsize(m.mountpoint / "big.bin") == BIG_BYTES
        before = vm_hwm_bytes(m.proc.pid)
        summed = subprocess.run(
            ["sha256sum", str(m.mountpoint / "big.bin")], capture_output=True, check=True, timeout=300, text=True
        )
        assert summed.stdout.split()[0] == digest.hexdigest()
        grown = vm_hwm_bytes(m.proc.pid) - before
        # Read-ahead (32 MiB in the cache), what a stream keeps (16 MiB) and the block it fills: never the file.
        assert grown < 120 * MiB, f"the daemon's peak grew by {grown / MiB:.0f} MiB while 200 MiB streamed"
        assert server.gets("/big.bin").count(None) == 1  # one stream from byte 0 to the end
