"""Export-ready modules: the vision encoder and the token embedding every format exports, written once.

Both share the model's weights (the same ``nn.Parameter`` objects, not copies) and compute what the
eager model computes, in a form ``torch.export`` (and from it ExecuTorch, ``torch.onnx`` and
coremltools) takes:

- :class:`VisionEncoder`: image bytes -> image embeddings ``(1, V*T, D)``, with the 1/255 scaling and
  the tower's mean/std inside the graph, so an app only resizes/pads. ``stacked=True`` takes the
  ExecuTorch runner's image, uint8 ``(1, 3, V*S, S)`` (the views stacked top to bottom); ``stacked=False``
  takes the views as a batch ``(V, 3, S, S)``, uint8 (ONNX) or float in 0..255 (Core ML).
- :class:`TokenEmbedding`: token ids ``(1, n)`` -> embeddings ``(1, n, D)``. A new ``nn.Embedding``
  around the model's weight, so quantizing it (torchao swaps the weight) never touches the model.
  ``clamp_negative`` reads image placeholder ids (-200) as row 0, for runners that embed the whole
  prompt and overwrite those rows with the image embeddings (ONNX, Core ML).

Their arguments are named as the ONNX graphs' and Core ML packages' inputs (``pixel_values``,
``input_ids``), which take the names of the exported program's placeholders.

The decoder differs by how each runtime keeps the KV cache, so each format has its own, all sharing
the LLM's weights: ``ExportLlama`` (:mod:`.export_llama`, ExecuTorch XNNPACK/portable: llama custom
ops), ``CoreMLRunnerDecoder`` (:mod:`.coreml_decoder`, ExecuTorch's Core ML delegate),
``QnnRunnerDecoder`` (:mod:`.qnn`, the QNN delegate's static shapes), ``DecoderGraph``
(:mod:`.onnx_graphs`, past/present key-value tensors) and ``CoreMLDecoder`` (:mod:`.coreml_decoder`,
Core ML states).
"""

from __future__ import annotations

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """image (uint8 or float in 0..255) -> image embeddings (1, num_visual_tokens, hidden).

    ``stacked``: the image is (1, 3, V*S, S), view v in rows v*S .. (v+1)*S (ExecuTorch's runner passes one
    image); otherwise (V, 3, S, S)."""

    def __init__(self, model, stacked: bool = True):
        super().__init__()
        vcfg = model.config.vision
        self.vision, self.connector = model.vision, model.connector
        self.views, self.size, self.stacked = vcfg.num_views, vcfg.image_size, stacked
        self.register_buffer("mean", torch.tensor(vcfg.image_mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(vcfg.image_std).view(1, 3, 1, 1) * 255.0),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.float()
        if self.stacked:  # (1, 3, V*S, S) -> (V, 3, S, S)
            x = x.view(3, self.views, self.size, self.size).transpose(0, 1)
        tokens = self.connector(self.vision((x - self.mean) * self.inv_std))
        return tokens.reshape(1, -1, tokens.shape[-1])


class TokenEmbedding(nn.Module):
    """token ids (1, S) -> (1, S, hidden); shares the LLM's embedding weight."""

    def __init__(self, embed: nn.Embedding, clamp_negative: bool = False):
        super().__init__()
        self.embed = nn.Embedding(embed.num_embeddings, embed.embedding_dim, device="meta")
        self.embed.weight = embed.weight
        self.clamp_negative = clamp_negative

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids.clamp(min=0) if self.clamp_negative else input_ids)
