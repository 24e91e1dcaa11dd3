"""The README stays true: every setting documented, the test command the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_environment_variable_is_in_the_readme_table() -> None:
    source = (ROOT / "chatbot" / "settings.py").read_text()
    read = set(re.findall(r'reader\.get\(\s*"([A-Z0-9_]+)"', source))
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    assert len(read) >= 20
    assert read == documented


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in readme
    assert ".venv/bin/pip install -e '.[test]'" in readme
    assert ci.rstrip().endswith(".venv/bin/python -m pytest")
