"""The package's shape: imports only go down the layers of pyproject.toml's import-linter contract
(the one `make lint` runs), nothing below the command layer imports it, models/ imports nothing of
lmforge, and every verb's module is in the command layer."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lmforge"
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(src_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contracts, on the lmforge package under ``src_root``."""
    env = {**os.environ, "PYTHONPATH": str(src_root)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=src_root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contract_holds():
    result = _lint(SRC.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line", [
    ("runs.py", "from lmforge.commands import arguments"),  # upward, from a low layer
    ("eval/lm.py", "from lmforge.train import loop"),  # eval takes a model, never a trainer
    ("models/norms.py", "from lmforge.errors import LmforgeError"),  # models/ is saved next to the weights
])
def test_the_contract_catches_an_upward_import_even_inside_a_function(tmp_path, module, line):
    """The same check on a copy of the package with one forbidden import hidden in a function."""
    shutil.copytree(SRC, tmp_path / "lmforge", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "lmforge" / module, "a", encoding="utf-8") as f:
        f.write(f"\n\ndef _sneaky():\n    {line}\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-3000:]


def test_every_verb_lives_in_the_command_layer():
    for module_name, _ in (target.split(":") for target, *_ in COMMANDS.values()):
        assert (SRC / "commands" / f"{module_name}.py").is_file(), module_name
    library = [p for p in SRC.rglob("*.py") if "commands" not in p.parts and p.name != "cli.py"]
    for path in library:  # no *_command functions left in the library
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        assert not [n for n in names if n.endswith("_command")], path
