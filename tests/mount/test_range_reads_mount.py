"""Cheap first fetch through a real mount: random 4 KiB reads through the kernel over the HTTP file server fetch
small ranges, not whole blocks, checked with the daemon's own ``directfs_read_bytes_fetched_total``. The rules
themselves are pure (tests/unit/test_range_reads.py)."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.httpfiles import serve_files
from tests.support.mountd import directfs_command, fuse_available, mounted

KiB = 1024


def fetched_bytes(mountpoint: Path) -> float:
    text = subprocess.run(
        directfs_command("stats", "--raw", str(mountpoint)), check=True, capture_output=True, text=True, timeout=30
    ).stdout
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "directfs_read_bytes_fetched_total":
                return sample.value
    raise AssertionError("directfs_read_bytes_fetched_total missing from the daemon's metrics")


@pytest.mark.mount
@pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root")
def test_mount_random_4k_read_fetches_far_less_than_a_block(tmp_path: Path) -> None:
    size = 24 * 1024 * KiB  # three 8 MiB blocks (the default plain-store block size)
    data = random.Random(11).randbytes(size)
    (tmp_path / "big.bin").write_bytes(data)
    with serve_files(tmp_path) as files, mounted(files.url) as mount:
        before = fetched_bytes(mount.mountpoint)
        fd = os.open(mount.mountpoint / "big.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead: one 4 KiB READ per pread
            offsets = [13 * 1024 * KiB + 12_288, 5 * 1024 * KiB + 4096, 20 * 1024 * KiB]
            for offset in offsets:
                assert os.pread(fd, 4096, offset) == data[offset : offset + 4096]
        finally:
            os.close(fd)
        fetched = fetched_bytes(mount.mountpoint) - before
    assert 0 < fetched <= len(offsets) * 256 * KiB  # one default range per read, not an 8 MiB block each
