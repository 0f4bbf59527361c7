"""The VLM: vision tower -> connector -> image embeddings spliced into the LLM's text embeddings.

Token ids use ``IMAGE_TOKEN_ID`` (-200, as LLaVA/MobileVLM) at every visual-token position: the data
pipeline and the prompt builder expand one ``<image>`` placeholder into ``num_visual_tokens`` of them,
and :meth:`MobileVLM.embed` scatters the connector's outputs there. This is the same layout the
ExecuTorch ``MultimodalRunner`` produces (text, image embeddings, text) so training and inference agree.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mobilemllm.config import ModelConfig
from mobilemllm.errors import UserError
from mobilemllm.models.connectors import build_connector
from mobilemllm.models.llm import build_llm, cache_kwargs
from mobilemllm.models.vision import VisionTower

IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
PARTS = ("vision", "connector", "llm")


class MobileVLM(nn.Module):
    def __init__(self, config: ModelConfig, load_weights: bool = True):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision, load_weights=load_weights)
        self.connector = build_connector(config.connector, config.vision.hidden_size, config.llm.hidden_size)
        self.llm = build_llm(config.llm, load_weights=load_weights)

    # ---- parts -----------------------------------------------------------------------------
    def part(self, name: str) -> nn.Module:
        if name not in PARTS:
            raise UserError(f"unknown model part {name!r}; valid parts: {', '.join(PARTS)}")
        return getattr(self, name)

    def set_trainable(self, **parts: bool) -> None:
        """``set_trainable(vision=False, connector=True, llm=False)``: freeze/unfreeze by part."""
        for name, flag in parts.items():
            for p in self.part(name).parameters():
                p.requires_grad_(flag)

    def parameter_counts(self) -> dict[str, int]:
        counts = {name: sum(p.numel() for p in self.part(name).parameters()) for name in PARTS}
        counts["total"] = sum(counts.values())
        return counts

    # ---- forward pieces ----------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) or (B, V, 3, H, W) views -> (B, num_visual_tokens, llm_hidden)."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        b, v = pixel_values.shape[:2]
        feats = self.vision(pixel_values.flatten(0, 1).to(self.dtype))
        tokens = self.connector(feats)
        return tokens.reshape(b, v * tokens.shape[1], tokens.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with image embeddings scattered into the IMAGE_TOKEN_ID positions.

        ``pixel_values``/``image_embeds`` hold one image per row that contains image tokens, in order.
        """
        emb = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        mask = input_ids == IMAGE_TOKEN_ID
        if not mask.any():
            return emb
        if image_embeds is None:
            if pixel_values is None:
                raise UserError("the prompt has an image placeholder but no image was given")
            image_embeds = self.encode_images(pixel_values)
        per_row = mask.sum(1)
        rows = per_row[per_row > 0]
        if rows.numel() != image_embeds.shape[0] or bool((rows != image_embeds.shape[1]).any()):
            raise UserError(
                f"image placeholders do not match the images: rows have {rows.tolist()} visual-token slots, "
                f"images give {image_embeds.shape[0]} x {image_embeds.shape[1]} embeddings")
        return emb.masked_scatter(mask.unsqueeze(-1), image_embeds.to(emb.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                share_prefix: bool = False, logits_at: torch.Tensor | None = None, **kwargs):
        """Training forward: returns transformers' CausalLMOutput (``.loss`` on labelled tokens only).

        Two ways to spend fewer FLOPs on the same numbers (training objectives use them; not with ``labels``):

        - ``share_prefix``: the text every row starts with (the template's system prompt, about a third of a
          short question's tokens) goes through the LLM once, not once per row; the other positions attend
          to its keys and values, and its gradient is the sum over the rows, as when each row computes it;
        - ``logits_at`` (B, T) bool: logits only at those positions, ``(N, vocab)`` in row-major order: the
          LM head at the tokens a loss reads (an answer's few), not at every prompt token.
        """
        emb = self.embed(input_ids, pixel_values)
        if labels is not None or not (share_prefix or logits_at is not None):
            return self.llm(inputs_embeds=emb, attention_mask=attention_mask, labels=labels, **kwargs)
        share = share_prefix and not self._checkpointing()
        hidden = self._hidden(emb, attention_mask, shared_prefix_length(input_ids, attention_mask) if share else 0)
        if logits_at is not None:
            hidden = hidden[logits_at]
        return CausalLMOutputWithPast(logits=self.llm.get_output_embeddings()(hidden))

    def _hidden(self, emb: torch.Tensor, attention_mask: torch.Tensor | None, prefix: int) -> torch.Tensor:
        """The decoder's last hidden states (B, T, H); the first ``prefix`` positions computed once for all rows."""
        decoder = self.llm.get_decoder()
        if prefix == 0:
            return decoder(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state
        from transformers import DynamicCache

        cache = DynamicCache()
        head = decoder(inputs_embeds=emb[:1, :prefix], use_cache=True, **cache_kwargs(cache)).last_hidden_state
        cache.batch_repeat_interleave(emb.shape[0])
        rest = decoder(inputs_embeds=emb[:, prefix:], attention_mask=attention_mask, use_cache=True,
                       **cache_kwargs(cache)).last_hidden_state
        return torch.cat([head.expand(emb.shape[0], -1, -1), rest], dim=1)

    def _checkpointing(self) -> bool:
        """Gradient checkpointing turns the KV cache off in training, which the shared prefix needs."""
        # transformers marks the decoder's modules (the test behind its is_activation_checkpointing, which a
        # LoRA-wrapped LLM does not have under that name)
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.llm.modules())

    # ---- generation --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 eos_ids: Iterable[int] = (), use_cache: bool = True, seed: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Generate for one prompt (batch 1). Greedy when temperature == 0, else nucleus sampling."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.shape[0] != 1:
            raise ValueError("generate() takes one prompt at a time")
        ctx = self.config.llm.max_position_embeddings
        prompt_len = input_ids.shape[1]
        if prompt_len >= ctx:
            raise UserError(f"the prompt is {prompt_len} tokens (with the image's visual tokens) but the model's "
                            f"context is {ctx}; shorten the prompt")
        max_new_tokens = min(max_new_tokens, ctx - prompt_len)
        eos = set(int(e) for e in eos_ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        emb = self.embed(input_ids, pixel_values)
        out_tokens: list[int] = []
        past = None
        if use_cache:
            from transformers import DynamicCache

            past = DynamicCache()
        seq_emb = emb  # the whole sequence so far (used uncached); step_in is what the cached path feeds
        step_in = emb
        for step in range(max_new_tokens):
            if use_cache:
                out = self.llm(inputs_embeds=step_in, **cache_kwargs(past), use_cache=True)
            else:
                out = self.llm(inputs_embeds=seq_emb, use_cache=False)
            logits = out.logits[0, -1].float()
            token = _pick(logits, temperature, top_p, gen)
            out_tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos:
                break
            step_in = self.llm.get_input_embeddings()(torch.tensor([[token]])).to(emb.dtype)
            if not use_cache:
                seq_emb = torch.cat([seq_emb, step_in], dim=1)
        return out_tokens


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """How many leading tokens every row has in common, up to the first image token and short of each row's
    last real token (so every row keeps at least one position of its own); 0 for a single row or when only
    BOS is shared."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != IMAGE_TOKEN_ID)
    if attention_mask is not None:
        same &= attention_mask.bool().all(0)  # left padding is never part of the prefix
    limit = int(attention_mask.sum(1).min()) - 1 if attention_mask is not None else input_ids.shape[1] - 1
    differs = (~same[:limit]).nonzero()
    n = int(differs[0]) if len(differs) else max(limit, 0)
    return n if n >= 2 else 0  # one token (BOS) saves less than the second call costs


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))
