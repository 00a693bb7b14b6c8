#!/usr/bin/env python3
"""Full-cache exact-match accuracy of a model on held-out easy-vqa cases, per task — the figures
issue 16 asks of the project's small VLM (single >= 0.80, "In image k" at K=8 >= 0.70, per-image
enumeration at K=8 >= 0.80).

  python3 models/make_eval_set.py --seed 5 --n 240 --n-single 240 --out /tmp/evs5   # held out
  python3 scripts/model_check.py /tmp/evs5 /tmp/check [--model models/cache/smolvlm-dino]

Runs `csp-llava eval --kv-policy full` on the first N cases of each set (environment SETS to
change them: name=file:task:n:n_predict, comma-separated) and prints one markdown row per set:
cases, accuracy with a 95% Wilson interval, and for enumeration the per-image accuracy. The
per-case answers stay in OUT/<name>.cases.jsonl (a rerun resumes).
"""
import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SETS = ("single=single.jsonl:single:240:8,image-k K8=tasks-K8.jsonl:image-k:100:8,"
                "image-k K16=tasks-K16.jsonl:image-k:30:8,enum K8=enum-K8.jsonl:enum:12:72")


def wilson(k, n, z=1.96):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "cache", "smolvlm-dino"))
    ap.add_argument("--exe", default=os.path.join(ROOT, "target", "release", "csp-llava"))
    ap.add_argument("--threads", default="2")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for spec in os.environ.get("SETS", DEFAULT_SETS).split(","):
        name, rest = spec.split("=")
        fname, task, n, npred = rest.split(":")
        src = os.path.join(args.data, fname)
        base = os.path.dirname(os.path.abspath(src))
        cases = []
        for line in open(src):
            c = json.loads(line)
            if c.get("task", task) != task:
                continue
            c["images"] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in c["images"]]
            cases.append(c)
            if len(cases) == int(n):
                break
        tag = name.replace(" ", "-")
        data = os.path.join(args.out, tag + ".data.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in cases)
        sub = os.path.join(args.out, tag + ".cases.jsonl")
        cmd = [args.exe, "eval", "-m", os.path.join(args.model, "text.gguf"), "--mmproj", os.path.join(args.model, "mmproj.gguf"),
               "--data", data, "--kv-policy", "full", "-n", npred, "-t", args.threads, "-o", "json", "--cases-out", sub]
        if os.path.exists(sub) and os.path.getsize(sub) > 0:
            cmd.append("--resume")
        print("model-check:", name, len(cases), "cases", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        acc, pia, ok = [], [], 0
        for line in open(sub):
            r = json.loads(line)
            if not r.get("ok"):
                continue
            ok += 1
            res = r["results"][0]
            acc.append(res["accuracy"])
            if res.get("per_image_accuracy") is not None:
                pia.append(res["per_image_accuracy"])
        k = sum(1 for a in acc if a >= 1.0)
        lo, hi = wilson(k, len(acc))
        extra = f"{sum(pia) / len(pia):.3f}" if pia else "—"
        rows.append(f"| {name} | {len(acc)} | {k / max(1, len(acc)):.3f} [{lo:.2f}, {hi:.2f}] | {extra} |")
    print("| set | cases | exact match [95% Wilson] | per-image accuracy |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
