"""Fuzz of the manifest loader: whatever manifest.json holds, loading either succeeds or raises one-line
BundleError, and never opens a file outside the bundle folder.

Property-based (hypothesis), bounded and derandomized so it runs in seconds and the same way every time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobilemllm.bundle import manifest as M
from mobilemllm.bundle.layout import MANIFEST_NAME

from _manifests import minimal_manifest  # tests/ is on sys.path under pytest

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def valid_manifest(bundle: Path) -> dict:
    files = {rel: {"size": (bundle / rel).stat().st_size, "sha256": M.sha256_file(bundle / rel)}
             for rel in ("model.pte", "tokenizer/tokenizer.json")}
    return {**minimal_manifest(), "schema_version": 1, "files": files}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bundle with symbolic links leading out of it, next to a folder of secrets."""
    root = tmp_path_factory.mktemp("fuzz")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    bundle = root / "bundle"
    (bundle / "tokenizer").mkdir(parents=True)
    (bundle / "model.pte").write_bytes(b"program")
    (bundle / "tokenizer" / "tokenizer.json").write_text("{}")
    (bundle / "tokenizer" / "out.txt").symlink_to(outside / "secret.txt")
    (bundle / "outdir").symlink_to(outside)
    return bundle, valid_manifest(bundle), {"size": 6, "sha256": M.sha256_file(outside / "secret.txt")}


@pytest.fixture
def spy(world, monkeypatch):
    """Every file the loader hashes; each must lie inside the bundle."""
    bundle = world[0].resolve()
    read: list[Path] = []
    real = M.sha256_file

    def sha256_file(path, *a, **kw):
        read.append(Path(path).resolve())
        return real(path, *a, **kw)

    monkeypatch.setattr(M, "sha256_file", sha256_file)
    yield read
    outside = sorted({p for p in read if not p.is_relative_to(bundle)})
    assert not outside, f"read outside the bundle: {outside}"


def check_load(bundle: Path, text: str | bytes) -> None:
    """The property: load_manifest (with and without checksums) and bundle_problem never raise anything else."""
    path = bundle / MANIFEST_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    for verify in (True, False):
        try:
            M.load_manifest(bundle, verify=verify)
        except M.BundleError as e:
            assert "\n" not in str(e), str(e)
    assert M.bundle_problem(bundle) is None or isinstance(M.bundle_problem(bundle), str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)

# Paths a tampered manifest may name: escapes, absolute, symlinks out, odd characters, and plain ones.
paths = st.sampled_from([
    "../outside/secret.txt", "tokenizer/../../outside/secret.txt", "/etc/hostname", "C:/Windows", "a\\b",
    "tokenizer/out.txt", "outdir/secret.txt", "outdir", ".", "", "a//b", "a/", "nul\x00byte", "line\nbreak",
    "lone\ud800surrogate", "x" * 300, "model.pte", "tokenizer", "tokenizer/tokenizer.json", "x;touch PWNED;#",
]) | st.text(max_size=12)

# Where in a valid manifest a mutation lands (a key path).
SPOTS = [("format",), ("schema_version",), ("files",), ("tokenizer",), ("tokenizer", "dir"), ("methods",),
         ("preprocessing", "image_size"), ("preprocessing", "views"), ("prompt", "segments"), ("context",),
         ("graphs",), ("files", "model.pte"), ("files", "model.pte", "size"), ("model",), ("parity", "checks")]


@FUZZ
@given(st.one_of(json_values, st.binary(max_size=40), st.text(max_size=40)))
def test_arbitrary_content(world, spy, value):
    check_load(world[0], value if isinstance(value, (bytes, str)) else json.dumps(value))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SPOTS), json_values), max_size=3),
       st.lists(paths, max_size=3), paths, st.sampled_from(["executorch", "onnx", "coreml"]), st.booleans())
def test_tampered_manifests(world, spy, edits, extra_files, tok_dir, fmt, as_graphs):
    bundle, template, secret = world
    m = json.loads(json.dumps(template))
    for rel in extra_files:
        m["files"][rel] = dict(secret)
    m["tokenizer"]["dir"] = tok_dir
    m["format"] = fmt
    if as_graphs:
        m["graphs"] = {"vision_encoder": {"file": extra_files[0] if extra_files else "vision.onnx"}}
    for spot, value in edits:
        node = m
        for key in spot[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[spot[-1]] = value
    check_load(bundle, json.dumps(m, ensure_ascii=True))


def test_the_template_loads(world):
    """The fuzz starts from a manifest that loads (so tampering, not the template, is what gets refused)."""
    bundle, template, _ = world
    (bundle / MANIFEST_NAME).write_text(json.dumps(template))
    assert M.load_manifest(bundle)["files"]["model.pte"]["size"] == 7
