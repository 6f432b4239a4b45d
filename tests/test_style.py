"""The repository's Python passes the linter the project is configured with (pyproject's ``[tool.ruff.lint]``:
pycodestyle and pyflakes, lines up to 120 characters). Ruff comes with the ``test`` extra."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff comes with the test extra: pip install -e '.[test]'")
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks", "tools"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
