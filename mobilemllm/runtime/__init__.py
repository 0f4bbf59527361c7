"""Run an exported bundle: dispatch on ``manifest["format"]`` to the runner for that format.

``run_bundle(bundle_dir, pil_image, prompt, ...)`` is what ``mobilemllm generate --bundle`` calls. The
ExecuTorch path drives ExecuTorch's C++ ``MultimodalRunner`` (:mod:`.executorch_runner`); other formats
add a module here (``onnx_runner``) and a branch below.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from mobilemllm.errors import UserError


def prepare_image(manifest: dict, pil_image, image_path=None, warn: Callable[[str], None] | None = None):
    """PIL image -> uint8 views (V, 3, S, S) as the manifest's preprocessing says, noting any resize."""
    from mobilemllm.config import VisionConfig
    from mobilemllm.data.images import to_uint8_views

    pre = manifest["preprocessing"]
    s = pre["image_size"]
    if pil_image.size != (s, s) and warn is not None:
        name = f" {image_path}" if image_path else ""
        how = "padded to square and " if pre.get("aspect") == "pad" and pil_image.width != pil_image.height else ""
        warn(f"note: image{name} is {pil_image.width}x{pil_image.height}; {how}resized to {s}x{s} as the bundle expects")
    vcfg = VisionConfig(image_size=s, patch_size=1, image_aspect=pre.get("aspect", "pad"),
                        hires=pre.get("hires", "direct"), tile_grid=tuple(pre.get("tile_grid", (2, 2))),
                        image_mean=tuple(pre["mean"]), image_std=tuple(pre["std"]))
    return to_uint8_views(pil_image, vcfg)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_bundle(bundle_dir, pil_image, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
               on_text: Callable[[str], None] | None = None, image_path=None, report: bool = True,
               providers: list[str] | None = None):
    """Generate text for ``prompt`` about ``pil_image`` with the bundle at ``bundle_dir``; returns a RunResult.

    Prints time to first token and tokens/s to stderr when ``report``. ``providers`` names ONNX Runtime
    execution providers for ONNX bundles (e.g. ``["QNNExecutionProvider", "CPUExecutionProvider"]``).
    """
    from mobilemllm.bundle import load_manifest

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    fmt = manifest["format"]
    if providers and fmt != "onnx":
        raise UserError(f"--providers applies to ONNX bundles; {bundle_dir} is a {fmt} bundle")
    if fmt == "executorch":
        res = _run_executorch(bundle_dir, manifest, pil_image, prompt, max_new_tokens, temperature, on_text,
                              image_path)
    elif fmt == "onnx":
        try:
            from mobilemllm.runtime.onnx_runner import run_onnx_bundle
        except ModuleNotFoundError as e:
            raise UserError(f"this mobilemllm cannot run ONNX bundles ({e})") from None
        return run_onnx_bundle(bundle_dir, manifest, pil_image, prompt, max_new_tokens=max_new_tokens,
                               temperature=temperature, on_text=on_text, image_path=image_path,
                               providers=providers, report=report)
    elif fmt == "coreml":
        from mobilemllm.errors import BackendUnavailable

        raise BackendUnavailable("Core ML bundles run only on Apple hardware (macOS/iOS); open it in the iOS demo app")
    else:
        raise UserError(f"bundle format {fmt!r} is not supported")
    if report:
        if on_text is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()
        def rate(v: float) -> str:  # 0: nothing to time (e.g. one generated token: no decode step)
            return f"{v:.1f} tok/s" if v > 0 else "n/a"

        _stderr(f"[{res.prompt_tokens} prompt tokens, {res.generated_tokens + 1} generated; "
                f"time to first token {res.ttft_s * 1000:.0f} ms, prefill {rate(res.prefill_tokens_per_s)}, "
                f"decode {rate(res.decode_tokens_per_s)}; ExecuTorch MultimodalRunner, "
                f"{manifest['target']} bundle]")
    return res


def _run_executorch(bundle_dir: Path, manifest: dict, pil_image, prompt: str, max_new_tokens: int,
                    temperature: float, on_text, image_path):
    from mobilemllm.data.tokenizer import load_tokenizer
    from mobilemllm.bundle import fill_prompt
    from mobilemllm.bundle.layout import PROGRAM_NAME
    from mobilemllm.runtime.executorch_runner import count_prompt_tokens, run_program

    if manifest["export"].get("backend") == "coreml":
        from mobilemllm.errors import BackendUnavailable

        raise BackendUnavailable("this bundle uses ExecuTorch's Core ML delegate, which runs only on Apple "
                                 "hardware; run it in the iOS demo app, or export --target ios for XNNPACK")
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt 'a question about the image'")
    tok_dir = bundle_dir / manifest["tokenizer"]["dir"]
    tokenizer = load_tokenizer(tok_dir)
    ctx = manifest["context"]["max_context_len"]
    n_prompt = count_prompt_tokens(manifest, tokenizer, prompt)
    if n_prompt >= ctx:
        raise UserError(f"the prompt is {n_prompt} tokens (with the image's "
                        f"{manifest['prompt']['num_visual_tokens']} visual tokens) but the bundle's context is {ctx}; "
                        "shorten the prompt")
    longest = max((len(tokenizer.encode(seg["text"], add_special_tokens=False))
                   for seg in fill_prompt(manifest["prompt"], prompt) if seg["type"] == "text"), default=0)
    if longest > manifest["context"]["max_seq_len"]:
        raise UserError(f"a prompt segment is {longest} tokens but the bundle prefills at most "
                        f"{manifest['context']['max_seq_len']} at once; shorten the prompt")
    views = prepare_image(manifest, pil_image, image_path, warn=_stderr)
    max_new = max(1, min(int(max_new_tokens), ctx - n_prompt))
    return run_program(bundle_dir / PROGRAM_NAME, tok_dir, manifest, views,
                       prompt, max_new_tokens=max_new, temperature=temperature, on_text=on_text)
