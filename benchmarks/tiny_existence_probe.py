"""Does the answer to "Is there a X?" depend on X and on the image? Logit margin yes - no at the answer token.

    python benchmarks/tiny_existence_probe.py runs/tiny/instruct runs/tiny/data/eval

For held-out images with 1 and 2 shapes, asks about each of the 24 objects and prints the mean margin for
present and absent objects and how often a present object's margin beats an absent one's (0.5 = no
dependence on the object at all), then the spread of the margin across images and across asked objects.
"""
import collections
import json
import statistics
import sys
from pathlib import Path

import torch

from mobilemllm.data.images import load_image, preprocess
from mobilemllm.data.shapes import OBJECTS
from mobilemllm.inference import prompt_ids
from mobilemllm.models.checkpoint import load_checkpoint

ck, data = sys.argv[1], Path(sys.argv[2])
model, tok = load_checkpoint(ck)
model.eval()
torch.set_num_threads(2)
# the tiny BPE writes " yes" as "Ġ" + "yes": the decision is made at the token after the space
space, yes, no = (tok.convert_tokens_to_ids(t) for t in ("Ġ", "yes", "no"))
scenes = json.load(open(data / "scenes.json"))
spread: dict[str, list[float]] = collections.defaultdict(list)
for nshapes in (1, 2):
    present, absent = [], []
    for s in [s for s in scenes if len(s["shapes"]) == nshapes][:20]:
        pix = preprocess(load_image(data / "images" / (s["id"] + ".png")), model.config.vision).unsqueeze(0)
        objs = {f'{x["colour"]} {x["kind"]}' for x in s["shapes"]}
        with torch.no_grad():
            for o in OBJECTS:
                ids = torch.tensor([prompt_ids(model.config, tok, f"Is there a {o}?") + [space]])
                logits = model(input_ids=ids, pixel_values=pix).logits[0, -1]
                m = (logits[yes] - logits[no]).item()
                (present if o in objs else absent).append(m)
                spread[s["id"]].append(m)
    auc = sum(p > a for p in present for a in absent) / (len(present) * len(absent))
    print(f"{nshapes} shape(s): margin present {statistics.mean(present):.3f} (n={len(present)}), "
          f"absent {statistics.mean(absent):.3f} (n={len(absent)}), P(present > absent) {auc:.3f}")
means = [statistics.mean(v) for v in spread.values()]
print(f"mean margin per image: {min(means):.3f} .. {max(means):.3f}; "
      f"largest spread within one image: {max(max(v) - min(v) for v in spread.values()):.4f}")
