"""`mobilemllm info`: a preset's or checkpoint's parameter counts by part and visual token count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def info(
    model: str = typer.Argument("tiny", help="A preset name (e.g. tiny, mobilevlm-v2-1.7b) or a checkpoint folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show a model's parts, parameter counts and visual token count (no weights are loaded)."""
    import torch  # lazy: cli startup

    from mobilemllm.config import ModelConfig  # lazy: cli startup
    from mobilemllm.models.checkpoint import CONFIG_NAME, check_checkpoint_dir  # lazy: cli startup
    from mobilemllm.models.vlm import MobileVLM  # lazy: cli startup

    path = Path(model)
    if path.is_dir() or "/" in model or os.sep in model:  # a folder, or a path that names a missing one
        cfg = ModelConfig.load(check_checkpoint_dir(path) / CONFIG_NAME)
    else:
        cfg = ModelConfig.from_preset(model)
    cfg = cfg.replace(vision={"pretrained_path": None}, llm={"pretrained_path": None})
    with torch.device("meta"):
        counts = MobileVLM(cfg, load_weights=False).parameter_counts()
    report = {
        "name": cfg.name,
        "vision": f"{cfg.vision.kind} {cfg.vision.image_size}px/{cfg.vision.patch_size} "
                  f"{cfg.vision.num_layers}L x {cfg.vision.hidden_size} ({cfg.vision.hires})",
        "connector": cfg.connector.kind,
        "llm": f"llama {cfg.llm.num_layers}L x {cfg.llm.hidden_size}, {cfg.llm.num_heads} heads, "
               f"vocab {cfg.llm.vocab_size}, context {cfg.llm.max_position_embeddings}",
        "patches_per_view": cfg.vision.num_patches,
        "views": cfg.vision.num_views,
        "visual_tokens": cfg.num_visual_tokens,
        "parameters": counts,
        "template": cfg.template,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    t = Table(title=f"{cfg.name}", show_header=False)
    for key in ("vision", "connector", "llm", "template"):
        t.add_row(key, str(report[key]))
    t.add_row("visual tokens", f"{cfg.vision.num_patches} patches x {cfg.vision.num_views} view(s) -> "
                               f"{cfg.num_visual_tokens} tokens")
    for part, n in counts.items():
        t.add_row(f"params: {part}", f"{n:,} ({n / 1e6:.2f}M)")
    Console().print(t)
