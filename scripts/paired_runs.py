#!/usr/bin/env python3
"""Paired comparison of two `eval --cases-out` runs on the same cases (a setting against its
absence, e.g. protected sinks or `--obs-window all`): per policy x budget and metric, the mean of
B - A over the cases both ran, a 95 % paired-bootstrap interval (1,000 resamples, seeded), and
the cases where B / A is better. `eval`'s own `paired` compares policies within one run; this
compares runs.

  python3 scripts/paired_runs.py A.cases.jsonl B.cases.jsonl [--metric accuracy,kl] > table.md
"""
import argparse
import json
import random

LOWER_BETTER = {"kl", "perplexity"}


def load(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if not r.get("ok"):
            continue
        for p in r["results"]:
            out[(r["id"], p.get("question", 0), p["policy"], p["budget"])] = p
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--metric", default="accuracy,contains,kl")
    args = ap.parse_args()
    a, b = load(args.a), load(args.b)
    keys = sorted({(k[2], k[3] or "") for k in a} & {(k[2], k[3] or "") for k in b})
    print(f"A = `{args.a}`, B = `{args.b}`\n")
    print("| policy | budget | metric | n | A | B | B − A [95% CI] | B better / A better |")
    print("|---|---|---|---|---|---|---|---|")
    for pol, bud in keys:
        for m in args.metric.split(","):
            pairs = []
            for k, ra in a.items():
                if k[2] != pol or (k[3] or "") != bud or k not in b:
                    continue
                x, y = ra.get(m), b[k].get(m)
                if x is not None and y is not None:
                    pairs.append((x, y))
            if not pairs:
                continue
            d = [y - x for x, y in pairs]
            rng = random.Random(0)
            boots = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(1000))
            lo, hi = boots[25], boots[974]
            better = (lambda v: v < 0) if m in LOWER_BETTER else (lambda v: v > 0)
            nb = sum(better(v) for v in d)
            na = sum(better(-v) for v in d)
            ma = sum(x for x, _ in pairs) / len(pairs)
            mb = sum(y for _, y in pairs) / len(pairs)
            star = "" if lo <= 0 <= hi else " *"
            print(f"| {pol} | {bud or '–'} | {m} | {len(d)} | {ma:.3f} | {mb:.3f} | {sum(d) / len(d):+.3f} [{lo:+.3f}, {hi:+.3f}]{star} | {nb} / {na} |")


if __name__ == "__main__":
    main()
