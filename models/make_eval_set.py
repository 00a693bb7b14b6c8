#!/usr/bin/env python3
"""Writes `csp-llava eval` cases from the easy-vqa TEST split (never used in training):

  single.jsonl        single-image questions (a seeded sample of the test questions)
  multi-K{4,8,16}.jsonl  K images; a question about one of them by its number
                      ("In image 3, what color is the shape?"), and in a quarter of the cases a
                      question that needs two images ("Do image 2 and image 7 have the same color?")
  tasks-K{4,8,16}.jsonl  K images, --n cases of each task, in this order:
                      image-k  "In image 3, what color is the shape?" -> "blue"
                      compare  "Do image 2 and image 7 have the same shape?" -> "yes"/"no" (half "yes")
                      count    "How many images show a red shape?" / "... a circle?" -> "3" (a digit)
                      find     "Which image shows a blue circle?" -> "Image 4" (exactly one matches)
  enum-K{4,8,16}.jsonl   K images, "Describe each image." -> the full expected answer
                      "Image 1: red circle. Image 2: blue triangle. ... Image K: gray rectangle."
                      (per-image accuracy: parse "Image k: <color> <shape>." from the answer)

  questions-K{4,8,16}.jsonl  K images and three questions (image-k, count, find — or compare where
                      no image is unique) asked of one pruned cache: eval's protocol (3)

Every case (but the questions-K* ones, which have "questions") has {"id", "images", "prompt", "answer", "task"} (task: single, image-k, compare, count,
find, enum). single.jsonl and multi-K*.jsonl are the same as before for a seed (the new files draw
from a second generator seeded from --seed).

Deterministic from --seed; use another seed for a held-out set no setting is tuned on. Paths are
relative to the output directory (models/cache/easy-vqa by default). Pure Python, no dependencies.

  python3 models/make_eval_set.py --seed 1 --n 60 --out models/cache/easy-vqa/eval-seed1
  (enum-K16 answers are ~120 tokens: evaluate them with -n 160)
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
            f.write(json.dumps({"id": f"s{n}", "images": [rel(i)], "prompt": q, "answer": a, "task": "single"}) + "\n")
    for k in (4, 8, 16):
        with open(os.path.join(out, f"multi-K{k}.jsonl"), "w") as f:
            for n in range(args.n):
                imgs = rng.sample(ids, k)
                if n % 4 == 3:
                    x, y = sorted(rng.sample(range(k), 2))
                    what = rng.choice(["color", "shape"])
                    lab = color if what == "color" else shape
                    case = {"prompt": f"Do image {x + 1} and image {y + 1} have the same {what}?",
                            "answer": "yes" if lab[imgs[x]] == lab[imgs[y]] else "no", "task": "compare"}
                else:
                    t = rng.randrange(k)
                    q, a = rng.choice(by_image[imgs[t]])
                    case = {"prompt": f"In image {t + 1}, {q}", "answer": a, "task": "image-k"}
                f.write(json.dumps({"id": f"K{k}-{n}", "images": [rel(i) for i in imgs], **case}) + "\n")
    # the new task files: a second generator, so the files above stay as they were for a seed
    rng = random.Random(f"tasks-{args.seed}")
    for k in (4, 8, 16):
        with open(os.path.join(out, f"tasks-K{k}.jsonl"), "w") as f:
            for task in ("image-k", "compare", "count", "find"):
                n = 0
                while n < args.n:
                    imgs = rng.sample(ids, k)
                    if task == "image-k":
                        t = rng.randrange(k)
                        q, a = rng.choice(by_image[imgs[t]])
                        case = {"prompt": f"In image {t + 1}, {q}", "answer": a}
                    elif task == "compare":
                        what = rng.choice(["color", "shape"])
                        lab = color if what == "color" else shape
                        pairs = [(x, y) for x in range(k) for y in range(x + 1, k)]
                        want = n % 2 == 0          # half "yes"
                        pool = [p for p in pairs if (lab[imgs[p[0]]] == lab[imgs[p[1]]]) == want]
                        if not pool:
                            continue
                        x, y = rng.choice(pool)
                        case = {"prompt": f"Do image {x + 1} and image {y + 1} have the same {what}?", "answer": "yes" if want else "no"}
                    elif task == "count":
                        if n % 2 == 0:
                            c = color[rng.choice(imgs)] if rng.random() < 0.5 else rng.choice(COLORS)
                            case = {"prompt": f"How many images show a {c} shape?", "answer": str(sum(color[x] == c for x in imgs))}
                        else:
                            c = shape[rng.choice(imgs)] if rng.random() < 0.5 else rng.choice(SHAPES)
                            case = {"prompt": f"How many images show a {c}?", "answer": str(sum(shape[x] == c for x in imgs))}
                    else:
                        combos = [(color[x], shape[x]) for x in imgs]
                        unique = [c for c in combos if combos.count(c) == 1]
                        if not unique:
                            continue
                        c = rng.choice(unique)
                        case = {"prompt": f"Which image shows a {c[0]} {c[1]}?", "answer": f"Image {combos.index(c) + 1}"}
                    f.write(json.dumps({"id": f"{task}-K{k}-{n}", "images": [rel(i) for i in imgs], **case, "task": task}) + "\n")
                    n += 1
        with open(os.path.join(out, f"enum-K{k}.jsonl"), "w") as f:
            for n in range(args.n):
                imgs = rng.sample(ids, k)
                ans = " ".join(f"Image {j + 1}: {color[x]} {shape[x]}." for j, x in enumerate(imgs))
                f.write(json.dumps({"id": f"enum-K{k}-{n}", "images": [rel(i) for i in imgs], "prompt": "Describe each image.",
                                    "answer": ans, "task": "enum"}) + "\n")
    # protocol (3): three questions about the same images, asked of one pruned cache (a third
    # generator: the files above stay as they were for a seed)
    rng = random.Random(f"questions-{args.seed}")
    for k in (4, 8, 16):
        with open(os.path.join(out, f"questions-K{k}.jsonl"), "w") as f:
            for n in range(args.n):
                imgs = rng.sample(ids, k)
                t = rng.randrange(k)
                q, a = rng.choice(by_image[imgs[t]])
                c = color[rng.choice(imgs)]
                questions = [{"prompt": f"In image {t + 1}, {q}", "answer": a},
                             {"prompt": f"How many images show a {c} shape?", "answer": str(sum(color[x] == c for x in imgs))}]
                combos = [(color[x], shape[x]) for x in imgs]
                unique = [u for u in combos if combos.count(u) == 1]
                if unique:
                    u = rng.choice(unique)
                    questions.append({"prompt": f"Which image shows a {u[0]} {u[1]}?", "answer": f"Image {combos.index(u) + 1}"})
                else:
                    x, y = sorted(rng.sample(range(k), 2))
                    questions.append({"prompt": f"Do image {x + 1} and image {y + 1} have the same shape?",
                                      "answer": "yes" if shape[imgs[x]] == shape[imgs[y]] else "no"})
                f.write(json.dumps({"id": f"questions-K{k}-{n}", "images": [rel(i) for i in imgs], "questions": questions,
                                    "task": "multi-question"}) + "\n")
    print(out)


if __name__ == "__main__":
    main()
