"""Held-out VQA accuracy of a checkpoint by question type and by the number of shapes in the image.

    python benchmarks/tiny_vqa_by_shapes.py runs/tiny/instruct runs/tiny/data/eval
"""
import json, sys, collections, torch
from pathlib import Path
from mobilemllm.models.checkpoint import load_checkpoint
from mobilemllm.evaluation.run import _Runner, _questions
from mobilemllm.evaluation.metrics import exact_match
ck = sys.argv[1]; data = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/qs/train/data/eval")
model, tok = load_checkpoint(ck); model.eval()
scenes = {s["id"]: s for s in json.load(open(data / "scenes.json"))}
qs = _questions(data / "eval_questions.json", None)
torch.set_num_threads(2)
with torch.no_grad():
    preds = _Runner(model, tok, data / "images", 256).answers([(q["image"], q["question"]) for q in qs], 8)
tab = collections.defaultdict(list)
for q, p in zip(qs, preds):
    n = len(scenes[q["image"].rsplit(".", 1)[0]]["shapes"])
    tab[(q["type"], n)].append(exact_match(p, q["answer"]))
    tab[(q["type"], 0)].append(exact_match(p, q["answer"]))
for t in ("colour", "kind", "count", "position", "existence"):
    print(t, " ".join(f"n{n}:{sum(tab[(t,n)])/max(1,len(tab[(t,n)])):.2f}({len(tab[(t,n)])})" for n in range(0, 5)))
allh = [exact_match(p, q["answer"]) for q, p in zip(qs, preds)]
print("overall", sum(allh) / len(allh))
