"""The eager reference: our ``MobileVLM`` (transformers LLaMA) on a checkpoint folder or a preset.

Decoding drives ``model.llm`` with a ``DynamicCache`` directly (greedy, EOS ignored), so every run
decodes exactly the requested count; prefill asks for the last position's logits only, as the
exported decoders do.
"""

from __future__ import annotations

from pathlib import Path

import torch

import mobilemllm.api
from mobilemllm.api import load
from mobilemllm.bench import timing
from mobilemllm.bench.harness import Backend, Repetition
from mobilemllm.bench.prompt import BenchPrompt, bench_image, build_prompt, check_context, filler_ids
from mobilemllm.bench.roofline import kv_cache_bytes
from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.data.images import normalize
from mobilemllm.models.llm import cache_kwargs
from mobilemllm.templates import get_template


def eager_decode_bytes_per_token(model, position: int) -> int:
    """Bytes one decode step reads: every LLM weight except the input embedding table (one row is read),
    plus the KV cache up to ``position``. With tied embeddings the table is read whole by the LM head."""
    llm = model.llm
    emb = llm.get_input_embeddings().weight
    seen: set[int] = set()
    total = 0
    for p in llm.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    tied = llm.get_output_embeddings() is not None and llm.get_output_embeddings().weight is emb
    if not tied:
        total -= emb.numel() * emb.element_size()
    return total + kv_cache_bytes(model.config.llm, position, dtype_bytes=emb.element_size())


class PyTorchBackend(Backend):
    name = "pytorch"

    def open(self) -> None:
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401  (imports its modelling code, untimed)

    def load(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model, self.tokenizer = load(self.target)
        self.model.eval()
        cfg = self.model.config
        self.info.model_name = cfg.name
        self.info.format = "pytorch"
        self.info.quantization = str(self.model.dtype).replace("torch.", "").replace("float32", "fp32")
        path = Path(self.target)
        self.info.size_bytes = timing.size_on_disk(path) if path.is_dir() else None
        if not path.is_dir():
            self.info.notes.append(f"preset {self.target!r} with random weights")
        self.info.max_context = cfg.llm.max_position_embeddings
        self.info.num_visual_tokens = cfg.num_visual_tokens

    def prepare(self, prompt_tokens: int, new_tokens: int) -> BenchPrompt:
        cfg = self.model.config
        tok = self.tokenizer
        tpl = get_template(cfg.template)
        bos = tok.bos_token_id if tok is not None else 1
        self.prompt = build_prompt(prompt_tokens, cfg.num_visual_tokens, tokenizer=tok,
                                   prefix_text=tpl.prompt_prefix() if tok is not None else "",
                                   suffix_text=tpl.prompt_suffix("") if tok is not None else "",
                                   bos_id=bos, filler=filler_ids(tok, cfg.llm.vocab_size)[0])
        check_context(self.prompt, new_tokens, cfg.llm.max_position_embeddings, f"model {self.target}")
        self.new_tokens = new_tokens
        views = bench_image(cfg.vision.image_size, cfg.vision.num_views)
        self.uint8 = torch.from_numpy(views)
        self._normalize = lambda x: normalize(x, cfg.vision)
        self.info.decode_bytes_per_token = eager_decode_bytes_per_token(
            self.model, self.prompt.prefill_tokens + new_tokens // 2)
        return self.prompt

    def run_once(self) -> Repetition:
        from transformers import DynamicCache

        model, p = self.model, self.prompt
        ids = torch.tensor([p.prefix_ids + [IMAGE_TOKEN_ID] * p.num_visual_tokens + p.suffix_ids])
        embed_tokens = model.llm.get_input_embeddings()
        with torch.inference_mode():
            t0 = timing.now()
            pix = self._normalize(self.uint8).unsqueeze(0)  # (1, V, 3, S, S): the in-graph /255 + mean/std
            image_embeds = model.encode_images(pix)
            t1 = timing.now()
            emb = model.embed(ids, image_embeds=image_embeds)
            cache = DynamicCache()
            out = model.llm(inputs_embeds=emb, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            token = int(torch.argmax(out.logits[0, -1]))
            t2 = timing.now()
            for _ in range(self.new_tokens):
                step = embed_tokens(torch.tensor([[token]]))
                out = model.llm(inputs_embeds=step, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
                token = int(torch.argmax(out.logits[0, -1]))
            t3 = timing.now()
        return Repetition(prefill_tokens=p.prefill_tokens, decode_tokens=self.new_tokens,
                          ttft_s=timing.time_to_first_token(t0, t2), prefill_s=t2 - t1, decode_s=t3 - t2,
                          total_s=t3 - t0, image_encode_s=t1 - t0)

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
