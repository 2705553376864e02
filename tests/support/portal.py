"""Start the reference portal (``directfs serve``) as a real subprocess, and build awkward trees to serve.

Usage::

    hashes = make_tree(tmp_path / "tree", block_size=64 * 1024)
    with start_portal(tmp_path / "tree", extra_args=["--block-size", "64K"]) as portal:
        fid = portal.file_id("unicode/Zürich 東京 ☃.bin")
        ...

``writable=True`` adds ``--writable`` (WebDAV writes, docs/serve-writes.md); ``command_prefix`` runs the portal under
another command (e.g. ``unshare`` with a small tmpfs over the tree, to fill the disk). Every portal gets fresh random
credentials (never the printed demo ones) and its own state dir unless one is given
(pass the same ``state_dir`` twice to test restarts). The subprocess's stderr goes to a file that is attached to
the error when it fails to start, and is readable afterwards as ``portal.stderr_text()``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import random
import secrets
import selectors
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DAV = "DAV:"
CTERA = "http://www.ctera.com/ns"
WEBDAV_ROOT = "/ServicesPortal/webdav"
LISTENING_PREFIX = "directfs serve: listening on "
# Start-up includes the first ingest: generous, since a 2-core CI box also runs SeaweedFS and the test itself.
DEFAULT_START_TIMEOUT_SECONDS = 120.0


@dataclass
class DavEntry:
    href: str
    relpath: str  # decoded, relative to the WebDAV root, no trailing slash ('' = root)
    is_dir: bool
    size: int | None
    file_id: str | None
    etag: str | None
    lastmodified: str | None


@dataclass
class Portal:
    url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    username: str
    password: str = field(repr=False)
    token: str = field(repr=False)
    tree: Path
    state_dir: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def client(self, **kwargs: object) -> httpx.Client:
        kwargs.setdefault("verify", shared_ssl_context())
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30, **kwargs)  # type: ignore[arg-type]

    def dav_url(self, relpath: str, *, folder: bool = False) -> str:
        quoted = "/".join(urllib.parse.quote(p, safe="") for p in relpath.split("/") if p)
        return f"{WEBDAV_ROOT}/{quoted}" + ("/" if folder and quoted else "")

    def propfind(self, relpath: str = "", depth: str = "1", *, folder: bool = False) -> list[DavEntry]:
        with self.client() as client:
            response = client.request("PROPFIND", self.dav_url(relpath, folder=folder), headers={"Depth": depth})
        if response.status_code != 207:
            raise AssertionError(f"PROPFIND {relpath!r}: {response.status_code} {response.text[:200]}")
        return parse_multistatus(response.content)

    def file_id(self, relpath: str) -> str:
        """The ``ctera:fileid`` of ``relpath`` (PROPFIND Depth 0)."""
        (entry,) = self.propfind(relpath, depth="0")
        assert entry.file_id is not None
        return entry.file_id

    def rescan(self) -> None:
        """Ask for a rescan (SIGHUP). Returns at once; poll the feed or PROPFIND for the result."""
        self.proc.send_signal(signal.SIGHUP)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One default TLS context for every test client: httpx builds a new one per client otherwise (loading the CA
    bundle, ~70 ms), which made each short request of a test cost that much."""
    return ssl.create_default_context()


def parse_multistatus(body: bytes) -> list[DavEntry]:
    """Parse a 207 body with the standard library's XML parser (the portal is ours; no untrusted input here)."""
    root = ET.fromstring(body)
    entries = []
    for response in root.findall(f"{{{DAV}}}response"):
        href = response.findtext(f"{{{DAV}}}href") or ""
        props: dict[str, ET.Element] = {}
        for propstat in response.findall(f"{{{DAV}}}propstat"):
            if "200" not in (propstat.findtext(f"{{{DAV}}}status") or ""):
                continue
            for prop in propstat.find(f"{{{DAV}}}prop") or []:
                props[prop.tag] = prop
        rel = urllib.parse.unquote(href[len(WEBDAV_ROOT) :], errors="strict").strip("/")
        rt = props.get(f"{{{DAV}}}resourcetype")
        length = props.get(f"{{{DAV}}}getcontentlength")
        entries.append(
            DavEntry(
                href=href,
                relpath=rel,
                is_dir=rt is not None and rt.find(f"{{{DAV}}}collection") is not None,
                size=int(length.text or "0") if length is not None else None,
                file_id=(props[f"{{{CTERA}}}fileid"].text if f"{{{CTERA}}}fileid" in props else None),
                etag=(props[f"{{{DAV}}}getetag"].text if f"{{{DAV}}}getetag" in props else None),
                lastmodified=(
                    props[f"{{{DAV}}}getlastmodified"].text if f"{{{DAV}}}getlastmodified" in props else None
                ),
            )
        )
    return entries


def random_secret_access_key() -> str:
    """40 base64 characters (30 random bytes): the shape of a real CTERA secret access key."""
    return base64.b64encode(secrets.token_bytes(30)).decode()


def serve_command() -> list[str]:
    """How to run ``directfs serve``: the command module directly, so it works before every command exists."""
    return [sys.executable, "-m", "directfs.commands.serve"]


@contextlib.contextmanager
def start_portal(
    tree: Path,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    timeout_seconds: float = DEFAULT_START_TIMEOUT_SECONDS,
    writable: bool = False,
    command_prefix: Sequence[str] = (),
) -> Iterator[Portal]:
    """Run ``directfs serve tree --listen 127.0.0.1:0`` until the block exits; yield a :class:`Portal`."""
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="directfs-portal-")))
        state = state_dir if state_dir is not None else scratch / "state"
        creds = {
            "DIRECTFS_ACCESS_KEY_ID": "AK" + secrets.token_hex(8).upper(),
            "DIRECTFS_SECRET_ACCESS_KEY": random_secret_access_key(),
            "DIRECTFS_USERNAME": "tester",
            "DIRECTFS_PASSWORD": secrets.token_urlsafe(12),
            "DIRECTFS_TOKEN": secrets.token_urlsafe(24),
        }
        full_env = {**os.environ, **creds, **(env or {})}
        stderr_path = scratch / "stderr.log"
        stderr_file = stack.enter_context(open(stderr_path, "wb"))
        argv = [
            *command_prefix,
            *serve_command(),
            str(tree),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
            "--rescan-interval",
            "0",
            # Rejected logins are answered at once here: tests of the delay pass their own (the last flag wins).
            "--failed-auth-delay",
            "0",
            *(["--writable"] if writable else []),
            *extra_args,
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr_file, env=full_env)
        try:
            url = _wait_for_listening(proc, timeout_seconds, stderr_path)
            yield Portal(
                url=url,
                access_key_id=full_env["DIRECTFS_ACCESS_KEY_ID"],
                secret_access_key=full_env["DIRECTFS_SECRET_ACCESS_KEY"],
                username=full_env["DIRECTFS_USERNAME"],
                password=full_env["DIRECTFS_PASSWORD"],
                token=full_env["DIRECTFS_TOKEN"],
                tree=tree,
                state_dir=state,
                proc=proc,
                stderr_path=stderr_path,
            )
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _wait_for_listening(proc: subprocess.Popen[bytes], timeout_seconds: float, stderr_path: Path) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_seconds
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                proc.kill()
                raise RuntimeError(
                    f"directfs serve did not start in {timeout_seconds:.0f} s; stderr:\n{_tail(stderr_path)}"
                )
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                proc.wait(timeout=10)
                raise RuntimeError(f"directfs serve exited with {proc.returncode}; stderr:\n{_tail(stderr_path)}")
            if line.startswith(LISTENING_PREFIX):
                return line[len(LISTENING_PREFIX) :].strip()


def _tail(path: Path, limit: int = 8000) -> str:
    text = path.read_text(errors="replace")
    return text[-limit:]


# --- trees -----------------------------------------------------------------------------------------------------

UNICODE_NAME = "unicode/Zürich – 東京 ☃ é.bin"  # NFC é, CJK, a symbol, an en dash
AWKWARD_NAME = "spaced/name with % and # and ? and +.txt"


def make_tree(
    root: Path, block_size: int, *, many_files: int = 0, few_mib: int = 3, seed: int = 1234
) -> dict[str, str]:
    """Write the awkward tree under ``root``; return ``{relpath: sha256 hex}`` of every file.

    Sizes: 0, 1, block-1, block, block+1, a multi-block file (``few_mib`` MiB plus an odd tail), a compressible
    text file; names with spaces, ``%``, ``#``, ``?``, ``+`` and non-ASCII; nested folders; optionally
    ``many_files`` small files in one folder (``many/``), written with plain ``open`` so 10,000 take about a second.
    """
    rng = random.Random(seed)
    files: dict[str, bytes] = {
        "empty.bin": b"",
        "one-byte.bin": b"\x42",
        "sizes/block-minus-1.bin": rng.randbytes(block_size - 1),
        "sizes/block.bin": rng.randbytes(block_size),
        "sizes/block-plus-1.bin": rng.randbytes(block_size + 1),
        "big/few-mib.bin": rng.randbytes(few_mib * 1024 * 1024 + 12345),
        "text/lorem.txt": (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20000)[: 3 * block_size + 7],
        UNICODE_NAME: rng.randbytes(block_size + 99),
        AWKWARD_NAME: b"awkward name\n" * 100,
        "a/b/c/deep.txt": b"deep inside\n",
        "a/b/sibling 2.bin": rng.randbytes(2 * block_size),
    }
    hashes: dict[str, str] = {}
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
    (root / "empty folder").mkdir(parents=True, exist_ok=True)
    if many_files:
        many = root / "many"
        many.mkdir(parents=True, exist_ok=True)
        for i in range(many_files):
            data = f"file {i}\n".encode()
            with open(many / f"f{i:05d}.txt", "wb") as f:
                f.write(data)
            hashes[f"many/f{i:05d}.txt"] = hashlib.sha256(data).hexdigest()
    return hashes
