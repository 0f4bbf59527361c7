"""Parity of an ExecuTorch program against the eager float model, method by method as the runner calls
them, then through ExecuTorch's C++ ``MultimodalRunner`` (what the apps drive) and its C++ tokenizer.

fp32 programs must match eager (embeddings and logits to the recipe's ``max_rel_diff``, greedy tokens and
the runner's text identical); quantized ones (or an int8 KV cache) are held to ``min_logit_cosine``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mobilemllm import bundle as B
from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.data.images import normalize, to_uint8_views
from mobilemllm.export import parity as P
from mobilemllm.inference import prompt_ids
from mobilemllm.runtime.executorch_runner import load_kernels, run_program

METHODS = ("vision_encoder", "token_embedding", "text_decoder")
PARITY_PROMPT = "What shape is in the image?"


def load_program(path: str | Path):
    """An ExecuTorch Program (Python bindings), with the llm custom ops registered."""
    from executorch.runtime import Runtime

    load_kernels()
    return Runtime.get().load_program(str(path))


def _eager_greedy(model, emb: torch.Tensor, n: int) -> tuple[list[torch.Tensor], list[int]]:
    """The float model's last-position logits and greedy tokens, full sequence each step (no cache)."""
    logits_rows, tokens, seq = [], [], emb
    for _ in range(n):
        logits = model.llm(inputs_embeds=seq).logits[:, -1].float()
        logits_rows.append(logits)
        tokens.append(int(logits.argmax()))
        seq = torch.cat([seq, model.llm.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], 1)
    return logits_rows, tokens


def _program_greedy(m_tok, m_dec, emb: torch.Tensor, n: int) -> tuple[list[torch.Tensor], list[int]]:
    """The program's greedy decoding: prefill ``emb``, then one token per call (EOS ignored)."""
    logits_rows, tokens, pos, chunk = [], [], 0, emb
    for _ in range(n):
        logits = m_dec.execute([chunk.contiguous(), torch.tensor([pos], dtype=torch.long)])[0].float()
        pos += chunk.shape[1]
        logits_rows.append(logits)
        tokens.append(int(logits.argmax()))
        chunk = m_tok.execute([torch.tensor([[tokens[-1]]])])[0]
    return logits_rows, tokens


def _teacher_forced(program, m_tok, emb: torch.Tensor, first: torch.Tensor, ref_tokens: list[int]):
    """The program's logits fed the eager model's tokens (a fair comparison even after divergence)."""
    rows = [first]
    m_dec = program.load_method("text_decoder")  # a fresh cache
    m_dec.execute([emb.contiguous(), torch.tensor([0], dtype=torch.long)])
    pos = emb.shape[1]
    for t in ref_tokens[:-1]:
        e = m_tok.execute([torch.tensor([[t]])])[0]
        rows.append(m_dec.execute([e.contiguous(), torch.tensor([pos], dtype=torch.long)])[0].float())
        pos += 1
    return torch.cat(rows)


def method_checks(model, tokenizer, program, views: torch.Tensor, ids: list[int], n: int, par: dict[str, Any],
                  fp32: bool) -> tuple[list[dict[str, Any]], str]:
    """The program's methods, called as the runner calls them, against eager: checks and a log summary."""
    cfg = model.config
    m_vis, m_tok, m_dec = (program.load_method(name) for name in METHODS)
    pix = normalize(views, cfg.vision).unsqueeze(0)
    with torch.inference_mode():
        emb_ref, img_ref = model.embed(torch.tensor([ids]), pix), model.encode_images(pix)
        img_pte = m_vis.execute([views.reshape(1, 3, -1, cfg.vision.image_size).contiguous()])[0]
        first = ids.index(IMAGE_TOKEN_ID)
        last = len(ids) - ids[::-1].index(IMAGE_TOKEN_ID)
        emb_pte = torch.cat([m_tok.execute([torch.tensor([ids[:first]])])[0], img_pte,
                             m_tok.execute([torch.tensor([ids[last:]])])[0]], dim=1)
        ref_logits, ref_tokens = _eager_greedy(model, emb_ref, n)
        pte_logits, pte_tokens = _program_greedy(m_tok, m_dec, emb_pte, n)
        tf_l = _teacher_forced(program, m_tok, emb_pte, pte_logits[0], ref_tokens)
    ref_l = torch.cat(ref_logits)
    rel, cos = P.max_rel_diff(tf_l, ref_l), P.logit_cosine(tf_l, ref_l)
    agree = P.greedy_agreement(pte_tokens, ref_tokens)
    tol, min_cos = float(par.get("max_rel_diff", 1e-4)), float(par.get("min_logit_cosine", 0.9))

    def exact(name, value):  # gated when fp32, reported otherwise
        return P.check(name, value, tol if fp32 else None, (value <= tol) if fp32 else None)

    checks = [exact("image_embedding_max_rel_diff", P.max_rel_diff(img_pte, img_ref)),
              exact("prompt_embedding_max_rel_diff", P.max_rel_diff(emb_pte, emb_ref)),
              exact("logits_max_rel_diff", rel),
              P.check("logit_cosine", cos, None if fp32 else min_cos, None if fp32 else cos >= min_cos),
              P.check(f"greedy_agreement_{n}", agree, 1.0 if fp32 else None, (agree == 1.0) if fp32 else None)]
    return checks, f"logits max rel diff {rel:.2e}, cosine {cos:.6f}, greedy agreement {agree:.3f} ({n} tokens)"


def runner_checks(model, tokenizer, pte: Path, tokenizer_dir: Path, manifest: dict[str, Any], views: torch.Tensor,
                  ids: list[int], n: int, fp32: bool) -> tuple[list[dict[str, Any]], bool]:
    """The C++ MultimodalRunner (same prompt and image, greedy) vs eager generate, and the C++ tokenizer."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    with torch.inference_mode():
        eager = model.generate(torch.tensor([ids]), normalize(views, model.config.vision).unsqueeze(0),
                               max_new_tokens=n, eos_ids=eos)
    eager_text = tokenizer.decode(eager, skip_special_tokens=True)
    res = run_program(pte, tokenizer_dir, manifest, views, PARITY_PROMPT, max_new_tokens=n, temperature=0.0)
    same = res.text == eager_text
    same_ids = cpp_tokenizer_matches(tokenizer_dir, tokenizer, manifest["prompt"])
    return [P.check("runner_text_matches_eager", same, True if fp32 else None, same if fp32 else None),
            P.check("runner_prompt_tokens", res.prompt_tokens, len(ids), res.prompt_tokens == len(ids)),
            P.check("cpp_tokenizer_matches", same_ids, True, same_ids)], same


def check_parity(model, tokenizer, pte: Path, staging: Path, manifest: dict[str, Any], recipe: dict[str, Any],
                 fp32: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the .pte (ExecuTorch runtime, then MultimodalRunner) against the eager float model."""
    cfg = model.config
    par = recipe.get("parity") or {}
    views = torch.from_numpy(to_uint8_views(P.scene_image(cfg), cfg.vision))
    ids = prompt_ids(cfg, tokenizer, PARITY_PROMPT)
    # as many greedy steps as asked for, within the exported context
    n = max(1, min(int(par.get("greedy_tokens", 32)), manifest["context"]["max_context_len"] - len(ids)))
    checks, summary = method_checks(model, tokenizer, load_program(pte), views, ids, n, par, fp32)
    more, same = runner_checks(model, tokenizer, pte, staging / B.TOKENIZER_DIR, manifest, views, ids, n, fp32)
    log(f"parity: {summary}, runner text {'==' if same else '!='} eager")
    return checks + more


def cpp_tokenizer_matches(tokenizer_dir: Path, tokenizer, prompt: dict[str, Any]) -> bool:
    """ExecuTorch's C++ tokenizer (what the apps' runner encodes text with) gives our ids for every segment."""
    from pytorch_tokenizers import CppHFTokenizer

    cpp = CppHFTokenizer()
    cpp.load(str(tokenizer_dir / "tokenizer.json"))
    for seg in B.fill_prompt(prompt, PARITY_PROMPT):
        if seg["type"] == "text" and list(cpp.encode(seg["text"], 0, 0)) != tokenizer.encode(
                seg["text"], add_special_tokens=False):
            return False
    return True
