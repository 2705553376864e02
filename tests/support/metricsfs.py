"""A metered filesystem without FUSE for the metrics tests: ``FileSystem`` and the read engine over a small file://
tree, with the registry the daemon builds; and readers of exposition text."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from directfs import metrics
from directfs.engine.reader import ReadEngine, ReadSettings
from directfs.sources.base import SourceOptions
from directfs.sources.registry import create_source
from directfs.vfs import ROOT_INODE, FileSystem

BLOCK = 4096


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from exposition text (fails on invalid text)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


@dataclass
class Mounted:
    fs: FileSystem
    engine: ReadEngine
    ops: metrics.OpStats
    registry: object


@contextlib.asynccontextmanager
async def metered_fs(tmp_path: Path) -> AsyncIterator[Mounted]:
    """``a.bin`` (10 blocks + 7 bytes) and ``b.bin`` (3 blocks) under ``tmp_path / "data"``."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(os.urandom(10 * BLOCK + 7))
    (data / "b.bin").write_bytes(os.urandom(3 * BLOCK))
    source = create_source(f"file://{data}?block_size_bytes={BLOCK}", SourceOptions())
    async with trio.open_nursery() as nursery:
        engine = ReadEngine(ReadSettings(), nursery)
        fs = FileSystem(source, engine)
        await fs.start()
        ops = metrics.OpStats()
        registry = metrics.build_registry(
            metrics.Sources(read_statistics=engine.statistics, vfs_statistics=fs.statistics, op_stats=ops)
        )
        yield Mounted(fs, engine, ops, registry)
        await fs.aclose()
        nursery.cancel_scope.cancel()
    await source.aclose()


async def read_whole(fs: FileSystem, name: str) -> int:
    attrs = await fs.lookup(ROOT_INODE, name)
    fh, _ = await fs.open(attrs.inode, os.O_RDONLY)
    total = 0
    while chunk := await fs.read(fh, total, 5000):
        total += len(chunk)
    await fs.release(fh)
    return total
