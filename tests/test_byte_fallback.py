"""LLaMA-style sentencepiece tokenizers with byte fallback (MobileLLaMA's): the tokenizer every bundle ships is
one ExecuTorch's C++ tokenizer reads, with the ids Python gives, and byte pieces (accents, emoji, CJK) stream
from an exported bundle exactly as eager decoding writes them.

The checkpoint is written in MobileVLM's published layout by ``tests/test_importers.py``'s builder, with a
sentencepiece model trained here (``byte_fallback=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_importers import clip_vision_config, write_mobilevlm

from mobilemllm.models.importers import import_checkpoint

OUT_OF_VOCAB = "é🙂形"  # none of these is a piece of the tiny vocabulary: byte pieces only
TEXTS = ["A chat between a curious user and an assistant.", " leading space", "two  spaces", "tab\tand\nnewline",
         "Ünïcödé ça 日本語 🙂🙃", OUT_OF_VOCAB, "▁literal", "", " ", "</s>after", "<s>odd</s> text"]


@pytest.fixture(scope="module")
def spm_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("byte_fallback")
    return write_mobilevlm(root / "MobileVLM-bytes", "mlp2x_gelu", clip_vision_config(hidden=64, heads=1),
                           with_tower=True, shards="safetensors", tower_dir=root / "clip-vit-bytes")


@pytest.fixture(scope="module")
def source_tokenizer(spm_source):
    """The published folder's tokenizer as transformers loads it (LlamaTokenizer: a Metaspace pre-tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig

    return AutoTokenizer.from_pretrained(spm_source.folder, local_files_only=True, config=LlamaConfig())


def cpp_tokenizer(folder: Path):
    from pytorch_tokenizers import CppHFTokenizer

    cpp = CppHFTokenizer()
    cpp.load(str(folder / "tokenizer.json"))
    return cpp


# ---- the conversion (fast) ---------------------------------------------------------------------------------


def test_source_tokenizer_is_one_the_cpp_tokenizer_refuses(source_tokenizer, tmp_path):
    """The reason for the conversion: pytorch_tokenizers has no Metaspace pre-tokenizer."""
    assert json.loads(source_tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]["type"] == "Metaspace"
    source_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="Failed to load"):
        cpp_tokenizer(tmp_path)


def test_converted_tokenizer_same_ids_in_python_and_cpp(source_tokenizer, tmp_path):
    from mobilemllm.data.cpp_tokenizer import cpp_compatible
    from mobilemllm.data.tokenizer import load_tokenizer

    tok = cpp_compatible(source_tokenizer)
    tok.save_pretrained(tmp_path)
    cpp = cpp_tokenizer(tmp_path)
    again = load_tokenizer(tmp_path)  # what every later step loads
    assert cpp_compatible(again) is again  # already in the C++ form: left alone
    bos = source_tokenizer.bos_token_id
    for text in TEXTS:
        ours = tok.encode(text, add_special_tokens=False)
        assert list(cpp.encode(text, 0, 0)) == ours == again.encode(text, add_special_tokens=False), text
        if "<s>" not in text and "</s>" not in text:  # the source's ids for any text without special tokens
            assert ours == source_tokenizer.encode(text, add_special_tokens=False), text
        if text:  # "<s>" + a segment, as the first prompt segment: bos, then the segment's own ids
            assert list(cpp.encode("<s>" + text, 0, 0)) == [bos] + ours, text
    ids = tok.encode(OUT_OF_VOCAB, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert len(pieces) > len(OUT_OF_VOCAB) and all(p == "\u2581" or p.startswith("<0x") for p in pieces), pieces
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (bos, source_tokenizer.eos_token_id,
                                                                       source_tokenizer.unk_token_id)


def test_converted_tokenizer_decodes_one_token_at_a_time_with_spaces(source_tokenizer, tmp_path):
    """The C++ runner decodes token by token: every word keeps its space, byte pieces join to the text."""
    from mobilemllm.data.cpp_tokenizer import cpp_compatible

    tok = cpp_compatible(source_tokenizer)
    tok.save_pretrained(tmp_path)
    cpp = cpp_tokenizer(tmp_path)
    text = "the circle is red " + OUT_OF_VOCAB + " 日本"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == " " + text == cpp.decode_batch(ids)
    assert source_tokenizer.decode(ids) == text  # the same text, its leading space stripped
    words = [i for i in ids if not tok.convert_ids_to_tokens(i).startswith("<0x")]
    assert "".join(cpp.decode(i) for i in words) == "".join(tok.decode([i]) for i in words)
    assert any(cpp.decode(i).startswith(" ") for i in words)


def test_byte_level_tokenizers_are_left_alone(tiny_tokenizer):
    from mobilemllm.data.cpp_tokenizer import cpp_compatible

    assert cpp_compatible(tiny_tokenizer) is tiny_tokenizer


def test_imported_checkpoint_ships_the_converted_tokenizer(spm_source, tmp_path):
    out = import_checkpoint(spm_source.folder, tmp_path / "ckpt")
    spec = json.loads((out / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"] is None and spec["model"]["byte_fallback"] is True
    from tokenizers import Tokenizer

    python = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert list(cpp_tokenizer(out).encode(text, 0, 0)) == python.encode(text, add_special_tokens=False).ids


def test_decode_only_runner_tokenizer_keeps_every_byte_piece(source_tokenizer):
    """The Python runner's decode-only tokenizer: a byte piece and the plain piece with the same bytes
    (``<0x57>`` and ``W``) must stay two tokens (one replaced the other: "unknown token: 90")."""
    from mobilemllm.data.cpp_tokenizer import cpp_compatible
    from mobilemllm.runtime.piece_tokenizer import decode_only_tokenizer_dir

    tok = cpp_compatible(source_tokenizer)
    folder = decode_only_tokenizer_dir(tok, f"test-byte-fallback-{len(tok)}-{tok.backend_tokenizer.to_str()}")
    spec = json.loads((folder / "tokenizer.json").read_text())
    ids = set(spec["model"]["vocab"].values()) | {t["id"] for t in spec["added_tokens"]}
    assert ids == set(range(len(tok)))
    assert tok.convert_tokens_to_ids("<0x57>") in ids


# ---- exported bundles (slow) ---------------------------------------------------------------------------------


def force_answer(folder: Path, tokenizer, prompt_last: int, answer: list[int], eos: int) -> None:
    """Edit a MobileVLM folder's weights so greedy decoding after ``prompt_last`` emits ``answer`` then EOS.

    Attention and MLP outputs are zeroed, so the last hidden state is the last token's embedding; each
    lm_head row ``next`` is set to (norm weight * embedding of the token that must precede it).
    """
    path = folder / "model.safetensors"
    state = load_file(str(path))
    for k in state:
        if k.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[k] = torch.zeros_like(state[k])
    emb, w = state["model.embed_tokens.weight"].float(), state["model.norm.weight"].float()
    head = torch.zeros_like(state["lm_head.weight"], dtype=torch.float32)
    chain = [prompt_last] + answer + [eos]
    for prev, nxt in zip(chain[:-1], chain[1:]):
        head[nxt] = 20.0 * w * emb[prev] / emb[prev].norm()
    state["lm_head.weight"] = head.to(state["lm_head.weight"].dtype)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def forced_checkpoint(spm_source, source_tokenizer, tmp_path_factory):
    """A published-layout checkpoint whose greedy answer to any question is OUT_OF_VOCAB in byte pieces."""
    import shutil

    from mobilemllm.config import ModelConfig
    from mobilemllm.inference import prompt_ids

    root = tmp_path_factory.mktemp("forced")
    src = root / "MobileVLM-forced"
    shutil.copytree(spm_source.folder, src)
    tok = source_tokenizer
    answer = tok.encode(OUT_OF_VOCAB, add_special_tokens=False)
    cfg = ModelConfig.from_preset("tiny", template="vicuna_v1")
    last = prompt_ids(cfg, tok, "What is it?")[-1]
    assert len(set(answer + [last])) == len(answer) + 1, "the forced chain needs distinct tokens"
    force_answer(src, tok, last, answer, tok.eos_token_id)
    return import_checkpoint(src, root / "ckpt")


def test_forced_byte_pieces_stream_eagerly_as_the_answer(forced_checkpoint, shapes_image):
    from mobilemllm.api import load
    from mobilemllm.inference import answer

    model, tok = load(forced_checkpoint)
    streamed: list[str] = []
    eager = answer(model, tok, shapes_image, "What is it?", max_new_tokens=24, on_text=streamed.append)
    assert "".join(streamed) == eager.text == OUT_OF_VOCAB
    assert len(streamed) < len(eager.tokens)  # byte pieces were held back until their character was whole


def _export_and_compare(ckpt: Path, out: Path, target: str, shapes_image) -> None:
    from mobilemllm.api import load
    from mobilemllm.bundle import load_manifest
    from mobilemllm.cli import main
    from mobilemllm.data.images import load_image
    from mobilemllm.inference import answer
    from mobilemllm.runtime import run_bundle

    assert main(["export", "--model", str(ckpt), "--out", str(out), "--target", target]) == 0
    manifest = load_manifest(out)
    assert manifest["parity"]["passed"]
    model, tok = load(ckpt)
    img = load_image(shapes_image)
    eager = answer(model, tok, img, "What is it?", max_new_tokens=24)
    assert eager.text == OUT_OF_VOCAB  # the forced answer, all byte pieces
    streamed: list[str] = []
    res = run_bundle(out, img, "What is it?", max_new_tokens=24, on_text=streamed.append, report=False)
    assert "".join(streamed) == res.text == eager.text  # (both without the answer's leading space)
    assert res.prompt_tokens == eager.prompt_tokens
    checks = {c["name"]: c["value"] for c in manifest["parity"]["checks"]}
    assert checks.get("runner_text_matches_eager", True) and checks.get("cpp_tokenizer_matches", True)


@pytest.mark.slow
def test_byte_fallback_checkpoint_exports_to_portable_and_streams_as_eager(forced_checkpoint, tmp_path,
                                                                          shapes_image):
    from mobilemllm.bundle import load_manifest
    from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
    from mobilemllm.bundle.prompt import fill_prompt
    from mobilemllm.inference import prompt_ids
    from mobilemllm.models.checkpoint import load_checkpoint

    out = tmp_path / "portable"
    _export_and_compare(forced_checkpoint, out, "portable", shapes_image)
    # what the apps do: the C++ tokenizer on the bundle's tokenizer.json, segment by segment
    manifest = load_manifest(out)
    model, tok = load_checkpoint(forced_checkpoint)
    cpp = cpp_tokenizer(out / manifest["tokenizer"]["dir"])
    for q in ["What is it?", OUT_OF_VOCAB + " ?"]:
        assert manifest["prompt"]["bos_in_first_text"]  # "<s>" opens the first segment
        ids: list[int] = []
        for seg in fill_prompt(manifest["prompt"], q):
            if seg["type"] == "image":
                ids += [IMAGE_TOKEN_ID] * manifest["prompt"]["num_visual_tokens"]
            else:
                ids += list(cpp.encode(seg["text"], 0, 0))
        assert ids == prompt_ids(model.config, tok, q), q


@pytest.mark.slow
def test_byte_fallback_checkpoint_exports_to_onnx_and_streams_as_eager(forced_checkpoint, tmp_path, shapes_image):
    _export_and_compare(forced_checkpoint, tmp_path / "onnx", "onnx", shapes_image)


@pytest.mark.slow
def test_byte_fallback_checkpoint_exports_to_android_and_streams_as_eager(forced_checkpoint, tmp_path,
                                                                         shapes_image):
    """The shipped android recipe (8da4w decoder, 4-bit embedding): the forced byte-piece answer survives
    quantization, and the bundle streams it as eager does."""
    _export_and_compare(forced_checkpoint, tmp_path / "android", "android", shapes_image)
