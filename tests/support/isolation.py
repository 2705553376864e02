"""A test process without the developer's DIRECTFS_* variables or /etc/directfs config (what the CLI and the fsspec
filesystem would otherwise fold in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def isolate_directfs_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Drop every DIRECTFS_* variable and point DIRECTFS_CONFIG at an empty private config file (returned)."""
    for name in list(os.environ):
        if name.startswith("DIRECTFS_"):
            monkeypatch.delenv(name)
    config = tmp_path / "empty.toml"
    config.write_text("")
    config.chmod(0o600)
    monkeypatch.setenv("DIRECTFS_CONFIG", str(config))
    return config
