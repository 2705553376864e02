"""``make demo``: a guided tour on a fresh machine.

Generates a small sample namespace (text files, a short video when ffmpeg is installed, a sqlite database, a nested
folder), publishes it with the reference portal (``directfs serve``), mounts it with ``directfs mount``, shows
``ls -l``, a ``cat`` and a checksum comparison, then waits for Ctrl-C and unmounts cleanly. With ``CI=true`` (or
``--no-wait``) it runs the tour and exits 0.

This module is a user of the command line, like a person at a shell: it imports no directfs internals.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_SECONDS = 120.0  # ingest of the sample tree takes ~1 s; a cold venv import on a slow disk more


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def make_sample_tree(root: Path) -> None:
    (root / "docs" / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    (root / "README.txt").write_text("Welcome to directfs: this file was read through the mount.\n")
    (root / "docs" / "notes with spaces.txt").write_text("".join(f"line {i}: directfs\n" for i in range(2000)))
    (root / "docs" / "nested" / "deeper" / "naïve-日本.txt").write_text("unicode names work\n")
    if not (root / "docs" / "random.bin").exists():  # several blocks, odd size; kept so a re-run re-encodes nothing
        (root / "docs" / "random.bin").write_bytes(os.urandom(9 * 1024 * 1024 + 123))
    database = root / "inventory.sqlite"
    if not database.exists():
        with contextlib.closing(sqlite3.connect(database)) as db:
            db.execute("create table items (id integer primary key, name text, qty integer)")
            db.executemany("insert into items (name, qty) values (?, ?)", [(f"item-{i}", i * 7) for i in range(5000)])
            db.commit()
    video = root / "clip.mp4"
    if shutil.which("ffmpeg") and not video.exists():
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "testsrc=duration=4:size=320x240:rate=25",
                "-pix_fmt",
                "yuv420p",
                str(video),
            ],
            check=False,
        )


def directfs_command() -> list[str]:
    return [sys.executable, "-m", "directfs.cli"]


@contextlib.contextmanager
def portal(tree: Path, state: Path, env: dict[str, str], log_path: Path) -> Iterator[str]:
    log = log_path.open("ab")  # its per-request access log would drown the tour
    proc = subprocess.Popen(
        [*directfs_command(), "serve", str(tree), "--listen", "127.0.0.1:0", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        url = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on " in line:
                url = line.rsplit("listening on ", 1)[1].strip()
                break
        if url is None:
            raise SystemExit(f"the reference portal did not start (see {log_path})")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m directfs.demo", description=__doc__)
    parser.add_argument("--mountpoint", default="mnt", help="where to mount (default ./mnt)")
    parser.add_argument("--workdir", default="demo-data", help="sample data and portal state (default ./demo-data)")
    parser.add_argument("--no-wait", action="store_true", help="run the tour and exit (implied by CI=true)")
    args = parser.parse_args(argv)
    wait = not args.no_wait and os.environ.get("CI", "").lower() not in ("1", "true", "yes")

    workdir = Path(args.workdir).resolve()
    tree, state = workdir / "namespace", workdir / "portal-state"
    mountpoint = Path(args.mountpoint).resolve()
    tree.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)

    # One fresh demo identity per run, handed to both processes through their environment (never argv).
    env = dict(os.environ)
    env.update(
        DIRECTFS_ACCESS_KEY_ID="demo-" + secrets.token_hex(8),
        DIRECTFS_SECRET_ACCESS_KEY=base64.b64encode(secrets.token_bytes(30)).decode(),
        DIRECTFS_USERNAME="demo",
        DIRECTFS_PASSWORD=secrets.token_urlsafe(16),
    )

    say(f"Generating a sample namespace in {tree}")
    make_sample_tree(tree)
    say(f"Starting the reference portal (directfs serve; its log: {workdir / 'portal.log'})")
    with portal(tree, state, env, workdir / "portal.log") as url:
        source = "ctera+" + url
        say(f"Mounting {source} at {mountpoint}")
        run([*directfs_command(), "mount", source, str(mountpoint)], env=env)
        try:
            say("ls -lR of the mount")
            run(["ls", "-lR", "--time-style=long-iso", str(mountpoint)])
            say("cat a file through the mount")
            run(["cat", str(mountpoint / "README.txt")])
            say("Checksums: source tree vs mount")
            mismatches = 0
            for path in sorted(p for p in tree.rglob("*") if p.is_file()):
                rel = path.relative_to(tree)
                same = sha256(path) == sha256(mountpoint / rel)
                mismatches += not same
                print(f"  {'ok ' if same else 'BAD'}  {rel}")
            if (mountpoint / "inventory.sqlite").exists() and shutil.which("sqlite3"):
                say("sqlite3 queries a database in the mount")
                run(
                    [
                        "sqlite3",
                        "-readonly",
                        str(mountpoint / "inventory.sqlite"),
                        "select count(*), sum(qty) from items",
                    ]
                )
            if (mountpoint / "clip.mp4").exists() and shutil.which("ffprobe"):
                say("ffprobe reads a video in the mount")
                run(["ffprobe", "-v", "error", "-show_entries", "format=duration,size", str(mountpoint / "clip.mp4")])
            if mismatches:
                print(f"{mismatches} file(s) differ", file=sys.stderr)
                return 1
            if wait:
                say(f"The mount is live at {mountpoint}. Try it from another shell; press Ctrl-C here to unmount.")
                with contextlib.suppress(KeyboardInterrupt):
                    signal.pause()
        finally:
            say("Unmounting")
            subprocess.run([*directfs_command(), "umount", str(mountpoint)], check=False)
    say("Done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
