"""Metrics, one helper each: exact match, POPE confusion metrics, caption hallucination (CHAIR-style)."""

from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np

_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (VQA-style normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def yes_no(text: str) -> str:
    """POPE's reading of a free answer: "yes" if it starts with yes, otherwise "no"."""
    words = normalize_answer(text).split()
    return "yes" if words and words[0] == "yes" else "no"


def pope_metrics(predictions: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = "yes"), yes-ratio, and the false-positive rate
    (share of absent objects the model says are there: its hallucination rate)."""
    tp = fp = tn = fn = 0
    for p, y in zip(predictions, labels):
        if p == "yes":
            tp += y == "yes"
            fp += y != "yes"
        else:
            fn += y == "yes"
            tn += y != "yes"
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "hallucination_rate": fp / (fp + tn) if fp + tn else 0.0,
    }


def caption_hallucination(mentioned: list[set[str]], present: list[Iterable[str]]) -> dict[str, Any]:
    """CHAIR-style rates over captions: ``object_rate`` = hallucinated / mentioned objects (CHAIR_i),
    ``caption_rate`` = captions with any hallucinated object (CHAIR_s), and object ``recall``; with the
    object rate's 95 % bootstrap interval and the per-caption counts (``per_caption``), which
    :func:`object_rate_change` needs to compare two models on the same captions."""
    per = {"mentioned": [], "hallucinated": [], "objects": [], "named": []}
    for said, truth in zip(mentioned, present):
        truth = set(truth)
        per["mentioned"].append(len(said))
        per["hallucinated"].append(len(said - truth))
        per["objects"].append(len(truth))
        per["named"].append(len(said & truth))
    n, n_mention, n_truth = len(per["mentioned"]), sum(per["mentioned"]), sum(per["objects"])
    return {
        "n": n,
        "object_rate": sum(per["hallucinated"]) / n_mention if n_mention else 0.0,
        "object_rate_ci": _interval((per["mentioned"], per["hallucinated"]), _rate),
        "caption_rate": sum(h > 0 for h in per["hallucinated"]) / n if n else 0.0,
        "recall": sum(per["named"]) / n_truth if n_truth else 0.0,
        "per_caption": per,
    }


def object_rate_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """How much ``after``'s hallucinated-object rate differs from ``before``'s on the same captions (two
    ``caption_hallucination`` reports), with a paired 95 % bootstrap interval: on a few hundred captions a
    change of a few points can be noise, and only an interval that excludes 0 says a model hallucinates
    less. None when the reports lack per-caption counts or are not of the same captions."""
    a, b = before.get("per_caption"), after.get("per_caption")
    if not a or not b or b["objects"] != a["objects"]:
        return None
    change = after["object_rate"] - before["object_rate"]
    ci = _interval((a["mentioned"], a["hallucinated"], b["mentioned"], b["hallucinated"]),
                   lambda ma, ha, mb, hb, axis: _rate(mb, hb, axis) - _rate(ma, ha, axis))
    return {"change": change, "ci": ci}


def _rate(mentioned, hallucinated, axis=-1):
    """Hallucinated / mentioned objects over captions, for bootstrap resamples along ``axis``."""
    m = np.sum(mentioned, axis=axis)
    return np.divide(np.sum(hallucinated, axis=axis), m, out=np.zeros(np.shape(m)), where=m > 0)


def _interval(data: tuple, statistic, resamples: int = 2000) -> list[float] | None:
    """95 % percentile-bootstrap interval of ``statistic`` over captions (resampled together, fixed seed so a
    report is reproducible): scipy's bootstrap, percentile method because a rate of 0 on every resample
    makes BCa undefined. None for fewer than two captions."""
    if len(data[0]) < 2:
        return None
    from scipy import stats  # lazy: seconds to load; only the caption intervals need it
    res = stats.bootstrap(tuple(np.asarray(d, dtype=float) for d in data), statistic, paired=True,
                          vectorized=True, n_resamples=resamples, method="percentile",
                          rng=np.random.default_rng(0))
    lo, hi = res.confidence_interval
    return [float(lo), float(hi)]
