"""``directfs umount MOUNTPOINT``: unmount, then wait (bounded) until the daemon serving it has exited."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Final

from ..options import duration_arg
from ..units import format_duration

HELP = "Unmount a directfs mount and wait until its daemon has exited."

# A daemon closes its open handles and exits well within a second; 10 s covers a loaded machine.
DEFAULT_WAIT_SECONDS: Final = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the namespace is mounted")
    parser.add_argument(
        "-z",
        "--lazy",
        action="store_true",
        help="detach even while files are open (fusermount3 -z); the daemon exits when the last one closes",
    )
    parser.add_argument(
        "--wait",
        type=duration_arg,
        default=DEFAULT_WAIT_SECONDS,
        metavar="DURATION",
        help=f"how long to wait for the daemon to exit (default {format_duration(DEFAULT_WAIT_SECONDS)}: it needs "
        "well under 1 s)",
    )


def _daemon_pids(mountpoint: str) -> list[int]:
    """Processes whose command line is ``directfs ... mount ... MOUNTPOINT``: the daemon(s) serving it."""
    from ..mount import resolved_mountpoint

    target = resolved_mountpoint(mountpoint)
    pids: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                argv = [arg.decode("utf-8", "surrogateescape") for arg in handle.read().split(b"\0") if arg]
        except OSError:
            continue
        if "mount" not in argv or not any("directfs" in arg for arg in argv[:3]):
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            cwd = "/"
        if any(resolved_mountpoint(os.path.join(cwd, arg)) == target for arg in argv[argv.index("mount") + 1 :]):
            pids.append(int(name))
    return pids


def run(args: argparse.Namespace) -> int:
    from ..mount import mount_device

    mountpoint: str = args.mountpoint
    if mount_device(mountpoint) is None:
        print(f"directfs umount: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    daemons = _daemon_pids(mountpoint)
    command = ["fusermount3", "-u", *(["-z"] if args.lazy else []), mountpoint]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        reason = done.stderr.strip() or f"fusermount3 exited with {done.returncode}"
        hint = " (files still open? close them or use --lazy)" if "busy" in reason.lower() else ""
        print(f"directfs umount: {reason}{hint}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        alive = [pid for pid in daemons if os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)]
        if not alive:
            return 0
        time.sleep(0.05)  # polling another process: no event to wait on
    print(
        f"directfs umount: unmounted, but the daemon (pid {', '.join(map(str, alive))}) is still running",
        file=sys.stderr,
    )
    return 1


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return True
