"""A minimal valid manifest for tests that write or load bundles without exporting anything."""

from __future__ import annotations


def minimal_manifest(fmt: str = "executorch") -> dict:
    """A manifest that validates, without exporting anything (``files`` is filled in by the writer)."""
    return {
        "format": fmt, "target": "test",
        "model": {"name": "tiny", "config": {}},
        "files": {},
        "methods": {"get_max_seq_len": {"value": 64}},
        "tokenizer": {"dir": "tokenizer", "bos_id": 1, "eos_ids": [2], "vocab_size": 300},
        "prompt": {"template": "plain", "add_bos": True, "num_visual_tokens": 16,
                   "segments": [{"type": "image"}, {"type": "text", "text": "{question}"}]},
        "preprocessing": {"image_size": 32, "aspect": "pad", "resample": "bicubic", "input_dtype": "uint8",
                          "input_shape": [1, 3, 32, 32], "normalize_in_graph": True, "mean": [0.5] * 3,
                          "std": [0.5] * 3},
        "context": {"max_seq_len": 64, "max_context_len": 256},
        "quantization": {"text_decoder": {"scheme": "fp32"}},
        "parity": {"passed": True, "forced": False, "checks": []},
        "export": {"recipe": {"name": "test"}},
    }
