"""Run an ONNX bundle (``vision.onnx`` + ``embed.onnx`` + ``decoder.onnx``) with ONNX Runtime.

The prompt is built exactly as eager inference builds it (``mobilemllm.inference.prompt_ids``):
text ids with IMAGE_TOKEN_ID at the visual-token positions; ``embed.onnx`` embeds the ids and the
image embeddings from ``vision.onnx`` overwrite the placeholder rows. One prefill call of
``decoder.onnx`` over the whole prompt, then one call per generated token, feeding ``present.*``
back as ``past_key_values.*``. Text streams through ``TokenStream`` (UTF-8 safe).

The execution providers are a list (default ``CPUExecutionProvider``) so NNAPI, CoreML or QNN can be
named on devices whose onnxruntime build has them; unknown names fail with the list that exists.

:class:`OnnxRunner` is the engine (sessions, embedding, one decoder step, a single-turn loop that export's
parity check uses); :class:`OnnxBundleRunner` is the bundle's :class:`~mobilemllm.runtime.base.Runner`
(images preprocessed from the manifest, the KV cache kept between turns of a conversation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mobilemllm.bundle import load_manifest
from mobilemllm.bundle.layout import GRAPH_FILES, IMAGE_TOKEN_ID
from mobilemllm.config import ModelConfig
from mobilemllm.data.images import load_image, to_uint8_views
from mobilemllm.data.tokenizer import eos_ids, load_tokenizer
from mobilemllm.errors import BackendUnavailable, CheckpointError, UserError
from mobilemllm.inference import TokenStream, prompt_ids
from mobilemllm.runtime.base import Runner

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float  # image encode + prompt embedding + prefill, until the first token is picked
    decode_s: float  # time for the tokens after the first
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def check_providers(providers: Sequence[str] | None) -> list[str]:
    """Validate execution provider names against this onnxruntime build."""
    import onnxruntime as ort

    providers = list(providers or DEFAULT_PROVIDERS)
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise BackendUnavailable(f"execution provider(s) {', '.join(missing)} are not in this onnxruntime build; "
                                 f"available: {', '.join(available)}")
    return providers


def _session(path: Path, providers: list[str], threads: int | None):
    import onnxruntime as ort

    if not path.exists():
        raise CheckpointError(f"ONNX graph {path} is missing; re-export the bundle with `mobilemllm export`")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CheckpointError(f"ONNX Runtime cannot load {path}: {e}") from None


class BoundKV:
    """The KV cache as ONNX Runtime values (``present.*`` of the last call), ``length`` tokens long."""

    def __init__(self, values: list, length: int):
        self.values = values
        self.length = length

    def numpy(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.values]


class SharedKV:
    """A KV cache of fixed-size buffers that the decoder updates in place; ``length`` tokens are filled.

    It also keeps the decoder's IOBinding: past and present are bound to the same buffers once, and each
    step rebinds only the new embeddings and the attention mask (a view of one preallocated row of ones).
    """

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.values = None  # OrtValues over ``arrays``, made on first use
        self.length = 0
        self.io = None  # the decoder's IOBinding, made on first use
        self.mask = np.ones((1, arrays[0].shape[2]), dtype=np.int64)
        self.logits: np.ndarray | None = None  # preallocated output when the graph's logits shape is fixed

    @property
    def shape(self):
        return self.arrays[0].shape


def uses_group_query_attention(path: Path) -> bool:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        return False
    return any(node.op_type == "GroupQueryAttention" for node in graph.node)


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature <= 0, else nucleus sampling (the same rule as eager ``generate``)."""
    logits = logits.astype(np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        keep = np.cumsum(sorted_p) - sorted_p < top_p
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_p[keep]
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


class OnnxRunner:
    """Three ONNX Runtime sessions and the generation loop over them."""

    def __init__(self, graph_dir: str | Path, config, tokenizer, *, files: dict[str, str] | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 shared_kv: bool | None = None):
        self.dir = Path(graph_dir)
        self.config = config
        self.tokenizer = tokenizer
        self.providers = check_providers(providers)
        files = files or GRAPH_FILES
        self.vision = _session(self.dir / files["vision_encoder"], self.providers, threads)
        self.embed_session = _session(self.dir / files["token_embedding"], self.providers, threads)
        self.decoder = _session(self.dir / files["text_decoder"], self.providers, threads)
        self.num_layers = config.llm.num_layers
        # past_key_values.{i}.key/value in, present.{i}.key/value out, paired by name (graphs from other
        # exporters list them in other orders).
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.num_layers)
                                          for kv in ("key", "value")]
        declared_in = {i.name for i in self.decoder.get_inputs()}
        declared_out = {o.name for o in self.decoder.get_outputs()}
        missing = sorted((set(self.past_names) - declared_in) | (set(self.output_names) - declared_out))
        if missing:
            raise CheckpointError(f"{files['text_decoder']} does not have the inputs/outputs a decoder needs for "
                                  f"{self.num_layers} layers: missing {', '.join(missing[:6])}")
        # Our decoder takes position_ids; ONNX Runtime GenAI's GroupQueryAttention decoder derives the
        # positions from the attention mask and has no such input. Feed what the graph declares.
        self.decoder_inputs = {i.name for i in self.decoder.get_inputs()}
        # A GroupQueryAttention decoder (ONNX Runtime GenAI's builder) updates one max-length cache buffer
        # per tensor in place, as ONNX Runtime GenAI's runtime does (past_present_share_buffer): the default
        # for such graphs (shared_kv=None); shared_kv=False grows the cache by concatenation instead.
        gqa = uses_group_query_attention(self.dir / files["text_decoder"])
        self.shared_kv = gqa if shared_kv is None else (bool(shared_kv) and gqa)
        shape = self.decoder.get_outputs()[0].shape  # logits: (batch, 1, vocab) when the builder pruned the lm head
        self.fixed_logits = (len(shape) == 3 and shape[1] == 1 and isinstance(shape[2], int))

    # ---- bundle ------------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle: str | Path, manifest: dict | None = None, *,
                    providers: Sequence[str] | None = None, threads: int | None = None,
                    shared_kv: bool | None = None) -> "OnnxRunner":
        bundle = Path(bundle)
        if manifest is None:
            manifest = read_manifest(bundle)
        if manifest.get("format") != "onnx":
            raise UserError(f"{bundle} is a {manifest.get('format')!r} bundle, not an ONNX bundle")
        config = ModelConfig.from_dict(manifest["model"]["config"])
        tokenizer = load_tokenizer(bundle / manifest["tokenizer"]["dir"])
        files = {part: entry["file"] for part, entry in manifest["graphs"].items()}
        return cls(bundle, config, tokenizer, files=files, providers=providers, threads=threads,
                   shared_kv=shared_kv)

    # ---- pieces ------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.config.llm.max_position_embeddings

    def encode_image(self, image) -> np.ndarray:
        """PIL image -> image embeddings (1, num_visual_tokens, D)."""
        pixels = to_uint8_views(image, self.config.vision)
        return self.vision.run(None, {"pixel_values": pixels})[0]

    def embed(self, ids: Sequence[int], image_embeds: np.ndarray | None = None) -> np.ndarray:
        ids_arr = np.asarray([ids], dtype=np.int64)
        emb = self.embed_session.run(None, {"input_ids": ids_arr})[0]
        slots = ids_arr[0] == IMAGE_TOKEN_ID
        if slots.any():
            if image_embeds is None:
                raise UserError("the prompt has an image placeholder but no image was given")
            if int(slots.sum()) != image_embeds.shape[1]:
                raise UserError(f"the prompt has {int(slots.sum())} visual-token slots but the image gives "
                                f"{image_embeds.shape[1]} embeddings")
            emb[0, slots] = image_embeds[0].astype(emb.dtype)
        return emb

    def empty_past(self):
        """A fresh KV cache: growing arrays, or one max-length buffer per tensor for a shared-buffer decoder."""
        heads, hd = self.config.llm.kv_heads, self.config.llm.head_dim
        if self.shared_kv:
            return SharedKV([np.zeros((1, heads, self.max_context, hd), dtype=np.float32) for _ in self.past_names])
        import onnxruntime as ort

        empty = np.zeros((1, heads, 0, hd), dtype=np.float32)
        return BoundKV([ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names], 0)

    def step(self, embeds: np.ndarray, past):
        """One decoder call: (1, n, D) embeddings after ``past`` -> last logits (V,), new past."""
        if isinstance(past, SharedKV):
            return self._step_shared(embeds, past)
        if isinstance(past, BoundKV):
            return self._step_bound(embeds, past)
        p = past[0].shape[2]
        n = embeds.shape[1]
        feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, p + n), dtype=np.int64)}
        if "position_ids" in self.decoder_inputs:
            feed["position_ids"] = np.arange(p, p + n, dtype=np.int64)[None]
        feed.update(zip(self.past_names, past))
        out = self.decoder.run(self.output_names, feed)
        return out[0][0, -1], out[1:]

    def _bind_inputs(self, io, embeds: np.ndarray, p: int, n: int) -> None:
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        io.bind_cpu_input("attention_mask", np.ones((1, p + n), dtype=np.int64))
        if "position_ids" in self.decoder_inputs:
            io.bind_cpu_input("position_ids", np.arange(p, p + n, dtype=np.int64)[None])

    def _step_bound(self, embeds: np.ndarray, kv: "BoundKV"):
        """present.* stay ONNX Runtime values and go straight back in as past.*: no copy of the whole
        cache into numpy arrays every step (that copy alone cost ~15 % of decode time on the bench preset)."""
        n = embeds.shape[1]
        io = self.decoder.io_binding()
        self._bind_inputs(io, embeds, kv.length, n)
        for name, value in zip(self.past_names, kv.values):
            io.bind_ortvalue_input(name, value)
        for name in self.output_names:
            io.bind_output(name)
        self.decoder.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy()[0, -1], BoundKV(list(outs[1:]), kv.length + n)

    def _step_shared(self, embeds: np.ndarray, kv: "SharedKV"):
        """GroupQueryAttention with past and present bound to the same max-length buffers: the cache is
        written in place (as ONNX Runtime GenAI's runtime does), not copied into a longer array each step."""
        import onnxruntime as ort

        p, n = kv.length, embeds.shape[1]
        if p + n > kv.mask.shape[1]:
            raise UserError(f"the KV cache holds {kv.mask.shape[1]} tokens; {p} + {n} do not fit")
        io = kv.io
        if io is None:
            kv.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in kv.arrays]
            io = kv.io = self.decoder.io_binding()
            for name, value in zip(self.past_names, kv.values):
                io.bind_ortvalue_input(name, value)
            for name, value in zip(self.output_names[1:], kv.values):
                io.bind_ortvalue_output(name, value)
            if self.fixed_logits:  # written in place every step; nothing to allocate or copy out
                kv.logits = np.empty([1, 1, self.decoder.get_outputs()[0].shape[2]], dtype=np.float32)
                io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(kv.logits))
            else:
                io.bind_output("logits")
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        io.bind_cpu_input("attention_mask", kv.mask[:, :p + n])
        if "position_ids" in self.decoder_inputs:
            io.bind_cpu_input("position_ids", np.arange(p, p + n, dtype=np.int64)[None])
        self.decoder.run_with_iobinding(io)
        kv.length = p + n
        if kv.logits is not None:
            return kv.logits[0, -1].copy(), kv
        # only the logits come back to numpy (copy_outputs_to_cpu() would copy every max-length cache too);
        # outputs come back in binding order, logits first
        return io.get_outputs()[-1].numpy()[0, -1], kv

    def prompt_ids(self, question: str) -> list[int]:
        return prompt_ids(self.config, self.tokenizer, question)

    def check_prompt(self, ids: Sequence[int]) -> None:
        if len(ids) >= self.max_context:
            raise UserError(f"the prompt is {len(ids)} tokens (with the image's visual tokens) but the bundle's "
                            f"context is {self.max_context}; shorten the prompt")

    # ---- generation --------------------------------------------------------------------------
    def generate_ids(self, ids: Sequence[int], image=None, *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, eos_ids: Sequence[int] = (),
                     on_token: Callable[[int], None] | None = None,
                     image_embeds: np.ndarray | None = None) -> tuple[list[int], float, float]:
        """Generate after prompt ``ids``; returns (tokens, ttft_s, decode_s)."""
        self.check_prompt(ids)
        max_new_tokens = min(max_new_tokens, self.max_context - len(ids))
        rng = np.random.default_rng(seed)
        eos = set(int(e) for e in eos_ids)
        t0 = time.perf_counter()
        if image_embeds is None and image is not None:
            image_embeds = self.encode_image(image)
        emb = self.embed(ids, image_embeds)
        past = self.empty_past()
        tokens: list[int] = []
        ttft = 0.0
        t_first = t0
        for step in range(max_new_tokens):
            logits, past = self.step(emb, past)
            token = pick_token(logits, temperature, top_p, rng)
            if step == 0:
                t_first = time.perf_counter()
                ttft = t_first - t0
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos or step == max_new_tokens - 1:
                break
            emb = self.embed_session.run(None, {"input_ids": np.asarray([[token]], dtype=np.int64)})[0]
        decode = time.perf_counter() - t_first
        return tokens, ttft, decode

    def generate(self, image, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Answer ``question`` about ``image`` (a PIL image or a path), streaming text to ``on_text``."""
        if isinstance(image, (str, Path)):
            image = load_image(image)
        ids = self.prompt_ids(question)
        eos = eos_ids(self.tokenizer)
        stream = TokenStream(self.tokenizer, on_text, skip=eos)
        tokens, ttft, decode = self.generate_ids(ids, image, max_new_tokens=max_new_tokens, temperature=temperature,
                                                 top_p=top_p, seed=seed, eos_ids=eos, on_token=stream.put)
        text = stream.finish(self.tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True))
        return GenerationResult(tokens, text, len(ids), ttft, decode)


def read_manifest(bundle: str | Path) -> dict:
    """The bundle's manifest, validated (schema and checksums) by the shared bundle module."""
    return load_manifest(bundle)


class OnnxBundleRunner(Runner):
    """An ONNX bundle through ONNX Runtime; the decoder's past (``present.*`` fed back) is kept between turns.

    Sampling honours temperature, top_p and seed (numpy's generator, nucleus sampling as eager generation).
    Options: ``providers`` (execution providers in order, default CPU) and ``threads`` (intra-op threads).
    """

    format = "onnx"
    options = ("providers", "threads")

    def describe(self) -> str:
        providers = self.engine.providers if self.loaded else (self.opts.get("providers") or DEFAULT_PROVIDERS)
        return f"ONNX Runtime {', '.join(providers)}, {self.manifest['target']} bundle"

    def _load(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendUnavailable("running ONNX bundles needs onnxruntime: pip install onnxruntime") from None
        self.engine = OnnxRunner.from_bundle(self.bundle_dir, self.manifest, providers=self.opts.get("providers"),
                                             threads=self.opts.get("threads"))
        self.max_context = min(self.max_context, self.engine.max_context)
        self.vision_input = self.engine.vision.get_inputs()[0].name
        self._past = None

    def _reset_cache(self) -> None:
        self._past = None

    def _run(self, ids, views, max_new, sampling, on_token):
        engine = self.engine
        image_embeds = None
        if IMAGE_TOKEN_ID in ids:
            image_embeds = engine.vision.run(None, {self.vision_input: views})[0]
        emb = engine.embed(ids, image_embeds)
        past = self._past if self._past is not None else engine.empty_past()
        self._past = None  # unknown until the run completes
        rng = np.random.default_rng(sampling.seed)
        top_p = 1.0 if sampling.top_p is None else float(sampling.top_p)
        for step in range(max_new):
            logits, past = engine.step(emb, past)
            token = pick_token(logits, float(sampling.temperature), top_p, rng)
            if on_token(token) or step == max_new - 1:
                break
            emb = engine.embed_session.run(None, {"input_ids": np.asarray([[token]], dtype=np.int64)})[0]
        self._past = past
        return {}
