"""Does the installed llama.cpp run a CLIP tower's class token where clip.cpp's inputs expect it?

llama-cpp-python 0.3.36 (the newest on PyPI) vendors a llama.cpp whose LLaVA graph
(``tools/mtmd/models/llava.cpp``) appends the class embedding after the patch embeddings while clip.cpp's
inputs assume it comes first (ggml-org/llama.cpp#25814): each patch gets its neighbour's position embedding,
the first patch's output is dropped and the class token's output is fed to the LLM. No mmproj layout makes
that graph right (it hands the projector only n-1 patch outputs), so a model with a CLIP tower needs a
llama.cpp with the fix: ``scripts/install_llama_cpp.py`` builds one (see docs/gguf.md).

:func:`class_token_first` answers the question by running clip.cpp once on a hand-made mmproj whose output
can be written down: a 2 x 2 patch grid, a patch embedding that copies one pixel, a layer that adds nothing
(zero weights), a class embedding of twos and an identity MLP projector. Each output row is then
``gelu(pixel of patch j + position j+1)``; the broken graph gives ``gelu(pixel of patch j+1 + position j+1)``
and, in the last row, the class token's ``gelu(2 + position n)``. A few milliseconds, once per process.
"""

from __future__ import annotations

import functools
import math
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tokenizers import pre_tokenizers

from mobilemllm.errors import BackendUnavailable
from mobilemllm.runtime.llamacpp_engine import LlamaCppEngine

ISSUE = "ggml-org/llama.cpp#25814"
FIX = "python scripts/install_llama_cpp.py (in mobilemllm's source; docs/gguf.md)"
_IMAGE, _PATCH, _WIDTH, _FFN = 4, 2, 8, 16  # a 2 x 2 patch grid, tiny widths
_N = (_IMAGE // _PATCH) ** 2
_POS_STEP, _CLASS = 0.1, 2.0
_CELL_VALUES = (60, 120, 180, 240)  # channel 0 of each patch (uint8), row-major


def _gelu(x: np.ndarray) -> np.ndarray:
    """ggml_gelu (the tanh form)."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def probe_view() -> np.ndarray:
    """The (3, 4, 4) uint8 image: each 2 x 2 patch holds its value in channel 0, zeros elsewhere."""
    view = np.zeros((3, _IMAGE, _IMAGE), dtype=np.uint8)
    side = _IMAGE // _PATCH
    for j, value in enumerate(_CELL_VALUES):
        r, c = divmod(j, side)
        view[0, r * _PATCH:(r + 1) * _PATCH, c * _PATCH:(c + 1) * _PATCH] = value
    return view


def expected_rows(class_first: bool) -> np.ndarray:
    """The projector's output (n, width) for the probe image, with the class token first (right) or last."""
    cells = np.array(_CELL_VALUES, dtype=np.float64) / 255.0
    pos = _POS_STEP * np.arange(_N + 1)
    if class_first:
        x = cells + pos[1:]
    else:
        x = np.concatenate([cells[1:], [_CLASS]]) + pos[1:]
    return np.repeat(_gelu(x)[:, None], _WIDTH, axis=1)


def write_probe_mmproj(path: Path) -> None:
    """The probe's mmproj: CLIP layout (class embedding, positions for n+1 tokens), ``mlp`` projector."""
    import gguf  # optional backend (the gguf extra)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("mlp")
    w.add_vision_image_size(_IMAGE)
    w.add_vision_patch_size(_PATCH)
    w.add_vision_embedding_length(_WIDTH)
    w.add_vision_feed_forward_length(_FFN)
    w.add_vision_block_count(1)
    w.add_vision_head_count(2)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_projection_dim(_WIDTH)
    w.add_vision_image_mean([0.0, 0.0, 0.0])
    w.add_vision_image_std([1.0, 1.0, 1.0])
    w.add_vision_use_gelu(False)
    w.add_array("clip.vision.feature_layer", [1])
    kernel = np.zeros((_WIDTH, 3, _PATCH, _PATCH), np.float32)
    kernel[:, 0, 0, 0] = 1.0  # every feature = channel 0 of the patch's top-left pixel
    eye, zeros, ones = np.eye(_WIDTH, dtype=np.float32), np.zeros(_WIDTH, np.float32), np.ones(_WIDTH, np.float32)
    tensors = {
        "v.class_embd": ones * _CLASS,
        "v.patch_embd.weight": kernel,
        "v.position_embd.weight": np.repeat((_POS_STEP * np.arange(_N + 1, dtype=np.float32))[:, None], _WIDTH, 1),
        "mm.0.weight": eye, "mm.0.bias": zeros, "mm.2.weight": eye, "mm.2.bias": zeros,
    }
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):  # a layer that adds zero to its input
        tensors[f"v.blk.0.{name}.weight"] = np.zeros((_WIDTH, _WIDTH), np.float32)
        tensors[f"v.blk.0.{name}.bias"] = zeros
    tensors.update({"v.blk.0.ffn_up.weight": np.zeros((_FFN, _WIDTH), np.float32),
                    "v.blk.0.ffn_up.bias": np.zeros(_FFN, np.float32),
                    "v.blk.0.ffn_down.weight": np.zeros((_WIDTH, _FFN), np.float32), "v.blk.0.ffn_down.bias": zeros,
                    "v.blk.0.ln1.weight": ones, "v.blk.0.ln1.bias": zeros,
                    "v.blk.0.ln2.weight": ones, "v.blk.0.ln2.bias": zeros})
    for name, data in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    _finish(w)


def write_probe_text_model(path: Path) -> None:
    """A one-layer LLaMA GGUF of the projector's width (mtmd loads an mmproj only beside a text model)."""
    import gguf  # optional backend (the gguf extra)

    tokens = list(pre_tokenizers.ByteLevel.alphabet()) + ["ab", "</s>"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_context_length(64)
    w.add_embedding_length(_WIDTH)
    w.add_block_count(1)
    w.add_feed_forward_length(_FFN)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(_WIDTH // 2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.NORMAL)] * (vocab - 1) + [int(gguf.TokenType.CONTROL)])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, _WIDTH), "output_norm.weight": (_WIDTH,),
              "blk.0.attn_norm.weight": (_WIDTH,), "blk.0.ffn_norm.weight": (_WIDTH,),
              "blk.0.attn_q.weight": (_WIDTH, _WIDTH), "blk.0.attn_k.weight": (_WIDTH, _WIDTH),
              "blk.0.attn_v.weight": (_WIDTH, _WIDTH), "blk.0.attn_output.weight": (_WIDTH, _WIDTH),
              "blk.0.ffn_gate.weight": (_FFN, _WIDTH), "blk.0.ffn_up.weight": (_FFN, _WIDTH),
              "blk.0.ffn_down.weight": (_WIDTH, _FFN)}
    for name, shape in shapes.items():
        data = np.ones(shape, np.float32) if len(shape) == 1 else rng.normal(0, 0.02, shape).astype(np.float32)
        w.add_tensor(name, data)
    _finish(w)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def probe_rows() -> np.ndarray:
    """clip.cpp's output for the probe image (n, width), through the installed llama-cpp-python."""
    with tempfile.TemporaryDirectory(prefix="mobilemllm-clip-probe-") as tmp:
        text, mmproj = Path(tmp) / "model.gguf", Path(tmp) / "mmproj.gguf"
        write_probe_text_model(text)
        write_probe_mmproj(mmproj)
        engine = LlamaCppEngine(text, mmproj, 64, threads=1)
        try:
            return engine.encode_view(probe_view())
        finally:
            engine.close()


@functools.cache
def class_token_first() -> bool:
    """True when this llama.cpp's clip.cpp gives a CLIP tower's patch outputs in order (the fix is in);
    False for the class-token-last graph of ggml-org/llama.cpp#25814. BackendUnavailable without llama.cpp;
    RuntimeError when the output is neither (a clip.cpp this probe was not written for)."""
    rows = probe_rows()
    for class_first in (True, False):
        want = expected_rows(class_first)
        if rows.shape == want.shape and np.abs(rows - want).max() < 1e-2:
            return class_first
    raise RuntimeError(f"llama.cpp's clip.cpp gave an unexpected output for the class-token probe: {rows[:, 0]}")


def clip_problem() -> str | None:
    """One line naming the issue and its fix when this llama.cpp runs CLIP towers wrongly; None when it runs
    them right (or could not be asked: the export's parity check then decides)."""
    try:
        if class_token_first():
            return None
    except (BackendUnavailable, RuntimeError):
        return None
    return (f"this llama.cpp (llama-cpp-python {version('llama-cpp-python')}) feeds a CLIP tower's class token to "
            f"the LLM in place of the first patch ({ISSUE}); install the fixed build: {FIX}")
