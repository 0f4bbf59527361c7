"""Outputs of a benchmark run: a rich table with ratios against the first row, ``--json`` and ``--csv``
files with every raw repetition and the machine description, and a ``--plot`` PNG (matplotlib).

Every file is written to a temporary name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

from mobilemllm.bench.harness import CaseResult
from mobilemllm.bench.timing import summarize
from mobilemllm.errors import BackendUnavailable, UserError

RESULT_FORMAT = "mobilemllm-bench/1"

# JSON schema of a --json file (validated by the tests).
_SUMMARY = {"type": ["object", "null"], "required": ["n", "median", "p10", "p90", "min", "max", "mean"]}
RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "created", "machine", "settings", "cases"],
    "properties": {
        "format": {"const": RESULT_FORMAT},
        "created": {"type": "string"},
        "machine": {"type": "object", "required": ["device", "cpu", "cores", "threads", "versions"]},
        "settings": {"type": "object", "required": ["prompt_tokens", "new_tokens", "warmup", "repeat"]},
        "cases": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["label", "backend", "target", "info", "load_s", "peak_rss_bytes", "prefill_tokens",
                         "new_tokens", "summary", "repetitions", "roofline", "ratios"],
            "properties": {
                "summary": {"type": "object", "required": ["ttft_s", "prefill_tok_s", "decode_tok_s"],
                            "additionalProperties": _SUMMARY},
                "repetitions": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "required": ["index", "prefill_tokens", "decode_tokens", "ttft_s", "prefill_s", "decode_s",
                                 "total_s", "image_encode_s", "prefill_tok_s", "decode_tok_s", "methods",
                                 "runner_stats"]}},
                "ratios": {"type": "object", "required": ["reference", "prefill_tok_s", "ttft_s", "decode_tok_s"]},
                "roofline": {"type": ["object", "null"],
                             "required": ["bandwidth_bytes_s", "bytes_per_token", "ceiling_tok_s", "fraction"]},
            }}},
    },
}

CSV_COLUMNS = ["label", "backend", "target", "model", "format", "quantization", "repetition", "prefill_tokens",
               "decode_tokens", "image_encode_s", "prefill_s", "prefill_tok_s", "ttft_s", "decode_s", "decode_tok_s",
               "total_s", "load_s", "peak_rss_bytes", "size_bytes", "decode_bytes_per_token", "ceiling_tok_s",
               "bandwidth_bytes_s", "threads", "device", "cpu", "cores", "versions"]


def result_document(cases: Sequence[CaseResult], machine: dict[str, Any], settings: dict[str, Any]) -> dict:
    docs = []
    for c in cases:
        d = c.to_dict()
        ref = reference_for(c, cases)
        d["ratios"] = {"reference": cases.index(ref), **{m: ratio(c, ref, m) for m in RATIO_METRICS}}
        docs.append(d)
    return {"format": RESULT_FORMAT,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "settings": settings, "cases": docs}


RATIO_METRICS = {"prefill_tok_s": True, "ttft_s": False, "decode_tok_s": True}  # metric -> higher is better


def ratio(case: CaseResult, ref: CaseResult, metric: str) -> float | None:
    """Speed-up of ``case`` over ``ref`` on the medians of ``metric`` (> 1: ``case`` is faster)."""
    a, b = case.summary(metric), ref.summary(metric)
    if a is None or b is None or not a.median or not b.median:
        return None
    return a.median / b.median if RATIO_METRICS[metric] else b.median / a.median


def _atomic_write(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(doc: dict, path: str | Path) -> Path:
    return _atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())


def csv_rows(doc: dict) -> list[dict[str, Any]]:
    m = doc["machine"]
    versions = " ".join(f"{k}={v}" for k, v in sorted(m.get("versions", {}).items()))
    rows = []
    for c in doc["cases"]:
        roof = c.get("roofline") or {}
        for r in c["repetitions"]:
            rows.append({
                "label": c["label"], "backend": c["backend"], "target": c["target"],
                "model": c["info"]["model_name"], "format": c["info"]["format"],
                "quantization": c["info"]["quantization"], "repetition": r["index"],
                **{k: r[k] for k in ("prefill_tokens", "decode_tokens", "image_encode_s", "prefill_s",
                                     "prefill_tok_s", "ttft_s", "decode_s", "decode_tok_s", "total_s")},
                "load_s": c["load_s"], "peak_rss_bytes": c["peak_rss_bytes"], "size_bytes": c["info"]["size_bytes"],
                "decode_bytes_per_token": c["info"]["decode_bytes_per_token"],
                "ceiling_tok_s": roof.get("ceiling_tok_s"), "bandwidth_bytes_s": roof.get("bandwidth_bytes_s"),
                "threads": c["threads"], "device": m["device"], "cpu": m["cpu"], "cores": m["cores"],
                "versions": versions,
            })
    return rows


def write_csv(doc: dict, path: str | Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in csv_rows(doc):
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return _atomic_write(path, buf.getvalue().encode())


# ---- terminal table ------------------------------------------------------------------------------
def _fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if x is None else f"{x * scale:,.{digits}f}"


def _spread(s, scale: float = 1.0, digits: int = 1) -> str:
    if s is None:
        return "—"
    return f"{_fmt(s.median, scale, digits)} [dim]({_fmt(s.p10, scale, digits)}–{_fmt(s.p90, scale, digits)})[/]"


def _ratio(value: float | None, ref: float | None, higher_is_better: bool) -> str:
    if value is None or ref is None or ref == 0 or value == 0:
        return ""
    r = value / ref if higher_is_better else ref / value
    color = "green" if r >= 1.05 else "red" if r <= 0.95 else "white"
    return f" [{color}]×{r:.2f}[/]"


def table(cases: Sequence[CaseResult], machine: dict[str, Any], title: str | None = None):
    """A rich Table: medians with (p10–p90), and ×ratio against the first row (× > 1: faster)."""
    t = Table(title=title or f"mobilemllm bench — {machine['device']}: {machine['cpu']}, "
                             f"{machine['threads']} thread(s)", title_justify="left")
    for col, just in (("#", "right"), ("case", "left"), ("backend", "left"), ("quant", "left"),
                      ("size MiB", "right"), ("load s", "right"), ("image ms", "right"),
                      ("prefill tok/s", "right"), ("TTFT ms", "right"), ("decode tok/s", "right"),
                      ("roofline", "right"), ("peak RSS MiB", "right")):
        t.add_column(col, justify=just)
    first_of: dict[str, CaseResult] = {}
    for c in cases:
        first_of.setdefault(c.info.model_name, c)

    def med(c, m):
        s = c.summary(m)
        return s.median if s else None

    for i, c in enumerate(cases, 1):
        ref = reference_for(c, cases, first_of)
        rel = ref is not c
        roof = c.roofline
        roof_txt = "—"
        if roof:
            roof_txt = f"≤{roof['ceiling_tok_s']:,.0f}"
            if roof.get("fraction") is not None:
                roof_txt += f" ({roof['fraction'] * 100:.0f}%)"
        t.add_row(
            str(i), c.label, c.backend, c.info.quantization,
            _fmt(c.info.size_bytes, 1 / 2**20), _fmt(c.load_s, 1, 2), _spread(c.summary("image_encode_s"), 1e3),
            _spread(c.summary("prefill_tok_s"), 1, 0) + (_ratio(med(c, "prefill_tok_s"), med(ref, "prefill_tok_s"), True) if rel else ""),
            _spread(c.summary("ttft_s"), 1e3) + (_ratio(med(c, "ttft_s"), med(ref, "ttft_s"), False) if rel else ""),
            _spread(c.summary("decode_tok_s"), 1, 1) + (_ratio(med(c, "decode_tok_s"), med(ref, "decode_tok_s"), True) if rel else ""),
            roof_txt, _fmt(c.peak_rss_bytes, 1 / 2**20, 0),
        )
    return t


def busy_warning(machine: dict[str, Any]) -> str | None:
    """A line when other work competed for the CPUs during the run. The load average is read at the end of the
    run, so it holds the benchmark's own busy threads (one request at a time, ``threads`` of them): the machine
    was busy when the load beyond those is more than half a core and the total exceeds the usable cores."""
    load, cores = machine.get("load_average"), machine.get("cores_usable") or machine.get("cores")
    if not (load and cores):
        return None
    own = min(machine.get("threads") or cores, cores)
    if load[0] > cores and load[0] - own > 0.5:
        return (f"warning: the machine was busy (load average {load[0]:.1f} on {cores} cores, {own} of it this "
                "benchmark's threads): numbers are noisy, and multi-threaded runtimes suffer most (their threads "
                "wait on each other); --threads 1 is steadier")
    return None


def reference_for(case: CaseResult, cases: Sequence[CaseResult],
                  first_of: dict[str, CaseResult] | None = None) -> CaseResult:
    """The row a case's ratios compare with: the first row of the same model, else row 1."""
    if first_of is None:
        first_of = {}
        for c in cases:
            first_of.setdefault(c.info.model_name, c)
    return first_of.get(case.info.model_name, cases[0])


def footnotes(cases: Sequence[CaseResult], settings: dict[str, Any], machine: dict[str, Any] | None = None) -> list[str]:
    lines = [f"{settings['prompt_tokens']} prompt tokens + image, {settings['new_tokens']} decoded tokens (EOS "
             f"ignored); {settings['warmup']} warm-up + {settings['repeat']} runs: median (p10–p90); ×: ratio to "
             "the first row of the same model (>1 is faster); roofline: decode ceiling = bandwidth ÷ bytes read per token (achieved %)."]
    for i, c in enumerate(cases, 1):
        p = c.prefill_tokens
        lines.append(f"#{i} {c.label}: prefill {p} tokens ({c.info.num_visual_tokens} image + {p - c.info.num_visual_tokens} text)"
                     + ("; image encode timed inside prefill by the runner" if c.summary("image_encode_s") is None else "")
                     + "".join(f"; {n}" for n in c.info.notes))
        methods = _method_summary(c)
        if methods:
            lines.append("   per method (median per request): " + ", ".join(
                f"{name} {ms:.2f} ms / {calls:g} call(s)" for name, (ms, calls) in methods.items()))
        roof = c.roofline
        if roof:
            lines.append(f"   bandwidth {roof['bandwidth_bytes_s'] / 1e9:.1f} GB/s ({roof['bandwidth_source']}), "
                         f"{roof['bytes_per_token'] / 2**20:.1f} MiB read per decoded token"
                         + ("; above the ceiling: the weights fit in the CPU caches, so DRAM bandwidth does not "
                            "bound this model" if (roof.get("fraction") or 0) > 1 else ""))
    warning = busy_warning(machine or {})
    if warning:
        lines.append(warning)
    return lines


def _method_summary(c: CaseResult) -> dict[str, tuple[float, float]]:
    names: list[str] = []
    for r in c.repetitions:
        for n in (r.methods or {}):
            if n not in names:
                names.append(n)
    out = {}
    for n in names:
        s = summarize((r.methods or {}).get(n, {}).get("seconds") for r in c.repetitions)
        calls = summarize((r.methods or {}).get(n, {}).get("calls") for r in c.repetitions)
        if s:
            out[n] = (s.median * 1e3, calls.median if calls else 0)
    return out


# ---- plot ----------------------------------------------------------------------------------------
def write_plot(cases: Sequence[CaseResult], machine: dict[str, Any], path: str | Path) -> Path:
    """PNG: latency breakdown per case (image encode, prefill, decode) and decode tok/s vs the ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailable("--plot needs matplotlib: pip install 'matplotlib>=3.8'") from None

    def med(c, m):
        s = c.summary(m)
        return s.median if s else 0.0

    labels = [f"#{i} {c.label}\n{c.backend} {c.info.quantization}" for i, c in enumerate(cases, 1)]
    enc = [med(c, "image_encode_s") * 1e3 for c in cases]
    pre = [med(c, "prefill_s") * 1e3 for c in cases]
    dec = [med(c, "decode_s") * 1e3 for c in cases]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.55 * len(cases) + 1.5))
    y = list(range(len(cases)))
    ax1.barh(y, enc, color="#8e7cc3", label="image encode")
    ax1.barh(y, pre, left=enc, color="#6fa8dc", label="prefill (LLM)")
    ax1.barh(y, dec, left=[a + b for a, b in zip(enc, pre)], color="#f6b26b", label="decode")
    ax1.set_yticks(y, labels)
    ax1.invert_yaxis()
    ax1.set_xlabel("milliseconds per request (median)")
    ax1.set_title("latency breakdown")
    ax1.legend(loc="lower right", fontsize=8)
    got = [med(c, "decode_tok_s") for c in cases]
    ax2.barh(y, got, color="#93c47d", label="decode tok/s (median)")
    ceilings = [(c.roofline or {}).get("ceiling_tok_s") for c in cases]
    cy = [yy for yy, cv in zip(y, ceilings) if cv]
    if cy:
        ax2.scatter([cv for cv in ceilings if cv], cy, marker="|", s=400, color="#cc0000",
                    label="bandwidth ceiling")
    ax2.set_yticks(y, labels)
    ax2.invert_yaxis()
    ax2.set_xscale("log")  # tiny models and their ceilings span orders of magnitude
    for yy, v in zip(y, got):
        if v:
            ax2.annotate(f"{v:,.0f}", (v, yy), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax2.set_xlabel("decode tokens/s (log scale)")
    ax2.set_title("decode vs memory-bandwidth ceiling")
    ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{machine['device']}: {machine['cpu']}, {machine['threads']} thread(s)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return _atomic_write(path, buf.getvalue())
