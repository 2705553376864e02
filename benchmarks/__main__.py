"""``make bench``: directfs measured side by side with what users would otherwise pick, in one run, on one machine.

Every figure is the median of ``--runs`` runs; every comparison is measured in the same run on the same data. The
results go to ``benchmarks/results/latest.json`` and ``benchmarks/results/latest.md`` (with the machine description),
and the table is printed.

Sections (``--only`` picks some):

* ``directio``   Direct IO download of one large file from the reference portal: directfs Streamer and Blocks APIs vs
                 the real cterasdk Blocks API (its own defaults), MB/s.
* ``mount``      the same file through ``directfs mount``: ``cat`` and ``dd bs=1M``, cold (fresh mount) and warm
                 (page cache), vs the Streamer API without FUSE (what FUSE costs) vs the plaintext on local disk.
* ``random``     4 KiB and 128 KiB random ``pread``s through the mount, cold and warm: p50/p99 latency, IOPS; time to
                 first byte of a cold file.
* ``metadata``   ``ls -l`` of a 10,000-entry folder, cold and warm.

Resource use (peak RSS, CPU seconds of the daemon) is recorded for every mount run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 1024 * 1024


# --- processes -------------------------------------------------------------------------------------------------


def directfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "directfs.cli", *args]


@dataclass
class Portal:
    url: str
    proc: subprocess.Popen[str]
    env: dict[str, str]


@contextlib.contextmanager
def portal(tree: Path, state: Path, extra: list[str] | None = None) -> Iterator[Portal]:
    env = dict(os.environ)
    env.update(
        DIRECTFS_ACCESS_KEY_ID="bench-" + secrets.token_hex(6),
        DIRECTFS_SECRET_ACCESS_KEY=base64.b64encode(secrets.token_bytes(30)).decode(),
        DIRECTFS_USERNAME="bench",
        DIRECTFS_PASSWORD=secrets.token_urlsafe(12),
    )
    cmd = directfs("serve", str(tree), "--listen", "127.0.0.1:0", "--state-dir", str(state), "--rescan-interval", "0")
    log = (state.parent / "portal.log").open("ab")  # its per-request access log would drown the table
    proc = subprocess.Popen([*cmd, *(extra or [])], stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on " in line:
                url = line.rsplit("listening on ", 1)[1].strip()
                break
        if url is None:
            raise SystemExit("reference portal failed to start")
        yield Portal(url, proc, env)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[bytes]

    def usage(self) -> dict[str, float]:
        """Peak RSS (MiB) and CPU seconds of the daemon so far."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return {"peak_rss_mib": hwm / 1024, "cpu_seconds": (int(fields[11]) + int(fields[12])) / ticks}


@contextlib.contextmanager
def mounted(source: str, mountpoint: Path, env: dict[str, str], extra: list[str] | None = None) -> Iterator[Mount]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the daemon; closed in the finally below
    proc = subprocess.Popen(
        directfs("mount", source, str(mountpoint), "-f", *(extra or [])), env=env, stderr=log, stdout=log
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit("mount failed:\n" + log.read().decode(errors="replace")[-4000:])
            time.sleep(0.05)
        os.listdir(mountpoint)
        yield Mount(mountpoint, proc)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)
            proc.kill()
        log.close()


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# --- measurement -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    what: str
    value: float
    unit: str
    runs: list[float] = field(default_factory=list)
    note: str = ""


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    values = [measure() for _ in range(runs)]
    return statistics.median(values), values


def timed_read(cmd: list[str], size: int) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return size / MiB / (time.perf_counter() - start)


def make_data(path: Path, size: int) -> None:
    """Mixed data: half incompressible, half text-like, so compression neither wins nor loses everything."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = random.Random(42)
    text = b"".join(f"{i:08d} directfs benchmark line, {rng.random():.12f}\n".encode() for i in range(20000))
    with path.open("wb") as f:
        written = 0
        while written < size:
            piece = (rng.randbytes(MiB // 2) + text[: MiB // 2])[: size - written]
            f.write(piece)
            written += len(piece)


# --- sections --------------------------------------------------------------------------------------------------


def streamer_mbps(url: str, env: dict[str, str], file_id: str, size: int, api: str) -> float:
    code = f"""
import time, trio
from directfs import DirectIO, ByteRange
async def main():
    async with DirectIO({url!r}, {env["DIRECTFS_ACCESS_KEY_ID"]!r}, {env["DIRECTFS_SECRET_ACCESS_KEY"]!r}) as dio:
        start = time.perf_counter(); n = 0
        if {api!r} == "streamer":
            async with dio.streamer({file_id!r}, ByteRange(0)) as stream:
                async for fragment in stream:
                    n += len(fragment)
        else:
            async with dio.blocks({file_id!r}) as blocks:
                async for block in blocks:
                    n += len(block.data)
        assert n == {size}, n
        print(n / 1048576 / (time.perf_counter() - start))
trio.run(main)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def cterasdk_mbps(url: str, env: dict[str, str], file_id: str, size: int) -> float:
    code = f"""
import asyncio, time
from cterasdk.direct.client import DirectIO
async def main():
    client = DirectIO({url!r}, {env["DIRECTFS_ACCESS_KEY_ID"]!r}, {env["DIRECTFS_SECRET_ACCESS_KEY"]!r})
    async with client:
        start = time.perf_counter(); n = 0
        for task in asyncio.as_completed(await client.blocks({int(file_id)})):
            block = await task
            n += len(block.data)
        assert n == {size}, n
        print(n / 1048576 / (time.perf_counter() - start))
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def file_id_of(portal_: Portal, rel: str) -> str:
    """The Direct IO id of ``rel``, from a PROPFIND Depth 0 parsed by our own (defusedxml) parser."""
    import httpx

    from directfs.sources import davxml

    reply = httpx.request(
        "PROPFIND",
        portal_.url + quote(f"/ServicesPortal/webdav/{rel}"),
        headers={"Depth": "0"},
        content=davxml.PROPFIND_BODY,
        auth=(portal_.env["DIRECTFS_USERNAME"], portal_.env["DIRECTFS_PASSWORD"]),
    )
    (resource,) = davxml.parse_multistatus(reply.content)
    assert resource.file_id, reply.text
    return resource.file_id


def section_directio(ctx: Context) -> None:
    fid = file_id_of(ctx.portal, ctx.big_name)
    for label, fn in [
        ("directfs Streamer API", lambda: streamer_mbps(ctx.portal.url, ctx.portal.env, fid, ctx.size, "streamer")),
        ("directfs Blocks API", lambda: streamer_mbps(ctx.portal.url, ctx.portal.env, fid, ctx.size, "blocks")),
        ("cterasdk 2.20.50 Blocks API", lambda: cterasdk_mbps(ctx.portal.url, ctx.portal.env, fid, ctx.size)),
    ]:
        value, runs = median_of(ctx.runs, fn)
        ctx.rows.append(Row("directio", label, value, "MB/s", runs))


def section_mount(ctx: Context) -> None:
    big = ctx.mountpoint / ctx.big_name
    fid = file_id_of(ctx.portal, ctx.big_name)
    streamer, streamer_runs = median_of(
        ctx.runs, lambda: streamer_mbps(ctx.portal.url, ctx.portal.env, fid, ctx.size, "streamer")
    )
    ctx.rows.append(Row("mount", "Streamer API, no FUSE (reference)", streamer, "MB/s", streamer_runs))
    for tool, cmd in [("cat", ["cat", str(big)]), ("dd bs=1M", ["dd", f"if={big}", "of=/dev/null", "bs=1M"])]:
        cold_runs, warm_runs, usage = [], [], {}
        for _ in range(ctx.runs):
            with mounted("ctera+" + ctx.portal.url, ctx.mountpoint, ctx.portal.env) as m:
                cold_runs.append(timed_read(cmd, ctx.size))
                warm_runs.append(timed_read(cmd, ctx.size))
                usage = m.usage()
        cold, warm = statistics.median(cold_runs), statistics.median(warm_runs)
        note = f"daemon peak RSS {usage['peak_rss_mib']:.0f} MiB, CPU {usage['cpu_seconds']:.1f} s"
        ctx.rows.append(Row("mount", f"{tool}, cold (fresh mount)", cold, "MB/s", cold_runs, note))
        ctx.rows.append(Row("mount", f"{tool}, warm (page cache)", warm, "MB/s", warm_runs))
        ctx.rows.append(Row("mount", f"{tool} cold / Streamer API", cold / streamer, "ratio", note="target >= 0.7"))
    local = ctx.tree / ctx.big_name
    dropped = drop_page_cache()
    value, runs = median_of(ctx.runs, lambda: timed_read(["cat", str(local)], ctx.size))
    ctx.rows.append(
        Row(
            "mount",
            "cat of the plaintext on local disk (ceiling)",
            value,
            "MB/s",
            runs,
            "" if dropped else "page cache could not be dropped: warm local read",
        )
    )


def section_random(ctx: Context) -> None:
    big = ctx.mountpoint / ctx.big_name
    for block in (4096, 128 * 1024):
        for state in ("cold", "warm"):
            with mounted("ctera+" + ctx.portal.url, ctx.mountpoint, ctx.portal.env) as m:
                offsets = [random.Random(7).randrange(0, ctx.size - block) for _ in range(200)]
                fd = os.open(big, os.O_RDONLY)
                try:
                    if state == "warm":
                        for off in offsets:
                            os.pread(fd, block, off)
                    latencies = []
                    start = time.perf_counter()
                    for off in offsets:
                        t0 = time.perf_counter()
                        os.pread(fd, block, off)
                        latencies.append((time.perf_counter() - t0) * 1000)
                    elapsed = time.perf_counter() - start
                finally:
                    os.close(fd)
                latencies.sort()
                usage = m.usage()
            p50 = latencies[len(latencies) // 2]
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            label = f"{block // 1024} KiB random pread, {state}"
            ctx.rows.append(Row("random", f"{label}: p50", p50, "ms"))
            ctx.rows.append(Row("random", f"{label}: p99", p99, "ms"))
            ctx.rows.append(
                Row(
                    "random",
                    f"{label}: IOPS",
                    len(offsets) / elapsed,
                    "IOPS",
                    note=f"daemon peak RSS {usage['peak_rss_mib']:.0f} MiB",
                )
            )
    ttfb = []
    for _ in range(ctx.runs):
        with mounted("ctera+" + ctx.portal.url, ctx.mountpoint, ctx.portal.env):
            t0 = time.perf_counter()
            with open(big, "rb") as f:
                f.read(1)
            ttfb.append((time.perf_counter() - t0) * 1000)
    ctx.rows.append(Row("random", "time to first byte, cold file", statistics.median(ttfb), "ms", ttfb))


def section_metadata(ctx: Context) -> None:
    folder = ctx.mountpoint / "many"
    cold_runs, warm_runs = [], []
    for _ in range(ctx.runs):
        with mounted("ctera+" + ctx.portal.url, ctx.mountpoint, ctx.portal.env):
            for bucket in (cold_runs, warm_runs):
                t0 = time.perf_counter()
                subprocess.run(["ls", "-l", str(folder)], check=True, stdout=subprocess.DEVNULL)
                bucket.append(time.perf_counter() - t0)
    ctx.rows.append(Row("metadata", f"ls -l of {ctx.many} entries, cold", statistics.median(cold_runs), "s", cold_runs))
    ctx.rows.append(Row("metadata", f"ls -l of {ctx.many} entries, warm", statistics.median(warm_runs), "s", warm_runs))


SECTIONS: dict[str, Callable[[Context], None]] = {
    "directio": section_directio,
    "mount": section_mount,
    "random": section_random,
    "metadata": section_metadata,
}


@dataclass
class Context:
    portal: Portal
    tree: Path
    mountpoint: Path
    big_name: str
    size: int
    runs: int
    many: int
    rows: list[Row] = field(default_factory=list)


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def render(rows: list[Row], info: dict[str, Any], runs: int) -> str:
    lines = [
        f"directfs benchmarks, {time.strftime('%Y-%m-%d')}, {info['cores']} cores ({info['cpu']}), "
        f"{info['memory_gib']} GiB, kernel {info['kernel']}, Python {info['python']}; medians of {runs} runs.",
        "",
        "| section | measurement | value | unit | runs | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs_text = ", ".join(f"{v:.1f}" for v in r.runs)
        lines.append(f"| {r.section} | {r.what} | {r.value:.2f} | {r.unit} | {runs_text} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=512, help="size of the large file (default 512)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    parser.add_argument("--many", type=int, default=10_000, help="entries in the metadata folder (default 10000)")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--workdir", default=str(HERE / "work"), help="data and state (kept between runs)")
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    tree, state, mountpoint = work / "tree", work / "state", work / "mnt"
    tree.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MiB
    big_name = f"big-{args.size_mib}MiB.bin"
    make_data(tree / big_name, size)
    many = tree / "many"
    many.mkdir(exist_ok=True)
    for i in range(args.many):
        p = many / f"f{i:06d}.txt"
        if not p.exists():
            p.write_bytes(b"x" * (i % 100))
    print(f"data ready in {tree}", flush=True)
    rows: list[Row] = []
    with portal(tree, state) as p:
        ctx = Context(p, tree, mountpoint, big_name, size, args.runs, args.many, rows)
        for name in args.only or list(SECTIONS):
            print(f"running {name} ...", flush=True)
            SECTIONS[name](ctx)
    info = machine()
    table = render(rows, info, args.runs)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(table)
    (RESULTS / "latest.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": info,
                "runs": args.runs,
                "size_mib": args.size_mib,
                "rows": [r.__dict__ for r in rows],
            },
            indent=2,
        )
    )
    if shutil.which("git"):
        print(f"results written to {RESULTS}/latest.md and latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
