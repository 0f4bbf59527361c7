"""MobileVLM v1 (ldp) and v2 (ldpv2) checkpoints in their published layouts, imported with `mobilemllm import`,
exported with `mobilemllm export --target gguf` and run through llama.cpp itself: clip.cpp's image embeddings
(the mmproj's output) equal eager's within fp16 rounding, and llama.cpp answers with eager's greedy text.

Both have CLIP towers (a class token), which llama.cpp runs right only with the class-token fix
(ggml-org/llama.cpp#25814; ``scripts/install_llama_cpp.py``, which the README's test command runs); the probe
test says so first when the installed build lacks it.
"""

from __future__ import annotations

import pytest
import torch
from test_export_gguf import need_llama_cpp
from test_importers import clip_vision_config, write_clip_folder, write_mobilevlm

from mobilemllm.bundle import load_manifest
from mobilemllm.cli import main
from mobilemllm.data.images import preprocess
from mobilemllm.export import parity as P
from mobilemllm.runtime.llamacpp_probe import FIX, class_token_first
from mobilemllm.inference import answer
from mobilemllm.models.checkpoint import load_checkpoint
from mobilemllm.models.importers import import_checkpoint
from mobilemllm.runtime import open_runner
from mobilemllm.runtime.base import bundle_views

# MobileVLM's projectors run in clip.cpp only on a 24 x 24 patch grid: 48 px images in 2 px patches.
GRID24 = {"image": 48, "patch": 2}
QUESTIONS = ("What is in the image?", "What colour is the shape?", "Describe the image.")


@pytest.fixture(scope="module")
def v1_checkpoint(tmp_path_factory):
    """MobileVLM v1 as published: ldpnet, fp32 weights in two .bin shards without the tower, whose own folder
    (a whole CLIPModel) --vision-tower names; imported."""
    root = tmp_path_factory.mktemp("mobilevlm_v1_gguf")
    clip_cfg = clip_vision_config(**GRID24)
    src = write_mobilevlm(root / "MobileVLM-1.7B", "ldpnet", clip_cfg, with_tower=False, shards="bin")
    write_clip_folder(root / "clip-vit-large-patch14-336", clip_cfg)
    return import_checkpoint(src.folder, root / "imported", vision_tower=root / "clip-vit-large-patch14-336")


@pytest.fixture(scope="module")
def v2_checkpoint(tmp_path_factory):
    """MobileVLM v2 as published: ldpnetv2, the CLIP tower embedded, one bf16 safetensors; imported."""
    root = tmp_path_factory.mktemp("mobilevlm_v2_gguf")
    clip_cfg = clip_vision_config(hidden=128, heads=2, **GRID24)
    src = write_mobilevlm(root / "MobileVLM_V2-1.7B", "ldpnetv2", clip_cfg, with_tower=True, shards="safetensors",
                          dtype=torch.bfloat16, tower_dir=root / "clip-vit-large-patch14-336")
    return import_checkpoint(src.folder, root / "imported")


def test_installed_llama_cpp_keeps_the_class_token_first():
    """The llama.cpp the project installs runs CLIP towers right (the probe of mobilemllm.runtime.llamacpp_probe)."""
    need_llama_cpp()
    assert class_token_first(), f"this llama.cpp has ggml-org/llama.cpp#25814; install the fixed build: {FIX}"


def _export_and_compare(checkpoint, out, projector: str) -> None:
    """`mobilemllm export --target gguf` (f16), then the mmproj's embeddings and the greedy answers against eager."""
    assert main(["export", "--target", "gguf", "--model", str(checkpoint), "--out", str(out),
                 "--decoder-quant", "f16"]) == 0
    model, tok = load_checkpoint(checkpoint)
    model.eval()
    manifest = load_manifest(out)
    assert manifest["graphs"]["vision_encoder"]["projector_type"] == projector
    assert manifest["graphs"]["vision_encoder"]["class_embedding"] and manifest["parity"]["passed"]
    assert not manifest["parity"].get("forced")

    runner = open_runner(out).load()
    try:
        for seed in (0, 1):  # the export's parity image, and another at the encoder's size
            image = P.parity_image(model.config.vision, seed)
            got = runner.engine.encode_views(bundle_views(manifest, image))
            with torch.inference_mode():
                want = model.encode_images(preprocess(image, model.config.vision).unsqueeze(0))[0]
            assert got.shape == tuple(want.shape) == (model.config.num_visual_tokens, model.config.llm.hidden_size)
            assert P.max_rel_diff(got, want) < 5e-3 and P.logit_cosine(got, want) > 0.9999
            for question in QUESTIONS:
                ours = answer(model, tok, image, question, max_new_tokens=10)
                theirs = runner.generate(image, question, max_new_tokens=10)
                # the text of llama.cpp's tokens (random weights answer in stray bytes, whose streamed text is
                # the runners' own matter)
                assert theirs.tokens == ours.tokens and tok.decode(theirs.tokens).strip() == ours.text, question
    finally:
        runner.close()


def test_mobilevlm_v1_ldp_runs_through_llama_cpp_as_eager(v1_checkpoint, tmp_path):
    need_llama_cpp()
    _export_and_compare(v1_checkpoint, tmp_path / "v1-gguf", "ldp")


def test_mobilevlm_v2_ldpv2_runs_through_llama_cpp_as_eager(v2_checkpoint, tmp_path):
    need_llama_cpp()
    _export_and_compare(v2_checkpoint, tmp_path / "v2-gguf", "ldpv2")
