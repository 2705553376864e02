"""``directfs stats MOUNTPOINT``: a human summary of a running mount's counters.

The daemon answers on its control socket (``directfs.metrics``: ``<runtime dir>/<hash of the mountpoint>.sock``,
mode 0600) with the same Prometheus exposition text as ``--metrics-address``; this command parses it with
``prometheus_client``'s parser and prints a summary. No network flag is needed, and only the user who runs the daemon
(or root) can read it. ``--raw`` prints the exposition text itself. A source NAME from the config file stands for its
configured mountpoint; ``--print-mountpoint`` prints that mountpoint and exits (the systemd unit uses it to clean a
stale mount before start).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from typing import Any

from ..options import add_flags

HELP = (
    "Show a running mount's counters: reads, cache, disk cache, prefetch, store calls, the change feed, FUSE "
    "requests and latency."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MOUNTPOINT|NAME", help="a mountpoint, or a [source.NAME] of the config")
    add_flags(parser, "config")
    parser.add_argument(
        "--raw", action="store_true", help="print the Prometheus exposition text as the daemon sends it"
    )
    parser.add_argument("--print-mountpoint", action="store_true", help="print the mountpoint and exit")


def resolve_mountpoint(target: str, config_path: str | None) -> str:
    """``target`` itself when it is an existing path, else the mountpoint of the config's ``[source.target]``."""
    from .. import config
    from ..errors import ConfigError

    if os.sep in target or os.path.exists(target):
        return os.path.abspath(target)
    source = config.load_for(config_path).source(target)
    if source.mountpoint is None:
        raise ConfigError(f"[source.{target}] has no mountpoint")
    return source.mountpoint


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of a cumulative histogram, None if it is empty."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    for bound, cumulative in buckets:
        if cumulative >= q * total:
            return bound
    return math.inf


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return ">30 s"
    return f"<={seconds * 1000:g} ms" if seconds < 1 else f"<={seconds:g} s"


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _feed_line(values: dict[str, float], states: list[tuple[dict[str, str], float]]) -> str:
    """The change feed's state, how long it has been in it, and its lag (``directfs.sources.ctera.feed``)."""
    state = next((labels["state"] for labels, n in states if n), "stopped")
    meaning = {
        "up": "long TTL",
        "starting": "catching up; short TTL",
        "down": "short TTL until it is back",
        "unsupported": "the Portal has none; short TTL",
        "stopped": "short TTL",
    }.get(state, "")

    def count(name: str) -> int:
        value = values.get(f"feed_{name}_total", 0.0)
        return 0 if math.isnan(value) else int(value)

    return (
        f"  change feed    {state} for {_seconds(values.get('feed_state_seconds'))} ({meaning}), "
        f"lag {_seconds(values.get('feed_lag_seconds'))}, last reply {_seconds(values.get('feed_last_reply_seconds'))}"
        f" ago; {count('events')} events, {count('invalidations')} invalidations, {count('resets')} resets, "
        f"{count('downs')} outages"
    )


def summarize(text: str, *, mountpoint: str) -> str:
    """The human summary of exposition ``text``."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    labelled: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    histograms: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("directfs_")
            if name == "fuse_request_duration_seconds_bucket":
                bound = math.inf if sample.labels["le"] == "+Inf" else float(sample.labels["le"])
                histograms[sample.labels["op"]].append((bound, sample.value))
            elif sample.labels:
                labelled[name].append((sample.labels, sample.value))
            else:
                values[name] = sample.value

    def v(name: str) -> int:
        return int(values.get(name, 0))

    lines = [f"directfs mount at {mountpoint}"]
    if "reads_total" in values:
        hits, misses = v("cache_hits_total"), v("cache_misses_total")
        ratio = f"{100 * hits / (hits + misses):.1f}% hits" if hits + misses else "no block reads yet"
        lines += [
            f"  reads          {v('reads_total')} calls, {_size(v('read_bytes_served_total'))} served, "
            f"{_size(v('read_bytes_fetched_total'))} fetched (amplification "
            f"{values.get('read_amplification_ratio', 0):.2f})",
            f"  cache          {hits} hits, {misses} misses ({ratio}), {v('cache_evictions_total')} evictions, "
            f"{_size(v('cache_size_bytes'))} of {_size(v('cache_capacity_bytes'))} in {v('cache_entries')} blocks",
            f"  fetches        {v('fetches_in_flight')} in flight, {v('fetches_started_total')} started, "
            f"{v('fetches_failed_total')} failed, {v('cache_joined_misses_total')} joined (single-flight)",
            f"  prefetch       {v('prefetch_issued_total')} issued, {v('prefetch_used_total')} used, "
            f"{v('prefetch_wasted_total')} wasted, {v('prefetch_outstanding')} outstanding, "
            f"{_size(v('prefetch_reserved_bytes'))} of {_size(v('prefetch_budget_bytes'))} budget",
        ]
    if "disk_cache_hits_total" in values:
        disk_hits, disk_misses = v("disk_cache_hits_total"), v("disk_cache_misses_total")
        lines.append(
            f"  disk cache     {disk_hits} hits, {disk_misses} misses, {_size(v('disk_cache_written_bytes_total'))} "
            f"written, {v('disk_cache_skipped_writes_total')} not written, "
            f"{v('disk_cache_evictions_total')} evictions, {v('disk_cache_corrupt_total')} corrupt dropped, "
            f"{_size(v('disk_cache_size_bytes'))} of {_size(v('disk_cache_capacity_bytes'))} in "
            f"{v('disk_cache_entries')} files"
        )
    if "source_calls_total" in labelled:
        calls = ", ".join(f"{labels['kind']} {int(n)}" for labels, n in labelled["source_calls_total"])
        lines.append(f"  store calls    {calls}")
        lines.append(f"  open           {v('open_files')} files, {v('open_dirs')} folders, {v('inodes')} inodes known")
    if "feed_state" in labelled:
        lines.append(_feed_line(values, labelled["feed_state"]))
    if "http_retries_total" in values:
        lines.append(f"  http retries   {v('http_retries_total')}")
    per_op: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, n in labelled.get("fuse_requests_total", []):
        per_op[labels["op"]][labels["errno"]] = int(n)
    if per_op:
        lines.append("  FUSE requests  op: count (errors)  latency p50 / p99")
        for op in sorted(per_op, key=lambda name: -sum(per_op[name].values())):
            codes = per_op[op]
            errors = ", ".join(f"{code} {n}" for code, n in sorted(codes.items()) if code != "ok")
            buckets = sorted(histograms.get(op, []))
            lines.append(
                f"    {op:<12} {sum(codes.values()):>8}{f' ({errors})' if errors else ''}  "
                f"{_duration(_quantile(buckets, 0.5))} / {_duration(_quantile(buckets, 0.99))}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..metrics import control_socket_path, read_control_socket

    mountpoint = resolve_mountpoint(args.target, args.config)
    if args.print_mountpoint:
        print(mountpoint)
        return 0
    path = control_socket_path(mountpoint)
    try:
        text = read_control_socket(path)
    except FileNotFoundError:
        print(f"directfs stats: no directfs daemon serves {mountpoint} (no control socket {path})", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"directfs stats: {path}: permission denied (run as the daemon's user or root)", file=sys.stderr)
        return 1
    except OSError as exc:
        reason: Any = exc.strerror or exc
        print(f"directfs stats: {path}: {reason} (is the daemon still running?)", file=sys.stderr)
        return 1
    print(text if args.raw else summarize(text, mountpoint=mountpoint), end="\n" if not args.raw else "")
    return 0
