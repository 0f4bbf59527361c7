"""Linear probes of a run's visual tokens: does each quadrant's token say the shape's colour and kind?

    python benchmarks/tiny_token_probe.py runs/tiny pretrain instruct

For each checkpoint (a stage folder of the run), the visual tokens of 1000 training images (run/data/train)
train one logistic-regression probe per quadrant on all tokens concatenated (7 colour classes: 6 + "no
shape"; 5 kind classes), tested on the 200 held-out images (run/data/eval). Needs runs with 4 visual
tokens or more. Prints the mean token norm and the probes' held-out accuracy (all quadrants, empty ones
included: kind chance ~0.4 with the empty class).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mobilemllm.data.images import load_image, preprocess
from mobilemllm.data.shapes import COLOURS, KINDS, POSITIONS
from mobilemllm.models.checkpoint import load_checkpoint


def features(model, data: Path, n: int):
    scenes = json.loads((data / "scenes.json").read_text())[:n]
    xs, colours, kinds = [], [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 100):
            chunk = scenes[i:i + 100]
            pix = torch.stack([preprocess(load_image(data / "images" / f'{s["id"]}.png'), model.config.vision)
                               for s in chunk])
            xs.append(model.encode_images(pix))
            for s in chunk:
                at = {x["position"]: x for x in s["shapes"]}
                colours.append([list(COLOURS).index(at[p]["colour"]) if p in at else len(COLOURS) for p in POSITIONS])
                kinds.append([KINDS.index(at[p]["kind"]) if p in at else len(KINDS) for p in POSITIONS])
    return torch.cat(xs), torch.tensor(colours), torch.tensor(kinds)


def probe(x_train, y_train, x_test, y_test, classes: int) -> float:
    a, b = x_train.flatten(1), x_test.flatten(1)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    accs = []
    for q in range(len(POSITIONS)):
        w = torch.zeros(a.shape[1], classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, bias], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(a @ w + bias, y_train[:, q]) + 1e-3 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        accs.append(((b @ w + bias).argmax(1) == y_test[:, q]).float().mean().item())
    return sum(accs) / len(accs)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    run = Path(sys.argv[1])
    torch.set_num_threads(1)
    for stage in sys.argv[2:] or ["pretrain", "instruct"]:
        model, _ = load_checkpoint(run / stage)
        model.eval()
        xtr, ctr, ktr = features(model, run / "data" / "train", 1000)
        xte, cte, kte = features(model, run / "data" / "eval", 200)
        print(f"{run.name} {stage}: {xtr.shape[1]} tokens, norm {xtr.norm(dim=-1).mean():.1f}, colour "
              f"{probe(xtr, ctr, xte, cte, len(COLOURS) + 1):.3f}, kind {probe(xtr, ktr, xte, kte, len(KINDS) + 1):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
