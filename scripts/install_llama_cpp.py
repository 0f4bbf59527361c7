#!/usr/bin/env python3
"""Build and install llama-cpp-python 0.3.36 with llama.cpp's CLIP class-token order fixed.

The llama.cpp vendored in llama-cpp-python 0.3.36 (the newest on PyPI) appends a CLIP tower's class embedding
after the patch embeddings (``tools/mtmd/models/llava.cpp``) while clip.cpp's inputs assume it comes first
(ggml-org/llama.cpp#25814): every patch gets its neighbour's position embedding, the first patch's output is
dropped and the class token's is fed to the LLM. SigLIP towers (no class token) are not affected. This script
downloads the 0.3.36 source distribution from PyPI, puts the class embedding first (one line), builds a wheel
with the local version ``0.3.36+clsfix`` (it satisfies ``llama-cpp-python==0.3.36``) into a cache folder, and
installs it into the Python running the script. A later run reuses the cached wheel (seconds).

    python scripts/install_llama_cpp.py                 # build once (about 10 CPU-minutes), then install
    python scripts/install_llama_cpp.py --build-only    # only make the wheel (e.g. for other machines)

Standard library only: it runs in a fresh virtual environment before the project is installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
LOCAL_VERSION = f"{VERSION}+clsfix"
GRAPH_FILE = "vendor/llama.cpp/tools/mtmd/models/llava.cpp"
BUGGY = "inp = ggml_concat(ctx0, inp, model.class_embedding, 1);"
FIXED = "inp = ggml_concat(ctx0, model.class_embedding, inp, 1);"
VERSION_FILE = "llama_cpp/__init__.py"
DEFAULT_WHEELS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mobilemllm" / "wheels"


class PatchError(RuntimeError):
    """The source is not the one this patch was written for."""


def patch_graph(text: str) -> str:
    """llava.cpp with the class embedding concatenated before the patches (the row order clip.cpp's
    ``positions`` and ``patches`` inputs assume)."""
    if text.count(BUGGY) != 1:
        state = "already has the class embedding first" if FIXED in text else "has no line to patch"
        raise PatchError(f"{GRAPH_FILE} {state}: expected one `{BUGGY}` (the {PACKAGE} {VERSION} source)")
    return text.replace(BUGGY, FIXED)


def patch_version(text: str) -> str:
    """``__version__`` with the local label, so the wheel says it is the patched build."""
    old = f'__version__ = "{VERSION}"'
    if text.count(old) != 1:
        raise PatchError(f"{VERSION_FILE} has no `{old}`")
    return text.replace(old, f'__version__ = "{LOCAL_VERSION}"')


def patch_source(root: Path) -> None:
    """Apply both patches to an unpacked source distribution."""
    for rel, fix in ((GRAPH_FILE, patch_graph), (VERSION_FILE, patch_version)):
        path = root / rel
        path.write_text(fix(path.read_text(encoding="utf-8")), encoding="utf-8")


def for_this_machine(wheel: Path) -> bool:
    """Whether a wheel's platform tag (``linux_x86_64``, ``macosx_11_0_arm64``, ``win_amd64``) is this machine's
    (a shared cache folder may hold other machines' wheels; the libraries inside are native)."""
    plat = wheel.stem.rsplit("-", 1)[-1].lower()
    system = {"linux": "linux", "darwin": "macosx", "win32": "win"}.get(sys.platform, sys.platform)
    return plat.startswith(system) and plat.endswith(platform.machine().lower())


def cached_wheel(wheel_dir: Path) -> Path | None:
    """The patched wheel already built in ``wheel_dir`` for this machine (None when there is none)."""
    found = sorted(w for w in wheel_dir.glob(f"llama_cpp_python-{LOCAL_VERSION}-*.whl") if for_this_machine(w))
    return found[-1] if found else None


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def build_wheel(wheel_dir: Path) -> Path:
    """Download the sdist, patch it and build the wheel into ``wheel_dir``."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-clsfix-") as tmp:
        tmp = Path(tmp)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(tmp),
             f"{PACKAGE}=={VERSION}"])
        (sdist,) = tmp.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python < 3.10.12: no filters
            tar.extractall(tmp / "src", **safe)
        (root,) = (tmp / "src").iterdir()
        patch_source(root)
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL",
                                                                           str(os.cpu_count() or 1))}
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), str(root)], env=env)
    wheel = cached_wheel(wheel_dir)
    if wheel is None:
        raise PatchError(f"pip built no {PACKAGE} {LOCAL_VERSION} wheel in {wheel_dir}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel-dir", type=Path, default=DEFAULT_WHEELS,
                        help=f"where the patched wheel is built and cached (default {DEFAULT_WHEELS})")
    parser.add_argument("--build-only", action="store_true", help="make the wheel, do not install it")
    parser.add_argument("--rebuild", action="store_true", help="build again even if the wheel is cached")
    args = parser.parse_args(argv)
    wheel = None if args.rebuild else cached_wheel(args.wheel_dir)
    if wheel is None:
        try:
            wheel = build_wheel(args.wheel_dir)
        except PatchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"patched {PACKAGE}: {wheel}", flush=True)
    if not args.build_only:
        run([sys.executable, "-m", "pip", "install", str(wheel)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
