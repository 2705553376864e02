"""fsx-style oracle: hypothesis-driven sequences of open, pread, read-after-seek, mmap and close over several files
of awkward sizes, through one real mount of the portal (started once per module), checked against the source bytes.

Regressions, the mechanism: hypothesis shrinks a failing sequence to a minimal one and stores it in the example
database configured below, ``tests/.hypothesis-regressions`` (a directory in the repository, not the default
``.hypothesis`` cache). Every later run replays the stored examples first, so a failure found once is re-checked on
every run until it is fixed. To make one permanent and reviewable, copy the shrunk sequence that hypothesis prints
("Falsifying example: ...") into an ``@example(...)`` decorator below; those run even with an empty database.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.support.blockserver import payload
from tests.support.faultproxy import ctera_env
from tests.support.mountd import Mount, fuse_available, mounted
from tests.support.portal import start_portal

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and root")]

BLOCK = 64 * 1024
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 123]
REGRESSIONS = DirectoryBasedExampleDatabase(str(Path(__file__).parents[1] / ".hypothesis-regressions"))

Op = tuple[str, int, int, int]  # (kind, file or handle slot, offset, length)


@pytest.fixture(scope="module")
def fsx_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, list[bytes]]]:
    tree = tmp_path_factory.mktemp("tree")
    contents = [payload(size, seed=size) for size in SIZES]
    for index, data in enumerate(contents):
        (tree / f"f{index}.bin").write_bytes(data)
    # Small cache: evictions and re-fetches happen within one sequence.
    with (
        start_portal(tree, extra_args=["--block-size", "64K", "--compression", "gzip"]) as portal,
        mounted("ctera+" + portal.url, env=ctera_env(portal), extra_args=["--cache-size", "1M"]) as mount,
    ):
        yield mount, contents


offsets = st.integers(min_value=0, max_value=6 * BLOCK)
lengths = st.sampled_from([0, 1, 7, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK])
operation = st.one_of(
    st.tuples(st.just("open"), st.integers(0, len(SIZES) - 1), st.just(0), st.just(0)),
    st.tuples(st.sampled_from(["pread", "seekread", "mmap", "close"]), st.integers(0, 3), offsets, lengths),
)


def run_sequence(mount: Mount, contents: list[bytes], ops: list[Op]) -> None:
    handles: list[tuple[int, int]] = []  # (fd, file index)
    try:
        for kind, slot, offset, length in ops:
            if kind == "open":
                handles.append((os.open(mount.mountpoint / f"f{slot}.bin", os.O_RDONLY), slot))
                continue
            if not handles:
                continue
            fd, index = handles[slot % len(handles)]
            expected = contents[index][offset : offset + length]
            if kind == "pread":
                assert os.pread(fd, length, offset) == expected, (kind, index, offset, length)
            elif kind == "seekread":
                assert os.lseek(fd, offset, os.SEEK_SET) == offset
                got = b""
                while len(got) < length and (piece := os.read(fd, length - len(got))):
                    got += piece
                assert got == expected, (kind, index, offset, length)
            elif kind == "mmap":
                if not contents[index]:
                    continue  # an empty file cannot be mapped
                with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
                    assert mapped[offset : offset + length] == expected, (kind, index, offset, length)
            elif kind == "close":
                os.close(fd)
                handles.pop(slot % len(handles))
    finally:
        for fd, _ in handles:
            os.close(fd)


@settings(
    max_examples=60,
    deadline=None,
    database=REGRESSIONS,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(operation, min_size=1, max_size=25))
@example(ops=[("open", 5, 0, 0), ("pread", 0, BLOCK - 1, 2), ("mmap", 0, 5 * BLOCK, BLOCK), ("close", 0, 0, 0)])
@example(
    ops=[("open", 0, 0, 0), ("pread", 0, 0, 4096), ("mmap", 0, 0, 1), ("open", 4, 0, 0), ("seekread", 1, BLOCK, 7)]
)
def test_random_operation_sequences_match_the_source(fsx_mount: tuple[Mount, list[bytes]], ops: list[Op]) -> None:
    mount, contents = fsx_mount
    run_sequence(mount, contents, ops)
