#!/usr/bin/env python3
"""Writes `csp-llava eval` cases from the easy-vqa TEST split (never used in training):

  single.jsonl        single-image questions (a seeded sample of the test questions)
  multi-K{4,8,16}.jsonl  K images; a question about one of them by its number
                      ("In image 3, what color is the shape?"), and in a quarter of the cases a
                      question that needs two images ("Do image 2 and image 7 have the same color?")

Deterministic from --seed; use another seed for a held-out set no setting is tuned on. Paths are
relative to the output directory (models/cache/easy-vqa by default). Pure Python, no dependencies.

  python3 models/make_eval_set.py --seed 1 --n 60 --out models/cache/easy-vqa/eval-seed1
"""
import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = ["red", "green", "blue", "yellow", "teal", "brown", "gray", "black"]
SHAPES = ["circle", "rectangle", "triangle"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "cache", "easy-vqa"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=60, help="cases per multi-image file")
    ap.add_argument("--n-single", type=int, default=200, help="single-image cases")
    args = ap.parse_args()
    out = args.out or os.path.join(args.data, f"eval-seed{args.seed}")
    os.makedirs(out, exist_ok=True)
    qs = json.load(open(os.path.join(args.data, "test", "questions.json")))
    color, shape, by_image = {}, {}, {}
    for q, a, i in qs:
        by_image.setdefault(i, []).append((q, a))
        if a in COLORS and "color" in q:
            color[i] = a
        if a in SHAPES and q.startswith("what") and "color" not in q:
            shape[i] = a
    ids = sorted(i for i in by_image if i in color and i in shape)
    rel = lambda i: os.path.relpath(os.path.join(args.data, "test", "images112", f"{i}.png"), out)
    rng = random.Random(args.seed)
    with open(os.path.join(out, "single.jsonl"), "w") as f:
        for n, (q, a, i) in enumerate(rng.sample(qs, args.n_single)):
            f.write(json.dumps({"id": f"s{n}", "images": [rel(i)], "prompt": q, "answer": a}) + "\n")
    for k in (4, 8, 16):
        with open(os.path.join(out, f"multi-K{k}.jsonl"), "w") as f:
            for n in range(args.n):
                imgs = rng.sample(ids, k)
                if n % 4 == 3:
                    x, y = sorted(rng.sample(range(k), 2))
                    what = rng.choice(["color", "shape"])
                    lab = color if what == "color" else shape
                    case = {"prompt": f"Do image {x + 1} and image {y + 1} have the same {what}?",
                            "answer": "yes" if lab[imgs[x]] == lab[imgs[y]] else "no"}
                else:
                    t = rng.randrange(k)
                    q, a = rng.choice(by_image[imgs[t]])
                    case = {"prompt": f"In image {t + 1}, {q}", "answer": a}
                f.write(json.dumps({"id": f"K{k}-{n}", "images": [rel(i) for i in imgs], **case}) + "\n")
    print(out)


if __name__ == "__main__":
    main()
