"""Filter image-caption pairs by CLIP score (``mobilemllm data filter``), as LAION/DataComp filter web pairs.

A scorer (:mod:`mobilemllm.training.caption_scorer`: the foundations stage's towers, or a transformers
CLIP/SigLIP folder) embeds images and captions into one space; a pair's score is their cosine similarity.
Pairs are kept above ``threshold`` or as the ``top_fraction`` best; the kept records go to a new LLaVA-format
file, and a report (JSON + a histogram PNG of the scores with the cut) beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from mobilemllm.data.dataset import image_path, read_records, validate_conversation
from mobilemllm.data.images import load_image
from mobilemllm.errors import DataError, UserError

# ----------------------------------------------------------------------------------------- pairs
def caption_pairs(path: Path, image_folder: Path | None = None,
                  allow_outside_images: bool = False) -> tuple[list[dict], list[str], list[Path]]:
    """(records, captions, image paths) of a LLaVA caption file: each record's first answer is its caption."""
    records = read_records(path)
    folder = image_folder or path.parent / "images"
    texts, images = [], []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        turns = validate_conversation(rec, where)
        if "image" not in rec:
            raise DataError(f"{where} has no image; data filter scores image-caption pairs")
        texts.append(turns[0][1])
        images.append(image_path(folder, rec["image"], where, allow_outside=allow_outside_images))
    return records, texts, images


def score_pairs(scorer, texts: list[str], images: list[Path], batch_size: int = 64) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), batch_size):
        out.append(scorer([load_image(p) for p in images[s:s + batch_size]], texts[s:s + batch_size]).float())
    return torch.cat(out) if out else torch.zeros(0)


def keep_mask(scores: torch.Tensor, threshold: float | None = None,
              top_fraction: float | None = None) -> tuple[torch.Tensor, float]:
    """Which pairs stay, and the score cut that decides it (one of ``threshold``/``top_fraction``)."""
    if (threshold is None) == (top_fraction is None):
        raise UserError("give exactly one of --threshold and --top-fraction")
    if top_fraction is not None:
        if not 0 < top_fraction <= 1:
            raise UserError(f"--top-fraction must be in (0, 1], got {top_fraction}")
        k = max(1, round(top_fraction * len(scores)))
        order = torch.argsort(scores, descending=True, stable=True)
        keep = torch.zeros(len(scores), dtype=torch.bool)
        keep[order[:k]] = True
        return keep, float(scores[order[k - 1]]) if len(scores) else 0.0
    return scores >= threshold, float(threshold)


def histogram(scores: torch.Tensor, cut: float, path: Path) -> None:
    """The score histogram with the cut as a line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores.numpy(), bins=40, color="#4c72b0")
    ax.axvline(cut, color="#c44e52", linestyle="--", label=f"cut {cut:.3f}")
    ax.set_xlabel("image-caption score (cosine)")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def filter_file(data: str | Path, scorer: Callable[[list, list[str]], torch.Tensor], out: str | Path, *,
                threshold: float | None = None,
                top_fraction: float | None = None, image_folder: str | Path | None = None, batch_size: int = 64,
                allow_outside_images: bool = False) -> dict[str, Any]:
    """Score ``data``'s pairs with ``scorer(images, captions) -> scores``, write the kept records to ``out``
    (image names as they were: put ``out`` beside the image folder, or pass it as the stage's
    ``image_folder``), ``<out stem>.report.json`` and ``<out stem>.hist.png``. Returns the report."""
    data, out = Path(data), Path(out)
    if not data.is_file():
        raise UserError(f"data file {data} does not exist")
    keep_mask(torch.zeros(1), threshold, top_fraction)  # the choice is checked before any work
    records, texts, images = caption_pairs(data, Path(image_folder) if image_folder else None, allow_outside_images)
    scores = score_pairs(scorer, texts, images, batch_size)
    keep, cut = keep_mask(scores, threshold, top_fraction)
    kept = [r for r, k in zip(records, keep.tolist()) if k]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(out)
    hist = out.with_name(out.stem + ".hist.png")
    histogram(scores, cut, hist)
    report = {"data": str(data), "scorer": getattr(scorer, "name", type(scorer).__name__), "out": str(out),
              "pairs": len(records),
              "kept": len(kept), "cut": cut, "threshold": threshold, "top_fraction": top_fraction,
              "score": {"min": float(scores.min()), "mean": float(scores.mean()), "max": float(scores.max())}
              if len(scores) else None, "histogram": str(hist),
              "scores": {str(r.get("id", i)): round(float(s), 5) for i, (r, s) in enumerate(zip(records, scores))}}
    out.with_name(out.stem + ".report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
