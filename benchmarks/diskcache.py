"""``python -m benchmarks --only diskcache``: the disk cache (``--disk-cache``, docs/disk-cache.md) through the mount.

The main portal's large file (encrypted, 4 MiB snappy blocks: kept on disk as the ciphertext fetched) read with
``cat`` through ``directfs mount --disk-cache DIR``, per run in a fresh cache folder:

* cold: a fresh mount, empty cache (every block a GET; the blocks are written to DIR in the background);
* memory-warm: the same mount again (the kernel's page cache);
* disk-warm: unmounted, page cache dropped where possible, mounted again on the same DIR (zero block GETs: every
  block from DIR, checked and decoded);
* and ``cat`` of the plaintext file on the same disk, the issue's reference (target: disk-warm >= 0.8x of it).

Each mount's CPU and peak RSS are recorded as in the other sections.
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING

from benchmarks.__main__ import directfs, directfs_metrics_text, drop_page_cache, fuse_daemon, measure, timed_read

if TYPE_CHECKING:
    from benchmarks.__main__ import Context

SECTION = "diskcache"


def section_diskcache(ctx: Context) -> None:
    p = ctx.portal
    label = "directfs --disk-cache"
    ctx.peers[label] = (
        "directfs mount ctera+http://127.0.0.1:PORT MNT -f --disk-cache DIR (DIR on the work folder's disk, 10G bound; "
        "other settings default); the encrypted file's blocks are kept as fetched"
    )
    big = ctx.mountpoint / ctx.big_name
    local = ctx.tree / ctx.big_name
    for run in range(ctx.runs):
        cache = ctx.workdir / "disk-cache"
        shutil.rmtree(cache, ignore_errors=True)
        argv = directfs(
            "mount",
            "ctera+" + p.url,
            str(ctx.mountpoint),
            "-f",
            "--disk-cache",
            str(cache),
            "--disk-cache-key-file",
            str(ctx.workdir / "disk-cache.key"),
        )
        print(f"  run {run + 1}/{ctx.runs}: disk cache", flush=True)
        with fuse_daemon("directfs disk cache", argv, ctx.mountpoint, p.env, ctx.logs / "diskcache-1.log") as d:
            m = measure(lambda: timed_read(["cat", str(big)], ctx.size), d)
            ctx.table.add(SECTION, f"{label}: cat, cold (empty cache)", "MB/s", m.value, m.usage)
            m = measure(lambda: timed_read(["cat", str(big)], ctx.size), d)
            ctx.table.add(SECTION, f"{label}: cat, memory-warm (page cache)", "MB/s", m.value, m.usage)
            deadline = time.monotonic() + 60
            while "directfs_disk_cache_writes_total" not in (text := directfs_metrics_text(d)) or _pending(text):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        dropped = drop_page_cache()
        with fuse_daemon("directfs disk cache", argv, ctx.mountpoint, p.env, ctx.logs / "diskcache-2.log") as d:
            m = measure(lambda: timed_read(["cat", str(big)], ctx.size), d)
            note = "page cache dropped before" if dropped else "page cache not dropped (DIR files may be in memory)"
            ctx.table.add(SECTION, f"{label}: cat, disk-warm (remount)", "MB/s", m.value, m.usage, note=note)
        if dropped:
            drop_page_cache()
        ctx.table.add(SECTION, "cat of the plaintext on local disk", "MB/s", timed_read(["cat", str(local)], ctx.size))
    ctx.table.ratio(
        SECTION,
        "disk-warm / cat of the local file",
        (SECTION, f"{label}: cat, disk-warm (remount)"),
        (SECTION, "cat of the plaintext on local disk"),
        "target >= 0.8",
    )
    ctx.table.ratio(
        SECTION,
        "disk-warm / cold",
        (SECTION, f"{label}: cat, disk-warm (remount)"),
        (SECTION, f"{label}: cat, cold (empty cache)"),
    )


def _pending(text: str) -> bool:
    """Whether the daemon is still writing: fewer blocks written than fetched (a cold read fetched every block)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("directfs_disk_cache_writes_total ", "directfs_fetches_started_total ")):
            name, value = line.split()
            values[name] = float(value)
    written = values.get("directfs_disk_cache_writes_total", 0.0)
    return written < values.get("directfs_fetches_started_total", 0.0)
