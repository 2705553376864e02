"""``directfs serve --help``, run as a subprocess (it starts no server): every flag and the facts an operator needs
are in it, and the real CLI dispatches to it. The reference portal serving: tests/component/test_server_portal.py.
"""

from __future__ import annotations

import subprocess
import sys

from tests.support.portal import serve_command


def test_serve_help_is_complete() -> None:
    result = subprocess.run([*serve_command(), "--help"], capture_output=True, text=True, check=True)
    for flag in (
        "--listen",
        "--state-dir",
        "--block-size",
        "--chunking",
        "--compression",
        "--compression-rule",
        "--native",
        "--non-direct",
        "--store",
        "--store-endpoint",
        "--url-ttl",
        "--rescan-interval",
        "--max-blocks-per-reply",
        "--access-key-id",
        "--secret-access-key-file",
        "--username",
        "--password-file",
        "--token-file",
        "--tls-cert",
        "--fault-latency-ms",
        "--fault-error-rate",
        "--fault-status",
        "--fault-drop-mid-body-rate",
        "--fault-corrupt-blocks-rate",
        "--fault-url-ttl",
        "DIRECTFS_SECRET_ACCESS_KEY",
        "listening on",
        "SIGHUP",
        "TEST ONLY",
    ):
        assert flag in result.stdout, flag


def test_cli_dispatches_serve() -> None:
    """``directfs serve --help`` through the real CLI (which builds every command's parser)."""
    result = subprocess.run(
        [sys.executable, "-m", "directfs.cli", "serve", "--help"], capture_output=True, text=True, check=True
    )
    assert "--max-blocks-per-reply" in result.stdout
