"""A wheel built from pyproject.toml (not an editable install, which would hide the gap)
holds every Python file of every package under rlprox/ and envs/: a subpackage missing
from ``[tool.setuptools] packages`` fails here, not on a user's machine."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT

BUILD = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"


def expected_files() -> set[str]:
    """Wheel paths of every .py file in a package (a folder with an __init__.py)."""
    root = Path(ROOT)
    found = set()
    for source, installed in ((root / "rlprox", "rlprox"), (root / "envs", "rlprox/envs")):
        for path in source.rglob("*.py"):
            if "__pycache__" in path.parts or not (path.parent / "__init__.py").exists():
                continue
            if source.name == "rlprox" and path.is_relative_to(root / "rlprox" / "envs"):
                continue
            found.add(f"{installed}/{path.relative_to(source).as_posix()}")
    return found


def test_wheel_holds_every_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(Path(ROOT) / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("rlprox", "envs"):
        shutil.copytree(Path(ROOT) / folder, src / folder, ignore=ignore)
    out = subprocess.run([sys.executable, "-c", BUILD], cwd=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = src / "dist" / out.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = expected_files()
    assert "rlprox/engine/fit.py" in expected and "rlprox/envs/__init__.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (add the package to [tool.setuptools] packages): {missing}"
