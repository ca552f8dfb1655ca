"""Check the lowest supported versions: install every floor of pyproject.toml exactly, then run the tests.

    python scripts/check_versions.py                  # every floor, torch included (its CUDA wheels: ~3 GB download)
    python scripts/check_versions.py --torch 2.13.0   # every floor but torch's (a small CPU build, where one is served)
    python scripts/check_versions.py --torch 2.13.0 --core    # the same on the core tests only (what CI runs)

The environment lives in ``.venv-lowest/`` (git-ignored) and is reused between runs (``--fresh`` rebuilds it).
It prints a table of the versions checked (floor, lowest installed, this environment's) and the test result,
and exits with the tests' status (all tests but the notebooks'; name test files after ``--`` to run fewer).
Run it with the Python version to check.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import venv
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-lowest"
#: Every test of the library and the command line; not the notebooks (they need the notebook tools and more time).
SKIPPED_TESTS = ("tests/test_notebooks.py", "tests/test_browser.py")
#: ``--core``: data, models, training loop, checkpoints and resume, evaluation, strategies (peft), command line.
CORE_TESTS = [
    "tests/test_data.py",
    "tests/test_models.py",
    "tests/test_training.py",
    "tests/test_reliability.py",
    "tests/test_evaluation.py",
    "tests/test_strategies.py",
    "tests/test_history.py",
    "tests/test_vocab_padding.py",
    "tests/test_cli.py",
    "tests/test_bad_inputs.py",
]
TEST_TOOLS = ["pytest>=8.0", "ipywidgets>=8.1"]


def floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``{package: lowest version}`` from the ``>=`` requirements of [project] dependencies."""
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject.read_text(encoding="utf-8"), re.S | re.M)
    if block is None:
        raise SystemExit(f"{pyproject}: no [project] dependencies list found")
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][^",;]*)"', block.group(1)))


def mismatched_floors(pins: dict[str, str]) -> list[str]:
    """Floors that requirements.txt or environment.yml state differently from pyproject.toml."""
    problems = []
    for name in ("requirements.txt", "environment.yml"):
        stated = dict(
            re.findall(
                r"^[\s-]*([A-Za-z0-9_.-]+)>=([0-9][^\s,;]*)\s*$", (ROOT / name).read_text(encoding="utf-8"), re.M
            )
        )
        problems += [
            f"{name}: {package}>={stated.get(package)}, pyproject.toml: {package}>={floor}"
            for package, floor in pins.items()
            if stated.get(package) != floor
        ]
    return problems


def python_floor(pyproject: Path = ROOT / "pyproject.toml") -> str:
    found = re.search(r'^requires-python = ">=([0-9.]+)"', pyproject.read_text(encoding="utf-8"), re.M)
    return found.group(1) if found else "?"


def run(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, command)), flush=True)
    return subprocess.run([str(part) for part in command], check=False, **kwargs)


def installed_versions(python: Path, packages: list[str]) -> dict[str, str]:
    """Versions of ``packages`` in the environment of ``python``."""
    code = "import sys; from importlib import metadata\nfor name in sys.argv[1:]: print(name, metadata.version(name))"
    output = subprocess.run([str(python), "-c", code, *packages], check=True, capture_output=True, text=True).stdout
    return dict(line.split() for line in output.splitlines())


def current_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def print_table(stated: dict[str, str], lowest: dict[str, str], python: str, result: str, seconds: float) -> None:
    rows = [
        ("package", "floor", "lowest tested", "this environment"),
        ("python", python_floor(), python, ".".join(map(str, sys.version_info[:3]))),
    ]
    rows += [(name, stated[name], lowest.get(name, "-"), current_version(name)) for name in stated]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print(f"\nCore tests on the lowest versions: {result} ({seconds / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", help="test this torch version instead of the floor")
    parser.add_argument("--fresh", action="store_true", help="rebuild .venv-lowest from scratch")
    parser.add_argument("--core", action="store_true", help="run only the core tests (about a minute)")
    parser.add_argument("pytest_args", nargs="*", help="pytest arguments after --, e.g. -- tests/test_data.py")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    stated = floors()
    problems = mismatched_floors(stated)
    if problems:
        print("The stated floors disagree; keep them in step:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    pins = {**stated, **({"torch": args.torch} if args.torch else {})}
    if args.fresh or not (VENV / "bin" / "python").exists():
        venv.create(VENV, with_pip=True, clear=True)
    python = VENV / "bin" / "python"
    install = run(
        python,
        "-m",
        "pip",
        "install",
        "-q",
        *[f"{name}=={version}" for name, version in pins.items()],
        *TEST_TOOLS,
        "-e",
        ROOT,
    )
    if install.returncode or run(python, "-m", "pip", "check").returncode:
        print("\nThe floors cannot be installed together: raise the one pip names in pyproject.toml.", file=sys.stderr)
        return install.returncode or 1
    lowest = installed_versions(python, list(pins))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    selection = [*(CORE_TESTS if args.core else []), *(f"--ignore={path}" for path in SKIPPED_TESTS)]
    tests = run(
        python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection, *args.pytest_args, cwd=ROOT, env=env
    )
    version = subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print_table(stated, lowest, version, "passed" if tests.returncode == 0 else "FAILED", time.perf_counter() - started)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
