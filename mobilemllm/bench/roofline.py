"""The decode roofline: a decode step reads every decoder weight (and the KV cache) once, so

    decode tokens/s  <=  memory bandwidth / bytes read per token.

``measure_bandwidth`` times a large copy on this host (counted STREAM-style: bytes read + bytes
written); for a phone, pass its bandwidth instead (e.g. 76.8 GB/s for a Snapdragon 8 Gen 3's
LPDDR5X) and the ceiling is a projection. Bytes per token come from the bundle: the decoder graph's
file where a format keeps one per part (ONNX), else the decoder's weight count times the bytes per
weight of its quantization scheme (ExecuTorch's single .pte).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from mobilemllm.bench.timing import now

from mobilemllm.quantization import weight_bits  # bits per weight of every scheme a manifest can name

_BANDWIDTH_CACHE: dict[tuple[int, int], float] = {}


def measure_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 10, threads: int | None = None) -> float:
    """This host's memory bandwidth in bytes/s: the best of ``repeats`` copies of ``nbytes`` (read + write).

    Measured once per process and size (the copy takes well under a second).
    """

    key = (nbytes, threads or torch.get_num_threads())
    if key in _BANDWIDTH_CACHE:
        return _BANDWIDTH_CACHE[key]

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in before timing
        best = float("inf")
        for _ in range(repeats):
            t = now()
            dst.copy_(src)
            best = min(best, now() - t)
        del src, dst
    finally:
        torch.set_num_threads(old)
    _BANDWIDTH_CACHE[key] = bw = 2 * nbytes / best
    return bw


def kv_cache_bytes(llm_cfg, position: int, dtype_bytes: float = 4) -> int:
    """KV cache one decode step reads at ``position``: K and V of every layer for every earlier token."""
    return int(2 * llm_cfg.num_layers * llm_cfg.kv_heads * llm_cfg.head_dim * int(position) * dtype_bytes)


def scheme_bytes_per_weight(scheme: str, group_size: int | None = None) -> float:
    """Bytes one weight costs under ``scheme`` (e.g. 8da4w at group 32: 0.5 + 4/32 = 0.625)."""
    bits = weight_bits(scheme)
    if bits is None:
        return 4.0
    per = bits / 8
    if bits < 16:  # plus an fp32 scale per group; int8 without a group size: per channel (~1 per 4096)
        per += 4 / (group_size or (128 if bits == 4 else 4096))
    return per


def decoder_weight_bytes(llm_cfg, scheme: str = "fp32", group_size: int | None = None) -> int:
    """Bytes of the weights one decode step reads: attention + MLP linears (quantized), norms (fp32) and the
    LM head (quantized like the linears); not the input embedding table, of which one row is read."""
    h, i, L = llm_cfg.hidden_size, llm_cfg.intermediate_size, llm_cfg.num_layers
    kv = llm_cfg.kv_heads * llm_cfg.head_dim
    linears = L * (h * h * 2 + h * kv * 2 + 3 * h * i) + llm_cfg.vocab_size * h
    norms = (2 * L + 1) * h
    return int(linears * scheme_bytes_per_weight(scheme, group_size) + norms * 4)


@dataclass
class Roofline:
    bandwidth_bytes_s: float
    bandwidth_source: str  # "measured on this host" | "given (--bandwidth)"
    bytes_per_token: int
    ceiling_tok_s: float
    achieved_tok_s: float | None
    fraction: float | None  # achieved / ceiling

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def roofline(bytes_per_token: int, bandwidth_bytes_s: float, achieved_tok_s: float | None,
             source: str) -> Roofline:
    ceiling = bandwidth_bytes_s / bytes_per_token
    frac = achieved_tok_s / ceiling if achieved_tok_s else None
    return Roofline(bandwidth_bytes_s, source, int(bytes_per_token), ceiling, achieved_tok_s, frac)
