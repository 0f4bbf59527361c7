"""Can the tiny LLaMA learn the shapes world's questions when the image is *perfect* symbols?

A diagnostic for issue 3 (docs/training.md): the vision tower and connector are replaced by visual tokens
that are sums of learned colour, kind and grid-position embeddings (4 tokens, one per quadrant, or 16, a
4x4 grid with 2x2 tokens per shape, like the tiny model's), followed or preceded by the question's words;
the tiny preset's LLaMA (4 layers x 128) answers with one word. Every question type of the held-out
evaluation (seed-1 scenes) is printed as training goes.

    python benchmarks/tiny_symbolic_lookup.py --layout image-first --tokens 16 --steps 3000
    python benchmarks/tiny_symbolic_lookup.py --layout question-first --tokens 16 --steps 3000

On the 2-core CPU (2026-11-27, batch 64, lr 1e-3 constant): image first, 4 tokens, 3000 steps: colour,
kind, count 100 %, position 0.82, existence 0.45 (a constant answer). Question first (the question's
words, the image, then "?" again): 4 tokens, all five types 100 % from step ~1250; 16 tokens from ~1900,
after a plateau at existence 0.47-0.53. See vicuna_short_qfirst in mobilemllm/templates.py.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch import nn

from mobilemllm.config import LLMConfig
from mobilemllm.data.shapes import COLOURS, KINDS, POSITIONS, QUESTION_TYPES, ask, sample_scene
from mobilemllm.models.llm import build_llm

COLOUR_LIST = list(COLOURS)


class SymbolicWorld:
    """Scenes -> (colour ids, kind ids per visual token, question word ids, answer word id, type)."""

    def __init__(self, tokens: int):
        if tokens not in (4, 16):
            raise SystemExit("--tokens must be 4 or 16")
        self.tokens = tokens
        words = ["<pad>", "<bos>", "?"] + COLOUR_LIST + list(KINDS) + "top bottom left right yes no 1 2 3 4".split()
        words += "what colour is the shape in where there a how many shapes are".split()
        self.vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}

    def words(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.lower().replace("?", " ?").split()]

    def cells(self, position: str) -> list[int]:
        p = POSITIONS.index(position)
        if self.tokens == 4:
            return [p]
        row, col = divmod(p, 2)
        return [(2 * row + a) * 4 + 2 * col + b for a in (0, 1) for b in (0, 1)]

    def example(self, rng: random.Random, idx: int, seed: int, fixed_questions: bool = False):
        scene = sample_scene(random.Random(f"scene:{seed}:{idx}") if fixed_questions else rng, idx, seed)
        q = None
        while q is None:
            qtype = rng.choice(QUESTION_TYPES)
            # fixed: one question per type per scene, like the data files (eval_questions.json)
            q = ask(scene, random.Random(f"q:{seed}:{idx}:{qtype}") if fixed_questions else rng, qtype)
        colours, kinds = [len(COLOURS)] * self.tokens, [len(KINDS)] * self.tokens
        for s in scene.shapes:
            for c in self.cells(s.position):
                colours[c], kinds[c] = COLOUR_LIST.index(s.colour), KINDS.index(s.kind)
        return colours, kinds, self.words(q.text), self.words(q.answer)[0], q.type


class Model(nn.Module):
    def __init__(self, world: SymbolicWorld, hidden: int, layers: int, heads: int, image_std: float = 0.5):
        super().__init__()
        self.world = world
        self.llm = build_llm(LLMConfig(vocab_size=64, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                       intermediate_size=3 * hidden, max_position_embeddings=256,
                                       tie_word_embeddings=True))
        self.colour = nn.Embedding(len(COLOURS) + 1, hidden)  # + "no shape"
        self.kind = nn.Embedding(len(KINDS) + 1, hidden)
        self.cell = nn.Embedding(world.tokens, hidden)
        for e in (self.colour, self.kind, self.cell):
            nn.init.normal_(e.weight, std=image_std)

    def forward(self, colours, kinds, question, question_first: bool):
        emb = self.llm.get_input_embeddings()
        n = colours.shape[0]
        image = self.colour(colours) + self.kind(kinds) + self.cell.weight[None]
        bos = emb(torch.full((n, 1), self.world.vocab["<bos>"]))
        if question_first:  # question, image, then "?" again where the answer is read
            x = torch.cat([bos, emb(question), image, emb(question[:, -1:])], 1)
        else:
            x = torch.cat([bos, image, emb(question)], 1)
        return self.llm(inputs_embeds=x).logits[:, -1]


def batch(world: SymbolicWorld, rng: random.Random, n: int, seed: int, start: int, scenes: int = 0):
    """``n`` examples: scenes start, start + 1, ... (a fresh stream), or drawn from the first ``scenes``
    scenes with one fixed question per type each (a finite data set, as the real pipeline's)."""
    if scenes:
        exs = [world.example(rng, rng.randrange(scenes), seed, fixed_questions=True) for _ in range(n)]
    else:
        exs = [world.example(rng, start + i, seed) for i in range(n)]
    width = max(len(e[2]) for e in exs)
    pad = world.vocab["<pad>"]
    question = torch.tensor([[pad] * (width - len(e[2])) + e[2] for e in exs])  # left-padded
    return (torch.tensor([e[0] for e in exs]), torch.tensor([e[1] for e in exs]), question,
            torch.tensor([e[3] for e in exs]), [e[4] for e in exs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=["image-first", "question-first"], default="question-first")
    ap.add_argument("--tokens", type=int, default=16, help="visual tokens: 4 (one per quadrant) or 16 (4x4 grid)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=250, help="evaluate every N steps")
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=0,
                    help="train on a finite set of this many scenes with one question per type each (0: a "
                         "fresh scene for every example)")
    ap.add_argument("--image-std", type=float, default=0.5,
                    help="initial std of the symbol embeddings (text embeddings: 0.02); large values mimic "
                         "connector outputs far above the text scale")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    world = SymbolicWorld(args.tokens)
    model = Model(world, args.hidden, args.layers, args.heads, args.image_std)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    qf = args.layout == "question-first"
    held_out = batch(world, random.Random(7), args.eval_size, 1, 0)  # seed-1 scenes, as the evaluation split
    rng, t0 = random.Random(args.seed), time.time()
    for step in range(1, args.steps + 1):
        colours, kinds, question, answer, _ = batch(world, rng, args.batch, 0, step * args.batch, args.scenes)
        loss = nn.functional.cross_entropy(model(colours, kinds, question, qf), answer)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                colours, kinds, question, answer, types = held_out
                right = (model(colours, kinds, question, qf).argmax(-1) == answer).tolist()
            acc = {t: [r for r, ty in zip(right, types) if ty == t] for t in QUESTION_TYPES}
            print(f"step {step:5d}  loss {loss.item():.3f}  "
                  + "  ".join(f"{t} {sum(v) / max(len(v), 1):.2f}" for t, v in acc.items())
                  + f"  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
