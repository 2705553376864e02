"""Configuration of the reference portal: one frozen dataclass built once by ``directfs serve`` (flags > env).

Credentials are one set (:class:`Credentials`): either everything the user configured and nothing else, or, when
nothing at all is configured, the public demo set. Secrets are ``repr=False`` so a config printed in a traceback or a
log never shows them (the access key id included: it alone unlocks native files through ``/directio``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from ..errors import ConfigError
from ..sources.ctera.codec import Compression

# Demo credentials, printed with a warning when the user configures none at all (never mixed with configured ones).
# The secret is 40 base64 characters (30 bytes), the shape of real CTERA secret access keys, so the codec's
# zero-padding to 32 bytes is exercised by every demo.
DEMO_ACCESS_KEY_ID: Final = "DIRECTFSDEMOACCESSKEY"
# base64("directfs-demo-secret-key-00000"): public by design, printed with a warning whenever it is used
DEMO_SECRET_ACCESS_KEY: Final = "ZGlyZWN0ZnMtZGVtby1zZWNyZXQta2V5LTAwMDAw"  # noqa: S105
DEMO_USERNAME: Final = "demo"
DEMO_PASSWORD: Final = "demo"  # noqa: S105 - printed demo default
DEMO_TOKEN: Final = "directfs-demo-token"  # noqa: S105 - printed demo default

# 4 MiB: the CTERA default for fixed-size blocks (KB "Adding a Folder Group"; docs/ctera-direct-io.md §9).
DEFAULT_BLOCK_SIZE_BYTES: Final = 4 * 1024 * 1024
# ~512 KiB average: the CTERA default for variable (content-defined) blocks (docs/ctera-direct-io.md §9). Min/max are
# FastCDC's usual avg/4 and avg*8, which bound both the per-block overhead and the largest object a client buffers.
CDC_AVERAGE_BYTES: Final = 512 * 1024
CDC_MIN_BYTES: Final = CDC_AVERAGE_BYTES // 4
CDC_MAX_BYTES: Final = CDC_AVERAGE_BYTES * 8
# 86400 s: real Portal URLs carry X-Amz-Expires=86400 (Cyberduck's sample, docs/ctera-direct-io.md §2.2).
DEFAULT_URL_TTL_SECONDS: Final = 86400
# 30 s: a test or demo sees a change within half a minute; a rescan of an unchanged tree is only stat() calls.
DEFAULT_RESCAN_INTERVAL_SECONDS: Final = 30.0
# 0.5 s per rejected login: a person who mistyped a password barely notices it, and a guesser is held to two guesses a
# second per connection. Each rejected request sleeps on its own (asyncio), so other clients are not slowed.
DEFAULT_FAILED_AUTH_DELAY_SECONDS: Final = 0.5

# 5 GiB: the largest object one S3 PUT may carry, a bound clients already live with (bigger files go multipart, which
# WebDAV lacks). It keeps one client from filling the disk or stalling the portal by accident: an upload needs its
# size free in DIR and its blocks in the state dir (the previous version's stay until the next scan), and its
# encoding holds the other writes and the scans (one at a time), at ~100 MB/s on the 2-core test box: ~50 s at 5 GiB.
# A test or a small disk passes its own (--max-upload-size).
DEFAULT_MAX_UPLOAD_SIZE_BYTES: Final = 5 * 1024**3

# The change feed keeps the last 100,000 events (about 45 MB of the index at ~450 bytes each): twice the 50,000-entry
# trees of the benchmarks, so a client that follows from before a whole such tree is ingested or rewritten can still
# replay it (50 pages of 2000), and a client further behind than that resets (lists afresh), which is then the
# cheaper path anyway. 0 keeps every event (the index then grows with every change, forever).
DEFAULT_FEED_RETENTION_EVENTS: Final = 100_000

Chunking = Literal["fixed", "cdc"]
EmptyFiles = Literal["empty-list", "zero-chunk"]

_COMPRESSION_NAMES: Final = {
    "snappy": Compression.SNAPPY,
    "snappy-raw": Compression.SNAPPY_RAW,
    "gzip": Compression.GZIP,
    "none": Compression.NONE,
}


def parse_compression(name: str) -> Compression:
    try:
        return _COMPRESSION_NAMES[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown compression {name!r}; choose one of {', '.join(_COMPRESSION_NAMES)}") from None


def parse_compression_rule(text: str) -> tuple[str, Compression]:
    """``GLOB=gzip`` -> (GLOB, Compression.GZIP)."""
    glob, sep, name = text.rpartition("=")
    if not sep or not glob:
        raise ConfigError(f"--compression-rule wants GLOB=COMPRESSION, got {text!r}")
    return glob, parse_compression(name)


def glob_matches(glob: str, relpath: str) -> bool:
    """Shell-style match against the relative path, or against the base name when the glob has no ``/``."""
    if fnmatch.fnmatchcase(relpath, glob):
        return True
    return "/" not in glob and fnmatch.fnmatchcase(relpath.rsplit("/", 1)[-1], glob)


def default_state_dir(root: Path) -> Path:
    """Outside DIR, one per DIR: ``$XDG_STATE_HOME/directfs/portal-<16 hex of the absolute path>``."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:16]
    return base / "directfs" / f"portal-{digest}"


@dataclass(frozen=True)
class Credentials:
    """One credential set. ``None`` means "not configured": that surface refuses every request, never defaults.

    * ``username`` + ``password``: HTTP Basic for WebDAV and the Notification Service (both or neither);
    * ``token``: ``Authorization: Bearer`` for the same surfaces;
    * ``access_key_id`` + ``secret_access_key``: the Direct IO key pair (both or neither). Without it ``/directio``
      is off and the file keys are wrapped with a random secret kept in the state dir (see ``server/main.py``).
    """

    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    demo: bool = False  # the printed public demo set (only when nothing at all was configured)

    @property
    def basic(self) -> bool:
        return self.username is not None and self.password is not None

    @property
    def direct_io(self) -> bool:
        return self.access_key_id is not None and self.secret_access_key is not None


@dataclass(frozen=True)
class FaultConfig:
    """Test-only fault injection. Every knob is off (0) unless a ``--fault-*`` flag sets it."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    status: int = 503
    drop_mid_body_rate: float = 0.0
    corrupt_blocks_rate: float = 0.0
    url_ttl_seconds: int | None = None
    targets: frozenset[str] = frozenset({"blocks"})  # "blocks" and/or "portal"
    seed: int | None = None
    # Upload faults (--writable): answer PUTs with this status after reading their body, or drop the connection
    # half-way through the body; either way nothing is written. put_count: only the first N PUTs (0 = every PUT),
    # so a client's retry can succeed.
    put_status: int | None = None
    put_drop: bool = False
    put_count: int = 0
    # The change feed down (docs/serve-feed.md): while this file exists, /metadata/list and /metadata/longpoll (parked
    # ones too) close the connection without an answer, or answer the status the file holds (e.g. "503").
    feed_down_file: Path | None = None
    # Count every request by method and path, answered at COUNTS_PATH (not a fault: not in ``active``).
    count_requests: bool = False

    @property
    def active(self) -> bool:
        return bool(
            self.latency_ms
            or self.error_rate
            or self.drop_mid_body_rate
            or self.corrupt_blocks_rate
            or self.url_ttl_seconds is not None
            or self.put_faults
            or self.feed_down_file is not None
        )

    @property
    def put_faults(self) -> bool:
        return self.put_status is not None or self.put_drop


@dataclass(frozen=True)
class StoreConfig:
    kind: Literal["local", "s3"] = "local"
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"  # botocore needs a region to sign; S3-compatible servers ignore its value


@dataclass(frozen=True)
class EncodingRules:
    """How a file is stored: chunking, compression (with per-glob overrides), native and non-direct globs."""

    chunking: Chunking = "fixed"
    block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES
    compression: Compression = Compression.SNAPPY
    compression_rules: tuple[tuple[str, Compression], ...] = ()
    native_globs: tuple[str, ...] = ()
    non_direct_globs: tuple[str, ...] = ()

    def compression_for(self, relpath: str) -> Compression:
        for glob, compression in self.compression_rules:  # first matching rule wins, in flag order
            if glob_matches(glob, relpath):
                return compression
        return self.compression

    def is_native(self, relpath: str) -> bool:
        return any(glob_matches(g, relpath) for g in self.native_globs)

    def is_non_direct(self, relpath: str) -> bool:
        return any(glob_matches(g, relpath) for g in self.non_direct_globs)

    def chunking_label(self) -> str:
        """Stored with each file: a file encoded under other chunking parameters is re-encoded (new file id)."""
        if self.chunking == "cdc":
            return f"cdc:{CDC_MIN_BYTES}:{CDC_AVERAGE_BYTES}:{CDC_MAX_BYTES}"
        return f"fixed:{self.block_size_bytes}"


@dataclass(frozen=True)
class ServeConfig:
    root: Path
    state_dir: Path
    host: str
    port: int
    credentials: Credentials
    encoding: EncodingRules = field(default_factory=EncodingRules)
    store: StoreConfig = field(default_factory=StoreConfig)
    url_ttl_seconds: int = DEFAULT_URL_TTL_SECONDS
    rescan_interval_seconds: float = DEFAULT_RESCAN_INTERVAL_SECONDS
    max_blocks_per_reply: int = 0  # 0 = the whole list in one reply (what the released cterasdk needs)
    empty_files: EmptyFiles = "empty-list"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    public_url: str | None = None  # base of block URLs when clients reach us under another name
    faults: FaultConfig = field(default_factory=FaultConfig)
    ingest_workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    failed_auth_delay_seconds: float = DEFAULT_FAILED_AUTH_DELAY_SECONDS
    # WebDAV PUT, MKCOL, DELETE, MOVE and PROPPATCH into DIR (docs/serve-writes.md); off: 405, as a read-only server
    writable: bool = False
    max_upload_size_bytes: int = DEFAULT_MAX_UPLOAD_SIZE_BYTES
    feed_retention_events: int = DEFAULT_FEED_RETENTION_EVENTS  # 0: keep every event

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"
