"""Block stores: where encoded block objects live, and how a client is given a URL for one.

* :class:`LocalBlockStore`: a directory in the state dir, served by the portal itself at
  ``/blocks/<key>?expires=<unix>&sig=<hex>``; the signature is HMAC-SHA256 over path and expiry with a server
  secret kept in the state dir (so URLs survive a restart). Expired or tampered URLs get 403.
* :class:`S3BlockStore`: an S3-compatible bucket; URLs are SigV4 presigned GETs made by botocore (never hand-rolled).

``put``/``delete`` are synchronous and thread-safe: the ingest runs them in worker threads. ``url`` is cheap and
runs on the event loop.

Object keys are ``blocks/<2 hex>/<64 hex>``: content addressed (see :mod:`.index` for what the hash covers), fanned
out over 256 directories so no directory holds more than a few thousand entries.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Final, Protocol

from ..errors import ConfigError
from ..values import parse_decimal
from .config import StoreConfig

SIGNING_SECRET_FILE: Final = "url-signing.key"  # noqa: S105 - a file name
SIGNING_SECRET_BYTES: Final = 32  # HMAC-SHA256 key: as long as the hash output


def object_key(digest_hex: str) -> str:
    return f"blocks/{digest_hex[:2]}/{digest_hex}"


class BlockStore(Protocol):
    kind: str

    def put(self, key: str, data: bytes) -> None: ...

    def delete(self, key: str) -> None: ...

    def url(self, key: str, *, base_url: str, ttl_seconds: int) -> str: ...


class UrlSigner:
    """HMAC-SHA256 over ``"<path>\\n<expires>"``. ``path`` is the URL path exactly as sent (percent-encoded)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> UrlSigner:
        path = state_dir / SIGNING_SECRET_FILE
        try:
            secret = path.read_bytes()
        except FileNotFoundError:
            secret = secrets.token_bytes(SIGNING_SECRET_BYTES)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
        if len(secret) != SIGNING_SECRET_BYTES:
            raise ConfigError(f"{path} is damaged: delete it to make a new URL signing key")
        return cls(secret)

    def signature(self, path: str, expires: int) -> str:
        return hmac.new(self._secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, ttl_seconds: int, *, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + ttl_seconds)
        return f"{path}?expires={expires}&sig={self.signature(path, expires)}"

    def check(self, path: str, expires_text: str, sig: str, *, now: float | None = None) -> str | None:
        """None when valid, else the reason (for the server log; the client only sees 403)."""
        # ASCII only (the caller validates too): str.isdigit() accepts "²", and compare_digest refuses non-ASCII str.
        expires = parse_decimal(expires_text)
        if expires is None or not sig or not sig.isascii():
            return "missing or malformed expires/sig"
        if not hmac.compare_digest(self.signature(path, expires).encode(), sig.encode()):
            return "bad signature"
        if expires < (time.time() if now is None else now):
            return "expired"
        return None


class LocalBlockStore:
    kind = "local"

    def __init__(self, directory: Path, signer: UrlSigner) -> None:
        self.directory = directory
        self.signer = signer
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / key

    def put(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a crash never leaves a half object under its final name. No fsync: the index is
        # committed after the objects, and a lost object after a power cut is re-encoded on the next scan
        # (on start the index is checked against the store: Index.forget_missing_objects).
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def url(self, key: str, *, base_url: str, ttl_seconds: int) -> str:
        return base_url + self.signer.sign("/" + urllib.parse.quote(key), ttl_seconds)


class S3BlockStore:
    """Objects in ``s3://bucket/prefix``. Credentials come from botocore's usual chain (``AWS_*`` env, files)."""

    kind = "s3"

    def __init__(self, config: StoreConfig) -> None:
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        if session.get_credentials() is None:
            raise ConfigError("--store s3:// needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        self.bucket = config.bucket
        self.prefix = config.prefix.strip("/")
        self._client: Any = session.create_client(
            "s3",
            region_name=config.region,
            endpoint_url=config.endpoint_url,
            config=botocore.config.Config(
                signature_version="s3v4",
                # path style: S3-compatible servers on an IP/port have no per-bucket DNS names
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,  # loopback/LAN connects take ms; a dead endpoint fails the ingest quickly
                read_timeout=60,  # a 4 MiB PUT on a slow link
            ),
        )
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # botocore raises ClientError/EndpointConnectionError; report them as config errors
            raise ConfigError(f"cannot use bucket {self.bucket!r} at {config.endpoint_url or 'AWS'}: {exc}") from exc

    def _full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._full_key(key), Body=data)

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._full_key(key))

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._full_key(key))
        except self._client.exceptions.ClientError:
            return False
        return True

    def url(self, key: str, *, base_url: str, ttl_seconds: int) -> str:
        url: str = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full_key(key)}, ExpiresIn=ttl_seconds
        )
        return url


def parse_store_url(url: str | None, endpoint_url: str | None, region: str | None) -> StoreConfig:
    if not url or url == "local":
        return StoreConfig()
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"--store wants s3://bucket[/prefix] or 'local', got {url!r}")
    return StoreConfig(
        kind="s3",
        bucket=parsed.netloc,
        prefix=parsed.path.strip("/"),
        endpoint_url=endpoint_url,
        region=region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    )
