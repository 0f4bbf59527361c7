"""Quantize the text GGUF with llama.cpp's own quantizer (``llama_model_quantize`` via llama-cpp-python).

llama.cpp picks each tensor's type from the file type it is asked for: ``q8_0`` and ``q4_0`` quantize every
matrix to that type; ``q4_k_m`` mixes 4-bit K-quants with 6-bit ones for some tensors (llama.cpp's
``Q4_K_M`` rule) and falls back to q5_0/q8_0-style types for rows whose width is not a multiple of 256 (the
super-block), which small models hit. The manifest records the types the file really holds
(:func:`tensor_types`). The mmproj stays fp16: clip.cpp's graphs are small next to the text model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mobilemllm.errors import BackendUnavailable, UserError

FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_Q4_K_M"}  # gguf.LlamaFileType names
SCHEMES = ("f16", *FILE_TYPES)


def quantize_text_gguf(src: Path, dst: Path, scheme: str, threads: int | None = None) -> None:
    """``src`` (fp16 GGUF) -> ``dst`` quantized to ``scheme`` by llama.cpp."""
    import gguf

    try:
        import llama_cpp
    except ImportError:
        raise BackendUnavailable("quantizing a GGUF needs llama-cpp-python (llama.cpp's quantizer): "
                                 "pip install 'mobilemllm[gguf]'") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, FILE_TYPES[scheme]))
    params.nthread = int(threads or 0)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not Path(dst).exists():
        raise UserError(f"llama.cpp could not quantize {src.name} to {scheme} (llama_model_quantize returned {rc})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the GGUF at ``path`` holds, e.g. {"Q4_K": 14, "F32": 9}."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def tensor_type(path: Path, name: str) -> str:
    """The ggml type of the tensor ``name`` in the GGUF at ``path``."""
    import gguf

    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == name:
            return t.tensor_type.name
    raise KeyError(name)
