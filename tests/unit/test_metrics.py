"""Metrics: exposition text parsed with prometheus_client's own parser, counters moving as files are read through
the real filesystem object and read engine over a file:// source; the control socket, and the `directfs stats`
summary of it. The HTTP endpoint on 127.0.0.1: tests/component/test_metrics_endpoint.py."""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from directfs import metrics
from directfs.commands import stats
from directfs.errors import ConfigError
from tests.support.metricsfs import BLOCK, Mounted, metered_fs, read_whole, samples, value


@pytest.fixture
async def mounted(tmp_path: Path) -> AsyncIterator[Mounted]:
    async with metered_fs(tmp_path) as it:
        yield it


async def test_counters_move_when_files_are_read(mounted: Mounted) -> None:
    before = metrics.exposition(mounted.registry).decode()  # type: ignore[arg-type]
    assert value(before, "directfs_read_bytes_served_total") == 0
    assert value(before, "directfs_cache_misses_total") == 0

    size = await read_whole(mounted.fs, "a.bin")
    await read_whole(mounted.fs, "a.bin")  # again: served from the cache
    after = metrics.exposition(mounted.registry).decode()  # type: ignore[arg-type]

    assert value(after, "directfs_read_bytes_served_total") == 2 * size
    assert value(after, "directfs_read_bytes_fetched_total") == size  # each block fetched once
    assert value(after, "directfs_read_amplification_ratio") == pytest.approx(0.5)
    assert value(after, "directfs_cache_hits_total") > 0
    assert value(after, "directfs_cache_misses_total") > 0
    assert value(after, "directfs_cache_size_bytes") == size
    assert value(after, "directfs_fetches_in_flight") == 0
    assert value(after, "directfs_source_calls_total", kind="open") == 2
    assert (
        value(after, "directfs_source_calls_total", kind="list")
        + value(after, "directfs_source_calls_total", kind="stat")
        >= 1
    )
    # every counter is monotonic between the two scrapes
    for key, number in samples(before).items():
        if key[0].endswith("_total"):
            assert samples(after)[key] >= number, key


def test_op_stats_histogram_and_errno_labels() -> None:
    ops = metrics.OpStats()
    ops.record("read", 0, 0.00005)
    ops.record("read", 0, 0.003)
    ops.record("read", 0, 100.0)  # beyond the last bucket: +Inf only
    ops.record("lookup", 2, 0.0002)
    registry = metrics.build_registry(metrics.Sources(op_stats=ops))
    text = metrics.exposition(registry).decode()
    assert value(text, "directfs_fuse_requests_total", op="read", errno="ok") == 3
    assert value(text, "directfs_fuse_requests_total", op="lookup", errno="ENOENT") == 1
    assert value(text, "directfs_fuse_request_duration_seconds_bucket", op="read", le="0.0001") == 1
    assert value(text, "directfs_fuse_request_duration_seconds_bucket", op="read", le="0.005") == 2
    assert value(text, "directfs_fuse_request_duration_seconds_bucket", op="read", le="30.0") == 2
    assert value(text, "directfs_fuse_request_duration_seconds_bucket", op="read", le="+Inf") == 3
    assert value(text, "directfs_fuse_request_duration_seconds_count", op="read") == 3
    assert value(text, "directfs_fuse_request_duration_seconds_sum", op="read") == pytest.approx(100.00305)
    assert metrics.errno_label(0) == "ok" and metrics.errno_label(5) == "EIO" and metrics.errno_label(99999) == "99999"


def test_http_attempts_retries_and_give_ups_are_exported() -> None:
    from directfs.http import HTTPStatistics

    registry = metrics.build_registry(metrics.Sources(http=lambda: HTTPStatistics(attempts=10, retries=7, gave_up=2)))
    text = metrics.exposition(registry).decode()
    assert value(text, "directfs_http_attempts_total") == 10
    assert value(text, "directfs_http_retries_total") == 7
    assert value(text, "directfs_http_gave_up_total") == 2


def test_remote_metrics_address_needs_explicit_permission() -> None:
    registry = metrics.build_registry(metrics.Sources())
    with pytest.raises(ConfigError, match=r"--metrics-address 0.0.0.0:9567: not a loopback address.*allow-remote"):
        metrics.start_metrics_server("0.0.0.0", 9567, registry, allow_remote=False)


def test_control_socket_path_is_per_mountpoint(tmp_path: Path) -> None:
    env = {"DIRECTFS_RUNTIME_DIR": str(tmp_path)}
    a = metrics.control_socket_path("/mnt/a", env)
    assert a == metrics.control_socket_path("/mnt/./a", env)
    assert a != metrics.control_socket_path("/mnt/b", env)
    assert os.path.dirname(a) == str(tmp_path) and a.endswith(".sock")


async def test_control_socket_and_stats_summary(
    mounted: Mounted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = tmp_path / "run"
    monkeypatch.setenv("DIRECTFS_RUNTIME_DIR", str(runtime))
    mountpoint = str(tmp_path)
    path = metrics.control_socket_path(mountpoint)
    listener = metrics.bind_control_socket(path)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    assert oct(os.stat(runtime).st_mode & 0o777) == oct(0o700)
    mounted.ops.record("read", 0, 0.002)
    mounted.ops.record("lookup", 2, 0.0001)
    await read_whole(mounted.fs, "a.bin")
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.serve_control_socket, listener, lambda: metrics.exposition(mounted.registry))  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="another daemon already serves this mountpoint"):
            metrics.bind_control_socket(path)
        raw = await trio.to_thread.run_sync(metrics.read_control_socket, path)
        status = await trio.to_thread.run_sync(
            stats.run, argparse.Namespace(target=mountpoint, config=None, raw=False, print_mountpoint=False)
        )
        nursery.cancel_scope.cancel()
    assert not await trio.Path(path).exists()  # removed on shutdown
    assert value(raw, "directfs_read_bytes_served_total") == 10 * BLOCK + 7
    assert status == 0
    out = capsys.readouterr().out
    assert f"directfs mount at {mountpoint}" in out
    assert "40.0 KiB served, 40.0 KiB fetched (amplification 1.00)" in out
    assert "store calls    stat" in out
    assert "lookup" in out and "(ENOENT 1)" in out
    assert "read                1  <=2.5 ms / <=2.5 ms" in out


async def test_stale_control_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "x.sock")
    first = metrics.bind_control_socket(path)
    first.close()  # a daemon that died: the file stays, no one listens
    assert await trio.Path(path).exists()
    with pytest.raises(ConnectionRefusedError):
        await trio.to_thread.run_sync(metrics.read_control_socket, path)
    second = metrics.bind_control_socket(path)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.serve_control_socket, second, lambda: b"# the new daemon\n")  # type: ignore[arg-type]
        answer = await trio.to_thread.run_sync(metrics.read_control_socket, path)
        nursery.cancel_scope.cancel()
    assert answer == "# the new daemon\n"


def test_runtime_dir_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    with pytest.raises(ConfigError, match="must be a folder owned by uid"):
        metrics.bind_control_socket(str(loose / "x.sock"))


def test_stats_without_a_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DIRECTFS_RUNTIME_DIR", str(tmp_path / "run"))
    status = stats.run(argparse.Namespace(target=str(tmp_path), config=None, raw=False, print_mountpoint=False))
    assert status == 1
    assert "no directfs daemon serves" in capsys.readouterr().err


def test_stats_print_mountpoint_of_a_named_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[source.p]\nurl = "file:///d"\nmountpoint = "/mnt/p"\n')
    status = stats.run(argparse.Namespace(target="p", config=str(cfg), raw=False, print_mountpoint=True))
    assert status == 0 and capsys.readouterr().out == "/mnt/p\n"
