"""Can the tiny LLaMA learn the shapes world's questions from a trained model's *real* visual tokens?

The companion of tiny_symbolic_lookup.py (issue 3, docs/training.md): the visual tokens are those of a run's
checkpoint (vision tower + connector, frozen, on the run's own train and held-out images), times
``--scale`` after a trainable linear map; the question uses the symbolic script's word vocabulary and
layout, and a fresh LLaMA of the tiny preset's shape answers with one word. Training questions are one per
type per training scene (as eval_questions.json); the held-out split asks five per scene.

    python benchmarks/tiny_real_token_lookup.py runs/P/pretrain --scale 10 --steps 2500

On the 2-core CPU (2026-11-27, one thread, batch 64, lr 1e-3): the tokens of a patch_merger + "patches"
foundation run (4 tokens, norm 1.25 after the output norm; text embeddings start at 0.23): with
--scale 10, colour 1.00 from step 500, kind 0.90-0.94, position 1.00 and existence 0.94-0.97 from step
~1750-2250 (215 s); with --scale 1 after 2500 steps colour 0.66, kind 0.53, position 0.65, existence 0.48.
So those tokens carry everything the questions need, and their scale against the text decides how fast it
is learned.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_symbolic_lookup import Model, SymbolicWorld  # noqa: E402

from mobilemllm.data.images import load_image, preprocess  # noqa: E402
from mobilemllm.data.shapes import QUESTION_TYPES, Scene, ask  # noqa: E402
from mobilemllm.models.checkpoint import load_checkpoint  # noqa: E402


def visual_tokens(vlm, data: Path) -> tuple[list[Scene], torch.Tensor]:
    scenes = [Scene.from_dict(s) for s in json.loads((data / "scenes.json").read_text())]
    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), 200):
            pix = torch.stack([preprocess(load_image(data / "images" / f"{s.id}.png"), vlm.config.vision)
                               for s in scenes[i:i + 200]])
            out.append(vlm.encode_images(pix))
    return scenes, torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run's checkpoint folder, e.g. runs/tiny/pretrain (its run folder "
                                       "holds data/train and data/eval)")
    ap.add_argument("--scale", type=float, default=10.0, help="multiply the (linearly mapped) visual tokens")
    ap.add_argument("--layout", choices=["image-first", "question-first"], default="question-first")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    ckpt = Path(args.checkpoint)
    vlm, _ = load_checkpoint(ckpt)
    vlm.eval()
    train_scenes, train_v = visual_tokens(vlm, ckpt.parent / "data" / "train")
    eval_scenes, eval_v = visual_tokens(vlm, ckpt.parent / "data" / "eval")
    print(f"visual tokens {tuple(train_v.shape)}, mean norm {train_v.norm(dim=-1).mean():.2f}", flush=True)
    world = SymbolicWorld(4)
    model = Model(world, 128, 4, 4)
    proj = nn.Linear(train_v.shape[-1], 128)
    params = list(model.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    qf = args.layout == "question-first"

    def example(scenes, i, rng, fixed):
        q = None
        while q is None:
            t = rng.choice(QUESTION_TYPES)
            q = ask(scenes[i], random.Random(f"q:{i}:{t}") if fixed else rng, t)
        return world.words(q.text), world.words(q.answer)[0], q.type

    def forward(v, questions):
        emb = model.llm.get_input_embeddings()
        width, pad = max(len(q) for q in questions), world.vocab["<pad>"]
        question = torch.tensor([[pad] * (width - len(q)) + q for q in questions])
        image = proj(v) * args.scale
        bos = emb(torch.full((v.shape[0], 1), world.vocab["<bos>"]))
        parts = [bos, emb(question), image, emb(question[:, -1:])] if qf else [bos, image, emb(question)]
        return model.llm(inputs_embeds=torch.cat(parts, 1)).logits[:, -1]

    erng = random.Random(7)
    held = [(i,) + example(eval_scenes, i, erng, False) for i in range(len(eval_scenes)) for _ in range(5)]
    rng, t0 = random.Random(args.seed), time.time()
    for step in range(1, args.steps + 1):
        idx = [rng.randrange(len(train_scenes)) for _ in range(args.batch)]
        exs = [example(train_scenes, i, rng, True) for i in idx]
        loss = nn.functional.cross_entropy(forward(train_v[idx], [e[0] for e in exs]),
                                           torch.tensor([e[1] for e in exs]))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                pred = forward(eval_v[[h[0] for h in held]], [h[1] for h in held]).argmax(-1)
            right = (pred == torch.tensor([h[2] for h in held])).tolist()
            acc = {t: [r for r, h in zip(right, held) if h[3] == t] for t in QUESTION_TYPES}
            print(f"step {step:5d}  loss {loss.item():.3f}  "
                  + "  ".join(f"{t} {sum(v) / max(len(v), 1):.2f}" for t, v in acc.items())
                  + f"  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
