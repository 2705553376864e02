"""A private nginx with the WebDAV modules (nginx-light + libnginx-mod-http-dav-ext) for webdav(s):// tests.

Config per ``docs/testbed.md`` §2. One server, the same tree under four locations:

* ``/open/``: no auth;
* ``/basic/``: HTTP Basic (``{PLAIN}`` htpasswd entry, no apache2-utils needed);
* ``/bearer/``: a Bearer check: ``Authorization`` must be one of ``tokens`` (an nginx ``map`` in an included file);
  :meth:`NginxDav.set_tokens` rewrites it and reloads nginx (SIGHUP), returning once the new set is in force;
* ``/x509/`` on the TLS port: a client certificate signed by the test CA is required (``ssl_verify_client``);
* ``/rw/``, ``/rw-basic/``, ``/rw-bearer/``: the same tree, writable (``dav_methods PUT DELETE MKCOL COPY MOVE``),
  without auth, with Basic, with the Bearer check. ``create_full_put_path off``: a PUT into a missing folder is 409,
  as on real stores (``--rw`` tests). The other locations stay read-only (PUT answers 405).

The TLS port serves a certificate of a locally generated CA (trustme). The worker runs as root (``user root``):
pytest's tmp folders are 0700, so ``nobody`` could not read them. Missing Debian packages are installed with apt
(as the Makefile's system-deps target does); tests skip when that is impossible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trustme

DAV_MODULE = Path("/usr/lib/nginx/modules/ngx_http_dav_ext_module.so")
START_TIMEOUT_SECONDS = 30.0  # nginx starts in milliseconds; a loaded 2-core CI box gets generous slack


def ensure_nginx() -> str:
    """The nginx binary, installing nginx-light + the dav-ext module with apt if missing; skip if impossible."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary and DAV_MODULE.exists():
        return binary
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nginx-light", "libnginx-mod-http-dav-ext"],
            env=env,
            check=False,
            capture_output=True,
        )
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not binary or not DAV_MODULE.exists():
        pytest.skip("nginx-light and libnginx-mod-http-dav-ext are not installed (make system-deps)")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NginxDav:
    port: int
    tls_port: int
    user: str
    password: str = field(repr=False)
    ca: trustme.CA
    workdir: Path
    proc: subprocess.Popen[bytes]
    client_cert_pem: Path  # a client certificate + key (one PEM) signed by the CA, accepted on /x509/

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls_host(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    def write_ca(self, path: Path) -> Path:
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def set_tokens(self, tokens: Sequence[str]) -> None:
        """Accept exactly ``tokens`` on /bearer/ from now on (reload, then wait until nginx answers accordingly)."""
        _write_tokens(self.workdir, tokens)
        old_workers = self._workers()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        probe = f"http://{self.host}/bearer/"
        while time.monotonic() < deadline:
            # New workers take over within milliseconds. An old worker keeps serving the keep-alive connections it
            # holds with the old config, so also wait for the old workers to exit (they close idle connections).
            if (
                not (old_workers & self._workers())
                and all(_status(probe, t) == 207 for t in tokens)
                and _status(probe, "stale-probe") == 401
            ):
                return
            time.sleep(0.05)  # polling a reloading server, not an assertion
        raise RuntimeError("nginx did not pick up the new tokens")

    def _workers(self) -> set[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return {int(pid) for pid in children.read_text().split()}
        except OSError:
            return set()


def _status(url: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}", "Depth": "0"}
    try:
        return httpx.request("PROPFIND", url, headers=headers, timeout=5).status_code
    except httpx.TransportError:
        return 0


def _write_tokens(workdir: Path, tokens: Sequence[str]) -> None:
    lines = "".join(f'"Bearer {t}" 1;\n' for t in tokens)
    tmp = workdir / "tokens.map.tmp"
    tmp.write_text(lines)
    os.replace(tmp, workdir / "tokens.map")


def _config(workdir: Path, root: Path, port: int, tls_port: int) -> str:
    dav = "dav_ext_methods PROPFIND OPTIONS;"
    # Writes go to a temp file under client_body_temp_path (the same file system as the tree: tmp_path) and are renamed
    # into place when the body is complete, so a cut PUT leaves nothing behind. 0644 files as a real store makes them.
    rw = f"{dav} dav_methods PUT DELETE MKCOL COPY MOVE; create_full_put_path off; dav_access user:rw group:r all:r;"
    temp = "\n".join(
        f"  {kind}_temp_path {workdir}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
load_module {DAV_MODULE};
user root root;
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  client_max_body_size 0;  # no limit: the write tests upload 40 MiB and more (nginx's default is 1 MiB)
  default_type application/octet-stream;
{temp}
  map $http_authorization $bearer_ok {{
    default 0;
    include {workdir}/tokens.map;
  }}
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {workdir}/server.pem;
    ssl_certificate_key {workdir}/server.pem;
    ssl_client_certificate {workdir}/ca.pem;
    ssl_verify_client optional;
    root {root};
    location /open/ {{ alias {root}/; {dav} }}
    location /basic/ {{ alias {root}/; auth_basic "dav"; auth_basic_user_file {workdir}/htpasswd; {dav} }}
    location /bearer/ {{ alias {root}/; if ($bearer_ok = 0) {{ return 401; }} {dav} }}
    location /x509/ {{ alias {root}/; if ($ssl_client_verify != SUCCESS) {{ return 403; }} {dav} }}
    location /rw/ {{ alias {root}/; {rw} }}
    location /rw-basic/ {{ alias {root}/; auth_basic "dav"; auth_basic_user_file {workdir}/htpasswd; {rw} }}
    location /rw-bearer/ {{ alias {root}/; if ($bearer_ok = 0) {{ return 401; }} {rw} }}
  }}
}}
"""


@contextlib.contextmanager
def start_nginx(workdir: Path, root: Path, *, tokens: Sequence[str] = ()) -> Iterator[NginxDav]:
    binary = ensure_nginx()
    workdir.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    client_pem = workdir / "client.pem"
    ca.issue_cert("directfs-test-user@example.org").private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    user, password = "davuser", "dav-pass-" + os.urandom(6).hex()
    (workdir / "htpasswd").write_text(f"{user}:{{PLAIN}}{password}\n")
    _write_tokens(workdir, tokens)
    port, tls_port = free_port(), free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(_config(workdir, root, port, tls_port))
    log_path = workdir / "stderr.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [binary, "-c", str(conf), "-e", str(workdir / "error.log")], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {log_path.read_text()} {(workdir / 'error.log').read_text()}")
            try:
                if httpx.request("OPTIONS", f"http://127.0.0.1:{port}/open/", timeout=2).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not start")
            time.sleep(0.05)  # polling a starting server, not an assertion
        yield NginxDav(port, tls_port, user, password, ca, workdir, proc, client_pem)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
