"""``python -m benchmarks --only listing``: listings at scale over WebDAV, directfs against rclone (issue 15).

One private nginx (tests/support/nginx.py: nginx-light + dav-ext, ``/open/`` without auth; ``tcp_nodelay`` is on by
default and the config keeps it: strace shows the worker setting TCP_NODELAY on each keep-alive connection) serves
one data folder under ``WORKDIR/listing/data``, made once
and kept:

* ``tree``: ``--tree`` small files (0-99 bytes) in folders of 1,000 (50,000 files + 50 folders by default);
* ``many``: one folder of ``--many`` small files (10,000);
* ``million``: with ``--listing-folder N`` (opt-in: 1,000,000 adds ~10 minutes), one folder of N empty files (made
  once, ~40 s for 1,000,000).

Peers, each a fresh mount per run (cold) and the same command again in it (warm), runs interleaved so that a slow
phase of the shared machine hits every peer alike:

* ``directfs``: ``directfs mount webdav://127.0.0.1:PORT/open/ MNT -f`` with its defaults (5 s metadata TTL);
* ``directfs --xattrs off``: the same, answering getxattr/listxattr ENOSYS, so the kernel stops sending the
  ``security.selinux`` / ``system.posix_acl_access`` probes ``ls -l`` makes for every entry;
* ``directfs --xattrs off --metadata-ttl 5m``: also trusting listings as long as rclone does by default
  (``--dir-cache-time 5m``), to tell what the TTL costs a warm pass from what the code costs;
* ``rclone``: ``rclone mount dav: MNT --read-only`` with rclone's defaults otherwise (a webdav remote, vendor
  ``other``, from ``RCLONE_CONFIG_DAV_*`` variables and an empty config file in the work folder).

Figures: ``ls -lR`` and ``find`` over the tree, ``ls -l`` of the 10,000-entry folder (seconds, cold and warm), the
FUSE requests directfs answered in the first run (its ``directfs_fuse_requests_total``), ratios rclone time / directfs
time (> 1: directfs faster), and (opt-in) the daemons' memory while they list the big folder with ``ls -f`` (no
stat, no sort: the kernel's READDIRPLUS): the growth of its RSS over its RSS before the listing, sampled every
20 ms, per entry. With the daemon's defaults that folder fails ETIMEDOUT (see ``BIG_DEADLINE_SECONDS``), so one
more row lists it with both deadlines raised. Finally ``memory_breakdown`` lists the 10,000-entry folder in this
process, without FUSE, through the same WebDAVSource and FileSystem the daemon uses, and says with tracemalloc where
the bytes per entry go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.__main__ import (
    Context,
    Daemon,
    clean_env,
    directfs,
    directfs_fuse_requests,
    ensure_tools,
    fmt,
    fuse_daemon,
    measure,
)

SECTION = "listing"
PER_FOLDER = 1000  # files per folder of the tree: 50 folders of 1,000 is the 50,000-entry tree
# rclone's --dir-cache-time default (rclone mount docs): the row that trusts listings as long as rclone does.
RCLONE_DIR_CACHE_TIME = "5m"
RSS_SAMPLE_SECONDS = 0.02  # RSS sampling period while the big folder lists: a peak lasts far longer than this
# A 1,000,000-entry webdav:// folder fails ETIMEDOUT after ~20 s here, twice over: the PROPFIND and its whole
# ~340 MB reply must fit in the RetryPolicy's 20 s total budget, and the listing yields its first entry only once
# that reply is parsed, under a 20 s per-entry deadline (VfsSettings.metadata_deadline_seconds). Neither is an
# option; to measure the listing's memory at all, one row runs the daemon with both raised (BIG_DEADLINE_SHIM).
BIG_DEADLINE_SECONDS = 600.0
# ``python -c SHIM SECONDS mount ...``: directfs's own CLI with both deadlines replaced (benchmarks only).
BIG_DEADLINE_SHIM = """
import dataclasses, functools, sys
import directfs.commands.mount as command
import directfs.sources.httpstore as httpstore
deadline = float(sys.argv.pop(1))
httpstore.RetryPolicy = functools.partial(httpstore.RetryPolicy, total_budget_seconds=deadline)
built = command.mount_config
def mount_config(*args, **kwargs):
    config = built(*args, **kwargs)
    vfs = dataclasses.replace(config.vfs_settings, metadata_deadline_seconds=deadline)
    return dataclasses.replace(config, vfs_settings=vfs)
command.mount_config = mount_config
from directfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


# --- data ------------------------------------------------------------------------------------------------------


def _make_files(
    folder: Path, count: int, size_of: Callable[[int], int], name: Callable[[int], str], markers: Path
) -> None:
    """``count`` files in ``folder``, once: a marker in ``markers`` (outside the served data, so no listing shows
    it) says it is complete; an interrupted run finishes the job, keeping the files it finds."""
    marker = markers / f"{folder.name}-{count}.done"
    if marker.exists():
        return
    if count >= 100_000:
        print(f"  making {folder} ({count:,} files, once)", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / name(i)
        size = size_of(i)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if size and os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)
                os.write(fd, b"x" * size)
        finally:
            os.close(fd)
    marker.write_text("")


def make_data(root: Path, markers: Path, tree_files: int, many: int, big: int) -> None:
    markers.mkdir(parents=True, exist_ok=True)
    tree = root / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    folders = max(1, tree_files // PER_FOLDER)
    for f in range(folders):
        first = f * PER_FOLDER
        count = min(PER_FOLDER, tree_files - first)
        _make_files(
            tree / f"d{f:04d}", count, lambda i: i % 100, lambda i, first=first: f"f{first + i:06d}.txt", markers
        )
    _make_files(root / "many", many, lambda i: i % 100, lambda i: f"f{i:06d}.txt", markers)
    if big:
        _make_files(root / "million", big, lambda i: 0, lambda i: f"f{i:07d}", markers)


# --- servers and peers -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def nginx(workdir: Path, root: Path) -> Iterator[Any]:
    from tests.support.nginx import start_nginx

    with start_nginx(workdir, root) as server:
        yield server


@dataclass(frozen=True)
class Peer:
    label: str
    description: str
    start: Callable[[], contextlib.AbstractContextManager[Daemon]]
    is_directfs: bool
    big_only: bool = False  # only for the big folder


def peers(ctx: Context, host: str, mnt: Path) -> list[Peer]:
    url = f"webdav://{host}/open/"
    log = ctx.logs / "listing-daemons.log"
    version = ctx.versions["directfs"]
    out = []
    for label, extra in (
        ("directfs", ()),
        ("directfs --xattrs off", ("--xattrs", "off")),
        (f"directfs --xattrs off --metadata-ttl {RCLONE_DIR_CACHE_TIME}", ("--xattrs", "off", "--metadata-ttl", "5m")),
    ):
        argv = directfs("mount", url, str(mnt), "-f", *extra)
        description = f"directfs {version} mount webdav://127.0.0.1:PORT/open/ MNT -f {' '.join(extra)}".rstrip() + (
            " (defaults: --metadata-ttl 5s, --xattrs on)" if not extra else ""
        )
        out.append(Peer(label, description, functools.partial(fuse_daemon, label, argv, mnt, clean_env(), log), True))
    argv = [sys.executable, "-c", BIG_DEADLINE_SHIM, str(BIG_DEADLINE_SECONDS), "mount", url, str(mnt), "-f"]
    label = f"directfs, deadlines {BIG_DEADLINE_SECONDS:.0f} s"
    out.append(
        Peer(
            label,
            f"directfs {version} mount webdav://127.0.0.1:PORT/open/ MNT -f with the listing deadline and the "
            f"PROPFIND's retry budget {BIG_DEADLINE_SECONDS:.0f} s instead of 20 s (benchmarks/listing.py "
            "BIG_DEADLINE_SHIM; big folder only)",
            functools.partial(fuse_daemon, label, argv, mnt, clean_env(), log),
            True,
            big_only=True,
        )
    )
    rclone_v = ctx.versions.get("rclone")
    if rclone_v:
        conf = ctx.workdir / SECTION / "rclone.conf"  # empty: the remote comes from RCLONE_CONFIG_DAV_* variables
        conf.write_text("")
        env = clean_env(
            RCLONE_CONFIG_DAV_TYPE="webdav",
            RCLONE_CONFIG_DAV_URL=f"http://{host}/open/",
            RCLONE_CONFIG_DAV_VENDOR="other",
        )
        argv = ["rclone", "--config", str(conf), "mount", "dav:", str(mnt), "--read-only"]
        out.append(
            Peer(
                "rclone",
                f"rclone {rclone_v} (Debian) mount dav: MNT --read-only (defaults otherwise: --vfs-cache-mode off, "
                "--dir-cache-time 5m, --attr-timeout 1s); remote from RCLONE_CONFIG_DAV_{TYPE=webdav,"
                "URL=http://127.0.0.1:PORT/open/,VENDOR=other}",
                functools.partial(fuse_daemon, "rclone", argv, mnt, env, log),
                False,
            )
        )
    return out


# --- measurements ----------------------------------------------------------------------------------------------


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def requests_note(before: dict[str, float], after: dict[str, float]) -> str:
    ops = {op: after[op] - before.get(op, 0.0) for op in after if after[op] > before.get(op, 0.0)}
    return "FUSE requests (first run): " + ", ".join(f"{op} {n:.0f}" for op, n in sorted(ops.items()))


def cold_warm(ctx: Context, peer: Peer, what: str, cmd: Callable[[Path], list[str]], first_run: bool) -> None:
    with peer.start() as d:
        for state in ("cold", "warm"):
            before = directfs_fuse_requests(d) if peer.is_directfs else {}
            m = measure(functools.partial(timed, cmd(d.path)), d)
            note = requests_note(before, directfs_fuse_requests(d)) if peer.is_directfs and first_run else ""
            ctx.table.add(SECTION, f"{peer.label}: {what}, {state}", "s", m.value, m.usage, note=note)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def last_failure(log: Path) -> str:
    """The last ``... failed: ...`` line a daemon logged (why a listing failed), or ''."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if " failed: " in line]
    return lines[-1].split(" failed: ", 1)[1][:200] if lines else ""


def big_listing(ctx: Context, peer: Peer, entries: int) -> None:
    """One fresh mount: its RSS before, ``ls -f`` of the big folder (timed) while a thread samples the RSS, and the
    RSS once ``ls`` has exited. A listing that fails is a row saying how and after how long."""
    what = f"{peer.label}: ls -f of a {entries:,}-entry folder"
    t0 = time.perf_counter()
    try:
        big_listing_once(ctx, peer, entries, what)
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        reason = last_failure(ctx.logs / "listing-daemons.log") if peer.is_directfs else ""
        ctx.table.add(
            SECTION,
            f"{what}: failed after",
            "s",
            time.perf_counter() - t0,
            note=f"FAILED: {reason or exc}",
        )


def big_listing_once(ctx: Context, peer: Peer, entries: int, what: str) -> None:
    with peer.start() as d:
        pid = d.proc.pid
        time.sleep(1.0)  # let the fresh daemon settle (start-up allocations, rclone's first GC)
        before = rss_kib(pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                with contextlib.suppress(OSError, RuntimeError):
                    peak[0] = max(peak[0], rss_kib(pid))
                done.wait(RSS_SAMPLE_SECONDS)

        listed: list[int] = []

        def run() -> float:
            t0 = time.perf_counter()
            out = subprocess.run(["ls", "-f", str(d.path / "million")], check=True, capture_output=True)
            elapsed = time.perf_counter() - t0
            # . and .. only when the daemon sends them (pyfuse3 does not; the kernel adds none)
            listed.append(sum(1 for name in out.stdout.split(b"\n") if name not in (b"", b".", b"..")))
            return elapsed

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            m = measure(run, d)
        finally:
            done.set()
            sampler.join()
        after = rss_kib(pid)
    if listed != [entries]:
        raise RuntimeError(f"{peer.label} listed {listed} entries of {entries}")
    growth = (peak[0] - before) * 1024
    ctx.table.add(SECTION, f"{what}, cold", "s", m.value, m.usage)
    ctx.table.add(
        SECTION, f"{what}: daemon RSS growth, peak", "MiB", growth / 2**20, note=f"RSS before: {before / 1024:.0f} MiB"
    )
    ctx.table.add(
        SECTION,
        f"{what}: daemon RSS growth per entry, peak",
        "bytes",
        growth / entries,
        note="target < ~300 bytes (issue 15)" if peer.is_directfs else "",
    )
    ctx.table.add(
        SECTION,
        f"{what}: daemon RSS growth per entry, after",
        "bytes",
        (after - before) * 1024 / entries,
        note="once ls has exited: what stays held, or is not given back to the OS",
    )


# --- where a listing's bytes go, in this process (no FUSE) ---------------------------------------------------------


def memory_breakdown(host: str, folder: str, entries: int) -> str:
    """List ``/open/FOLDER/`` through directfs's own WebDAVSource and FileSystem here, measuring with tracemalloc
    what each stage holds: the parsed PROPFIND resources (and the parse's peak), the Entry objects, the cached
    listing (list + by-name dict), and the inodes readdir creates (one per entry the kernel accepts). Bytes per entry
    hardly depend on the count (dicts and lists grow geometrically), and tracemalloc slows parsing several times, so
    the section runs it on the 10,000-entry folder."""
    import trio

    from directfs.sources.base import SourceOptions
    from directfs.sources.webdav import WebDAVSource
    from directfs.vfs import ROOT_INODE, FileSystem, VfsSettings

    class NoEngine:
        def open(self, file: object, identity: object) -> Any:
            raise AssertionError("no reads here")

    rows: list[tuple[str, float, str]] = []

    def now() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    async def main() -> None:
        # tracemalloc slows parsing several times: the per-read timeout must not cut the 340 MB reply short.
        source = WebDAVSource(f"webdav://{host}/open/", SourceOptions(read_timeout_seconds=BIG_DEADLINE_SECONDS))
        source._retry = dataclasses.replace(source._retry, total_budget_seconds=BIG_DEADLINE_SECONDS)
        try:
            tracemalloc.start()
            base = now()
            tracemalloc.reset_peak()
            resources = await source._propfind(folder, 1)
            parsed = now()
            parse_peak = tracemalloc.get_traced_memory()[1]
            rows.append(
                (
                    "DavResource objects (the PROPFIND reply, parsed; held until the Entry objects are made)",
                    (parsed - base) / entries,
                    f"peak while parsing: {(parse_peak - base) / entries:.0f} B/entry",
                )
            )
            del resources
            base = now()
            entries_list = [e async for e in source.list_dir(folder)]
            made = now()
            rows.append(
                (
                    "Entry objects (frozen slotted dataclass: name, is_dir, size, mtime_ns, version, ...)",
                    (made - base) / entries,
                    f"{len(entries_list):,} entries",
                )
            )
            del entries_list
            # The daemon's path: FileSystem._list keeps Entry list + by-name dict; readdir makes an inode per entry.
            # The default cache (200,000 entries) would not keep it, the default deadline would fail it (see above).
            settings = VfsSettings(listing_cache_entries=10 * entries, metadata_deadline_seconds=BIG_DEADLINE_SECONDS)
            fs = FileSystem(source, NoEngine(), settings)  # type: ignore[arg-type]
            await fs.start()
            base = now()
            tracemalloc.reset_peak()
            node = await fs.lookup(ROOT_INODE, folder)
            fh = await fs.opendir(node.inode)
            unpruned = now()
            list_peak = tracemalloc.get_traced_memory()[1]
            for _ in range(3):  # trio prunes stale deadlines from its heap in the run loop, once the task yields
                await trio.sleep(0)
            listed = now()
            rows.append(
                (
                    "stale CancelScopes left in trio's deadline heap by FileSystem._list until the listing task "
                    "yields (one scope per entry until fdc48db; one per listing since)",
                    (unpruned - listed) / entries,
                    "transient, but for the whole folder at once",
                )
            )
            rows.append(
                (
                    "cached listing: Entry objects + entries list + by_name dict (FileSystem._list)",
                    (listed - base) / entries,
                    f"peak while listing (DavResources + Entries + dict): {(list_peak - base) / entries:.0f} B/entry",
                )
            )
            count = 0

            def emit(name: str, attrs: object, next_id: int) -> bool:
                nonlocal count
                count += 1
                return True

            base = now()
            fs.readdir(fh, 0, emit)
            nodes = now()
            rows.append(
                (
                    "inode table after readdir: a _Node + path string + _nodes/_by_path entries per name",
                    (nodes - base) / entries,
                    f"{count:,} names accepted",
                )
            )
            fs.releasedir(fh)
            await fs.aclose()
        finally:
            tracemalloc.stop()
            await source.aclose()

    trio.run(main)
    total = rows[-2][1] + rows[-1][1]  # the cached listing and the inode table
    lines = [
        f"### Where a listing's memory goes: the {entries:,}-entry folder, tracemalloc in the benchmark process (the "
        "daemon's code, no FUSE)",
        "",
        "| stage | bytes per entry | note |",
        "|---|---|---|",
        *(f"| {what} | {value:.0f} | {note} |" for what, value, note in rows),
        f"| held by a daemon that listed the folder (cached listing + inodes) | {total:.0f} | |",
    ]
    return "\n".join(lines)


# --- the section -----------------------------------------------------------------------------------------------


def summary(ctx: Context, labels: list[str], whats: list[str], rclone: str | None) -> str:
    def med(label: str, what: str) -> float:
        row = ctx.table.get(SECTION, f"{label}: {what}")
        return statistics.median(row.runs) if row is not None and row.runs else float("nan")

    ours = [label for label in labels if label != rclone]
    head = "| measurement | " + " | ".join(labels)
    if rclone:
        head += " | " + " | ".join(f"rclone / {label}" for label in ours)
    lines = [
        f"### Listings over WebDAV (nginx), directfs vs rclone: seconds, medians of {ctx.runs} fresh mounts",
        "",
        head + " |",
        "|---" * (1 + len(labels) + (len(ours) if rclone else 0)) + "|",
    ]
    for what in whats:
        cells = [fmt(med(label, what)) for label in labels]
        if rclone:
            cells += [f"**{fmt(med(rclone, what) / med(label, what))}x**" for label in ours]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cold = a fresh mount; warm = the same command again in that mount. rclone / directfs is rclone's time over "
        "directfs's (> 1: directfs faster; target >= 1.5, issue 15). nginx answers in one PROPFIND per folder; "
        "directfs's warm pass re-lists every folder whose 5 s TTL has expired, rclone keeps listings 5 minutes.",
    ]
    return "\n".join(lines)


def section_listing(ctx: Context) -> None:
    root = ctx.workdir / SECTION
    data = root / "data"
    big = ctx.listing_folder
    t0 = time.monotonic()
    make_data(data, root / "markers", ctx.tree_entries, ctx.many, big)
    print(f"  data ready in {time.monotonic() - t0:.0f} s", flush=True)
    if "rclone" not in ctx.versions:
        ctx.versions.update({k: v for k, v in ensure_tools(ctx.logs / "apt.log").items() if k == "rclone"})
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        ctx.table.note(SECTION, "listing", "skipped: nginx is not installed (make system-deps)")
        return
    mnt = ctx.workdir / "mnt-listing"
    tree_entries = ctx.tree_entries + max(1, ctx.tree_entries // PER_FOLDER)
    commands: list[tuple[str, Callable[[Path], list[str]]]] = [
        (f"ls -lR of {tree_entries:,} entries", lambda m: ["ls", "-lR", str(m / "tree")]),
        (f"find over {tree_entries:,} entries", lambda m: ["find", str(m / "tree")]),
        (f"ls -l of a {ctx.many:,}-entry folder", lambda m: ["ls", "-l", str(m / "many")]),
    ]
    with nginx(root / "nginx", data) as server:
        all_peers = peers(ctx, server.host, mnt)
        small_peers = [peer for peer in all_peers if not peer.big_only]
        for peer in all_peers:
            ctx.peers[f"listing: {peer.label}"] = peer.description
        ctx.peers["listing: nginx"] = (
            "nginx-light + libnginx-mod-http-dav-ext (tests/support/nginx.py), /open/ without auth, one worker, "
            "tcp_nodelay on (nginx's default), access_log off"
        )
        for run in range(ctx.runs):
            for what, cmd in commands:
                for peer in small_peers:
                    print(f"  run {run + 1}: {peer.label}: {what}", flush=True)
                    cold_warm(ctx, peer, what, cmd, run == 0)
        labels = [peer.label for peer in small_peers]
        rclone = "rclone" if "rclone" in labels else None
        whats = [f"{what}, {state}" for what, _ in commands for state in ("cold", "warm")]
        if rclone:
            for peer in small_peers:
                if peer.is_directfs:
                    for what in whats:
                        ctx.table.ratio(
                            SECTION,
                            f"rclone / {peer.label}: {what}",
                            (SECTION, f"rclone: {what}"),
                            (SECTION, f"{peer.label}: {what}"),
                            "rclone time / directfs time: > 1 means directfs is faster",
                        )
        ctx.summaries.append(summary(ctx, labels, whats, rclone))
        if big:
            chosen = [all_peers[0], *(p for p in all_peers if p.big_only or not p.is_directfs)]
            for run in range(ctx.runs):
                for peer in chosen:
                    print(f"  run {run + 1}: {peer.label}: {big:,}-entry folder", flush=True)
                    big_listing(ctx, peer, big)
        else:
            ctx.table.note(SECTION, "big folder", "skipped: opt-in with --listing-folder 1000000")
        print("  memory breakdown of a directfs listing (in this process)", flush=True)
        try:
            ctx.summaries.append(memory_breakdown(server.host, "many", ctx.many))
        except Exception as exc:  # a failed breakdown must not cost the table measured before it
            ctx.summaries.append(f"Memory breakdown failed: {type(exc).__name__}: {exc}")
