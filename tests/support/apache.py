"""A private Apache httpd with mod_dav + mod_dav_fs (writable, no auth) for the WebDAV write tests: the most
complete DAV server at hand (class 1,2; strong ETags on files, weak ones on folders; PROPPATCH of dead properties,
``getlastmodified`` refused as protected). Config per ``docs/testbed.md`` §2.

Apache will not run its workers as root, and ``www-data`` cannot enter pytest's 0700 temp folders, so the server
gets a folder of its own under the system temp dir (mode 0755, data and lock folders owned by ``www-data``), removed
afterwards. Tests skip when apache2 or its DAV modules are missing (``make system-deps`` installs them).
"""

from __future__ import annotations

import contextlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .nginx import free_port

MODULES = Path("/usr/lib/apache2/modules")
START_TIMEOUT_SECONDS = 30.0  # Apache starts in well under a second; a loaded 2-core CI box gets slack


@dataclass
class ApacheDav:
    port: int
    root: Path  # the served folder (owned by www-data; readable and writable by the tests, as root)
    proc: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


def _config(base: Path, root: Path, port: int) -> str:
    modules = "\n".join(
        f"LoadModule {name}_module {MODULES}/mod_{name}.so" for name in ("mpm_event", "authz_core", "dav", "dav_fs")
    )
    return f"""
ServerRoot "{base}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
{modules}
User www-data
Group www-data
PidFile {base}/run/httpd.pid
DefaultRuntimeDir {base}/run
Mutex file:{base}/run
ErrorLog {base}/error.log
LogLevel warn
LimitRequestBody 0
DocumentRoot {root}
DavLockDB {base}/lock/DavLock
<Directory {root}>
  Dav On
  Require all granted
</Directory>
"""


@contextlib.contextmanager
def start_apache() -> Iterator[ApacheDav]:
    binary = shutil.which("apache2") or "/usr/sbin/apache2"
    if not Path(binary).exists() or not (MODULES / "mod_dav_fs.so").exists():
        pytest.skip("apache2 with mod_dav_fs is not installed (make system-deps)")
    try:
        www = pwd.getpwnam("www-data")
    except KeyError:
        pytest.skip("no www-data user for Apache's workers")
    base = Path(tempfile.mkdtemp(prefix="directfs-apache-"))
    try:
        base.chmod(0o755)
        root, lock, run = base / "data", base / "lock", base / "run"
        for folder in (root, lock, run):
            folder.mkdir()
        for folder in (root, lock):
            shutil.chown(folder, www.pw_uid, www.pw_gid)
        port = free_port()
        conf = base / "httpd.conf"
        conf.write_text(_config(base, root, port))
        with open(base / "stderr.log", "wb") as log_file:
            proc = subprocess.Popen([binary, "-f", str(conf), "-DFOREGROUND"], stdout=log_file, stderr=log_file)
        try:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"apache2 exited: {(base / 'stderr.log').read_text(errors='replace')}")
                try:
                    if httpx.request("OPTIONS", f"http://127.0.0.1:{port}/", timeout=2).status_code < 500:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("apache2 did not start")
                time.sleep(0.05)  # polling a starting server, not an assertion
            yield ApacheDav(port, root, proc)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)
