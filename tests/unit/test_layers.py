"""The layering contracts of pyproject.toml ([tool.importlinter]): kept by the code, and not vacuous.

``make lint`` runs ``lint-imports`` too; this test makes a layering break fail ``make test`` (and a plain ``pytest``)
as well. The self-checks guard the contract itself: it names every layer of the README in the README's order, and a
deliberately upward import in a scratch copy of the package breaks it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import directfs

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(directfs.__file__).resolve().parent
PYPROJECT = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# The README's chain (cli → mount → fuse_ops → vfs/reader → cache/fetch → sources/codec → http), top to bottom.
README_ORDER = ("cli", "mount", "fuse_ops", "vfs", "engine", "sources", "http")


def contracts() -> dict[str, dict[str, Any]]:
    with PYPROJECT.open("rb") as handle:
        config = tomllib.load(handle)["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


def layer_rows() -> list[list[str]]:
    """The layers contract's rows, top first, each a list of module tails without the "(optional)" parentheses."""
    rows = []
    for row in contracts()["layers"]["layers"]:
        separator = "|" if "|" in row else ":"
        rows.append([tail.strip().strip("()") for tail in row.split(separator)])
    return rows


def lint_imports(package_parent: Path, config: Path) -> tuple[int, str]:
    """``lint-imports`` over the ``directfs`` found in ``package_parent`` (this checkout, or a scratch copy): its exit
    status and its report without colours (some versions colour even a pipe)."""
    env = {**os.environ, "PYTHONPATH": str(package_parent), "COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)


def test_contracts_are_kept() -> None:
    status, out = lint_imports(PACKAGE.parent, PYPROJECT)
    assert status == 0, out
    assert "0 broken" in out


def test_layers_name_every_module_in_the_readme_order() -> None:
    contract = contracts()["layers"]
    assert contract["type"] == "layers"
    assert contract["containers"] == ["directfs"]
    assert contract["exhaustive"] is True  # a new module of directfs must be given a layer
    rows = layer_rows()
    level = {tail: index for index, row in enumerate(rows) for tail in row}
    present = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    present |= {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert present <= set(level), f"not in the layers contract: {sorted(present - set(level))}"
    for must in ("cli", "commands", "config", "mount", "server", "fuse_ops", "metrics", "vfs", "api", "engine"):
        assert must in level
    for must in ("sources", "http", "logs", "notify", "workers", "units", "errors"):
        assert must in level
    assert [level[name] for name in README_ORDER] == sorted({level[name] for name in README_ORDER})
    assert level["commands"] < level["config"] < level["metrics"]  # metrics and config never reach up (issue #11)
    assert level["vfs"] == level["api"] and "|" in contract["layers"][level["vfs"]]  # siblings, independent
    assert rows[-1] == ["errors"]


def test_server_and_sources_contracts() -> None:
    server = contracts()["server-private"]
    assert server["type"] == "protected"
    assert server["protected_modules"] == ["directfs.server"]
    assert server["allowed_importers"] == ["directfs.commands.serve"]
    sources = contracts()["sources-standalone"]
    assert sources["type"] == "forbidden"
    assert sources["source_modules"] == ["directfs.sources"]
    forbidden = {f"directfs.{name}" for name in ("engine", "vfs", "api", "mount", "fuse_ops", "commands", "cli")}
    assert set(sources["forbidden_modules"]) == forbidden


def test_upward_imports_in_a_scratch_copy_are_caught(tmp_path: Path) -> None:
    copy = tmp_path / "directfs"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    probes = {
        "engine/_layers_probe.py": "from .. import vfs\n",  # engine reaching up into the filesystem
        "sources/_layers_probe.py": "from ..engine import cache\n",  # a source using the engine
        "commands/_layers_probe.py": "from ..server import config\n",  # a command other than serve
        "metrics_probe.py": "from . import config\n",  # a top-level module no layer names
    }
    for name, text in probes.items():
        (copy / name).write_text(f'"""Scratch upward import (tests/unit/test_layers.py)."""\n\n{text}')

    status, out = lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert status != 0, out
    assert "directfs.engine is not allowed to import directfs.vfs" in out
    assert "directfs.sources is not allowed to import directfs.engine" in out
    assert "directfs.commands._layers_probe -> directfs.server.config" in out
    assert "- directfs.metrics_probe" in out  # exhaustive: unlisted
    assert "0 kept, 3 broken" in out
