"""The built wheel registers ctera:// with fsspec (entry point ``fsspec.specs``): installed into a fresh venv,
``fsspec.filesystem("ctera")`` finds it without importing directfs first."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import fsspec
assert "directfs" not in sys.modules, "directfs was imported before fsspec looked up the protocol"
fs = fsspec.filesystem("ctera")
import directfs.fsspec_ctera as module
print(type(fs).__module__, type(fs).__name__, module.__file__)
try:
    fs.ls("")
except OSError as exc:
    print("first call:", exc)
"""


@pytest.mark.slow
def test_the_wheel_registers_the_ctera_protocol(tmp_path: Path) -> None:
    # Built from a copy: an in-tree build would leave build/ and egg-info in the shared checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "directfs", source / "directfs", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True,
        timeout=180,
    )
    (wheel,) = wheels.glob("directfs-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "[fsspec.specs]" in text and "ctera = directfs.fsspec_ctera:CteraFileSystem" in text

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The wheel goes into the new venv; its dependencies come from this venv's site-packages, appended after it by a
    # plain path line (no .pth processing there, so this checkout's editable install is not on the path).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=120,
    )
    (site / "deps-from-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (tmp_path / "empty.toml").write_text("")
    (tmp_path / "empty.toml").chmod(0o600)
    clean_env = {"PATH": "/usr/bin:/bin", "DIRECTFS_CONFIG": str(tmp_path / "empty.toml")}  # no DIRECTFS_* of ours
    probe = subprocess.run(
        [str(python), "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean_env
    )
    assert probe.returncode == 0, probe.stderr
    found, first_call = probe.stdout.splitlines()
    module, name, path = found.split()
    assert (module, name) == ("directfs.fsspec_ctera", "CteraFileSystem")
    assert Path(path).is_relative_to(site), "the class came from the installed wheel"
    assert "needs a Portal" in first_call and "DIRECTFS_PORTAL_URL" in first_call, first_call
