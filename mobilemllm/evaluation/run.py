"""Run the evaluation suite on a folder of LLaVA-format evaluation files.

Files looked for in ``data_dir`` (each optional; the ones present are evaluated):

- ``eval_questions.json``: single-answer questions (``conversations``: human question, gpt answer; an
  optional ``type`` groups the accuracy) -> exact-match accuracy.
- ``eval_pope_{random,popular,adversarial}.json``: yes/no probes -> POPE metrics per split.
- ``eval_paraphrase.json``: single-answer questions in wordings never used in training (``type``: the
  question type, ``pope`` for POPE's question reworded) -> exact-match accuracy, overall and per type.
- ``eval_captions.json``: ``{image, prompt, objects}`` -> hallucinated-object rates of the generated
  detailed captions. Objects are read from the text with :func:`mobilemllm.data.shapes.parse_objects`
  (the shapes world's vocabulary; real data needs its own object parser).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.table import Table

from mobilemllm.data.dataset import check_image_name, image_path, read_records, validate_conversation
from mobilemllm.data.images import load_image, preprocess
from mobilemllm.data.shapes import POPE_SPLITS, parse_objects
from mobilemllm.data.tokenizer import eos_ids
from mobilemllm.errors import DataError
from mobilemllm.evaluation.generate import greedy_batch
from mobilemllm.evaluation.metrics import caption_hallucination, exact_match, pope_metrics, yes_no
from mobilemllm.inference import prompt_ids
from mobilemllm.runtime import Sampling, open_runner
from mobilemllm.templates import IMAGE

QUESTIONS_FILE = "eval_questions.json"
CAPTIONS_FILE = "eval_captions.json"
PARAPHRASE_FILE = "eval_paraphrase.json"
# bumped when a report gains fields, so cached reports (a stage folder's eval.json) are made again
REPORT_VERSION = 2  # 2: the caption hallucination rate's bootstrap interval and per-caption counts


def pope_file(split: str) -> str:
    return f"eval_pope_{split}.json"


def _questions(path: Path, limit: int | None, allow_outside_images: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, rec in enumerate(read_records(path)[:limit]):
        turns = validate_conversation(rec, f"{path}: record {i}")
        if "image" not in rec:
            raise DataError(f"{path}: record {i} has no image")
        check_image_name(rec["image"], f"{path}: record {i}", allow_outside=allow_outside_images)
        out.append({"image": rec["image"], "question": turns[0][0].replace(IMAGE, "").strip(),
                    "answer": turns[0][1].strip(), "type": rec.get("type", "all")})
    return out


class _Runner:
    def __init__(self, model, tokenizer, image_folder: Path, batch_size: int, allow_outside_images: bool = False):
        self.model, self.tok = model, tokenizer
        self.image_folder = image_folder
        self.allow_outside_images = allow_outside_images
        self.batch_size = batch_size
        self.cache: dict[str, torch.Tensor] = {}
        self.eos = eos_ids(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def pixels(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            path = image_path(self.image_folder, name, "evaluation", allow_outside=self.allow_outside_images)
            self.cache[name] = preprocess(load_image(path), self.model.config.vision)
        return self.cache[name]

    def answers(self, items: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
        """(image, question) pairs -> decoded greedy answers."""
        texts: list[str] = []
        # Sort by prompt length so batches need little padding; restore order afterwards.
        prompts = [prompt_ids(self.model.config, self.tok, q) for _, q in items]
        order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
        result: dict[int, str] = {}
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            pix = torch.stack([self.pixels(items[i][0]) for i in idx])
            outs = greedy_batch(self.model, [prompts[i] for i in idx], pix, pad_id=self.pad, eos_ids=self.eos,
                                max_new_tokens=max_new_tokens)
            for i, toks in zip(idx, outs):
                result[i] = self.tok.decode(toks, skip_special_tokens=True).strip()
        texts = [result[i] for i in range(len(items))]
        return texts


class _BundleRunner:
    """The same answers from an exported bundle, through its :class:`~mobilemllm.runtime.base.Runner`: one
    question at a time, greedy, each a new conversation about its image (the runner the apps use)."""

    KEEP_IMAGES = 64  # preprocessed images kept between questions

    def __init__(self, runner, image_folder: Path, allow_outside_images: bool = False):
        self.runner = runner
        self.image_folder = image_folder
        self.allow_outside_images = allow_outside_images
        self.conversations: dict[str, Any] = {}

    def conversation(self, name: str):
        if name not in self.conversations:
            if len(self.conversations) >= self.KEEP_IMAGES:
                self.conversations.pop(next(iter(self.conversations)))
            path = image_path(self.image_folder, name, "evaluation", allow_outside=self.allow_outside_images)
            self.conversations[name] = self.runner.conversation(load_image(path))
        return self.conversations[name]

    def answers(self, items: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
        sampling = Sampling(max_new_tokens=max_new_tokens)
        return [self.runner.answer(self.conversation(name), q, sampling).text for name, q in items]


def _check_data(data_dir: Path) -> None:
    if not data_dir.is_dir():
        raise DataError(f"evaluation data folder {data_dir} does not exist; write one with "
                        "`mobilemllm data synth --seed 1 --num-images 200 --out DIR`")
    files = [QUESTIONS_FILE, PARAPHRASE_FILE, CAPTIONS_FILE] + [pope_file(s) for s in POPE_SPLITS]
    if not any((data_dir / f).exists() for f in files):
        raise DataError(f"{data_dir} has none of the evaluation files ({', '.join(files)})")


def evaluate(model, tokenizer, data_dir: str | Path, *, image_folder: str | Path | None = None,
             limit: int | None = None, batch_size: int = 128, answer_tokens: int = 8, caption_tokens: int = 96,
             log: Callable[[str], None] | None = None, allow_outside_images: bool = False) -> dict[str, Any]:
    """Evaluate ``model`` on the evaluation files of ``data_dir``; returns a JSON-able report. Image names
    must stay inside the image folder unless ``allow_outside_images`` (mobilemllm.data.dataset)."""
    data_dir = Path(data_dir)
    _check_data(data_dir)
    model.eval()
    run = _Runner(model, tokenizer, Path(image_folder) if image_folder else data_dir / "images", batch_size,
                  allow_outside_images)
    return _evaluate(run, data_dir, limit, answer_tokens, caption_tokens, log, allow_outside_images)


def evaluate_bundle(bundle: str | Path, data_dir: str | Path, *, image_folder: str | Path | None = None,
                    limit: int | None = None, answer_tokens: int = 8, caption_tokens: int = 96,
                    log: Callable[[str], None] | None = None, allow_outside_images: bool = False,
                    **runner_opts: Any) -> dict[str, Any]:
    """:func:`evaluate` for an exported bundle (ExecuTorch or ONNX), answered by its runner.
    ``runner_opts`` go to :func:`~mobilemllm.runtime.open_runner` (``providers``, ``threads``)."""
    data_dir = Path(data_dir)
    _check_data(data_dir)
    runner = open_runner(bundle, **runner_opts)
    run = _BundleRunner(runner, Path(image_folder) if image_folder else data_dir / "images", allow_outside_images)
    return _evaluate(run, data_dir, limit, answer_tokens, caption_tokens, log, allow_outside_images)


def _evaluate(run, data_dir: Path, limit: int | None, answer_tokens: int, caption_tokens: int,
              log: Callable[[str], None] | None, allow_outside_images: bool) -> dict[str, Any]:
    """Every evaluation file of ``data_dir`` through ``run.answers`` (eager batches or a bundle's runner)."""
    report: dict[str, Any] = {"data": str(data_dir)}
    t0 = time.perf_counter()
    say = log or (lambda _m: None)

    for key, name in (("vqa", QUESTIONS_FILE), ("paraphrase", PARAPHRASE_FILE)):
        if (data_dir / name).exists():
            report[key] = _exact_match_report(run, _questions(data_dir / name, limit, allow_outside_images),
                                              answer_tokens)
            say(f"{key}: {report[key]['accuracy']:.3f} on {report[key]['n']} questions")

    pope: dict[str, Any] = {}
    for split in POPE_SPLITS:
        path = data_dir / pope_file(split)
        if not path.exists():
            continue
        qs = _questions(path, limit, allow_outside_images)
        preds = run.answers([(q["image"], q["question"]) for q in qs], answer_tokens)
        pope[split] = pope_metrics([yes_no(p) for p in preds], [yes_no(q["answer"]) for q in qs])
        say(f"pope {split}: acc {pope[split]['accuracy']:.3f}")
    if pope:
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio", "hallucination_rate")
        pope["mean"] = {k: sum(pope[s][k] for s in pope) / len(pope) for k in keys}
        report["pope"] = pope

    if (data_dir / CAPTIONS_FILE).exists():
        recs = read_records(data_dir / CAPTIONS_FILE)[:limit]
        for i, r in enumerate(recs):
            if not (isinstance(r.get("objects"), list) and isinstance(r.get("prompt"), str)):
                raise DataError(f"{data_dir / CAPTIONS_FILE}: record {i} needs image, prompt and an objects list")
            check_image_name(r.get("image"), f"{data_dir / CAPTIONS_FILE}: record {i}",
                             allow_outside=allow_outside_images)
        caps = run.answers([(r["image"], r["prompt"]) for r in recs], caption_tokens)
        stats = caption_hallucination([parse_objects(c) for c in caps], [r["objects"] for r in recs])
        stats["examples"] = [{"objects": r["objects"], "caption": c} for r, c in list(zip(recs, caps))[:3]]
        report["captions"] = stats
        ci = stats["object_rate_ci"]
        say(f"captions: hallucinated objects {stats['object_rate']:.3f}"
            + (f" (95 % interval {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
    report["eval_s"] = round(time.perf_counter() - t0, 2)
    return report


def _exact_match_report(run: _Runner | _BundleRunner, qs: list[dict[str, Any]], answer_tokens: int) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers, overall and per question type, with a few examples."""
    preds = run.answers([(q["image"], q["question"]) for q in qs], answer_tokens)
    by_type: dict[str, list[bool]] = {}
    for q, p in zip(qs, preds):
        by_type.setdefault(q["type"], []).append(exact_match(p, q["answer"]))
    hits = [h for v in by_type.values() for h in v]
    return {"n": len(hits), "accuracy": sum(hits) / max(1, len(hits)),
            "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
            "examples": [{"question": q["question"], "answer": q["answer"], "prediction": p}
                         for q, p in list(zip(qs, preds))[:5]]}


# The printed table's columns (summarize also gives paraphrase_accuracy, left out here to fit 80 columns).
SUMMARY_COLUMNS = (
    ("vqa_accuracy", "VQA acc"),
    ("pope_accuracy", "POPE acc"),
    ("pope_f1", "POPE F1"),
    ("pope_yes_ratio", "yes-ratio"),
    ("pope_hallucination", "POPE FP rate"),
    ("caption_object_halluc", "caption halluc. obj"),
    ("caption_halluc_captions", "captions w/ halluc."),
    ("rm_pair_accuracy", "RM pair acc"),
)


def summarize(report: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one report (a row of the per-stage table)."""
    vqa, pope, cap = report.get("vqa", {}), report.get("pope", {}).get("mean", {}), report.get("captions", {})
    return {
        "vqa_accuracy": vqa.get("accuracy"),
        "paraphrase_accuracy": (report.get("paraphrase") or {}).get("accuracy"),
        "rm_pair_accuracy": (report.get("reward") or {}).get("pair_accuracy"),
        "pope_accuracy": pope.get("accuracy"),
        "pope_f1": pope.get("f1"),
        "pope_yes_ratio": pope.get("yes_ratio"),
        "pope_hallucination": pope.get("hallucination_rate"),
        "caption_object_halluc": cap.get("object_rate"),
        "caption_halluc_captions": cap.get("caption_rate"),
    }


def format_table(rows: dict[str, dict[str, Any]], title: str = "evaluation"):
    """A rich Table: one row per model/stage, from ``{name: report}``."""
    t = Table(title=title)
    t.add_column("model")
    sums = {name: summarize(report) for name, report in rows.items()}
    cols = [(k, label) for k, label in SUMMARY_COLUMNS if any(s[k] is not None for s in sums.values())]
    for _, label in cols:  # columns no row has (RM pair accuracy without an rm stage) are left out
        t.add_column(label, justify="right")
    for name, s in sums.items():
        t.add_row(name, *("-" if s[k] is None else f"{100 * s[k]:.1f}%" for k, _ in cols))
    return t
