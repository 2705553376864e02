"""Dask across processes on ctera://: a ``dask.distributed`` LocalCluster of two worker processes reads a folder of CSV
and of Parquet files through the filesystem (pickled by its options, rebuilt in each worker with its own engine
thread and connections) and computes sums that match the source."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import dask.dataframe as dd
import pandas as pd
import pytest
from distributed import Client, LocalCluster

from tests.support.portal import Portal, start_portal

FILES = 6
ROWS = 2000


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tree = tmp_path_factory.mktemp("fsspec-dask")
    (tree / "csv").mkdir()
    (tree / "parquet").mkdir()
    for part in range(FILES):
        frame = pd.DataFrame({"x": range(part * ROWS, (part + 1) * ROWS), "y": [part * 0.5] * ROWS})
        frame.to_csv(tree / "csv" / f"part{part}.csv", index=False)
        frame.to_parquet(tree / "parquet" / f"part{part}.parquet", index=False)
    with start_portal(tree, extra_args=["--block-size", "16K"]) as served:
        yield served


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    # Worker processes (spawned: nothing of this process's engine thread or connections is inherited), one thread
    # each: 2 cores. No dashboard (no port to take, no warning when it is taken).
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as connected,
    ):
        yield connected


def options_for(portal: Portal) -> dict[str, Any]:
    return {
        "portal_url": portal.url,
        "access_key_id": portal.access_key_id,
        "secret_access_key": portal.secret_access_key,
        "username": portal.username,
        "password": portal.password,
    }


@pytest.mark.slow
def test_a_local_cluster_of_processes_reads_csv_and_parquet_through_ctera(portal: Portal, client: Client) -> None:
    expected_x = sum(range(FILES * ROWS))
    expected_y = sum(part * 0.5 * ROWS for part in range(FILES))
    workers = client.run(os.getpid)
    assert len(set(workers.values())) == 2 and os.getpid() not in workers.values()
    before = portal.request_count("GET", "/blocks/")

    csv = dd.read_csv("ctera://csv/*.csv", storage_options=options_for(portal), blocksize=None)
    assert csv.npartitions == FILES
    total = client.compute(csv[["x", "y"]].sum()).result()
    assert int(total["x"]) == expected_x and float(total["y"]) == pytest.approx(expected_y)

    parquet = dd.read_parquet("ctera://parquet", storage_options=options_for(portal))
    assert int(client.compute(parquet["x"].sum()).result()) == expected_x
    assert portal.request_count("GET", "/blocks/") > before, "the workers read the blocks themselves"

    def engines_in(dask_worker: Any) -> int:  # runs in each worker: its own engine thread served the reads
        from directfs import fsspec_ctera

        engine = fsspec_ctera._engine
        return 0 if engine is None else len(engine.sessions)

    assert all(count >= 1 for count in client.run(engines_in).values())


def test_the_filesystem_goes_to_a_worker_process_by_its_options(portal: Portal, client: Client) -> None:
    import fsspec

    fs = fsspec.filesystem("ctera", **options_for(portal))

    def read(filesystem: Any) -> tuple[int, bytes]:
        return os.getpid(), filesystem.cat_file("csv/part0.csv", 0, 3)

    pid, head = client.submit(read, fs, pure=False).result()
    assert pid != os.getpid() and head == b"x,y"
