"""Vendored JavaScript: pinned files from npm packages, checked against their manifest.

    python tools/vendor.py check              # offline: every vendored file matches its sha256
    python tools/vendor.py refresh            # fetch the pinned versions again (npm pack) and check
    python tools/vendor.py refresh --latest   # move every package to its newest version

Each manifest (``web/vendor/manifest.json`` for the page, ``tests/browser/vendor/manifest.json``
for test-only tools) lists packages: name, version, the registry's ``integrity`` of the tarball,
and the files taken from it with their sha256. Files are copied byte for byte, licence included,
so they can be compared with the published package. There is no build step: the page imports the
ES-module files as they are. ``refresh`` needs only the npm client (``npm pack`` verifies the
tarball against the registry's integrity before we read it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = [
    ROOT / "web" / "vendor" / "manifest.json",
    ROOT / "tests" / "browser" / "vendor" / "manifest.json",
]
NPM_TIMEOUT_S = 120


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(manifest: Path) -> dict:
    return json.loads(manifest.read_text())


def problems(manifest: Path) -> list[str]:
    """What differs between the vendored files and the manifest (empty when all is well)."""
    found = []
    folder = manifest.parent
    listed = {manifest.name}
    for package in load(manifest)["packages"]:
        name = f"{package['name']}@{package['version']}"
        if not any("licen" in f["to"].lower() for f in package["files"]):
            found.append(f"{name}: no licence file vendored")
        for file in package["files"]:
            listed.add(file["to"])
            path = folder / file["to"]
            if not path.is_file():
                found.append(f"{name}: {file['to']} is missing")
            elif sha256(path) != file["sha256"]:
                found.append(f"{name}: {file['to']} does not match its sha256 (edited?)")
    for path in folder.rglob("*"):
        if path.is_file() and path.relative_to(folder).as_posix() not in listed:
            found.append(f"{path.relative_to(folder)} is not in {manifest}")
    return found


def npm(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        ["npm", *args], cwd=cwd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        sys.exit(f"npm {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def refresh(manifest: Path, latest: bool) -> None:
    data = load(manifest)
    for package in data["packages"]:
        version = package["version"]
        if latest:
            version = json.loads(npm("view", package["name"], "version", "--json", cwd=ROOT))
        with tempfile.TemporaryDirectory() as tmp:
            spec = f"{package['name']}@{version}"
            [packed] = json.loads(npm("pack", spec, "--json", "--pack-destination", tmp, cwd=ROOT))
            pinned = package.get("integrity")
            if not latest and pinned and packed["integrity"] != pinned:
                sys.exit(f"{spec}: the registry sent {packed['integrity']}, pinned {pinned}")
            with tarfile.open(Path(tmp) / packed["filename"]) as tar:
                for file in package["files"]:
                    member = tar.extractfile(f"package/{file['from']}")
                    if member is None:
                        sys.exit(f"{spec} has no file {file['from']}")
                    target = manifest.parent / file["to"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(member.read())
                    file["sha256"] = sha256(target)
        package["version"], package["integrity"] = packed["version"], packed["integrity"]
        print(f"{manifest.relative_to(ROOT)}: {package['name']} {packed['version']}")
    manifest.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check", "refresh"])
    parser.add_argument("--latest", action="store_true", help="refresh to the newest versions")
    args = parser.parse_args(argv)
    if args.command == "refresh":
        for manifest in MANIFESTS:
            refresh(manifest, args.latest)
    found = [problem for manifest in MANIFESTS for problem in problems(manifest)]
    print("\n".join(found) or "vendored files match their manifests")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
