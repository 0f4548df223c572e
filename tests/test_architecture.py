"""The floors of dqtool/ are a checked contract ([tool.importlinter] in pyproject.toml):
the real tree keeps it, and an upward or stage-to-stage import breaks it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy's dqtool wins over the installed one
    return subprocess.run([str(LINT), "--no-cache", "--config", str(tree / "pyproject.toml")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "dqtool", tree / "dqtool", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy2(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _inject(path: Path, line: str) -> None:
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "\n" + rest if sep else line + "\n" + text)


def test_the_tree_keeps_the_contracts(tmp_path):
    r = _lint(_copy(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_a_stage_importing_another_stage_breaks_the_contract(tmp_path):
    tree = _copy(tmp_path)
    _inject(tree / "dqtool" / "stages" / "qat.py", "from dqtool.stages import convert  # noqa")
    r = _lint(tree)
    assert r.returncode != 0
    assert "Stages never import stages BROKEN" in r.stdout and "dqtool.stages.qat" in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    tree = _copy(tmp_path)
    _inject(tree / "dqtool" / "model" / "packed.py", "import dqtool.stages.export  # noqa")
    r = _lint(tree)
    assert r.returncode != 0
    assert "Floors: each imports only its own floor or below BROKEN" in r.stdout
    assert "dqtool.model.packed" in r.stdout
