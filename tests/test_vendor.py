"""The vendored JavaScript (web/vendor, tests/browser/vendor) is exactly what its manifest pins.

Offline: it hashes the files on disk; `python tools/vendor.py refresh` is what talks to npm.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "vendor.py"


def vendor_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("vendor_tool", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vendored_files_match_their_manifests() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("manifest", vendor_module().MANIFESTS, ids=lambda p: p.parent.name)
def test_every_package_is_pinned_with_its_licence(manifest: Path) -> None:
    for package in json.loads(manifest.read_text())["packages"]:
        assert package["version"][0].isdigit(), package  # an exact version, not a range
        assert package["integrity"].startswith("sha512-"), package
        assert package["license"], package
        assert any("LICENSE" in f["to"] for f in package["files"]), package


def test_an_edited_or_stray_file_is_caught(tmp_path: Path) -> None:
    vendor = vendor_module()
    copy = tmp_path / "vendor"
    shutil.copytree(ROOT / "web" / "vendor", copy)
    manifest = copy / "manifest.json"
    assert vendor.problems(manifest) == []
    edited = copy / "marked" / "marked.esm.js"
    edited.write_bytes(edited.read_bytes() + b"\nwindow.pwned = 1;\n")
    (copy / "extra.js").write_text("export {};\n")
    found = vendor.problems(manifest)
    assert any("marked.esm.js does not match" in p for p in found), found
    assert any("extra.js is not in" in p for p in found), found
