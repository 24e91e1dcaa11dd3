"""The code stays lint-clean and formatted (ruff), and the package type-checks clean (mypy,
strict); both are configured in pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["chatbot", "tests", "bench", "tools"]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ruff", *args, *PATHS]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_ruff_check() -> None:
    result = ruff("check", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = ruff("format", "--check", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)  # a first run (no .mypy_cache) on a loaded machine; later ones take ~2 s
def test_mypy_strict_on_the_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True and config["files"] == ["chatbot"], config
    if importlib.util.find_spec("mypy") is None:  # a virtualenv made before mypy joined the extra
        pytest.fail("mypy is not installed: .venv/bin/pip install -e '.[test]'")
    command = [sys.executable, "-m", "mypy"]  # what to check, and how: [tool.mypy]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout + result.stderr
