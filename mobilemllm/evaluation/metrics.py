"""Metrics, one helper each: exact match, POPE confusion metrics, caption hallucination (CHAIR-style)."""

from __future__ import annotations

import re
from typing import Iterable

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


def caption_hallucination(mentioned: list[set[str]], present: list[Iterable[str]]) -> dict[str, float]:
    """CHAIR-style rates over captions: ``object_rate`` = hallucinated / mentioned objects (CHAIR_i),
    ``caption_rate`` = captions with any hallucinated object (CHAIR_s), and object ``recall``."""
    n_mention = n_halluc = n_bad = n_truth = n_hit = 0
    for said, truth in zip(mentioned, present):
        truth = set(truth)
        wrong = said - truth
        n_mention += len(said)
        n_halluc += len(wrong)
        n_bad += bool(wrong)
        n_truth += len(truth)
        n_hit += len(said & truth)
    n = len(mentioned)
    return {
        "n": n,
        "object_rate": n_halluc / n_mention if n_mention else 0.0,
        "caption_rate": n_bad / n if n else 0.0,
        "recall": n_hit / n_truth if n_truth else 0.0,
    }
