"""Packaging: the wheel ships the package, the CLI, the package data and the top-level export/ recipes (as
``mobilemllm.export_recipes``), and a plain (non-editable) install into a fresh venv imports and finds them.

    python -m pytest tests/test_packaging.py -m slow
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def source_files() -> list[str]:
    """The files a fresh clone would have (tracked + untracked, minus what .gitignore excludes)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def expected_data_files(src: Path) -> list[str]:
    """Where each non-Python file the package must ship lands inside the wheel."""
    want = [f"mobilemllm/export_recipes/{p.name}" for p in sorted((src / "export").glob("*.yaml"))]
    for pattern in ("recipes/*.yaml", "schemas/*.json"):
        want += [p.relative_to(src).as_posix() for p in sorted((src / "mobilemllm").glob(pattern))]
    return want


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a clean copy of the source so stale build/ output in the working tree cannot leak in.
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for rel in source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    # setup.py maps the top-level export/ folder; git does not keep it while it is empty, the working tree does
    if (REPO / "export").is_dir():
        (src / "export").mkdir(exist_ok=True)
    dist = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(dist.glob("mobilemllm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def src(wheel) -> Path:
    """The source copy the wheel was built from (others may be adding files to the working tree meanwhile)."""
    return wheel.parent.parent / "src"


def test_wheel_contents(wheel, src):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("mobilemllm/__init__.py", "mobilemllm/cli/__init__.py", "mobilemllm/cli/info.py",
                     "mobilemllm/config.py", "mobilemllm/models/vlm.py", "mobilemllm/templates.py"):
        assert required in names, required
    # every Python module of the package is shipped
    for py in sorted((src / "mobilemllm").rglob("*.py")):
        rel = py.relative_to(src).as_posix()
        if "__pycache__" not in rel:
            assert rel in names, f"{rel} is missing from the wheel (a folder without __init__.py?)"
    for data in expected_data_files(src):
        assert data in names, f"{data} is missing from the wheel (package-data / setup.py mapping)"
    assert not any(n.startswith(("tests/", "export/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mobilemllm = mobilemllm.cli:run" in text


def test_installed_wheel_imports_and_lists_recipes(wheel, src, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    # the outer pip installs into the fresh venv (no network, no dependencies: importing is light)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = (
        "import importlib.resources as r, json, mobilemllm\n"
        "try:\n"
        "    recipes = sorted(p.name for p in r.files('mobilemllm.export_recipes').iterdir() if p.name.endswith('.yaml'))\n"
        "except ModuleNotFoundError:\n"
        "    recipes = None\n"
        "print(json.dumps({'file': mobilemllm.__file__, 'version': mobilemllm.__version__, 'recipes': recipes}))\n"
    )
    # run outside the repository so the source tree is not on sys.path
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    found = json.loads(out.stdout)
    assert Path(found["file"]).resolve().is_relative_to(venv.resolve()), found["file"]
    assert found["version"]
    shipped = sorted(p.name for p in (src / "export").glob("*.yaml"))
    if shipped:
        assert found["recipes"] == shipped
    else:  # no recipes written yet: nothing to list
        assert not found["recipes"]
