"""The phone apps' side of the bundle contract, checked on Linux (no Android SDK or Xcode here):

1. every manifest field the Kotlin and Swift code reads (all in Manifest.kt / Manifest.swift) exists in
   mobilemllm/schemas/manifest.schema.json;
2. the apps' preprocessing and prompt assembly, written out in Python from the manifest alone
   (mobilemllm.bundle.app_inputs), give the same uint8 image and token ids as training's
   ``to_uint8_views`` / ``prompt_ids``; the Kotlin port, compiled on a JVM, gives the same bytes and calls;
3. ``mobilemllm push --target android`` builds the exact adb commands and fails clearly without adb or a phone.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest_apps import app_bundle, kotlin_app_jar, kotlin_classpath, need_tool  # noqa: F401  (fixtures)

from mobilemllm.bundle import app_inputs as ai
from mobilemllm.cli import main

ROOT = Path(__file__).resolve().parents[1]
KOTLIN_DIR = ROOT / "android_demo/app/src/main/java/org/mobilemllm/demo"
SWIFT_DIR = ROOT / "ios_demo/MobileMLLMDemo"
MANIFEST_KT = KOTLIN_DIR / "Manifest.kt"
MANIFEST_SWIFT = SWIFT_DIR / "Manifest.swift"
READ_RE = re.compile(r"""\.(?:req|opt)\(\s*"([^"]+)"\s*\)""")


# ---- 1. manifest fields read by the apps exist in the schema -------------------------------------------
def schema_node(schema: dict, path: str):
    """The sub-schema for a dotted manifest path ('a.b[].c', '*' = any map key), or None if it is not there."""
    def resolve(node):
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            assert ref.startswith("#/")
            node = schema
            for part in ref[2:].split("/"):
                node = node[part]
        return node

    def step(node, key):
        node = resolve(node)
        if not isinstance(node, dict):
            return None
        props = node.get("properties", {})
        if key != "*" and key in props:
            return props[key]
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):  # a map: any key (named or '*') lands here
            return extra
        for branch in node.get("oneOf", []) + node.get("anyOf", []):
            found = step(branch, key)
            if found is not None:
                return found
        return None

    node = schema
    for part in path.split("."):
        items = part.endswith("[]")
        node = step(node, part[:-2] if items else part)
        if node is None:
            return None
        if items:
            node = resolve(node).get("items")
            if node is None:
                return None
    return resolve(node)


def app_reads(path: Path) -> list[str]:
    return READ_RE.findall(path.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    from mobilemllm.bundle import manifest_schema

    return manifest_schema()


def test_schema_path_resolver_rejects_unknown_fields(schema):
    assert schema_node(schema, "prompt.segments[].text") is not None
    assert schema_node(schema, "files.*.sha256") is not None
    assert schema_node(schema, "graphs.vision_encoder.inputs[].name") is not None
    for bad in ("prompt.segmentz", "preprocessing.image_size.x", "tokenizer.eos_ids[].x", "nope"):
        assert schema_node(schema, bad) is None, bad


@pytest.mark.parametrize("source", [MANIFEST_KT, MANIFEST_SWIFT], ids=["kotlin", "swift"])
def test_every_manifest_field_the_app_reads_is_in_the_schema(schema, source):
    reads = app_reads(source)
    # the reads an app cannot work without must be there (guards against the regex silently matching nothing)
    for needed in ("schema_version", "preprocessing.image_size", "preprocessing.pad_color", "prompt.segments[].text",
                   "prompt.bos_in_first_text", "tokenizer.dir", "files.*.role"):
        assert needed in reads, f"{source.name} does not read {needed}"
    missing = sorted({p for p in reads if schema_node(schema, p) is None})
    assert not missing, f"{source.name} reads manifest fields the schema does not define: {missing}"


@pytest.mark.parametrize("folder,ext,manifest_file", [(ROOT / "android_demo", ".kt", MANIFEST_KT),
                                                     (ROOT / "ios_demo", ".swift", MANIFEST_SWIFT)],
                         ids=["kotlin", "swift"])
def test_manifest_reads_live_only_in_the_manifest_file(folder, ext, manifest_file):
    others = [p for p in folder.rglob(f"*{ext}") if p != manifest_file and app_reads(p)]
    assert not others, f"manifest fields are read outside {manifest_file.name}: {others}"
    assert any(p.suffix == ext for p in folder.rglob(f"*{ext}") if p != manifest_file)


def syntax_errors(source: Path, language) -> list[str]:
    from tree_sitter import Language, Parser

    data = source.read_bytes()
    tree = Parser(Language(language)).parse(data)
    errors = []

    def walk(node):
        if node.type == "ERROR" or node.is_missing:
            line = node.start_point[0] + 1
            errors.append(f"{source.name}:{line}: {data[node.start_byte:node.end_byte][:60]!r}")
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    return errors


@pytest.mark.parametrize("folder,ext,grammar", [(ROOT / "android_demo", ".kt", "tree_sitter_kotlin"),
                                                (ROOT / "ios_demo", ".swift", "tree_sitter_swift")],
                         ids=["kotlin", "swift"])
def test_app_sources_parse(folder, ext, grammar, tmp_path):
    """No Android SDK or Swift compiler here: at least every app source must parse (tree-sitter grammars)."""
    import importlib

    try:
        language = importlib.import_module(grammar).language()
    except ImportError:
        language = None
    need_tool(grammar.replace("_", "-"), language is not None, "pip install -e '.[dev]' (tree-sitter grammars)")
    sources = sorted(folder.rglob(f"*{ext}"))
    assert len(sources) >= 5
    errors = [e for src in sources for e in syntax_errors(src, language)]
    assert not errors, errors
    broken = tmp_path / f"broken{ext}"  # the check itself can fail
    broken.write_text("fun f( { val x = }\n" if ext == ".kt" else "func f( { let x = }\n")
    assert syntax_errors(broken, language)


# ---- 2. preprocessing and prompt: the apps' Python twin vs training's code -----------------------------
def vision_config(**kw):
    from mobilemllm.config import SIGLIP_MEAN, SIGLIP_STD, VisionConfig

    if kw.pop("siglip", False):
        kw.update(kind="siglip", image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    return VisionConfig(image_size=kw.pop("image_size", 32), patch_size=8, **kw)


CASES = [dict(image_aspect=a, hires=h, siglip=sg) for a in ("pad", "resize") for h in ("direct", "tiles")
         for sg in (False, True)]
SIZES = [(32, 32), (33, 17), (7, 50), (100, 64), (300, 200), (31, 32), (5, 5), (640, 480), (1, 90)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_app_preprocessing_equals_training(case):
    from PIL import Image

    from mobilemllm.data.images import to_uint8_views
    from mobilemllm.export.manifest_sections import preprocessing_section

    vc = vision_config(**dict(case, tile_grid=(2, 3)))
    pre = preprocessing_section(vc)
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = to_uint8_views(img, vc)
        got = ai.image_views(ai.pixels_of(img), pre)
        assert got.dtype == np.uint8 and got.shape == want.shape, (w, h)
        assert np.array_equal(got, want), f"{w}x{h}: max diff {np.abs(got.astype(int) - want).max()}"


def test_app_resize_equals_pillow_bicubic_on_random_sizes():
    from PIL import Image

    rng = np.random.default_rng(1)
    for _ in range(150):
        w, h, ow, oh = (int(v) for v in rng.integers(1, 96, 4))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(a).resize((ow, oh), Image.Resampling.BICUBIC))
        assert np.array_equal(ai.resize(a, ow, oh), want), (w, h, ow, oh)


def test_app_preprocessing_refuses_what_it_does_not_implement():
    from mobilemllm.errors import UserError
    from mobilemllm.export.manifest_sections import preprocessing_section

    pre = preprocessing_section(vision_config())
    with pytest.raises(UserError, match="bicubic"):
        ai.image_views(np.zeros((4, 4, 3), np.uint8), dict(pre, resample="bilinear"))
    with pytest.raises(UserError, match="pad_color"):
        ai.image_views(np.zeros((4, 4, 3), np.uint8), {k: v for k, v in pre.items() if k != "pad_color"})


QUESTIONS = ["What colour is the shape?", "  how many shapes   ", "é ü ✓ 形 🙂", "", "a\nb", "<s>odd</s>"]


@pytest.mark.parametrize("template", ["vicuna_short", "vicuna_v1", "plain"])
def test_app_prompt_ids_equal_training(template, tiny_tokenizer, tmp_path):
    from conftest import make_tiny_config

    from mobilemllm.export.manifest_sections import prompt_section, tokenizer_section
    from mobilemllm.inference import prompt_ids

    cfg = make_tiny_config(template=template)
    tiny_tokenizer.save_pretrained(tmp_path)
    manifest = {"prompt": prompt_section(cfg, tiny_tokenizer),
                "tokenizer": tokenizer_section(tiny_tokenizer, cfg.llm.vocab_size)}
    for q in QUESTIONS:
        assert ai.prompt_token_ids(manifest, tmp_path / "tokenizer.json", q) == prompt_ids(cfg, tiny_tokenizer, q), q


def test_runner_calls_follow_the_manifest():
    manifest = {"tokenizer": {"bos_id": 1},
                "prompt": {"add_bos": True, "bos_in_first_text": True, "num_visual_tokens": 4,
                           "segments": [{"type": "text", "text": "<s>U: "}, {"type": "image"},
                                        {"type": "text", "text": "\n{question} A:"}]}}
    assert ai.runner_calls(manifest, "  why? ") == [("bos", 0), ("text", "<s>U: "), ("image", None),
                                                     ("text", "\nwhy? A:")]
    image_first = {"tokenizer": {"bos_id": 1},
                   "prompt": {"add_bos": True, "bos_in_first_text": False, "num_visual_tokens": 4,
                              "segments": [{"type": "image"}, {"type": "text", "text": "{question}"}]}}
    assert ai.runner_calls(image_first, "q")[0] == ("bos", 1)
    from mobilemllm.errors import UserError

    with pytest.raises(UserError, match="text segment last"):
        ai.runner_calls({"tokenizer": {"bos_id": 1}, "prompt": dict(image_first["prompt"],
                                                                    segments=[{"type": "image"}])}, "q")


def test_runner_image_layout_equals_the_runtime():
    from mobilemllm.export.manifest_sections import preprocessing_section
    from mobilemllm.runtime.executorch_runner import image_tensor

    pre = preprocessing_section(vision_config(hires="tiles", tile_grid=(2, 2)))
    views = ai.image_views(np.random.default_rng(2).integers(0, 256, (40, 70, 3), dtype=np.uint8), pre)
    want = image_tensor({"preprocessing": pre}, views).numpy()[0]
    assert np.array_equal(ai.runner_image(views), want)


# ---- the same on a real exported bundle, and the Kotlin port compiled on a JVM -----------------------------
@pytest.mark.slow
def test_exported_bundle_app_inputs_equal_training(app_bundle, shapes_image):
    from mobilemllm.config import ModelConfig
    from mobilemllm.data.images import load_image, to_uint8_views
    from mobilemllm.data.tokenizer import load_tokenizer
    from mobilemllm.bundle import load_manifest
    from mobilemllm.inference import prompt_ids

    m = load_manifest(app_bundle)
    cfg = ModelConfig.from_dict(m["model"]["config"])
    tok = load_tokenizer(app_bundle / m["tokenizer"]["dir"])
    for q in QUESTIONS:
        got = ai.prompt_token_ids(m, app_bundle / m["tokenizer"]["dir"] / "tokenizer.json", q)
        assert got == prompt_ids(cfg, tok, q), q
    img = load_image(shapes_image)
    assert np.array_equal(ai.image_views(ai.pixels_of(img), m["preprocessing"]), to_uint8_views(img, cfg.vision))


@pytest.fixture(scope="module")
def kotlin_jar(kotlin_app_jar) -> Path:
    return kotlin_app_jar


@pytest.mark.slow
def test_kotlin_port_gives_the_same_image_and_prompt(app_bundle, kotlin_jar, tmp_path, shapes_image):
    """Manifest.kt + BundleInputs.kt on a JVM: the bytes and prefill calls android_demo hands LlmModule."""
    from mobilemllm.config import ModelConfig
    from mobilemllm.data.images import load_image, to_uint8_views
    from mobilemllm.data.tokenizer import load_tokenizer
    from mobilemllm.bundle import load_manifest
    from mobilemllm.inference import prompt_ids
    from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
    from mobilemllm.runtime.executorch_runner import image_tensor

    m = load_manifest(app_bundle)
    cfg = ModelConfig.from_dict(m["model"]["config"])
    tok = load_tokenizer(app_bundle / m["tokenizer"]["dir"])
    rng = np.random.default_rng(3)
    images = [np.asarray(load_image(shapes_image))] + [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                                                       for w, h in [(73, 50), (20, 64), (32, 32), (3, 2)]]
    for i, (pixels, q) in enumerate(zip(images, QUESTIONS)):
        rgb = tmp_path / f"{i}.rgb"
        rgb.write_bytes(struct.pack(">ii", pixels.shape[1], pixels.shape[0]) + pixels.tobytes())
        out = tmp_path / f"out{i}"
        run = subprocess.run(["java", "-cp", kotlin_classpath(kotlin_jar), "org.mobilemllm.demo.ParityMainKt",
                              str(app_bundle / "manifest.json"), str(rgb), q, str(out)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        res = json.loads(Path(f"{out}.json").read_text())
        from PIL import Image

        want = image_tensor(m, to_uint8_views(Image.fromarray(pixels), cfg.vision)).numpy().reshape(-1)
        got = np.fromfile(f"{out}.chw", dtype=np.uint8)
        assert np.array_equal(got, want), f"image {i}: Kotlin preprocessing differs from training's"
        assert (res["width"], res["height"], res["channels"]) == (32, 32, 3)
        assert (res["program"], res["tokenizer_dir"]) == ("model.pte", "tokenizer")
        calls = [("bos", res["num_bos"])] + [(t, x) for t, x in res["calls"]]
        assert calls == ai.runner_calls(m, q)
        ids = [m["tokenizer"]["bos_id"]] * res["num_bos"]
        for kind, text in res["calls"]:
            ids += ([IMAGE_TOKEN_ID] * m["prompt"]["num_visual_tokens"] if kind == "image"
                    else tok.encode(text, add_special_tokens=False))
        assert ids == prompt_ids(cfg, tok, q), q


def run_kotlin(jar: Path, *args) -> str:
    run = subprocess.run(["java", "-cp", kotlin_classpath(jar), "org.mobilemllm.demo.ParityMainKt", *map(str, args)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.mark.slow
def test_kotlin_port_handles_tiles(app_bundle, kotlin_jar, tmp_path):
    """The same bundle's manifest switched to 2x3 tiles + the global view (the program input (1, 3, 7*S, S))."""
    from PIL import Image

    from mobilemllm.config import ModelConfig
    from mobilemllm.data.images import to_uint8_views

    m = json.loads((app_bundle / "manifest.json").read_text())
    vc = ModelConfig.from_dict(m["model"]["config"]).vision
    vc.hires, vc.tile_grid = "tiles", (2, 3)
    s = m["preprocessing"]["image_size"]
    m["preprocessing"].update(hires="tiles", tile_grid=[2, 3], views=7, input_shape=[1, 3, 7 * s, s])
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    pixels = np.random.default_rng(4).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    rgb = tmp_path / "img.rgb"
    rgb.write_bytes(struct.pack(">ii", 70, 45) + pixels.tobytes())
    run_kotlin(kotlin_jar, tmp_path / "manifest.json", rgb, "q", tmp_path / "out")
    res = json.loads((tmp_path / "out.json").read_text())
    assert (res["width"], res["height"]) == (s, 7 * s)
    want = ai.runner_image(to_uint8_views(Image.fromarray(pixels), vc)).reshape(-1)
    assert np.array_equal(np.fromfile(tmp_path / "out.chw", dtype=np.uint8), want)


@pytest.mark.slow
def test_kotlin_stats_equal_the_runtime_metrics(app_bundle, kotlin_jar, tmp_path, shapes_image):
    """The decode tokens/s android_demo shows from LlmCallback.onStats is the one mobilemllm reports."""
    from mobilemllm.data.images import load_image
    from mobilemllm.runtime import run_bundle
    from mobilemllm.runtime.rates import rates

    real = run_bundle(app_bundle, load_image(shapes_image), "What colour is the shape?", max_new_tokens=16,
                      report=False).stats
    made_up = dict(real, inference_start_ms=1000, prompt_eval_end_ms=1040, first_token_ms=1040,
                   inference_end_ms=1540, prompt_tokens=35, generated_tokens=15)
    for stats in (real, made_up):
        (tmp_path / "stats.json").write_text(json.dumps(stats))
        got = json.loads(run_kotlin(kotlin_jar, "--stats", tmp_path / "stats.json"))
        want = rates(stats)["decode_tokens_per_s"]
        if stats["inference_end_ms"] > stats["prompt_eval_end_ms"]:
            assert got["decode_tokens_per_s"] == pytest.approx(want, rel=1e-9)
        else:  # no measurable decode time: the app shows "–"
            assert got["decode_tokens_per_s"] is None
        assert (got["prompt_tokens"], got["generated_tokens"]) == (stats["prompt_tokens"], stats["generated_tokens"])
    assert got["decode_tokens_per_s"] == pytest.approx(30.0)


@pytest.mark.slow
def test_kotlin_bundle_store_explains_bad_bundles(app_bundle, kotlin_jar, tmp_path):
    """What android_demo shows for a good bundle, a half push, a manifest of another version, a missing one."""
    root = tmp_path / "mobilemllm"
    shutil.copytree(app_bundle, root / "good")
    shutil.copytree(app_bundle, root / "good.partial")  # a push in progress: not listed
    (root / "empty").mkdir()
    shutil.copytree(app_bundle, root / "truncated")
    with open(root / "truncated/model.pte", "r+b") as f:
        f.truncate(100)
    shutil.copytree(app_bundle, root / "future")
    m = json.loads((root / "future/manifest.json").read_text())
    (root / "future/manifest.json").write_text(json.dumps(dict(m, schema_version=2)))

    def opened(name: str) -> list[str]:
        return run_kotlin(kotlin_jar, "--open", root, name).splitlines()

    lines = opened("good")
    assert lines[0] == "bundles: future,good,truncated"
    assert lines[1] == f"ok: {root}/good/model.pte {root}/good/tokenizer/tokenizer.json"  # LlmModule wants a file
    assert "model.pte is 100 bytes" in opened("truncated")[1] and "Push it again" in opened("truncated")[1]
    assert "version 2; this app reads version 1" in opened("future")[1]
    assert "mobilemllm push --bundle DIR --target android" in opened("empty")[1]


# ---- 3. push -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, tiny_tokenizer) -> Path:
    """A schema-valid ExecuTorch bundle with stand-in bytes for the program (push only copies files)."""
    from conftest import make_tiny_config

    from mobilemllm import bundle as B
    from mobilemllm.export import manifest_sections as S

    cfg = make_tiny_config()
    manifest = {
        "format": "executorch", "target": "android",
        "model": {"name": cfg.name, "config": cfg.to_dict()},
        "methods": {"get_max_seq_len": {"value": 64}},
        "tokenizer": S.tokenizer_section(tiny_tokenizer, cfg.llm.vocab_size),
        "prompt": S.prompt_section(cfg, tiny_tokenizer),
        "preprocessing": S.preprocessing_section(cfg.vision),
        "context": {"max_seq_len": 64, "max_context_len": 256},
        "quantization": {"text_decoder": {"scheme": "fp32"}},
        "parity": {"passed": True, "forced": False, "checks": []},
        "export": {"recipe": {"name": "android"}},
    }
    out = tmp_path_factory.mktemp("push") / "tiny-bundle"
    return B.write_bundle(out, manifest, {"model.pte": b"program bytes", "tokenizer/tokenizer.json": b"{}"},
                          roles={"model.pte": "program"})


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_dry_run_prints_the_exact_adb_commands(small_bundle, capsys):
    code, out, err = run_cli(capsys, "push", "--bundle", small_bundle, "--target", "android", "--serial",
                             "emulator-5554", "--name", "tiny", "--dry-run")
    assert code == 0, err
    d = "/data/local/tmp/mobilemllm/tiny"
    adb = "adb -s emulator-5554"
    assert out.splitlines() == [
        f"{adb} shell rm -rf {d}.partial",
        f"{adb} shell mkdir -p {d}.partial {d}.partial/tokenizer",
        f"{adb} push {small_bundle}/model.pte {d}.partial/model.pte",
        f"{adb} push {small_bundle}/tokenizer/tokenizer.json {d}.partial/tokenizer/tokenizer.json",
        f"{adb} push {small_bundle}/manifest.json {d}.partial/manifest.json",
        f"{adb} shell sha256sum {d}.partial/model.pte {d}.partial/tokenizer/tokenizer.json",
        f"{adb} shell rm -rf {d}",
        f"{adb} shell mv {d}.partial {d}",
    ]


def test_push_dry_run_defaults_name_to_the_folder_and_no_serial(small_bundle, capsys):
    code, out, _ = run_cli(capsys, "push", "--bundle", small_bundle, "--dry-run")
    assert code == 0
    assert out.splitlines()[0] == "adb shell rm -rf /data/local/tmp/mobilemllm/tiny-bundle.partial"
    assert out.splitlines()[-1] == ("adb shell mv /data/local/tmp/mobilemllm/tiny-bundle.partial "
                                    "/data/local/tmp/mobilemllm/tiny-bundle")


def test_push_without_adb_fails_clearly(small_bundle, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no adb on it
    code, out, err = run_cli(capsys, "push", "--bundle", small_bundle, "--target", "android")
    assert code == 1 and out == ""
    assert "adb was not found on PATH" in err and "--dry-run" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("adb") is None, reason="adb is not installed (apt-get install adb)")
def test_push_with_adb_but_no_phone_fails_clearly(small_bundle, capsys):
    from mobilemllm.cli.push import connected_devices

    if any(state == "device" for state in connected_devices(shutil.which("adb")).values()):
        pytest.skip("a device is connected")
    code, _, err = run_cli(capsys, "push", "--bundle", small_bundle)
    assert code == 1 and "no Android device is connected" in err, err


def test_push_rejects_bad_input_before_touching_adb(small_bundle, capsys, tmp_path):
    code, _, err = run_cli(capsys, "push", "--bundle", small_bundle, "--target", "ios", "--dry-run")
    assert code == 2 and "unknown --target 'ios'" in err and "valid targets: android" in err
    code, _, err = run_cli(capsys, "push", "--bundle", small_bundle, "--name", "../etc", "--dry-run")
    assert code == 2 and "--name" in err
    code, _, err = run_cli(capsys, "push", "--bundle", tmp_path, "--dry-run")
    assert code == 2 and "no manifest.json" in err


def test_push_device_selection():
    from mobilemllm.cli.push import pick_device
    from mobilemllm.errors import BackendUnavailable, UserError

    assert pick_device({"A": "device"}, None) == "A"
    assert pick_device({"A": "device", "B": "device"}, "B") == "B"
    with pytest.raises(UserError, match="choose one with --serial"):
        pick_device({"A": "device", "B": "device"}, None)
    with pytest.raises(BackendUnavailable, match="unauthorized"):
        pick_device({"A": "unauthorized"}, None)
    with pytest.raises(BackendUnavailable, match="no device with serial 'C'"):
        pick_device({"A": "device"}, "C")


# A stand-in for adb + a phone (neither exists here): device paths map into a local folder, so the real
# push sequence (staging folder, checksums on the "phone", move into place) runs end to end.
FAKE_ADB = r'''#!/usr/bin/env python3
import hashlib, os, shutil, sys
root = os.environ["FAKE_PHONE_ROOT"]
args = sys.argv[1:]
if args[:1] == ["-s"]:
    args = args[2:]
def local(p):
    return os.path.join(root, p.lstrip("/"))
if args == ["devices"]:
    print("List of devices attached")
    print("FAKE123\tdevice")
elif args[0] == "push":
    os.makedirs(os.path.dirname(local(args[2])), exist_ok=True)
    shutil.copyfile(args[1], local(args[2]))
    if os.environ.get("FAKE_PHONE_CORRUPT") and args[2].endswith("model.pte"):
        with open(local(args[2]), "ab") as f:
            f.write(b"!")
elif args[:2] == ["shell", "rm"]:
    shutil.rmtree(local(args[-1]), ignore_errors=True)
elif args[:2] == ["shell", "mkdir"]:
    for p in args[4:]:
        os.makedirs(local(p), exist_ok=True)
elif args[:2] == ["shell", "sha256sum"]:
    for p in args[2:]:
        print(hashlib.sha256(open(local(p), "rb").read()).hexdigest() + "  " + p)
elif args[:2] == ["shell", "mv"]:
    os.rename(local(args[2]), local(args[3]))
else:
    sys.exit("fake adb: unexpected " + " ".join(args))
'''


@pytest.fixture
def fake_phone(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB.replace("/usr/bin/env python3", __import__("sys").executable))
    adb.chmod(0o755)
    phone = tmp_path / "phone"
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("FAKE_PHONE_ROOT", str(phone))
    return phone


def test_push_runs_the_commands_and_lands_the_bundle(small_bundle, capsys, fake_phone):
    code, out, err = run_cli(capsys, "push", "--bundle", small_bundle, "--name", "tiny")
    assert code == 0, err
    dest = fake_phone / "data/local/tmp/mobilemllm/tiny"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == \
        ["manifest.json", "model.pte", "tokenizer/tokenizer.json"]
    for rel in ("manifest.json", "model.pte", "tokenizer/tokenizer.json"):
        assert (dest / rel).read_bytes() == (small_bundle / rel).read_bytes()
    assert not (fake_phone / "data/local/tmp/mobilemllm/tiny.partial").exists()
    assert "FAKE123:/data/local/tmp/mobilemllm/tiny/" in out
    assert err.count("adb -s FAKE123 ") == 8  # each command is echoed as it runs


def test_push_keeps_a_corrupt_copy_out_of_place(small_bundle, capsys, fake_phone, monkeypatch):
    monkeypatch.setenv("FAKE_PHONE_CORRUPT", "1")
    code, _, err = run_cli(capsys, "push", "--bundle", small_bundle, "--name", "tiny")
    assert code == 1 and "differs from the bundle for model.pte" in err
    assert not (fake_phone / "data/local/tmp/mobilemllm/tiny").exists()
    assert (fake_phone / "data/local/tmp/mobilemllm/tiny.partial/model.pte").exists()
