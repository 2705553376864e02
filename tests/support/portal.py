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

The change feed (docs/serve-feed.md): ``portal.feed_list()``/``feed_drain()``/``feed_longpoll()`` call it,
``portal.reset_feed()`` makes every cursor so far answer 410 (SIGUSR2, waited for), and with ``feed_faults=True``
``portal.set_feed_down(True)`` takes the feed down (connections closed; ``status=503`` answers that instead) until
``set_feed_down(False)``. Every portal counts its requests (``--count-requests``): ``portal.request_count("PROPFIND",
"/ServicesPortal/webdav/many/")`` is the number received so far, exact as soon as the client has its answers.
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
FEED_LIST = "/ServicesPortal/v2/api/metadata/list"
FEED_LONGPOLL = "/ServicesPortal/v2/api/metadata/longpoll"
COUNTS_PATH = "/directfs/test/requests"  # --count-requests (directfs/server/app.py)
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
    guid: str | None = None  # ctera:guid


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
    feed_down_path: Path | None = None  # start_portal(feed_faults=True): --fault-feed-down-file

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def client(self, **kwargs: object) -> httpx.Client:
        kwargs.setdefault("verify", shared_ssl_context())
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, auth=self.auth, **kwargs)  # type: ignore[arg-type]

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

    # --- server-side request counts (--count-requests) ---

    def request_count(self, method: str | None = None, path_prefix: str = "") -> int:
        """Requests the portal received so far with ``method`` (any if None) whose decoded path starts with
        ``path_prefix`` (e.g. ``"/ServicesPortal/webdav/many/"``), whatever their answer; this query is not counted.
        A request is counted when it arrives, so everything a client already has an answer to is in the count."""
        params = {"prefix": path_prefix} | ({"method": method} if method is not None else {})
        with self.client() as client:
            response = client.get(COUNTS_PATH, params=params)
        response.raise_for_status()
        return int(response.json()["count"])

    # --- the change feed ---

    def feed_list(
        self, cursor: str | None = None, *, folder_ids: Sequence[int] = (), max_results: int = 2000
    ) -> dict[str, object]:
        """One ``/metadata/list`` answer (``entries``, ``cursor``, ``has_more``); an HTTPStatusError for 4xx/5xx."""
        body = {"folder_ids": list(folder_ids), "cursor": cursor, "max_results": max_results}
        with self.client() as client:
            response = client.post(FEED_LIST, json=body)
        response.raise_for_status()
        reply: dict[str, object] = response.json()
        return reply

    def feed_drain(
        self, cursor: str | None = None, *, folder_ids: Sequence[int] = (), max_results: int = 2000
    ) -> tuple[list[dict[str, object]], str]:
        """Every event after ``cursor`` (``list`` until ``has_more`` is false) and the cursor to go on from."""
        entries: list[dict[str, object]] = []
        while True:
            reply = self.feed_list(cursor, folder_ids=folder_ids, max_results=max_results)
            entries += reply["entries"]  # type: ignore[arg-type]
            cursor = str(reply["cursor"])
            if not reply["has_more"]:
                return entries, cursor

    def feed_cursor(self) -> str:
        """A cursor of the current feed at its newest event (drains the retained events: cheap on small trees)."""
        return self.feed_drain(None, max_results=10000)[1]

    def feed_longpoll(
        self, cursor: str | None, *, timeout_ms: float = 10000, folder_ids: Sequence[int] = ()
    ) -> httpx.Response:
        """One ``/metadata/longpoll`` (``{"changes": bool}`` on 200); the HTTP timeout allows for ``timeout_ms``."""
        body = {"folder_ids": list(folder_ids), "cursor": cursor, "timeout": timeout_ms}
        with self.client(timeout=timeout_ms / 1000 + 30) as client:
            return client.post(FEED_LONGPOLL, json=body)

    def reset_feed(self, *, timeout_seconds: float = 30) -> None:
        """End the feed (SIGUSR2) and wait until it is done: every cursor handed out before answers 410 (a client
        following the feed must reset), parked long-polls answer ``{"changes": true}``, and the new feed starts
        empty."""
        old = str(self.feed_list(None, max_results=1)["cursor"])
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout_seconds
        while True:
            with self.client() as client:
                status = client.post(FEED_LIST, json={"cursor": old}).status_code
            if status == 410:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the feed was not reset within {timeout_seconds} s (list answers {status})")
            time.sleep(0.02)

    def set_feed_down(self, down: bool, *, status: int | None = None) -> None:
        """Take the change feed down (``down``) or bring it back (start_portal(feed_faults=True)). Down: list and
        long-poll requests, parked ones within 0.1 s, get their connection closed without an answer, or ``status``
        (e.g. 503) as a JSON error. Takes effect at once for new requests."""
        if self.feed_down_path is None:
            raise AssertionError("start the portal with start_portal(..., feed_faults=True)")
        if down:
            self.feed_down_path.write_text("" if status is None else str(status))
        else:
            self.feed_down_path.unlink(missing_ok=True)


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
                guid=(props[f"{{{CTERA}}}guid"].text if f"{{{CTERA}}}guid" in props else None),
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
    count_requests: bool = True,
    feed_faults: bool = False,
) -> Iterator[Portal]:
    """Run ``directfs serve tree --listen 127.0.0.1:0`` until the block exits; yield a :class:`Portal`.

    ``count_requests``: ``--count-requests`` (for :meth:`Portal.request_count`). ``feed_faults``:
    ``--fault-feed-down-file`` in the scratch dir (for :meth:`Portal.set_feed_down`)."""
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
        feed_down_path = scratch / "feed-down" if feed_faults else None
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
            *(["--count-requests"] if count_requests else []),
            *(["--fault-feed-down-file", str(feed_down_path)] if feed_down_path is not None else []),
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
                feed_down_path=feed_down_path,
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
