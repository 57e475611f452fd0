"""Checks what the built sdist and wheel in a folder hold (default: dist/).

The wheel must hold the package, its `py.typed` marker and its metadata, and nothing else
(no tests, benchmarks, examples or figures); the sdist must hold everything needed to build
and test it (sources, tests, the README and the licence metadata, and the examples, benchmarks,
committed benchmark results and docs that tests run or read), and no caches or outputs.

    python scripts/check_dist.py dist
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL_ALLOWED = ("rmsprop_jax/", "rmsprop_jax-")
SDIST_REQUIRED = (
    "pyproject.toml",
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
    "rmsprop_jax/__init__.py",
    "rmsprop_jax/py.typed",
    "tests/conftest.py",
    "tests/helpers.py",
    "scripts/wheel_smoke.py",
    "examples/cli_help.py",
    "benchmarks/_results.py",
    "benchmarks/results/memory_cpu.json",
    "docs/index.md",
)
SDIST_FORBIDDEN = ("__pycache__", ".pyc", ".venv", "outputs/", ".hypothesis", "docs/_build")


def check_wheel(path: Path) -> list[str]:
    names = zipfile.ZipFile(path).namelist()
    problems = [f"wheel holds {n}" for n in names if not n.startswith(WHEEL_ALLOWED)]
    problems += [f"wheel holds {n}" for n in names if n.endswith((".png", ".json", ".csv"))]
    if "rmsprop_jax/py.typed" not in names:
        problems.append("wheel lacks rmsprop_jax/py.typed")
    if "rmsprop_jax/compat/__init__.py" not in names:
        problems.append("wheel lacks rmsprop_jax.compat")
    print(f"{path.name}: {len(names)} files")
    return problems


def check_sdist(path: Path) -> list[str]:
    with tarfile.open(path) as archive:
        names = [n.split("/", 1)[1] for n in archive.getnames() if "/" in n]
    problems = [f"sdist lacks {r}" for r in SDIST_REQUIRED if r not in names]
    problems += [f"sdist holds {n}" for n in names if any(f in n for f in SDIST_FORBIDDEN)]
    print(f"{path.name}: {len(names)} files")
    return problems


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "dist")
    wheels, sdists = sorted(folder.glob("*.whl")), sorted(folder.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise SystemExit(f"expected one wheel and one sdist in {folder}, got {wheels + sdists}")
    problems = check_wheel(wheels[0]) + check_sdist(sdists[0])
    if problems:
        raise SystemExit("\n".join(problems))
    print("dist contents ok")


if __name__ == "__main__":
    main()
