"""The code, experiments, tests and notebooks pass the project's lint rules (pyproject.toml, ``[tool.ruff.lint]``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


def test_ruff_check_passes() -> None:
    pytest.importorskip("ruff", reason="ruff is part of the test extras: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
