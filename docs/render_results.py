"""Render the result tables of README.md and docs/*.md from the raw results under docs/results/.

Every published table sits between two markers in a Markdown file::

    <!-- results: NAME -->
    ...table, rendered here from docs/results/<folder>/*.json...
    <!-- /results -->

``python docs/render_results.py`` rewrites those blocks; ``--check`` exits 1 when a block differs from
what the raw files give (tests/test_docs.py runs the check), so a number in the docs cannot drift from
the file it came from. Each block ends with the command that produced its files and the machine.

To publish a new table: run the command, save its JSON under docs/results/<folder>/, add a spec to
``SPECS`` below, put the markers where the table belongs and run this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


@dataclass(frozen=True)
class Spec:
    """One published table: which raw files, how they were made, and how they become rows."""

    folder: str
    command: str
    machine: str
    render: Callable[[dict[str, Any]], list[str]]


def _load(folder: str) -> dict[str, Any]:
    """Every JSON file of a results folder, by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / folder).glob("*.json"))}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _train_bench(files: dict[str, Any]) -> list[str]:
    rows = ["| stage | trainable params | micro-batch | grad. checkpointing | tokens/s per GPU (text only) | peak GPU memory |",
            "|---|---|---|---|---|---|"]
    for name in ("instruct_mb8_gc", "instruct_mb16", "pretrain_mb16_gc"):
        r = files[name]
        params = r['trainable_parameters']
        params = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
        rows.append(f"| {r['stage']} | {params} | {r['micro_batch']} | "
                    f"{'yes' if r['grad_checkpointing'] else 'no'} | {r['tokens_per_s']:,.0f} "
                    f"({r['text_tokens_per_s']:,.0f}) | {r['peak_memory_bytes'] / 2**30:.1f} GiB |")
    return rows


def _tiny_alignment(files: dict[str, Any]) -> list[str]:
    """DPO against PPO (and the instruct model both start from) on the held-out split of the tiny world."""
    res = files["results"]
    splits = ("random", "popular", "adversarial")
    rows = ["| stage | VQA | paraphrase VQA | POPE acc. (rand./pop./adv.) | POPE F1 | POPE yes-ratio | "
            "caption halluc. objects (CHAIR_i) | captions with one (CHAIR_s) | objects named (recall) | train s |",
            "|---|---|---|---|---|---|---|---|---|---|"]

    def three(pope: dict[str, Any], key: str) -> str:
        return " / ".join(f"{100 * pope[s][key]:.1f}" for s in splits) + " %"

    for stage in ("instruct", "dpo", "ppo"):
        entry = res["stages"].get(stage)
        if not entry or not entry.get("eval"):
            continue
        ev = entry["eval"]
        pope, cap = ev["pope"], ev["captions"]
        rows.append(f"| {stage} | {_pct(ev['vqa']['accuracy'])} | {_pct(ev['paraphrase']['accuracy'])} | "
                    f"{three(pope, 'accuracy')} | {three(pope, 'f1')} | {three(pope, 'yes_ratio')} | "
                    f"{_pct(cap['object_rate'])} | {_pct(cap['caption_rate'])} | {_pct(cap.get('recall'))} | "
                    f"{entry.get('train_wall_s') or 0:.0f} |")
    rows += ["", "Paraphrase accuracy per question type (held-out wordings):", "",
             "| stage | colour | kind | count | position | existence | POPE reworded |",
             "|---|---|---|---|---|---|---|"]
    for stage in ("instruct", "dpo", "ppo"):
        ev = (res["stages"].get(stage) or {}).get("eval")
        if ev:
            by = ev["paraphrase"]["by_type"]
            rows.append(f"| {stage} | " + " | ".join(_pct(by.get(t)) for t in
                                                      ("colour", "kind", "count", "position", "existence", "pope"))
                        + " |")
    rm = ((res["stages"].get("rm") or {}).get("eval") or {}).get("reward")
    if rm:
        rows += ["", f"Reward model (rm stage): {_pct(rm['pair_accuracy'])} of {rm['n']} held-out preference pairs "
                     "ranked right."]
    stages = res["stages"]
    trained = sum(e.get("train_wall_s") or 0 for e in stages.values())
    evaluated = sum(e.get("eval_wall_s") or 0 for e in stages.values())
    parts = ", ".join(f"{name} {entry.get('train_wall_s') or 0:.0f} s" for name, entry in stages.items())
    # a later run that reused every stage (the test suite reruns its fixture's folder) rewrites results.json with
    # its own evaluation times, those of cached reports: they are the evaluations' only when the run trained
    tail = f"; evaluation {evaluated:.0f} s" if evaluated and (res.get("total_wall_s") or 0) >= trained else ""
    rows += ["", f"Training of every stage: {trained:.0f} s wall ({parts}){tail}."]
    return rows


def _tiny_seeds(files: dict[str, Any]) -> list[str]:
    """The default recipe on several seeds (seeds.json of mobilemllm.training.seeds): each seed's numbers per
    stage, each aligned stage's change of the hallucinated-object rate with its 95 % interval, and how many
    seeds meet each target."""
    runs = files["seeds"]["runs"]
    met = {k: sum(r["targets"][k] for r in runs) for k in runs[0]["targets"]}
    rows = ["| seed | stage | VQA | paraphrase VQA | POPE acc. (rand./pop./adv.) | POPE F1 | POPE yes-ratio | "
            "caption halluc. objects | change (95 % interval) | captions with one | objects named | RM pairs | "
            "train s (all stages) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for stage in ("instruct", "dpo", "ppo"):
            st = run["stages"][stage]
            three = {k: " / ".join(f"{100 * st['pope'][p][k]:.1f}" for p in ("random", "popular", "adversarial"))
                     + " %" for k in ("accuracy", "f1", "yes_ratio")}
            rm = _pct(run.get("rm_pair_accuracy")) if stage == "ppo" else ""
            rows.append(f"| {run['seed']} | {stage} | {_pct(st['vqa'])} | {_pct(st['paraphrase'])} | "
                        f"{three['accuracy']} | {three['f1']} | {three['yes_ratio']} | "
                        f"{_pct(st['caption_object_halluc'])} | {_change(run, stage)} | "
                        f"{_pct(st['caption_halluc_captions'])} | "
                        f"{_pct(st.get('caption_recall'))} | {rm} | "
                        f"{run['train_wall_s']:.0f} |")
    clear = {s: sum(((r.get("halluc_change") or {}).get(s) or {}).get("ci", [0, 0])[1] < 0 for r in runs)
             for s in ("dpo", "ppo")}
    return rows + [
        "", f"Seeds tried: {len(runs)} ({', '.join(str(r['seed']) for r in runs)}); seeds meeting each target: "
        + ", ".join(f"{k.replace('_', ' ')} {v}/{len(runs)}" for k, v in met.items())
        + f"; hallucinated-object rate lower with a 95 % interval below zero: dpo {clear['dpo']}/{len(runs)}, "
        f"ppo {clear['ppo']}/{len(runs)}."]


def _change(run: dict[str, Any], stage: str) -> str:
    """An aligned stage's change of the hallucinated-object rate against its instruct model, in points, with
    the paired bootstrap interval (mobilemllm.evaluation.metrics.object_rate_change)."""
    c = (run.get("halluc_change") or {}).get(stage)
    if not c:
        return ""
    ci = c.get("ci")
    return f"{100 * c['change']:+.1f}" + (f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else "")


def _bench_table(report: dict[str, Any]) -> list[str]:
    """One row per case of a `mobilemllm bench --json` report (medians; × = decode speed-up over the
    report's reference case, eager PyTorch when it ran)."""
    rows = ["| backend | bundle | quantization | size MiB | load s | TTFT ms | prefill tok/s | decode tok/s | "
            "× reference (decode) | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]

    def med(case: dict[str, Any], metric: str) -> float | None:
        s = case["summary"].get(metric)
        return None if not s else s["median"]

    def num(v: float | None, fmt: str) -> str:
        return "–" if v is None else fmt.format(v)

    for c in report["cases"]:
        info = c["info"]
        size = None if info.get("size_bytes") is None else info["size_bytes"] / 2**20
        ttft = med(c, "ttft_s")
        rows.append(f"| {c['backend']} | {Path(c['target']).name} | {info.get('quantization', '–')} | "
                    f"{num(size, '{:.1f}')} | {num(c['load_s'], '{:.2f}')} | "
                    f"{num(None if ttft is None else ttft * 1000, '{:.0f}')} | "
                    f"{num(med(c, 'prefill_tok_s'), '{:,.0f}')} | {num(med(c, 'decode_tok_s'), '{:,.1f}')} | "
                    f"{num(c['ratios'].get('decode_tok_s'), '{:.2f}')} | "
                    f"{num(c['peak_rss_bytes'] / 2**20 if c.get('peak_rss_bytes') else None, '{:.0f}')} |")
    m = report["machine"]
    rows += ["", f"Run of {report['created'][:10]}: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
                 f"{m.get('threads', '?')} threads; {report['settings']['prompt_tokens']} prompt tokens + the image, "
                 f"{report['settings']['new_tokens']} new tokens, {report['settings']['warmup']} warm-up + "
                 f"{report['settings']['repeat']} runs."]
    return rows


def _bench_preset(files: dict[str, Any]) -> list[str]:
    return _bench_table(files["bench"])


def _med(case: dict[str, Any], metric: str) -> float | None:
    s = case["summary"].get(metric)
    return None if not s else s["median"]


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else fmt.format(v)


def _compare_rows(report: dict[str, Any]) -> list[str]:
    """One row per runtime of a `bench --compare` report: medians, decode with (p10–p90)."""
    rows = ["| runtime | quantization | size MiB | load s | image encode ms | prefill tok/s | TTFT ms | "
            "decode tok/s (p10–p90) | of bandwidth ceiling | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        info, dec, roof = c["info"], c["summary"].get("decode_tok_s"), c.get("roofline") or {}
        enc, ttft = _med(c, "image_encode_s"), _med(c, "ttft_s")
        spread = "" if not dec else f" ({dec['p10']:.1f}–{dec['p90']:.1f})"
        rows.append(f"| {c['label']} ({c['backend']}) | {info['quantization']} | "
                    f"{_num(info['size_bytes'] / 2**20 if info.get('size_bytes') else None, '{:,.0f}')} | "
                    f"{_num(c['load_s'], '{:.2f}')} | {_num(None if enc is None else enc * 1e3, '{:,.0f}')} | "
                    f"{_num(_med(c, 'prefill_tok_s'), '{:,.1f}')} | {_num(None if ttft is None else ttft * 1e3, '{:,.0f}')} | "
                    f"{_num(_med(c, 'decode_tok_s'), '{:.1f}')}{spread} | "
                    f"{_num(None if roof.get('fraction') is None else roof['fraction'] * 100, '{:.0f} %')}"
                    f"{_num(roof.get('ceiling_tok_s'), ' of {:.0f}')} | "
                    f"{_num(c['peak_rss_bytes'] / 2**20 if c.get('peak_rss_bytes') else None, '{:,.0f}')} |")
    return rows


def _compare_targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets for our ExecuTorch bundle, checked against the same run's numbers."""
    cases = report["cases"]
    ours = next((c for c in cases if c["backend"] == "executorch"), None)
    if ours is None:
        return []
    peers = [c for c in cases if c is not ours]
    llama = [c for c in peers if c["backend"] == "llamacpp" and _med(c, "image_encode_s")]

    def best(metric: str, pick=max) -> tuple[float | None, str]:
        got = [(_med(c, metric), c["label"]) for c in peers if _med(c, metric)]
        return pick(got) if got else (None, "—")

    dec, pre, enc = _med(ours, "decode_tok_s"), _med(ours, "prefill_tok_s"), _med(ours, "image_encode_s")
    peer_dec, peer_pre = best("decode_tok_s"), best("prefill_tok_s")
    llama_enc = min(((_med(c, "image_encode_s"), c["label"]) for c in llama), default=(None, "—"))

    def row(target: str, value: str, met: bool | None) -> str:
        return f"| {target} | {value} | {'—' if met is None else 'met' if met else '**missed**'} |"

    return ["", f"Targets for {ours['label']}, in this run:", "", "| target | measured | |", "|---|---|---|",
            row("decode ≥ 60 tok/s", _num(dec, "{:.1f} tok/s"), None if dec is None else dec >= 60),
            row("prefill ≥ 450 tok/s", _num(pre, "{:.1f} tok/s"), None if pre is None else pre >= 450),
            row("image encode faster than llama.cpp's",
                f"{_num(enc and enc * 1e3, '{:,.0f} ms')} vs {_num(llama_enc[0] and llama_enc[0] * 1e3, '{:,.0f} ms')} "
                f"({llama_enc[1]})", None if enc is None or llama_enc[0] is None else enc < llama_enc[0]),
            row("decode ahead of every peer", f"{_num(dec, '{:.1f}')} vs best peer {_num(peer_dec[0], '{:.1f}')} "
                f"({peer_dec[1]})", None if dec is None or peer_dec[0] is None else dec > peer_dec[0]),
            row("prefill ahead of every peer", f"{_num(pre, '{:.1f}')} vs best peer {_num(peer_pre[0], '{:.1f}')} "
                f"({peer_pre[1]})", None if pre is None or peer_pre[0] is None else pre > peer_pre[0])]


def _compare_profile(prof: dict[str, Any] | None, top: int = 4) -> list[str]:
    """The ExecuTorch bundle's phases, op kind by op kind (ETDump), and the decode step's bandwidth bound."""
    if not prof:
        return []
    rows = ["", f"Where the ExecuTorch bundle's time goes (ETDump through the devtools Inspector, "
                f"{prof['threads']} thread(s); each phase's {top} costliest operator kinds):", "",
            "| phase | wall ms | operator kinds (ms, share of the phase) |", "|---|---|---|"]
    for name, phase in prof["phases"].items():
        wall = phase["wall_ms"]
        ops = "; ".join(f"{op} {ms:,.1f} ({100 * ms / wall:.0f} %)" for op, ms in list(phase["ops_ms"].items())[:top])
        rows.append(f"| {name} | {wall:,.1f} | {ops} |")
    frac = prof.get("decode_fraction_of_bandwidth_bound")
    rows += ["", f"A decode step reads {prof['decode_bytes_per_token'] / 2**20:,.0f} MiB (weights + KV cache); at "
                 f"{prof['bandwidth_bytes_s'] / 1e9:.1f} GB/s that takes {prof['decode_bandwidth_bound_ms']:.1f} ms: "
                 f"the measured step runs at {_num(frac and frac * 100, '{:.0f} %')} of the bandwidth bound."]
    return rows


def _bench_compare(files: dict[str, Any]) -> list[str]:
    report = files["bench"]
    m, st = report["machine"], report["settings"]
    rows = _compare_rows(report)
    rows += ["", f"Run of {report['created'][:10]}: `--compare {st.get('compare', '?')}`, {st['order'] if 'order' in st else ''}; "
                 f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads; {st['prompt_tokens']} prompt tokens + the "
                 f"image, {st['new_tokens']} new tokens, {st['warmup']} warm-up + {st['repeat']} runs per runtime."]
    return rows + _compare_targets(report) + _compare_profile(files.get("profile"))



def _train_step_speed(files: dict[str, Any]) -> list[str]:
    """Seconds per instruct step of the tiny recipe per phase: the plain forward against the lean one and
    micro_batch_tokens (benchmarks/train_step_speed.py), with the ratio to the plain forward."""
    r = files["cpu"]
    names = {"curriculum": "curriculum (one-line questions)", "mixed": "mixed (conversations, captions, reworded questions)"}
    rows = ["| phase | plain forward, 64-row micro-batches | lean forward | lean + `micro_batch_tokens: 4096` (recipe) |",
            "|---|---|---|---|"]
    for phase, label in names.items():
        cells = [f"{r['median_s_per_step']['full'][phase]:.3f} s"]
        for setting in ("lean", "lean+tokens"):
            cells.append(f"{r['median_s_per_step'][setting][phase]:.3f} s ({r['ratio_to_full'][setting][phase]:.2f} x)")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def _vision_attention(files: dict[str, Any]) -> list[str]:
    """The ExecuTorch image encode traced with SDPA and with eager attention (benchmarks/vision_attention.py)."""
    r = files["report"]
    enc = r["image_encode_s"]
    rows = ["| vision encoder traced with | image encode ms (median) | runs ms |", "|---|---|---|"]
    for name, label in (("sdpa", "SDPA (before)"), ("eager", "eager attention (now)")):
        rows.append(f"| {label} | {1000 * enc[name]['median']:,.0f} | "
                    + ", ".join(f"{1000 * t:,.0f}" for t in enc[name]["all"]) + " |")
    return rows + ["", f"{enc['sdpa']['median'] / enc['eager']['median']:.1f}x faster at {r['threads']} threads "
                       f"({r['quantization']}, `{r['preset']}` shapes, random weights; outputs within "
                       f"{100 * r['max_rel_diff_eager_vs_sdpa']:.1f} % of each other's largest value)."]


SPECS: dict[str, Spec] = {
    "train-bench-h100": Spec(
        "train_bench_h100", "OUT=docs/results/train_bench_h100 bash benchmarks/gpu_train_bench.sh",
        "one NVIDIA H100 80GB, torch 2.11 + CUDA 13, bf16 autocast, MobileVLM V2 1.7B shapes (random weights), "
        "513-token samples", _train_bench),
    "tiny-pipeline": Spec(
        "tiny_pipeline", "mobilemllm train --recipe tiny --out runs/fixture0 seed=0 num_threads=2  (results: "
        "runs/fixture0/results.json)",
        "x86_64 AMD EPYC VM, 2 cores (2 threads), no GPU; torch 2.13.0; the box otherwise idle but for a test "
        "process at nice 19. The test suite's fixture (tests/_trained.py) trains the same stages to bit-identical "
        "weights; this run's foundations stage was reused from a run of the same settings made minutes before "
        "(its time from that run)",
        _tiny_alignment),
    "tiny-seeds": Spec(
        "tiny_seeds", "mobilemllm train --recipe tiny --out runs/b$S seed=$S num_threads=1 for S in 1 2 3 4 (two at "
        "a time), seed 0 the tiny-pipeline run above; python -m mobilemllm.training.seeds runs/fixture0 runs/b1 "
        "runs/b2 runs/b3 runs/b4 > docs/results/tiny_seeds/seeds.json",
        "x86_64 AMD EPYC VM, 2 cores, no GPU; torch 2.13.0. Seeds 1-4 trained two side by side at one thread each "
        "(seeds 3 and 4 for a while beside three more jobs), so their wall times are not the budget's; each "
        "seed's foundations stage was reused from a run of the same settings made before (its time from that run)",
        _tiny_seeds),
    "train-step-speed": Spec(
        "train_step_speed", "python benchmarks/train_step_speed.py --run runs/fixture0 --threads 2 --steps 20 "
        "--rounds 6 --json docs/results/train_step_speed/cpu.json",
        "x86_64 AMD EPYC VM, 2 cores (2 threads), no GPU, otherwise idle; torch 2.13.0; median over 120 steps "
        "per phase and setting, the settings alternating within each round, each leading one round in turn",
        _train_step_speed),
    "vision-attention": Spec(
        "vision_attention_1.4b", "python benchmarks/vision_attention.py --preset mobilellama-1.4b --threads 2 "
        "--repeat 5 --json docs/results/vision_attention_1.4b/report.json",
        "x86_64 AMD EPYC VM, 2 cores, 24 GB, no GPU, otherwise idle (load average in the JSON); torch 2.13.0, "
        "executorch 1.5.1", _vision_attention),
    "bench-preset": Spec(
        "bench_preset", "OUT=/tmp/bench-preset bash benchmarks/bench_preset.sh  (report: $OUT/bench.json)",
        "x86_64 AMD EPYC VM, 2 cores, 24 GB, no GPU, shared with other jobs during the run (load average ~4: "
        "absolute numbers are pessimistic, compare within the table); torch 2.13.0, executorch 1.5.1, "
        "onnxruntime 1.32",
        _bench_preset),
    "compare-mobilellama": Spec(
        "bench_compare_1.4b",
        "mobilemllm bench --model mobilellama-1.4b --compare executorch:group=128,onnx:decoder=genai,gguf:q4_0,"
        "gguf:q4_k_m --threads 2 --prompt-tokens 128 --new-tokens 128 --warmup 1 --repeat 3 --force --cache runs/compare "
        "--json docs/results/bench_compare_1.4b/bench.json  (bundles exported with --force: random weights; "
        "profile: python -m mobilemllm.bench.profile BUNDLE --threads 2 --prompt-tokens 128 --json "
        "docs/results/bench_compare_1.4b/profile.json)",
        "x86_64 AMD EPYC VM, 2 cores, 24 GB, no GPU, otherwise idle (load average 0.8 before the run, 2.3 after it: "
        "its own two threads); torch 2.13.0, executorch 1.5.1, onnxruntime 1.32, onnxruntime-genai 0.18, "
        "llama-cpp-python 0.3.36 with the CLIP class-token fix (scripts/install_llama_cpp.py)",
        _bench_compare),
}


def render(name: str) -> str:
    """The block body for ``name``: the table, then where its numbers come from."""
    spec = SPECS[name]
    lines = spec.render(_load(spec.folder))
    lines += ["", f"Raw results: [docs/results/{spec.folder}/](docs/results/{spec.folder}); "
                  f"command: `{spec.command}`; machine: {spec.machine}."]
    return "\n".join(lines) + "\n"


def _relink(body: str, md: Path) -> str:
    """Links in a block are written relative to the repo root; make them relative to ``md``'s folder."""
    if md.parent == ROOT:
        return body
    return body.replace("](docs/results/", "](results/")


def process(md: Path, check: bool) -> list[str]:
    """Re-render every block of ``md``; returns the names of blocks that differed."""
    text = md.read_text()
    stale: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in SPECS:
            raise SystemExit(f"{md}: unknown results block {name!r}; known: {', '.join(SPECS)}")
        body = _relink(render(name), md)
        if body != m.group("body"):
            stale.append(name)
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(sub, text)
    if stale and not check:
        md.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report stale blocks and exit 1 instead of rewriting")
    args = ap.parse_args(argv)
    stale = {}
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        names = process(md, args.check)
        if names:
            stale[md.relative_to(ROOT).as_posix()] = names
    for where, names in stale.items():
        print(f"{where}: {'stale' if args.check else 'rendered'} {', '.join(names)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
