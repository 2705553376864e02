"""``make bench``: directfs measured side by side with what users would otherwise pick, in one run, on one machine.

Every figure is the median of ``--runs`` runs; every comparison is measured in the same run on the same data. The
results go to ``benchmarks/results/latest.json`` and ``benchmarks/results/latest.md`` (with the machine description,
the commit, the load average and the exact peer versions and options), and the table is printed. Logs of the portal,
SeaweedFS and every daemon go to ``WORKDIR/logs/``, never to the terminal.

Sections (``--only`` picks some):

* ``directio``   Direct IO download of one large file from the reference portal: directfs Streamer and Blocks APIs vs
                 the real cterasdk Blocks API (its default, unbounded, and max_workers 4/8/16), MB/s and ratios.
* ``mount``      the same file through ``directfs mount``: ``cat`` and ``dd bs=1M``, cold (fresh mount) and warm
                 (page cache), vs the Streamer API without FUSE (what FUSE costs) vs the plaintext on local disk.
* ``random``     4 KiB and 128 KiB random reads through the mount (fio psync if installed, else a Python pread loop),
                 cold (fresh mount) and warm (the same offsets again): p50/p99 latency, IOPS; time to first byte.
* ``s3``         one plain object on SeaweedFS (SigV4 enforced): ``directfs mount s3://`` vs ``rclone mount`` (cache
                 off, and the read settings its docs recommend) vs ``s3fs``: sequential cat cold/warm, random reads,
                 time to first byte, daemon peak RSS and CPU, and read amplification from SeaweedFS's own byte counter.
* ``metadata``   ``ls -l`` of a 10,000-entry folder and ``find`` over a 50,000-entry tree, cold and warm.
* ``blocks``     what the block layout costs (issue 11): one file (``--blocks-size``, 256 MiB) served by four portals,
                 fixed 256 KiB, content-defined ~512 KiB, fixed 1 MiB and 4 MiB blocks; per layout a fresh-mount cold
                 ``cat``, the Streamer API, a naive one-connection in-order client (``benchmarks/naive.py``) and
                 cterasdk at its best max_workers, MB/s and ratios, with the daemon's CPU per block and per MiB and
                 its peak RSS against ``--cache-size``; for 1 MiB blocks also time to first byte and the block GETs
                 one cold 4 KiB random read causes (counted in the portal's access log). Runs only its own portals.
* ``listing``    listings at scale over WebDAV (issue 15, benchmarks/listing.py): ``ls -lR`` and ``find`` over a
                 50,000-entry tree and ``ls -l`` of a 10,000-entry folder, cold and warm, through ``directfs mount
                 webdav://`` (defaults, ``--xattrs off``, and ``--metadata-ttl 5m`` as rclone's listing cache) and
                 ``rclone mount`` of the same nginx, with ratios; daemon RSS per entry while a 1,000,000-entry folder
                 lists (opt-in: ``--listing-folder 1000000``), and where a listing's bytes go. Own nginx only.

Resource use: every measurement made through a daemon records the daemon's peak RSS (VmHWM, MiB, since the mount
started) and the CPU seconds it spent during that measurement (/proc/PID/stat utime+stime delta). Read amplification =
bytes fetched from storage / bytes the benchmark read: for directfs over the portal from the daemon's own counter
(plaintext bytes fetched, ``directfs.metrics`` control socket), for the s3 section from SeaweedFS's
``SeaweedFS_s3_bucket_traffic_sent_bytes_total`` (so all four daemons are counted the same way).

Fresh machine: ``make bench`` builds the venv; this module installs the Debian packages rclone, s3fs and fio when
``apt-cache policy`` offers them (root or sudo), and skips a peer with a note when one cannot be installed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KiB = 1024
MiB = 1024 * KiB

# Debian packages of the peers and of fio (binary -> package). Each is optional: a missing one skips its rows.
APT_TOOLS = {"rclone": "rclone", "s3fs": "s3fs", "fio": "fio"}
# A daemon that does not show its mount within this time is broken, not slow (they mount in < 2 s here).
MOUNT_TIMEOUT_SECONDS = 60.0
# The bucket of the s3 section; one object in it, named like the portal's big file.
BUCKET = "bench"
# SeaweedFS opens each HTTP port and port + 10000 for gRPC (docs/testbed.md §1.2).
GRPC_OFFSET = 10000


# --- small helpers ---------------------------------------------------------------------------------------------


def directfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "directfs.cli", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours minus CA-bundle variables (every endpoint here is plain HTTP on loopback, and
    rclone 1.60's AWS SDK refuses to start when AWS_CA_BUNDLE is set: "LoadCustomCABundleError")."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update(extra)
    return env


def dpkg_version(package: str) -> str | None:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None if out.returncode == 0 else None


def ensure_tools(log_path: Path) -> dict[str, str | None]:
    """Install the missing Debian packages that apt offers; return binary -> Debian version (None: unavailable)."""
    missing = [pkg for binary, pkg in APT_TOOLS.items() if shutil.which(binary) is None]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        with log_path.open("ab") as log:
            subprocess.run([*sudo, "apt-get", "update", "-qq"], stdout=log, stderr=log, check=False)
            offered = []
            for pkg in missing:
                policy = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True, check=False)
                candidate = re.search(r"Candidate:\s*(\S+)", policy.stdout)
                if candidate and candidate.group(1) != "(none)":
                    offered.append(pkg)
                else:
                    print(f"  {pkg}: no Debian candidate (apt-cache policy); its rows are skipped", flush=True)
            if offered:
                print(f"  installing Debian packages: {' '.join(offered)}", flush=True)
                subprocess.run(
                    [*sudo, "apt-get", "install", "-y", "-qq", *offered],
                    stdout=log,
                    stderr=log,
                    check=False,
                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                )
    return {binary: dpkg_version(pkg) if shutil.which(binary) else None for binary, pkg in APT_TOOLS.items()}


def free_port_pair() -> int:
    """A port p with p and p + 10000 free and <= 55535 (SeaweedFS binds both). Racy; a collision fails the start."""
    while True:
        guess = 20000 + secrets.randbelow(30000)
        ok = True
        for port in (guess, guess + GRPC_OFFSET):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return guess


# --- daemons ---------------------------------------------------------------------------------------------------


@dataclass
class Usage:
    peak_rss_mib: float
    cpu_seconds: float


@dataclass
class Daemon:
    """A FUSE daemon running in the foreground as our child, mounted at ``path``."""

    name: str
    path: Path
    proc: subprocess.Popen[bytes]

    def usage(self) -> Usage:
        """Peak RSS (VmHWM, MiB) since start and CPU seconds (user + system) so far."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return Usage(hwm / 1024, (int(fields[11]) + int(fields[12])) / ticks)


@contextlib.contextmanager
def fuse_daemon(name: str, argv: list[str], mountpoint: Path, env: dict[str, str], log_path: Path) -> Iterator[Daemon]:
    """Start ``argv`` (a daemon that stays in the foreground), wait for the mount, always unmount at the end."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mountpoint):  # left by an interrupted earlier run
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)
    log = log_path.open("ab")
    log.write(f"\n=== {time.strftime('%H:%M:%S')} {name}: {' '.join(argv)}\n".encode())
    log.flush()
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT_SECONDS
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not mount (see {log_path}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)  # polling a starting daemon, not a measurement
        os.listdir(mountpoint)
        yield Daemon(name, mountpoint, proc)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)
            proc.kill()
            proc.wait()
        log.close()


def directfs_metrics_text(daemon: Daemon) -> str:
    """The directfs daemon's Prometheus exposition, from its control socket (directfs.metrics)."""
    from directfs.metrics import control_socket_path

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(control_socket_path(str(daemon.path)))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def directfs_fetched_bytes(daemon: Daemon) -> float:
    """Plaintext bytes the directfs daemon fetched from storage so far."""
    match = re.search(r"^directfs_read_bytes_fetched_total (\S+)$", directfs_metrics_text(daemon), re.M)
    if match is None:
        raise RuntimeError("directfs_read_bytes_fetched_total missing from the daemon's metrics")
    return float(match.group(1))


def directfs_fuse_requests(daemon: Daemon) -> dict[str, float]:
    """FUSE requests answered so far, by operation (all errno labels summed)."""
    counts: dict[str, float] = {}
    for labels, value in re.findall(
        r"^directfs_fuse_requests_total\{([^}]*)\} (\S+)$", directfs_metrics_text(daemon), re.M
    ):
        op = re.search(r'op="([^"]+)"', labels)
        if op:
            counts[op.group(1)] = counts.get(op.group(1), 0.0) + float(value)
    return counts


@dataclass
class Portal:
    url: str
    proc: subprocess.Popen[str]
    env: dict[str, str]


@contextlib.contextmanager
def portal(
    tree: Path, state: Path, logs: Path, extra: tuple[str, ...] = (), log_name: str = "portal.log"
) -> Iterator[Portal]:
    """``directfs serve tree`` (``extra``: more serve flags, e.g. the block layout) with fresh random credentials."""
    env = clean_env(
        DIRECTFS_ACCESS_KEY_ID="bench-" + secrets.token_hex(6),
        DIRECTFS_SECRET_ACCESS_KEY=base64.b64encode(secrets.token_bytes(30)).decode(),
        DIRECTFS_USERNAME="bench",
        DIRECTFS_PASSWORD=secrets.token_urlsafe(12),
    )
    cmd = directfs(
        "serve", str(tree), "--listen", "127.0.0.1:0", "--state-dir", str(state), "--rescan-interval", "0", *extra
    )
    log = (logs / log_name).open("ab")  # its per-request access log would drown the table
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 1200  # the first start ingests the whole tree (minutes); later ones reuse state
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on " in line:
                url = line.rsplit("listening on ", 1)[1].strip()
                break
        if url is None:
            raise SystemExit(f"reference portal failed to start; see {logs / log_name}")
        yield Portal(url, proc, env)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@dataclass
class Seaweed:
    endpoint: str
    metrics_url: str
    access_key: str
    secret_key: str = field(repr=False)

    def sent_bytes(self) -> float:
        """Bytes SeaweedFS's S3 gateway has sent for the bucket so far (its Prometheus counter)."""
        import httpx

        text = httpx.get(self.metrics_url, timeout=10).text
        match = re.search(rf'^SeaweedFS_s3_bucket_traffic_sent_bytes_total{{bucket="{BUCKET}"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def seaweed(workdir: Path, logs: Path) -> Iterator[Seaweed]:
    """SeaweedFS ``weed mini`` as in tests/support/seaweed.py (SigV4 enforced, telemetry off, loopback only), plus
    ``-metricsPort`` for the byte counters. Its data dir persists under ``workdir`` so the object is uploaded once."""
    from tests.support.seaweed import s3_client, weed_binary

    (workdir / "data").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "weed" + secrets.token_hex(6), secrets.token_urlsafe(24)
    identities = workdir / "s3.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    identities.chmod(0o600)
    s3, webdav, master, volume, filer, admin = (free_port_pair() for _ in range(6))
    metrics = free_port_pair()
    argv = [
        weed_binary(),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        f"-s3.config={identities}",
        f"-s3.port={s3}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-webdav.port={webdav}",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-admin.port={admin}",
        f"-metricsPort={metrics}",
    ]
    with (logs / "seaweedfs.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=clean_env())
    endpoint = f"http://127.0.0.1:{s3}"
    client = s3_client(endpoint, access_key, secret_key)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited; see {logs / 'seaweedfs.log'}")
            try:
                try:
                    client.head_bucket(Bucket=BUCKET)
                except client.exceptions.ClientError:
                    client.create_bucket(Bucket=BUCKET)
                    client.head_bucket(Bucket=BUCKET)
                break
            except Exception:  # starting: connection refused, 5xx, bucket not yet visible
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # polling a starting server
        yield Seaweed(endpoint, f"http://127.0.0.1:{metrics}/metrics", access_key, secret_key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# --- the table -------------------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    what: str
    unit: str
    runs: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    amplification: list[float] = field(default_factory=list)
    note: str = ""
    ratio: float | None = None  # ratio rows: computed from two medians, no runs of their own

    @property
    def value(self) -> float:
        if self.ratio is not None:
            return self.ratio
        return statistics.median(self.runs) if self.runs else float("nan")

    def as_json(self) -> dict[str, Any]:
        def med(xs: list[float]) -> float | None:
            return round(statistics.median(xs), 4) if xs else None

        return {
            "section": self.section,
            "what": self.what,
            "unit": self.unit,
            "median": round(self.value, 4),
            "runs": [round(v, 4) for v in self.runs],
            "daemon_peak_rss_mib": med(self.peak_rss_mib),
            "daemon_cpu_seconds": med(self.cpu_seconds),
            "read_amplification": med(self.amplification),
            "note": self.note,
        }


class Table:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}

    def add(
        self,
        section: str,
        what: str,
        unit: str,
        value: float,
        usage: Usage | None = None,
        amplification: float | None = None,
        note: str = "",
    ) -> None:
        row = self.rows.setdefault((section, what), Row(section, what, unit, note=note))
        row.runs.append(value)
        if usage is not None:
            row.peak_rss_mib.append(usage.peak_rss_mib)
            row.cpu_seconds.append(usage.cpu_seconds)
        if amplification is not None:
            row.amplification.append(amplification)

    def get(self, section: str, what: str) -> Row | None:
        return self.rows.get((section, what))

    def ratio(
        self, section: str, what: str, numerator: tuple[str, str], denominator: tuple[str, str], note: str = ""
    ) -> None:
        num, den = self.get(*numerator), self.get(*denominator)
        if num is None or den is None or not num.runs or not den.runs or den.value == 0:
            return
        self.rows[(section, what)] = Row(section, what, "ratio", note=note, ratio=num.value / den.value)

    def note(self, section: str, what: str, note: str) -> None:
        self.rows[(section, what)] = Row(section, what, "-", note=note, ratio=float("nan"))


@dataclass
class Measured:
    value: float
    usage: Usage | None
    amplification: float | None


def measure(
    fn: Callable[[], float],
    daemon: Daemon | None = None,
    fetched: Callable[[], float] | None = None,
    app_bytes: int = 0,
) -> Measured:
    """Run ``fn`` (returns the figure); with a daemon also its CPU delta and peak RSS, with ``fetched`` (a cumulative
    byte counter of the store side) the read amplification over ``app_bytes`` read by the benchmark."""
    cpu0 = daemon.usage().cpu_seconds if daemon else 0.0
    fetched0 = fetched() if fetched else 0.0
    value = fn()
    usage = None
    if daemon is not None:
        after = daemon.usage()
        usage = Usage(after.peak_rss_mib, after.cpu_seconds - cpu0)
    amplification = (fetched() - fetched0) / app_bytes if fetched and app_bytes else None
    return Measured(value, usage, amplification)


def timed_read(cmd: list[str], size: int) -> float:
    """MB/s (MiB/s, as the rest of the table) of ``cmd`` reading ``size`` bytes."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return size / MiB / (time.perf_counter() - start)


def first_byte_ms(path: Path) -> float:
    t0 = time.perf_counter()
    with path.open("rb") as f:
        f.read(1)
    return (time.perf_counter() - t0) * 1000


@dataclass
class RandomResult:
    p50_ms: float
    p99_ms: float
    iops: float


def random_reads(path: Path, size: int, block: int, ios: int, seed: int) -> RandomResult:
    """``ios`` random reads of ``block`` bytes: fio (psync, buffered, fadvise RANDOM, fixed seed so a second call
    reads the same offsets) when installed, else a Python pread loop with the same properties."""
    if shutil.which("fio"):
        cmd = [
            "fio",
            "--name=randread",
            f"--filename={path}",
            "--readonly",
            "--rw=randread",
            f"--bs={block}",
            "--ioengine=psync",
            f"--size={size}",
            f"--number_ios={ios}",
            "--randrepeat=1",
            f"--randseed={seed}",
            "--invalidate=0",  # keep the page cache: the warm pass must see what the cold pass left
            "--lat_percentiles=1",
            "--output-format=json",
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["read"]
        pct = job["lat_ns"]["percentile"]
        return RandomResult(pct["50.000000"] / 1e6, pct["99.000000"] / 1e6, job["iops"])
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size - block) // block * block for _ in range(ios)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
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
    return RandomResult(
        latencies[len(latencies) // 2], latencies[max(0, int(len(latencies) * 0.99) - 1)], ios / elapsed
    )


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


def make_tree(root: Path, entries: int, per_folder: int, size_of: Callable[[int], int]) -> None:
    """``entries`` small files in folders of ``per_folder`` (idempotent: existing files are kept)."""
    root.mkdir(exist_ok=True)
    for i in range(entries):
        folder = root if per_folder >= entries else root / f"d{i // per_folder:04d}"
        folder.mkdir(exist_ok=True)
        p = folder / f"f{i:06d}.txt"
        if not p.exists():
            p.write_bytes(b"x" * size_of(i))


# --- shared measurement patterns ---------------------------------------------------------------------------------


MountFactory = Callable[[], contextlib.AbstractContextManager[Daemon]]


def sequential(
    ctx: Context,
    section: str,
    label: str,
    start: MountFactory,
    rel: str,
    size: int,
    fetched: Callable[[Daemon], float] | None,
    tools: list[str],
) -> None:
    """Per tool and run: a fresh mount, one cold read (MB/s), the same read again (warm, page cache)."""
    for tool in tools:
        for _ in range(ctx.runs):
            with start() as d:
                path = d.path / rel
                cmd = ["cat", str(path)] if tool == "cat" else ["dd", f"if={path}", "of=/dev/null", "bs=1M"]
                counter = functools.partial(fetched, d) if fetched else None
                for state in ("cold", "warm"):
                    m = measure(functools.partial(timed_read, cmd, size), d, counter, size)
                    ctx.table.add(section, f"{label}: {tool}, {state}", "MB/s", m.value, m.usage, m.amplification)


def random_section(
    ctx: Context,
    section: str,
    label: str,
    start: MountFactory,
    rel: str,
    size: int,
    fetched: Callable[[Daemon], float] | None,
) -> None:
    """Per block size and run: a fresh mount, time to first byte (4 KiB pass only), a cold pass of random reads and
    the same offsets again (warm)."""
    for block in (4 * KiB, 128 * KiB):
        for run in range(ctx.runs):
            with start() as d:
                path = d.path / rel
                counter = functools.partial(fetched, d) if fetched else None
                if block == 4 * KiB:
                    m = measure(functools.partial(first_byte_ms, path), d)
                    ctx.table.add(section, f"{label}: time to first byte, cold file", "ms", m.value, m.usage)
                for state in ("cold", "warm"):
                    seed = 1000 + run  # a different offset set per run, the same one for cold and warm
                    result: list[RandomResult] = []

                    def one(
                        path: Path = path, block: int = block, seed: int = seed, result: list[RandomResult] = result
                    ) -> float:
                        result.append(random_reads(path, size, block, ctx.random_ios, seed))
                        return result[0].iops

                    m = measure(one, d, counter, block * ctx.random_ios)
                    name = f"{label}: {block // KiB} KiB random read, {state}"
                    ctx.table.add(section, f"{name}, IOPS", "IOPS", m.value, m.usage, m.amplification)
                    ctx.table.add(section, f"{name}, p50", "ms", result[0].p50_ms)
                    ctx.table.add(section, f"{name}, p99", "ms", result[0].p99_ms)


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


def cterasdk_mbps(url: str, env: dict[str, str], file_id: str, size: int, max_workers: int | None) -> float:
    code = f"""
import asyncio, time
from cterasdk.direct.client import DirectIO
async def main():
    client = DirectIO({url!r}, {env["DIRECTFS_ACCESS_KEY_ID"]!r}, {env["DIRECTFS_SECRET_ACCESS_KEY"]!r})
    async with client:
        start = time.perf_counter(); n = 0
        for task in asyncio.as_completed(await client.blocks({int(file_id)}, max_workers={max_workers!r})):
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
    p = ctx.portal
    fid = file_id_of(p, ctx.big_name)
    sdk = f"cterasdk {ctx.versions['cterasdk']} Blocks API"
    variants: list[tuple[str, Callable[[], float]]] = [
        ("directfs Streamer API (max_workers=8)", lambda: streamer_mbps(p.url, p.env, fid, ctx.size, "streamer")),
        ("directfs Blocks API (max_workers=8)", lambda: streamer_mbps(p.url, p.env, fid, ctx.size, "blocks")),
    ]
    for workers in (None, 4, 8, 16):
        label = f"{sdk} (max_workers={workers or 'unbounded, its default'})"
        variants.append((label, lambda w=workers: cterasdk_mbps(p.url, p.env, fid, ctx.size, w)))  # type: ignore[misc]
    # Interleaved (one run of each variant, then the next run) so slow phases of a noisy machine hit all alike.
    for _ in range(ctx.runs):
        for label, fn in variants:
            ctx.table.add("directio", label, "MB/s", fn())
    best = max(
        (r for (s, w), r in ctx.table.rows.items() if s == "directio" and w.startswith(sdk)), key=lambda r: r.value
    )
    for ours in ("directfs Streamer API (max_workers=8)", "directfs Blocks API (max_workers=8)"):
        ctx.table.ratio(
            "directio", f"{ours.split(' (')[0]} / best cterasdk", ("directio", ours), ("directio", best.what), best.what
        )


def ctera_mount(ctx: Context) -> contextlib.AbstractContextManager[Daemon]:
    ctx.peers["directfs ctera+http://"] = (
        f"directfs {ctx.versions['directfs']} mount ctera+http://127.0.0.1:PORT MNT -f (defaults: --cache-size 256M, "
        "--read-ahead 32M; raises the mount's read_ahead_kb to 1024); portal: directfs serve, 4 MiB blocks, snappy, "
        "local block store"
    )
    argv = directfs("mount", "ctera+" + ctx.portal.url, str(ctx.mountpoint), "-f")
    return fuse_daemon("directfs ctera", argv, ctx.mountpoint, ctx.portal.env, ctx.logs / "directfs-mount.log")


def section_mount(ctx: Context) -> None:
    p = ctx.portal
    fid = file_id_of(p, ctx.big_name)
    for _ in range(ctx.runs):
        ctx.table.add(
            "mount", "Streamer API, no FUSE (reference)", "MB/s", streamer_mbps(p.url, p.env, fid, ctx.size, "streamer")
        )
    sequential(
        ctx,
        "mount",
        "directfs ctera+http://",
        lambda: ctera_mount(ctx),
        ctx.big_name,
        ctx.size,
        directfs_fetched_bytes,
        ["cat", "dd bs=1M"],
    )
    dropped = drop_page_cache()
    local = ctx.tree / ctx.big_name
    for _ in range(ctx.runs):
        if dropped:
            drop_page_cache()
        ctx.table.add(
            "mount",
            "cat of the plaintext on local disk (ceiling)",
            "MB/s",
            timed_read(["cat", str(local)], ctx.size),
            note="page cache dropped before each run" if dropped else "page cache could not be dropped: warm read",
        )
    ref = ("mount", "Streamer API, no FUSE (reference)")
    for tool in ("cat", "dd bs=1M"):
        cold = ("mount", f"directfs ctera+http://: {tool}, cold")
        ctx.table.ratio("mount", f"{tool} cold / Streamer API (what FUSE costs)", cold, ref, "target >= 0.7")
    ctx.table.ratio(
        "mount",
        "cat cold / local disk",
        ("mount", "directfs ctera+http://: cat, cold"),
        ("mount", "cat of the plaintext on local disk (ceiling)"),
    )


def section_random(ctx: Context) -> None:
    random_section(
        ctx,
        "random",
        "directfs ctera+http://",
        lambda: ctera_mount(ctx),
        ctx.big_name,
        ctx.size,
        directfs_fetched_bytes,
    )


def section_metadata(ctx: Context) -> None:
    for what, cmd in [
        (f"ls -l of a {ctx.many}-entry folder", ["ls", "-l", str(ctx.mountpoint / "many")]),
        (f"find over a {ctx.tree_entries}-entry tree", ["find", str(ctx.mountpoint / "tree")]),
    ]:
        for _ in range(ctx.runs):
            with ctera_mount(ctx) as d:
                for state in ("cold", "warm"):

                    def run(cmd: list[str] = cmd) -> float:
                        t0 = time.perf_counter()
                        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                        return time.perf_counter() - t0

                    before = directfs_fuse_requests(d)
                    m = measure(run, d)
                    after = directfs_fuse_requests(d)
                    ops = {op: after[op] - before.get(op, 0.0) for op in after if after[op] > before.get(op, 0.0)}
                    note = "FUSE requests (first run): " + ", ".join(f"{op} {n:.0f}" for op, n in sorted(ops.items()))
                    ctx.table.add("metadata", f"{what}, {state}", "s", m.value, m.usage, note=note)


def section_s3(ctx: Context) -> None:
    work = ctx.workdir / "s3"
    with seaweed(work / "seaweedfs", ctx.logs) as weed:
        client_mod = __import__("tests.support.seaweed", fromlist=["s3_client"])
        client = client_mod.s3_client(weed.endpoint, weed.access_key, weed.secret_key)
        key = ctx.big_name
        local = ctx.tree / ctx.big_name
        try:
            present = client.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == ctx.size
        except client.exceptions.ClientError:
            present = False
        if not present:
            print(f"  uploading {key} to SeaweedFS (once; kept in {work})", flush=True)
            with local.open("rb") as body:
                client.put_object(Bucket=BUCKET, Key=key, Body=body)
        secret_files = work / "secrets"
        secret_files.mkdir(mode=0o700, exist_ok=True)
        passwd = secret_files / "s3fs.passwd"
        passwd.write_text(f"{weed.access_key}:{weed.secret_key}\n")
        passwd.chmod(0o600)
        rclone_conf = secret_files / "rclone.conf"  # empty: the remote comes from RCLONE_CONFIG_* variables
        rclone_conf.write_text("")
        aws = clean_env(
            AWS_ACCESS_KEY_ID=weed.access_key, AWS_SECRET_ACCESS_KEY=weed.secret_key, AWS_DEFAULT_REGION="us-east-1"
        )
        rclone_env = clean_env(
            RCLONE_CONFIG_WEED_TYPE="s3",
            RCLONE_CONFIG_WEED_PROVIDER="SeaweedFS",
            RCLONE_CONFIG_WEED_ACCESS_KEY_ID=weed.access_key,
            RCLONE_CONFIG_WEED_SECRET_ACCESS_KEY=weed.secret_key,
            RCLONE_CONFIG_WEED_ENDPOINT=weed.endpoint,
            RCLONE_CONFIG_WEED_FORCE_PATH_STYLE="true",
        )
        mnt = ctx.workdir / "mnt-s3"
        # (short label for the rows, exact version + options for the note and the legend, argv factory, env)
        peers: list[tuple[str, str, Callable[[], list[str]], dict[str, str]]] = [
            (
                "directfs s3://",
                f"directfs {ctx.versions['directfs']} mount s3://{BUCKET} MNT -f (defaults: 8 MiB blocks, "
                "--cache-size 256M, --read-ahead 32M; raises the mount's read_ahead_kb to 1024)",
                lambda: directfs("mount", f"s3://{BUCKET}", str(mnt), "-f"),
                {**aws, "AWS_ENDPOINT_URL_S3": weed.endpoint},
            )
        ]
        rclone_v, s3fs_v = ctx.versions.get("rclone"), ctx.versions.get("s3fs")
        if rclone_v:
            base = ["rclone", "--config", str(rclone_conf), "mount", f"weed:{BUCKET}", str(mnt), "--read-only"]
            remote = "remote from RCLONE_CONFIG_WEED_{TYPE=s3,PROVIDER=SeaweedFS,ENDPOINT,FORCE_PATH_STYLE=true,...}"
            off = ["--vfs-cache-mode", "off"]
            # What rclone's mount docs recommend for reading: the full VFS cache with a large --vfs-read-ahead (on
            # disk), and --no-modtime, which "S3 benefits hugely from". rclone 1.60 has no --vfs-read-chunk-streams.
            full = ["--vfs-cache-mode", "full", "--vfs-read-ahead", "256M", "--no-modtime"]
            peers.append(
                (
                    "rclone cache off",
                    f"rclone {rclone_v} (Debian) mount weed:{BUCKET} MNT --read-only {' '.join(off)}; {remote}",
                    lambda: [*base, *off],
                    rclone_env,
                )
            )

            def rclone_full() -> list[str]:
                cache = Path(tempfile.mkdtemp(prefix="rclone-cache-", dir=work))  # fresh per mount: cold is cold
                return [*base, *full, "--cache-dir", str(cache)]

            peers.append(
                (
                    "rclone cache full",
                    f"rclone {rclone_v} (Debian) mount weed:{BUCKET} MNT --read-only {' '.join(full)} "
                    "--cache-dir FRESH_DIR_PER_MOUNT",
                    rclone_full,
                    rclone_env,
                )
            )
        else:
            ctx.table.note("s3", "rclone mount", "skipped: rclone not installable here")
        if s3fs_v:
            opts = f"ro,passwd_file={passwd},url={weed.endpoint},use_path_request_style"
            peers.append(
                (
                    "s3fs",
                    f"s3fs {s3fs_v} (Debian) {BUCKET} MNT -f -o ro,passwd_file=FILE,url=ENDPOINT,"
                    "use_path_request_style (defaults otherwise: no use_cache)",
                    lambda: ["s3fs", BUCKET, str(mnt), "-f", "-o", opts],
                    clean_env(),
                )
            )
        else:
            ctx.table.note("s3", "s3fs", "skipped: s3fs not installable here")

        def fetched(_: Daemon) -> float:
            return weed.sent_bytes()

        for label, description, argv, env in peers:
            print(f"  s3: {label}", flush=True)
            ctx.peers[label] = description

            def start(
                label: str = label, argv: Callable[[], list[str]] = argv, env: dict[str, str] = env
            ) -> contextlib.AbstractContextManager[Daemon]:
                return fuse_daemon(label, argv(), mnt, env, ctx.logs / "s3-daemons.log")

            sequential(ctx, "s3", label, start, key, ctx.size, fetched, ["cat"])
            first = ctx.table.get("s3", f"{label}: cat, cold")
            if first is not None:
                first.note = description
            random_section(ctx, "s3", label, start, key, ctx.size, fetched)
        ours = peers[0][0]
        for label, *_ in peers[1:]:
            for what in ("cat, cold", "4 KiB random read, cold, IOPS", "128 KiB random read, cold, IOPS"):
                ctx.table.ratio(
                    "s3", f"directfs / {label}: {what}", ("s3", f"{ours}: {what}"), ("s3", f"{label}: {what}")
                )
        for d in work.glob("rclone-cache-*"):
            shutil.rmtree(d, ignore_errors=True)


# --- blocks: the cost of a block layout (issue 11) ----------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    label: str  # row label
    serve_args: tuple[str, ...]  # directfs serve flags
    key: str  # file-name-safe name: state dir, log file


LAYOUTS = (
    Layout("fixed 256 KiB", ("--block-size", "256K"), "256K"),
    Layout("CDC ~512 KiB avg", ("--chunking", "cdc"), "cdc"),
    Layout("fixed 1 MiB", ("--block-size", "1M"), "1M"),
    Layout("fixed 4 MiB", ("--block-size", "4M"), "4M"),
)
# The layout that also gets time to first byte and the block GETs of one cold 4 KiB random read.
RANDOM_LAYOUT = "1M"
# The daemon's block cache in this section, passed explicitly so that the peak RSS rows can be read against it.
BLOCKS_CACHE_SIZE = "256M"
CTERASDK_WORKERS: tuple[int | None, ...] = (None, 4, 8, 16)


def parse_size(text: str) -> int:
    """``256M`` / ``1G`` / ``512K`` / a plain byte count."""
    units = {"K": KiB, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def directfs_metric(daemon: Daemon, name: str) -> float:
    """One unlabelled sample of the daemon's exposition (``directfs_fetches_started_total``...)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", directfs_metrics_text(daemon), re.M)
    if match is None:
        raise RuntimeError(f"{name} missing from the daemon's metrics")
    return float(match.group(1))


class AccessLog:
    """Block GETs the portal answered, counted server-side from its access log (``"GET /blocks/KEY" STATUS``): the
    portal has no request counter of its own, and its RedactingAccessLogger writes one line per request."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size

    def block_gets_since(self, mark: int) -> int:
        with self.path.open("rb") as f:
            f.seek(mark)
            return sum(1 for line in f if b'"GET /blocks/' in line)


@dataclass
class BlocksPortal:
    layout: Layout
    portal: Portal
    file_id: str
    access_log: AccessLog
    blocks: int
    mean_block: float


def block_list(p: Portal, file_id: str) -> list[dict[str, Any]]:
    """The chunks of the portal's /directio JSON (as every client sees them)."""
    import httpx

    reply = httpx.get(
        f"{p.url}/directio/{file_id}",
        headers={"Authorization": f"Bearer {p.env['DIRECTFS_ACCESS_KEY_ID']}"},
        timeout=60,
        trust_env=False,
    )
    reply.raise_for_status()
    chunks: list[dict[str, Any]] = reply.json()["chunks"]
    return chunks


def naive_mbps(p: Portal, file_id: str, size: int, *, md5: bool = False) -> float:
    """benchmarks/naive.py in its own process (as streamer_mbps and cterasdk_mbps); ``md5``: with the digest check."""
    cmd = [sys.executable, "-m", "benchmarks.naive", p.url, file_id, str(size), *(["--md5"] if md5 else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=p.env, cwd=HERE.parent)
    return float(out.stdout.strip().splitlines()[-1])


def blocks_mount(ctx: Context, bp: BlocksPortal) -> contextlib.AbstractContextManager[Daemon]:
    mnt = ctx.workdir / "mnt-blocks"
    argv = directfs("mount", "ctera+" + bp.portal.url, str(mnt), "-f", "--cache-size", BLOCKS_CACHE_SIZE)
    return fuse_daemon(f"directfs blocks {bp.layout.key}", argv, mnt, bp.portal.env, ctx.logs / "blocks-mounts.log")


def cold_random_4k(ctx: Context, bp: BlocksPortal, name: str, seed: int) -> tuple[float, int, float, float]:
    """One 4 KiB pread at a random 4 KiB-aligned offset in the middle half of a fresh-mounted file: (latency ms,
    block GETs the portal answered, block fetches the daemon started, plaintext bytes it fetched)."""
    offset = random.Random(seed).randrange(ctx.blocks_size // 4, 3 * ctx.blocks_size // 4) // (4 * KiB) * (4 * KiB)
    with blocks_mount(ctx, bp) as d:
        mark = bp.access_log.mark()
        started0 = directfs_metric(d, "directfs_fetches_started_total")
        fetched0 = directfs_fetched_bytes(d)
        fd = os.open(d.path / name, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            data = os.pread(fd, 4 * KiB, offset)
            latency = (time.perf_counter() - t0) * 1000
        finally:
            os.close(fd)
        assert len(data) == 4 * KiB
        time.sleep(1.0)  # let any read-ahead the read triggered start, and the portal write its access-log lines
        started = directfs_metric(d, "directfs_fetches_started_total") - started0
        fetched = directfs_fetched_bytes(d) - fetched0
        gets = bp.access_log.block_gets_since(mark)
    return latency, gets, started, fetched


def section_listing(ctx: Context) -> None:
    """Issue 15: listings at scale over WebDAV, directfs against rclone (benchmarks/listing.py)."""
    from benchmarks.listing import section_listing as run  # imported here: it imports this module's helpers

    run(ctx)


def section_blocks(ctx: Context) -> None:
    """Issue 11: per block layout, in one run on one file, a fresh-mount cold ``cat`` against the Streamer API, a
    naive one-connection client (benchmarks/naive.py) and cterasdk's Blocks API at its best setting, with the
    daemon's CPU per block and per MiB and its peak RSS; for 1 MiB blocks also time to first byte and the block GETs
    of one cold 4 KiB random read."""
    root = ctx.workdir / "blocks"
    tree = root / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    size = ctx.blocks_size
    name = f"mixed-{size // MiB}MiB.bin" if size % MiB == 0 else f"mixed-{size}B.bin"
    make_data(tree / name, size)
    sdk = f"cterasdk {ctx.versions['cterasdk']} Blocks API"
    ctx.peers["directfs blocks mount"] = (
        f"directfs {ctx.versions['directfs']} mount ctera+http://127.0.0.1:PORT MNT -f --cache-size "
        f"{BLOCKS_CACHE_SIZE}, a fresh mount per cold read; portal: directfs serve --block-size SIZE or --chunking "
        "cdc, snappy, local block store (its block files stay in the page cache: the same for every client)"
    )
    ctx.peers["naive client"] = (
        "benchmarks/naive.py: one httpx.Client (one connection), GET /directio/ID, blocks fetched strictly in order "
        "and decoded inline with directfs.sources.ctera.codec, no cache, bytes counted and dropped"
    )
    with contextlib.ExitStack() as stack:
        portals: list[BlocksPortal] = []
        for layout in LAYOUTS:
            t0 = time.monotonic()
            p = stack.enter_context(
                portal(
                    tree, root / f"state-{layout.key}", ctx.logs, layout.serve_args, f"portal-blocks-{layout.key}.log"
                )
            )
            fid = file_id_of(p, name)
            chunks = block_list(p, fid)
            assert sum(c["len"] for c in chunks) == size, "the block list does not cover the file"
            portals.append(
                BlocksPortal(
                    layout,
                    p,
                    fid,
                    AccessLog(ctx.logs / f"portal-blocks-{layout.key}.log"),
                    len(chunks),
                    size / len(chunks),
                )
            )
            print(
                f"  portal {layout.label}: {len(chunks)} blocks, mean {size / len(chunks) / KiB:.0f} KiB "
                f"(ready in {time.monotonic() - t0:.0f} s)",
                flush=True,
            )
        # Interleaved: one run of every client over every layout, then the next run, so a slow phase of a shared
        # machine hits all layouts and clients alike.
        for run in range(ctx.runs):
            for bp in portals:
                label = bp.layout.label
                print(f"  run {run + 1}/{ctx.runs}: {label}", flush=True)
                p = bp.portal
                with blocks_mount(ctx, bp) as d:
                    path = d.path / name
                    m = measure(
                        functools.partial(timed_read, ["cat", str(path)], size),
                        d,
                        functools.partial(directfs_fetched_bytes, d),
                        size,
                    )
                assert m.usage is not None
                ctx.table.add("blocks", f"{label}: cat, cold (fresh mount)", "MB/s", m.value, m.usage, m.amplification)
                ctx.table.add(
                    "blocks", f"{label}: daemon CPU per block, cold cat", "ms", m.usage.cpu_seconds * 1000 / bp.blocks
                )
                ctx.table.add(
                    "blocks", f"{label}: daemon CPU per MiB, cold cat", "ms", m.usage.cpu_seconds * 1000 / (size / MiB)
                )
                ctx.table.add(
                    "blocks",
                    f"{label}: daemon peak RSS, cold cat",
                    "MiB",
                    m.usage.peak_rss_mib,
                    note=f"VmHWM since mount; --cache-size {BLOCKS_CACHE_SIZE}",
                )
                ctx.table.add(
                    "blocks",
                    f"{label}: blocks in the file",
                    "blocks",
                    bp.blocks,
                    note=f"from /directio; mean {bp.mean_block / KiB:.0f} KiB",
                )
                ctx.table.add(
                    "blocks",
                    f"{label}: directfs Streamer API (max_workers=8)",
                    "MB/s",
                    streamer_mbps(p.url, p.env, bp.file_id, size, "streamer"),
                )
                ctx.table.add(
                    "blocks", f"{label}: naive client (1 connection, in order)", "MB/s", naive_mbps(p, bp.file_id, size)
                )
                ctx.table.add(
                    "blocks",
                    f"{label}: naive client + MD5 check (the per-byte work directfs does)",
                    "MB/s",
                    naive_mbps(p, bp.file_id, size, md5=True),
                )
                for workers in CTERASDK_WORKERS:
                    ctx.table.add(
                        "blocks",
                        f"{label}: {sdk} (max_workers={workers or 'unbounded'})",
                        "MB/s",
                        cterasdk_mbps(p.url, p.env, bp.file_id, size, workers),
                    )
                if bp.layout.key == RANDOM_LAYOUT:
                    with blocks_mount(ctx, bp) as d:
                        m = measure(functools.partial(first_byte_ms, d.path / name), d)
                    ctx.table.add(
                        "blocks", f"{label}: time to first byte, cold file (fresh mount)", "ms", m.value, m.usage
                    )
                    latency, gets, started, fetched = cold_random_4k(ctx, bp, name, seed=2000 + run)
                    what = f"{label}: one cold 4 KiB random read (fresh mount)"
                    ctx.table.add("blocks", f"{what}, latency", "ms", latency)
                    ctx.table.add(
                        "blocks",
                        f"{what}, block GETs (portal)",
                        "GETs",
                        gets,
                        note="GET /blocks/ lines in the portal's access log, 1 s after the read",
                    )
                    ctx.table.add(
                        "blocks",
                        f"{what}, block fetches (daemon)",
                        "fetches",
                        started,
                        note="directfs_fetches_started_total delta, 1 s after the read",
                    )
                    ctx.table.add(
                        "blocks",
                        f"{what}, plaintext fetched / block size",
                        "blocks",
                        fetched / bp.mean_block,
                        note="directfs_read_bytes_fetched_total delta / 1 MiB",
                    )
    blocks_summary(ctx, portals, sdk)


def blocks_summary(ctx: Context, portals: list[BlocksPortal], sdk: str) -> None:
    """Ratio rows, and one table (layouts x figures) for the terminal and latest.md."""

    def med(what: str) -> float:
        row = ctx.table.get("blocks", what)
        return row.value if row is not None and row.runs else float("nan")

    lines = [
        f"### Block layouts (issue 11): {ctx.blocks_size // MiB} MiB file, medians of {ctx.runs} runs",
        "",
        "| layout | blocks | mean KiB | cat cold MB/s | Streamer MB/s | naive MB/s | naive + MD5 MB/s "
        "| cterasdk best MB/s | cat / naive | cat / naive + MD5 | Streamer / naive | Streamer / cterasdk "
        "| daemon CPU ms/block | daemon CPU ms/MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bp in portals:
        label = bp.layout.label
        cat = ("blocks", f"{label}: cat, cold (fresh mount)")
        streamer = ("blocks", f"{label}: directfs Streamer API (max_workers=8)")
        naive = ("blocks", f"{label}: naive client (1 connection, in order)")
        naive_md5 = ("blocks", f"{label}: naive client + MD5 check (the per-byte work directfs does)")
        sdk_rows = [r for (s, w), r in ctx.table.rows.items() if s == "blocks" and w.startswith(f"{label}: {sdk}")]
        best = max(sdk_rows, key=lambda r: r.value)
        best_setting = best.what.rsplit("(", 1)[1].rstrip(")")
        ctx.table.ratio("blocks", f"{label}: cat cold / naive", cat, naive)
        ctx.table.ratio("blocks", f"{label}: cat cold / naive + MD5", cat, naive_md5)
        ctx.table.ratio("blocks", f"{label}: Streamer / naive", streamer, naive)
        ctx.table.ratio("blocks", f"{label}: Streamer / best cterasdk", streamer, ("blocks", best.what), best.what)
        lines.append(
            f"| {label} | {bp.blocks} | {fmt(bp.mean_block / KiB)} | {fmt(med(cat[1]))} | {fmt(med(streamer[1]))} "
            f"| {fmt(med(naive[1]))} | {fmt(med(naive_md5[1]))} | {fmt(best.value)} ({best_setting}) "
            f"| {fmt(med(cat[1]) / med(naive[1]))} | {fmt(med(cat[1]) / med(naive_md5[1]))} "
            f"| {fmt(med(streamer[1]) / med(naive[1]))} | {fmt(med(streamer[1]) / best.value)} "
            f"| {fmt(med(f'{label}: daemon CPU per block, cold cat'))} "
            f"| {fmt(med(f'{label}: daemon CPU per MiB, cold cat'))} "
            f"| {fmt(med(f'{label}: daemon peak RSS, cold cat'))} |"
        )
    for bp in portals:
        if bp.layout.key != RANDOM_LAYOUT:
            continue
        label = bp.layout.label
        what = f"{label}: one cold 4 KiB random read (fresh mount)"
        ttfb = fmt(med(f"{label}: time to first byte, cold file (fresh mount)"))
        lines += [
            "",
            f"{label}: time to first byte of a cold file {ttfb} ms; one cold 4 KiB random read "
            f"{fmt(med(f'{what}, latency'))} ms, {fmt(med(f'{what}, block GETs (portal)'))} block GETs at the portal "
            f"({fmt(med(f'{what}, block fetches (daemon)'))} fetches started by the daemon).",
        ]
    lines += [
        "",
        f"Daemon: `--cache-size {BLOCKS_CACHE_SIZE}`; CPU = utime + stime of the daemon during the cold cat; peak "
        "RSS = VmHWM since the mount started. Naive = benchmarks/naive.py (one httpx connection, blocks in order, "
        "decoded inline); naive + MD5 also checks each object against its ETag, as directfs does by default. "
        f"cterasdk best = the best median of max_workers in "
        f"{', '.join(str(w or 'unbounded') for w in CTERASDK_WORKERS)}.",
    ]
    ctx.summaries.append("\n".join(lines))


SECTIONS: dict[str, Callable[[Context], None]] = {
    "directio": section_directio,
    "mount": section_mount,
    "random": section_random,
    "s3": section_s3,
    "metadata": section_metadata,
    "blocks": section_blocks,
    "listing": section_listing,
    "diskcache": lambda ctx: __import__("benchmarks.diskcache").diskcache.section_diskcache(ctx),  # --disk-cache
}


@dataclass
class Context:
    main_portal: Portal | None  # the portal over the main tree; None when only the blocks section runs
    workdir: Path
    tree: Path
    mountpoint: Path
    logs: Path
    big_name: str
    size: int
    runs: int
    random_ios: int
    many: int
    tree_entries: int
    versions: dict[str, str | None]
    blocks_size: int = 256 * MiB
    listing_folder: int = 0  # entries of the listing section's big folder (0: skip it; opt-in, ~10 min for 1M)
    table: Table = field(default_factory=Table)
    peers: dict[str, str] = field(default_factory=dict)  # short row label -> exact version and options
    summaries: list[str] = field(default_factory=list)  # markdown blocks printed and written after the table

    @property
    def portal(self) -> Portal:
        if self.main_portal is None:
            raise RuntimeError("this section needs the main portal")
        return self.main_portal


# --- report ----------------------------------------------------------------------------------------------------


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
    os_name = "unknown"
    with contextlib.suppress(OSError):
        os_name = next(
            line.split("=", 1)[1].strip().strip('"')
            for line in Path("/etc/os-release").read_text().splitlines()
            if line.startswith("PRETTY_NAME=")
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "-C", str(HERE.parent), "status", "--porcelain", "directfs"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() + (" + uncommitted changes under directfs/" if dirty.stdout.strip() else "")


def fmt(value: float) -> str:
    if value != value:  # NaN: a note row
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render(table: Table, meta: dict[str, Any], summaries: Sequence[str] = ()) -> str:
    info = meta["machine"]
    if meta["sections"] == ["blocks"]:
        data = f"blocks section only: one {meta['blocks_size_mib']:g} MiB file (half random, half text)."
    elif meta["sections"] == ["listing"]:
        big = f" and a {meta['listing_folder']:,}-entry folder" if meta["listing_folder"] else ""
        data = (
            f"listing section only: a {meta['tree']:,}-file tree, a {meta['many']:,}-entry folder{big}, nginx WebDAV."
        )
    else:
        data = (
            f"large file {meta['size_mib']} MiB (half random, half text), {meta['random_ios']} random reads per pass"
            + (f"; blocks section: {meta['blocks_size_mib']:g} MiB file." if "blocks" in meta["sections"] else ".")
        )
    lines = [
        f"# directfs benchmarks, {meta['date']}",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, {info['os']}, kernel "
        f"{info['kernel']}, Python {info['python']}. Commit {meta['commit']}. Medians of {meta['runs']} runs; "
        f"{data} Load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']} (other work may share "
        "the machine; clients, servers and daemons all share the same cores). "
        f"Whole run: {meta['elapsed_seconds']:.0f} s.",
        "",
        "Peers: " + "; ".join(f"{k} {v or 'not installed'}" for k, v in meta["versions"].items()) + ".",
        "",
        *(f"- **{label}**: `{description}`" for label, description in meta["peers"].items()),
        "",
        "MB/s = MiB/s. Cold = fresh mount (empty caches); warm = the same reads again in that mount. RSS = daemon "
        "peak RSS since mount (MiB); CPU = daemon CPU seconds during that measurement; ampl. = bytes fetched from "
        "storage / bytes read (directfs: its plaintext counter; s3 section: SeaweedFS's bytes sent).",
        "",
        "| section | measurement | median | unit | runs | RSS MiB | CPU s | ampl. | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.rows.values():
        j = r.as_json()
        runs_text = ", ".join(fmt(v) for v in r.runs)
        rss = fmt(j["daemon_peak_rss_mib"]) if j["daemon_peak_rss_mib"] is not None else ""
        cpu = fmt(j["daemon_cpu_seconds"]) if j["daemon_cpu_seconds"] is not None else ""
        amp = fmt(j["read_amplification"]) if j["read_amplification"] is not None else ""
        lines.append(
            f"| {r.section} | {r.what} | {fmt(r.value)} | {r.unit} | {runs_text} | {rss} | {cpu} | {amp} | {r.note} |"
        )
    for summary in summaries:
        lines += ["", summary]
    return "\n".join(lines) + "\n"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=512, help="size of the large file (default 512, issue 8)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    parser.add_argument(
        "--random-ios", type=int, default=200, help="random reads per pass (default 200: p99 = 2nd worst read)"
    )
    parser.add_argument("--many", type=int, default=10_000, help="entries in the ls -l folder (default 10000)")
    parser.add_argument("--tree", type=int, default=50_000, help="files in the find tree (default 50000)")
    parser.add_argument(
        "--blocks-size",
        type=parse_size,
        default=256 * MiB,
        metavar="SIZE",
        help="size of the blocks section's file, K/M/G (default 256M, issue 11)",
    )
    parser.add_argument(
        "--listing-folder",
        type=int,
        default=0,
        metavar="N",
        help="listing section: also list a folder of N empty files (made once, ~40 s for 1000000) for the daemons' "
        "RSS per entry (issue 15: 1000000); opt-in, since 1000000 takes ~10 minutes (default 0: skipped)",
    )
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--workdir", default=str(HERE / "work"), help="data and state, kept between runs")
    parser.add_argument("--results", default=str(RESULTS), help="where latest.json and latest.md go")
    args = parser.parse_args(argv)

    started = time.monotonic()
    load_start = loadavg()
    work = Path(args.workdir).resolve()
    tree, state, mountpoint, logs = work / "tree", work / "state", work / "mnt", work / "logs"
    for d in (tree, logs):
        d.mkdir(parents=True, exist_ok=True)
    print(f"logs go to {logs}", flush=True)
    sections = args.only or list(SECTIONS)
    versions: dict[str, str | None] = {
        "directfs": importlib.metadata.version("directfs"),
        "cterasdk": importlib.metadata.version("cterasdk"),
    }
    if "s3" in sections or "random" in sections:
        versions.update(ensure_tools(logs / "apt.log"))
    if "s3" in sections:
        weed = subprocess.run(
            [str(Path(sys.executable).parent / "weed"), "version"], capture_output=True, text=True, check=False
        )
        versions["SeaweedFS"] = next((w for w in weed.stdout.split() if w[:1].isdigit() and "." in w), None)
    size = args.size_mib * MiB
    big_name = f"big-{args.size_mib}MiB.bin"
    needs_main_portal = any(name not in ("blocks", "listing") for name in sections)  # those run their own servers
    if needs_main_portal:
        make_data(tree / big_name, size)
        make_tree(tree / "many", args.many, args.many, lambda i: i % 100)
        make_tree(tree / "tree", args.tree, 1000, lambda i: 0)  # empty files: find needs names, not blocks to ingest
        print(f"data ready in {tree}; starting the portal (the first start ingests it all)", flush=True)
    t0 = time.monotonic()
    with portal(tree, state, logs) if needs_main_portal else contextlib.nullcontext() as p:
        if p is not None:
            print(f"portal ready in {time.monotonic() - t0:.0f} s", flush=True)
        ctx = Context(
            p, work, tree, mountpoint, logs, big_name, size, args.runs, args.random_ios, args.many, args.tree, versions
        )
        ctx.blocks_size = args.blocks_size
        ctx.listing_folder = args.listing_folder
        for name in sections:
            print(f"running {name} ...", flush=True)
            t1 = time.monotonic()
            SECTIONS[name](ctx)
            print(f"  {name} took {time.monotonic() - t1:.0f} s", flush=True)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "commit": git_commit(),
        "runs": args.runs,
        "size_mib": args.size_mib,
        "blocks_size_mib": args.blocks_size / MiB,
        "listing_folder": args.listing_folder,
        "random_ios": args.random_ios,
        "many": args.many,
        "tree": args.tree,
        "sections": sections,
        "peers": ctx.peers,
        "versions": versions,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "elapsed_seconds": time.monotonic() - started,
    }
    text = render(ctx.table, meta, ctx.summaries)
    print("\n" + text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.md").write_text(text)
    (results / "latest.json").write_text(
        json.dumps({**meta, "rows": [r.as_json() for r in ctx.table.rows.values()]}, indent=2) + "\n"
    )
    print(f"results written to {results}/latest.md and latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
