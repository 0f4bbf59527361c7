"""Fixtures for the app and web-demo tests (imported by test_apps.py and test_demo_web.py).

``app_bundle``: the random-weight tiny checkpoint (2 layers x 64, 32 px) exported once per test session
with ``mobilemllm export --target android`` (XNNPACK, kept fp32); about a minute and a half on two cores. The export is cached at module level so every test module that imports the fixture shares it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_CACHE: dict[str, Path] = {}


def export_tiny_bundle(checkpoint: Path, out: Path) -> Path:
    """`mobilemllm export --target android` of a checkpoint, kept fp32 (exact parity, quicker lowering)."""
    from mobilemllm.cli import main

    code = main(["export", "--target", "android", "--model", str(checkpoint), "--out", str(out),
                 "--decoder-quant", "fp32", "--embedding-quant", "fp32", "--vision-quant", "fp32"])
    assert code == 0, f"mobilemllm export failed with exit code {code}"
    return out


@pytest.fixture(scope="session")
def app_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """A real exported tiny ExecuTorch bundle (conftest's tiny_checkpoint). Treat it as read-only."""
    if "bundle" not in _CACHE:
        _CACHE["bundle"] = export_tiny_bundle(tiny_checkpoint, tmp_path_factory.mktemp("app_bundle") / "tiny-android")
    return _CACHE["bundle"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def need_tool(what: str, found: bool, how: str) -> None:
    """Skip when a tool is missing on a developer machine; fail in CI, where .ci/run installs it."""
    if found:
        return
    msg = f"{what} is not installed: {how}"
    if in_ci():
        pytest.fail(msg + " (.ci/run should have installed it)")
    pytest.skip(msg)


def find_kotlinc() -> str | None:
    """kotlinc from PATH, $KOTLINC, or the npm registry's kotlin-compiler package installed globally."""
    for cand in (os.environ.get("KOTLINC"), shutil.which("kotlinc")):
        if cand and Path(cand).exists():
            return cand
    npm = shutil.which("npm")
    if npm:
        try:
            root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
        cand = Path(root) / "kotlin-compiler" / "bin" / "kotlinc"
        if cand.exists():
            return str(cand)
    return None


ORG_JSON_JARS = ("/usr/share/java/com.android.json.jar",)  # Debian's libandroid-json-java: Android's own org.json
KOTLIN_SOURCES = ("Manifest.kt", "BundleInputs.kt", "RunnerStats.kt", "BundleStore.kt", "ChatSession.kt")
KOTLIN_TEST_SOURCES = ("ParityMain.kt", "PipeLlm.kt")


def kotlin_classpath(jar: Path) -> str:
    return ":".join([str(jar), *ORG_JSON_JARS])


@pytest.fixture(scope="session")
def kotlin_app_jar(tmp_path_factory) -> Path:
    """android_demo's Android-free Kotlin (manifest, preprocessing, stats, bundle store, conversation) and its
    JVM entry point, compiled once per session against Android's org.json; run with :func:`kotlin_classpath`."""
    if "kotlin" not in _CACHE:
        kotlinc = find_kotlinc()
        need_tool("kotlinc", kotlinc is not None, "`npm install -g kotlin-compiler@2.4.20` (the npm registry's Kotlin "
                  "compiler) or put kotlinc on PATH; a JDK 17+ is needed too")
        need_tool("java", shutil.which("java") is not None, "install a JDK 17+ (Debian: openjdk-17-jdk-headless)")
        need_tool("org.json", all(Path(j).is_file() for j in ORG_JSON_JARS),
                  "apt-get install libandroid-json-java (Android's org.json for the JVM)")
        root = Path(__file__).resolve().parents[1] / "android_demo/app/src"
        sources = [root / "main/java/org/mobilemllm/demo" / n for n in KOTLIN_SOURCES] + \
                  [root / "test/java/org/mobilemllm/demo" / n for n in KOTLIN_TEST_SOURCES]
        jar = tmp_path_factory.mktemp("kotlin") / "app.jar"
        out = subprocess.run([kotlinc, "-cp", ":".join(ORG_JSON_JARS), *map(str, sources), "-include-runtime",
                              "-d", str(jar)], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        _CACHE["kotlin"] = jar
    return _CACHE["kotlin"]
