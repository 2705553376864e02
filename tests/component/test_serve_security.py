"""Security review of ``directfs serve`` (issue 13: H1, L1, L2, L3, L8), each through a real server on loopback.

* H1: credentials are one set. The public demo values are used only when nothing at all is configured (and then only
  on a loopback listen unless ``--insecure-demo``); a surface without a configured credential is refused.
* L1: a crafted ``/blocks`` query is answered 403, never a 500 with a traceback.
* L2: control characters in a request line never reach the log raw.
* L3: a long-poll ``timeout`` that is not a finite number is refused (400) instead of parking the request.
* L8: a warning for plain HTTP off loopback; a delay on failed logins that blocks no one else; a state dir that is
  private (refused when group/other-writable or someone else's; created 0700, ``index.sqlite3`` 0600).
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import stat
import subprocess
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from directfs.errors import DecryptKeyError
from directfs.server.config import (
    DEMO_ACCESS_KEY_ID,
    DEMO_PASSWORD,
    DEMO_SECRET_ACCESS_KEY,
    DEMO_TOKEN,
    DEMO_USERNAME,
)
from directfs.sources.ctera import codec
from tests.support.portal import LISTENING_PREFIX, Portal, random_secret_access_key, serve_command, start_portal

LONGPOLL = "/ServicesPortal/v2/api/metadata/longpoll"
LIST = "/ServicesPortal/v2/api/metadata/list"
DAV_ROOT = "/ServicesPortal/webdav/"
CRED_VARS = (
    "DIRECTFS_ACCESS_KEY_ID",
    "DIRECTFS_SECRET_ACCESS_KEY",
    "DIRECTFS_USERNAME",
    "DIRECTFS_PASSWORD",
    "DIRECTFS_TOKEN",
)
NO_CREDENTIALS: Mapping[str, str] = dict.fromkeys(CRED_VARS, "")  # an empty variable is an unset one
DEMO_BEARER = {"Authorization": f"Bearer {DEMO_TOKEN}"}
# Lowered for tests (the default is a real delay): the delay test sets its own, longer, value.
FAST = ["--failed-auth-delay", "0"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "secret.txt").write_bytes(b"top secret\n" * 100)
    return root


def _full_set() -> dict[str, str]:
    return {
        "DIRECTFS_ACCESS_KEY_ID": "AK" + secrets.token_hex(8).upper(),
        "DIRECTFS_SECRET_ACCESS_KEY": random_secret_access_key(),
        "DIRECTFS_USERNAME": "tester",
        "DIRECTFS_PASSWORD": secrets.token_urlsafe(12),
        "DIRECTFS_TOKEN": secrets.token_urlsafe(24),
    }


def run_serve(
    tree: Path, args: list[str], env: Mapping[str, str], timeout_seconds: float = 60
) -> tuple[int | None, str]:
    """Run ``directfs serve tree ARGS`` expecting it to refuse to start: (exit status, stderr). A server that starts
    instead is stopped at once and reported with status None (so a test of a refusal fails, never hangs)."""
    argv = [*serve_command(), str(tree), "--rescan-interval", "0", *args]
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("DIRECTFS_")}, **env}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
    assert proc.stdout is not None
    line = b""
    timer = threading.Timer(timeout_seconds, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.terminate()
        _, err = proc.communicate(timeout=30)
    started = line.decode(errors="replace").startswith(LISTENING_PREFIX)
    return (None if started else proc.returncode), err.decode(errors="replace")


def dav_get(portal: Portal, relpath: str, **kwargs: object) -> httpx.Response:
    return httpx.get(portal.url + DAV_ROOT + relpath, timeout=30, **kwargs)  # type: ignore[arg-type]


def feed(portal: Portal, **kwargs: object) -> httpx.Response:
    return httpx.post(portal.url + LIST, json={"cursor": None}, timeout=30, **kwargs)  # type: ignore[arg-type]


# --- H1: one credential set ----------------------------------------------------------------------------------------


def test_only_basic_configured_refuses_every_bearer_token(tree: Path) -> None:
    with start_portal(tree, env={"DIRECTFS_TOKEN": ""}, extra_args=FAST) as portal:
        assert dav_get(portal, "docs/secret.txt", auth=portal.auth).status_code == 200
        # Before the fix the public demo token read every file and the change feed (200).
        assert dav_get(portal, "docs/secret.txt", headers=DEMO_BEARER).status_code == 401
        assert feed(portal, headers=DEMO_BEARER).status_code == 401
        propfind = httpx.request("PROPFIND", portal.url + DAV_ROOT, headers={"Depth": "1", **DEMO_BEARER})
        assert propfind.status_code == 401
        assert dav_get(portal, "docs/secret.txt", headers={"Authorization": "Bearer"}).status_code == 401
        # The challenge names only what is accepted.
        challenge = dav_get(portal, "docs/secret.txt").headers.get_list("WWW-Authenticate")
        assert challenge and all(c.startswith("Basic") for c in challenge)


def test_only_a_token_configured_refuses_basic(tree: Path) -> None:
    env = {"DIRECTFS_USERNAME": "", "DIRECTFS_PASSWORD": ""}
    with start_portal(tree, env=env, extra_args=FAST) as portal:
        token = {"Authorization": f"Bearer {portal.token}"}
        assert dav_get(portal, "docs/secret.txt", headers=token).status_code == 200
        # Before the fix demo:demo still worked next to the configured token.
        assert dav_get(portal, "docs/secret.txt", auth=(DEMO_USERNAME, DEMO_PASSWORD)).status_code == 401
        assert feed(portal, auth=(DEMO_USERNAME, DEMO_PASSWORD)).status_code == 401
        assert dav_get(portal, "docs/secret.txt", auth=("", "")).status_code == 401
        challenge = dav_get(portal, "docs/secret.txt").headers.get_list("WWW-Authenticate")
        assert challenge and all(c.startswith("Bearer") for c in challenge)


def _wrapped_keys(state_dir: Path) -> list[str]:
    with sqlite3.connect(f"file:{state_dir / 'index.sqlite3'}?mode=ro", uri=True) as db:
        return [str(r[0]) for r in db.execute("SELECT wrapped_key FROM nodes WHERE wrapped_key IS NOT NULL")]


def test_without_a_key_pair_direct_io_is_off_and_file_keys_are_not_wrapped_with_the_demo_secret(tree: Path) -> None:
    env = {"DIRECTFS_ACCESS_KEY_ID": "", "DIRECTFS_SECRET_ACCESS_KEY": ""}
    with start_portal(tree, env=env, extra_args=FAST) as portal:
        fid = portal.file_id("docs/secret.txt")
        assert dav_get(portal, "docs/secret.txt", auth=portal.auth).status_code == 200  # WebDAV still works
        for value in (f"Bearer {DEMO_ACCESS_KEY_ID}", f"Bearer {portal.token}", "Bearer"):
            reply = httpx.get(f"{portal.url}/directio/{fid}", headers={"Authorization": value})
            assert reply.status_code == 401, value
        assert "Direct IO is off" in portal.stderr_text()
        wrapped = _wrapped_keys(portal.state_dir)
        assert wrapped
        for value in wrapped:
            with pytest.raises(DecryptKeyError):
                codec.unwrap_file_key(value, DEMO_SECRET_ACCESS_KEY)
        wrapping_file = portal.state_dir / "file-key-wrapping.key"
        assert stat.S_IMODE(wrapping_file.stat().st_mode) == 0o600
        assert len(codec.unwrap_file_key(wrapped[0], wrapping_file.read_text().strip())) == 32
    # A restart keeps the generated secret: the files keep their ids (no re-encode).
    with start_portal(tree, env=env, state_dir=portal.state_dir, extra_args=FAST) as again:
        assert again.file_id("docs/secret.txt") == fid


@pytest.mark.parametrize(
    ("unset", "message"),
    [
        ("DIRECTFS_SECRET_ACCESS_KEY", "Direct IO key pair"),
        ("DIRECTFS_ACCESS_KEY_ID", "Direct IO key pair"),
        ("DIRECTFS_PASSWORD", "password"),
        ("DIRECTFS_USERNAME", "username"),
    ],
)
def test_half_a_credential_pair_refuses_to_start(tree: Path, tmp_path: Path, unset: str, message: str) -> None:
    env = {**_full_set(), unset: ""}
    status, err = run_serve(tree, ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s")], env)
    assert status == 1, err
    assert message in err and "Traceback" not in err
    assert "demo" not in err.lower()


def test_a_key_pair_alone_refuses_to_start(tree: Path, tmp_path: Path) -> None:
    env = {**_full_set(), "DIRECTFS_USERNAME": "", "DIRECTFS_PASSWORD": "", "DIRECTFS_TOKEN": ""}
    status, err = run_serve(tree, ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s")], env)
    assert status == 1, err
    assert "no portal login" in err


def test_demo_credentials_are_refused_off_loopback_unless_insecure_demo(tree: Path, tmp_path: Path) -> None:
    args = ["--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "s")]  # the case under test
    status, err = run_serve(tree, args, NO_CREDENTIALS)
    assert status == 1, err
    assert "--insecure-demo" in err and "Traceback" not in err
    with start_portal(tree, env=NO_CREDENTIALS, extra_args=[*FAST, "--insecure-demo"]) as portal:
        # --insecure-demo is about where it listens; on loopback (start_portal's listen) the demo set works anyway.
        assert dav_get(portal, "docs/secret.txt", auth=(DEMO_USERNAME, DEMO_PASSWORD)).status_code == 200
    # The flag is ignored (no demo values) when credentials are configured.
    with start_portal(tree, extra_args=[*FAST, "--insecure-demo"]) as portal:
        assert dav_get(portal, "docs/secret.txt", auth=(DEMO_USERNAME, DEMO_PASSWORD)).status_code == 401


# --- L1: crafted /blocks queries -----------------------------------------------------------------------------------


def test_crafted_block_queries_are_403_never_500(tree: Path) -> None:
    with start_portal(tree, extra_args=FAST) as portal:
        reply = httpx.get(f"{portal.url}/directio/{portal.file_id('docs/secret.txt')}", headers=_directio(portal))
        good = httpx.URL(reply.json()["chunks"][0]["url"])
        assert httpx.get(good).status_code == 200
        path = good.raw_path.split(b"?")[0].decode()
        sig = good.params["sig"]
        expires = good.params["expires"]
        queries = [
            f"expires=%C2%B2&sig={sig}",  # '²': str.isdigit() is True, int() raises
            f"expires=%D9%A1%D9%A2&sig={sig}",  # Arabic-Indic digits
            f"expires={'9' * 5000}&sig={sig}",  # past int()'s digit limit
            f"expires=-1&sig={sig}",
            f"expires=%20{expires}&sig={sig}",
            f"expires={expires}&sig=%C3%A9",  # non-ASCII: hmac.compare_digest raises TypeError on str
            f"expires={expires}&sig={sig.upper()}",
            f"expires={expires}&sig=",
            f"expires={expires}",
            f"sig={sig}",
            f"expires={expires}&sig={sig}%00",
        ]
        for query in queries:
            response = httpx.get(f"{portal.url}{path}?{query}")
            assert response.status_code == 403, (query, response.status_code, response.text[:300])
            assert "Traceback" not in response.text
        assert httpx.get(good).status_code == 200
        log = portal.stderr_text()
        assert "Traceback" not in log and "Error handling request" not in log


def _directio(portal: Portal) -> dict[str, str]:
    return {"Authorization": f"Bearer {portal.access_key_id}"}


# --- L2: access log injection --------------------------------------------------------------------------------------


def test_control_characters_in_request_lines_are_escaped_in_the_log(tree: Path) -> None:
    forged = '127.0.0.1 "GET /forged" 200 1 0.001s'
    with start_portal(tree, extra_args=FAST) as portal:
        injected = urllib.parse.quote(f"x\r\n{forged}\n\x1b[31mred\u202eevil\u2028", safe="")
        for path in (DAV_ROOT + injected, "/blocks/" + injected + "?expires=1&sig=00"):
            assert httpx.get(portal.url + path).status_code in (401, 403, 404)
        # Raw bytes aiohttp's parser refuses (400): one escaped INFO line each, no traceback to flood the log with.
        host, port = portal.url.removeprefix("http://").rsplit(":", 1)
        for raw in (b"GET /a\x1b[31mb HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /x HTTP/1.1\r\nX: a\x1bb\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(raw)
                assert sock.recv(100).startswith(b"HTTP/1.0 400"), raw
        time.sleep(0.2)  # the access log line is written after the reply
        log = portal.stderr_text()
    lines = log.splitlines()
    assert not any(line.startswith(forged) or line.startswith("\x1b") for line in lines), log[-2000:]
    for raw in ("\x1b", "\u202e", "\u2028", "\r"):
        assert raw not in log, repr(raw)
    assert "\\x1b[31mred" in log  # still readable: escaped, not dropped
    assert "Traceback" not in log and log.count("INFO aiohttp.server: bad HTTP request from 127.0.0.1") == 2


# --- L3: long-poll timeouts ----------------------------------------------------------------------------------------


def test_longpoll_timeout_must_be_a_finite_number(tree: Path) -> None:
    with start_portal(tree, extra_args=FAST) as portal:
        cursor = feed(portal, auth=portal.auth).json()["cursor"]
        for raw in ("NaN", "Infinity", "-Infinity", "-1", "true", '"10"', "1e400"):
            body = f'{{"cursor": "{cursor}", "timeout": {raw}}}'.encode()
            started = time.monotonic()
            # Before the fix NaN parked the request past the 60 s cap (here: the 10 s client timeout expires).
            response = httpx.post(
                portal.url + LONGPOLL,
                content=body,
                headers={"Content-Type": "application/json"},
                auth=portal.auth,
                timeout=10,
            )
            assert response.status_code == 400, (raw, response.status_code)
            assert time.monotonic() - started < 5, raw
        # A valid short timeout still answers "no changes" after about that long.
        started = time.monotonic()
        response = httpx.post(
            portal.url + LONGPOLL, json={"cursor": cursor, "timeout": 200.5}, auth=portal.auth, timeout=10
        )
        assert response.status_code == 200 and response.json() == {"changes": False}
        assert 0.15 < time.monotonic() - started < 5


# --- L8: plain HTTP warning, failed-login delay, private state dir ------------------------------------------------


def test_plain_http_off_loopback_warns(tree: Path) -> None:
    listen = ["--listen", "0.0.0.0:0"]  # the case under test (random port and credentials)
    with start_portal(tree, extra_args=[*FAST, *listen]) as portal:
        assert "plain HTTP" in portal.stderr_text()
    with start_portal(tree, extra_args=FAST) as portal:  # loopback: no warning
        assert "plain HTTP" not in portal.stderr_text()


def test_failed_logins_are_delayed_without_blocking_other_clients(tree: Path) -> None:
    delay = 1.5
    with start_portal(tree, extra_args=["--failed-auth-delay", f"{delay}s"]) as portal:
        url = portal.url + DAV_ROOT + "docs/secret.txt"
        results: dict[str, float] = {}

        def bad() -> None:
            started = time.monotonic()
            assert httpx.get(url, auth=(portal.username, "wrong"), timeout=30).status_code == 401
            results["bad"] = time.monotonic() - started

        worker = threading.Thread(target=bad)
        worker.start()
        time.sleep(0.2)  # the bad login is now waiting out its delay
        started = time.monotonic()
        assert httpx.get(url, auth=portal.auth, timeout=30).status_code == 200
        results["good"] = time.monotonic() - started
        worker.join()
        assert results["bad"] >= delay * 0.9, results
        assert results["good"] < delay / 2, results  # the event loop was not blocked
        for headers in ({"Authorization": "Bearer nope"}, {"Authorization": "Basic !!!"}):
            started = time.monotonic()
            assert httpx.get(url, headers=headers, timeout=30).status_code == 401
            assert time.monotonic() - started >= delay * 0.9, headers
        started = time.monotonic()
        fid = portal.file_id("docs/secret.txt")
        assert httpx.get(f"{portal.url}/directio/{fid}", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert time.monotonic() - started >= delay * 0.9
        started = time.monotonic()
        assert httpx.head(url, auth=(portal.username, "wrong"), timeout=30).status_code == 401  # HEAD of a GET
        assert time.monotonic() - started >= delay * 0.9
        # No credentials at all is the first leg of a challenge (what WebDAV clients send first): answered at once.
        started = time.monotonic()
        assert httpx.get(url, timeout=30).status_code == 401
        assert time.monotonic() - started < delay / 2


def test_state_dir_is_created_private(tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    with start_portal(tree, state_dir=state, extra_args=FAST) as portal:
        assert portal.file_id("docs/secret.txt")
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "index.sqlite3").stat().st_mode) == 0o600
        for extra in ("index.sqlite3-wal", "index.sqlite3-shm", "url-signing.key"):
            if (state / extra).exists():
                assert stat.S_IMODE((state / extra).stat().st_mode) == 0o600, extra
    # A state dir of an older version (index 0644) is tightened on the next start.
    (state / "index.sqlite3").chmod(0o644)
    with start_portal(tree, state_dir=state, extra_args=FAST):
        assert stat.S_IMODE((state / "index.sqlite3").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_group_or_other_writable_state_dir_is_refused(tree: Path, tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    status, err = run_serve(tree, ["--listen", "127.0.0.1:0", "--state-dir", str(state)], _full_set())
    assert status == 1, err
    assert "writable" in err and str(state) in err and "Traceback" not in err
    assert not (state / "index.sqlite3").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a directory to another user")
def test_a_state_dir_of_another_user_is_refused(tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # nobody
    status, err = run_serve(tree, ["--listen", "127.0.0.1:0", "--state-dir", str(state)], _full_set())
    assert status == 1, err
    assert "owned by" in err and "Traceback" not in err
    assert not (state / "index.sqlite3").exists()


@pytest.fixture
def demo_portal(tree: Path) -> Iterator[Portal]:
    with start_portal(tree, env=NO_CREDENTIALS, extra_args=FAST) as portal:
        yield portal


def test_demo_mode_on_loopback_still_serves_every_surface(demo_portal: Portal) -> None:
    """The demo set is whole: Basic, Bearer, Direct IO and its wrapping secret all work together."""
    portal = demo_portal
    assert dav_get(portal, "docs/secret.txt", auth=(DEMO_USERNAME, DEMO_PASSWORD)).status_code == 200
    assert dav_get(portal, "docs/secret.txt", headers=DEMO_BEARER).status_code == 200
    response = httpx.request(
        "PROPFIND", portal.url + DAV_ROOT + "docs/secret.txt", headers={"Depth": "0"}, auth=(DEMO_USERNAME, "demo")
    )
    assert response.status_code == 207
    fid = _fileid(response.text)
    reply = httpx.get(f"{portal.url}/directio/{fid}", headers={"Authorization": f"Bearer {DEMO_ACCESS_KEY_ID}"})
    assert reply.status_code == 200
    key = codec.unwrap_file_key(reply.json()["encrypt_info"]["wrapped_key"], DEMO_SECRET_ACCESS_KEY)
    assert len(key) == 32
    assert "public demo credentials" in portal.stderr_text()


def _fileid(multistatus: str) -> str:
    root = ET.fromstring(multistatus)  # our own server's reply
    node = root.find(".//{http://www.ctera.com/ns}fileid")
    assert node is not None and node.text
    return node.text


def test_new_flags_are_in_the_help() -> None:
    result = subprocess.run([*serve_command(), "--help"], capture_output=True, text=True, check=True)
    for text in ("--insecure-demo", "--failed-auth-delay", "Nothing configured", "file-key-wrapping.key"):
        assert text in result.stdout, text
