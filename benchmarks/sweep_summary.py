"""Summarise the runs of a tiny sweep (benchmarks/tiny_sweep.sh): held-out VQA by question type, caption
hallucination, and the instruct loss curve (mean loss per window of steps), one line per run.
    python benchmarks/sweep_summary.py /tmp/sweepruns [--window 250]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="folder of run folders (each one `mobilemllm train --out`)")
    ap.add_argument("--window", type=int, default=250, help="steps per loss-curve window")
    args = ap.parse_args()
    for run in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        line = [run.name]
        ev = run / "instruct" / "eval.json"
        if ev.exists():
            e = json.loads(ev.read_text()).get("report", {})
            vqa = e.get("vqa", {})
            by = " ".join(f"{k} {v * 100:.0f}" for k, v in sorted(vqa.get("by_type", {}).items()))
            cap = e.get("captions", {})
            pope = e.get("pope", {}).get("adversarial", {})
            line.append(f"vqa {vqa.get('accuracy', 0) * 100:.1f} % ({by}) caption halluc. obj "
                        f"{cap.get('object_rate', float('nan')) * 100:.1f} % recall {cap.get('recall', 0) * 100:.0f} %"
                        f" POPE-adv acc {pope.get('accuracy', 0) * 100:.1f} %")
        else:
            line.append("no instruct eval")
        m = run / "logs" / "instruct" / "metrics.jsonl"
        if m.exists():
            rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
            curve = []
            for i in range(0, len(rows), args.window):
                seg = rows[i:i + args.window]
                curve.append(f"{seg[-1]['step']}:{sum(r['loss'] for r in seg) / len(seg):.3f}")
            line.append("loss " + " ".join(curve))
        print(" | ".join(line))


if __name__ == "__main__":
    main()
