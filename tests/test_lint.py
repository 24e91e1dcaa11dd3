"""The code stays lint-clean and formatted (ruff), and the package type-checks clean (mypy,
strict); both are configured in pyproject.toml."""

from __future__ import annotations

import ast
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


def imports_of(path: Path) -> set[str]:
    """The modules (and `from` names, as `module.name`) that the file at `path` imports,
    relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_routes_never_import_the_app_module() -> None:
    """Routes reach the running app through `chatbot.runtime`; `chatbot.app` builds the app from
    them, so an import the other way is a cycle."""
    routes = sorted((ROOT / "chatbot" / "routes").glob("*.py"))
    assert len(routes) > 1
    for path in routes:
        cycle = {m for m in imports_of(path) if m == "chatbot.app" or m.startswith("chatbot.app.")}
        assert not cycle, f"{path.relative_to(ROOT)} imports {sorted(cycle)}"
    # Nor through another module: importing every route leaves the app module unloaded.
    modules = ", ".join(f"chatbot.routes.{p.stem}" for p in routes if p.stem != "__init__")
    check = f"import sys, {modules}; assert 'chatbot.app' not in sys.modules, 'chatbot.app'"
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
