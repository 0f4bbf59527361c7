"""Batched decoding: left-padded prompts, one KV cache for the whole batch.

:func:`greedy_batch` (evaluation) is equivalent to :meth:`MobileVLM.generate` with ``temperature=0`` per
prompt (tested), but runs a whole batch of short answers in a handful of forward passes;
:func:`sample_batch` draws the ``ppo`` stage's rollouts the same way, from a seeded generator.
"""

from __future__ import annotations

import torch

from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.models.llm import cache_kwargs


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], pixel_values: torch.Tensor | None, *, pad_id: int,
                 eos_ids: list[int], max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy continuations (EOS excluded) of ``prompts``; ``pixel_values`` holds one image per prompt."""
    return _decode(model, prompts, pixel_values, pad_id=pad_id, eos_ids=eos_ids, max_new_tokens=max_new_tokens)


@torch.inference_mode()
def sample_batch(model, prompts: list[list[int]], pixel_values: torch.Tensor | None, *, pad_id: int,
                 eos_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Sampled continuations of ``prompts`` at ``temperature`` (the EOS kept at the end of the rows that
    finished: the reward is read there). Deterministic for a given ``generator`` state."""
    return _decode(model, prompts, pixel_values, pad_id=pad_id, eos_ids=eos_ids, max_new_tokens=max_new_tokens,
                   temperature=temperature, generator=generator, keep_eos=True)


def _decode(model, prompts, pixel_values, *, pad_id: int, eos_ids: list[int], max_new_tokens: int,
            temperature: float = 0.0, generator: torch.Generator | None = None,
            keep_eos: bool = False) -> list[list[int]]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    b = len(prompts)
    n = max(len(p) for p in prompts)
    ctx = model.config.llm.max_position_embeddings
    max_new_tokens = max(0, min(max_new_tokens, ctx - n))
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, n - len(p):] = torch.tensor(p)
        mask[r, n - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    has_image = (ids == IMAGE_TOKEN_ID).any(1)
    pix = pixel_values[has_image.cpu()].to(device) if pixel_values is not None and bool(has_image.any()) else None
    emb = model.embed(ids, pix)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    embed_tokens = model.llm.get_input_embeddings()
    for _ in range(max_new_tokens):
        logits = model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, **cache_kwargs(cache),
                           use_cache=True).logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs.to(generator.device if generator is not None else probs.device), 1,
                                    generator=generator).squeeze(1).to(device)
        else:
            nxt = logits.argmax(-1)
        finished_now = torch.isin(nxt, eos)
        keep = ~done if keep_eos else ~done & ~finished_now
        for r in torch.nonzero(keep).flatten().tolist():
            out[r].append(int(nxt[r]))
        done |= finished_now
        if bool(done.all()):
            break
        emb = embed_tokens(nxt.unsqueeze(1)).to(emb.dtype)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], 1)
        pos = pos[:, -1:] + 1
    return out
