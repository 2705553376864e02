"""The naive Direct IO client: the floor a mount should reach (issue 11).

One ``httpx.Client`` (one keep-alive connection), ``GET /directio/{id}``, the file key unwrapped once, then every block
fetched strictly in order and decoded inline with directfs's codec; no threads, no cache, no read-ahead; the plaintext
is counted and dropped. ``python -m benchmarks.naive PORTAL_URL FILE_ID [SIZE] [--md5]`` prints MB/s (MiB/s);
credentials come from ``DIRECTFS_ACCESS_KEY_ID`` / ``DIRECTFS_SECRET_ACCESS_KEY`` as for ``directfs mount``.
``--md5`` also checks each object against the MD5 its ETag carries, as directfs does by default (the only integrity
signal CTERA blocks have): the naive floor with the same per-byte work.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import httpx

from directfs.sources.ctera import codec


def download(
    http: httpx.Client, portal_url: str, access_key_id: str, secret: str, file_id: str, *, md5: bool = False
) -> int:
    """Fetch and decode every block of ``file_id`` in order; return the plaintext byte count."""
    reply = http.get(f"{portal_url}/directio/{file_id}", headers={"Authorization": f"Bearer {access_key_id}"})
    meta = reply.raise_for_status().json()
    info = meta.get("encrypt_info") or {}
    key = codec.unwrap_file_key(info["wrapped_key"], secret) if info.get("data_encrypted") else None
    compression = codec.Compression.parse(meta.get("compression_type"))
    total = 0
    for chunk in meta["chunks"]:
        reply = http.get(chunk["url"]).raise_for_status()
        body = reply.content
        if md5 and hashlib.md5(body, usedforsecurity=False).hexdigest() != reply.headers["etag"].strip('"'):
            raise SystemExit(f"block {chunk['url'].split('?')[0]} does not match its ETag")
        plain = codec.decode_block(
            body, key=key, compression=compression, expected_length=chunk["len"], azure_md5_prefix=False
        )
        total += len(plain)
    return total


def main(argv: list[str]) -> int:
    md5 = "--md5" in argv
    argv = [a for a in argv if a != "--md5"]
    portal_url, file_id = argv[0].rstrip("/"), argv[1]
    expected = int(argv[2]) if len(argv) > 2 else None
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(timeout=60, limits=limits, trust_env=False) as http:  # created outside the timing
        start = time.perf_counter()
        n = download(
            http,
            portal_url,
            os.environ["DIRECTFS_ACCESS_KEY_ID"],
            os.environ["DIRECTFS_SECRET_ACCESS_KEY"],
            file_id,
            md5=md5,
        )
        elapsed = time.perf_counter() - start
    if expected is not None and n != expected:
        raise SystemExit(f"naive client read {n} bytes, expected {expected}")
    print(n / 1048576 / elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
