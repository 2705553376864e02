"""``fetch_range`` of the http(s):// source against the real HTTP file server on 127.0.0.1 (tests/support/httpfiles.py):
exact bytes up to the last one. The reader-level rules and the strictness of ``RangeFile`` are pure
(tests/unit/test_range_reads.py); a real mount's fetched bytes are in tests/mount/test_range_reads_mount.py."""

from __future__ import annotations

import random
from pathlib import Path

from directfs.sources.base import RangeReadable, SourceOptions
from directfs.sources.registry import create_source
from tests.support.httpfiles import serve_files

SIZE = 100_000
DATA = random.Random(3).randbytes(SIZE)


async def test_http_source_fetch_range_against_the_file_server(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(DATA)
    with serve_files(tmp_path) as files:
        source = create_source(files.url, SourceOptions())
        try:
            file = await source.open("f.bin", await source.stat("f.bin"))
            assert isinstance(file, RangeReadable)
            assert await file.fetch_range(99_000, 1000) == DATA[99_000:]
            await file.aclose()
        finally:
            await source.aclose()
