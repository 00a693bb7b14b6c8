#!/usr/bin/env python3
"""The headline tables from scripts/headline.sh's outputs (OUT/K{k}-{p1,p2,p3,cap}.json):

  1. at 20 % of the cache (and under the 25 % cap): the share of the full cache's accuracy each
     policy keeps, per protocol and K, with the paired difference against CSP;
  2. per protocol: every policy x budget, per K: accuracy (share of full), KL(full || policy),
     top-1 agreement with the full cache's tokens, and the paired differences in accuracy and
     KL against random and against CSP (95 % paired-bootstrap interval, cases won/lost).

p1 (enumeration, question in the prompt) is scored by per-image accuracy, the others by exact
match. Usage: python3 scripts/headline_table.py OUT_DIR > OUT_DIR/headline.md
"""
import glob
import json
import os
import re
import sys

NAMES = {
    "p1": "(1) question in the prompt — enumeration, per-image accuracy",
    "p2": "(2) question after pruning — image-k / compare / count / find, exact match",
    "p3": "(3) three questions of one pruned cache, exact match",
    "cap": "(4) question after pruning under a 25 % cap (`--kv-max-cells 0.25 --kv-budget 1.0`), exact match",
}
ORDER = ["full", "csp", "h2o", "snapkv", "aircache", "prefixkv", "lookm", "streaming", "random", "knorm", "vnorm", "keydiff", "expected"]


def metric(p):
    return "per_image_accuracy" if p == "p1" else "accuracy"


def load(out):
    """K{k}-{protocol}.json per (k, protocol); a run tagged `-more-<name>` (TAG=more-<name>: more
    policies on the same cases, e.g. one added later) is merged in: its policies that the base
    run lacks, with their paired rows. Other tagged variants (EXTRA flags) stay apart."""
    runs, extra = {}, []
    for f in sorted(glob.glob(os.path.join(out, "K*-*.json"))):
        m = re.match(r"K(\d+)-(p1|p2|p3|cap)(-more-[\w.]+)?\.json$", os.path.basename(f))
        if not m:
            continue
        try:
            v = json.load(open(f))
        except (json.JSONDecodeError, OSError):
            continue   # a run that did not finish
        key = (int(m.group(1)), m.group(2))
        if m.group(3):
            extra.append((key, v))
        else:
            runs[key] = v
    for key, v in extra:
        base = runs.get(key)
        if base is None:
            runs[key] = v
            continue
        have = {r["policy"] for r in base["summary"]}
        new = {r["policy"] for r in v["summary"]} - have
        base["summary"] += [r for r in v["summary"] if r["policy"] in new]
        base["paired"] += [p for p in v["paired"] if p["a"] in new or p["b"] in new]
    return runs


def row(v, policy, budget):
    for r in v["summary"]:
        if r["policy"] == policy and r["budget"] == budget:
            return r
    return None


def pair(v, a, b, budget, m):
    """mean(a - b), ci, wins_a, wins_b, n — whichever way round eval wrote it."""
    for p in v["paired"]:
        if p["metric"] != m or p["budget"] != budget:
            continue
        if p["a"] == a and p["b"] == b:
            return p["mean_diff"], p["ci"], p["wins_a"], p["wins_b"], p["n"]
        if p["a"] == b and p["b"] == a:
            return -p["mean_diff"], [-p["ci"][1], -p["ci"][0]], p["wins_b"], p["wins_a"], p["n"]
    return None


def fmt_pair(p, d=3):
    if p is None:
        return "–"
    mean, ci, wa, wb, _ = p
    star = "" if ci[0] <= 0 <= ci[1] else " *"
    return f"{mean:+.{d}f} [{ci[0]:+.{d}f}, {ci[1]:+.{d}f}] {wa}/{wb}{star}"


def full_value(runs, k, p):
    v = runs.get((k, p))
    if v is None:
        return None
    r = row(v, "full", None)
    if r is None and p == "cap":   # the cap runs hold no full row: the p2 run's, same cases
        return full_value(runs, k, "p2")
    return r and r.get(metric(p))


def main():
    out = sys.argv[1]
    runs = load(out)
    ks = sorted({k for k, _ in runs})
    protos = [p for p in ["p1", "p2", "p3", "cap"] if any((k, p) in runs for k in ks)]
    print("Held-out cases; `*`: the 95 % paired-bootstrap interval excludes 0; a/b: cases where "
          "the row's policy / the other side is better (ties left out).\n")

    print("### At 20 % of the cache: share of the full cache's accuracy kept\n")
    cols = [(p, k) for p in protos for k in ks if (k, p) in runs]
    print("| policy | " + " | ".join(f"{p} K={k}" for p, k in cols) + " |")
    print("|---|" + "---|" * len(cols))
    fulls = {c: full_value(runs, c[1], c[0]) for c in cols}
    print("| full (accuracy) | " + " | ".join("–" if fulls[c] is None else f"{fulls[c]:.3f}" for c in cols) + " |")
    names = sorted({r["policy"] for v in runs.values() for r in v["summary"]} - {"full"}, key=lambda x: ORDER.index(x) if x in ORDER else 99)
    for pol in names:
        cells = []
        for p, k in cols:
            v = runs[(k, p)]
            b = "1.0" if p == "cap" else "0.2"
            r = row(v, pol, b)
            f = fulls[(p, k)]
            if r is None or r.get(metric(p)) is None:
                cells.append("–")
                continue
            a = r[metric(p)]
            share = f"{100 * a / f:.0f}%" if f else "–"
            vs = "" if pol == "csp" else f" (vs csp {fmt_pair(pair(v, pol, 'csp', b, metric(p)), 2)})"
            cells.append(f"{a:.3f} = {share}{vs}")
        print(f"| {pol} | " + " | ".join(cells) + " |")
    print()

    for p in protos:
        m = metric(p)
        print(f"### {NAMES[p]}\n")
        for k in ks:
            v = runs.get((k, p))
            if v is None:
                continue
            n = max((r["n_cases"] for r in v["summary"]), default=0)
            f = full_value(runs, k, p)
            print(f"K = {k}: {n} cases, full cache {m.replace('_', ' ')} {'–' if f is None else f'{f:.3f}'}"
                  f"{' (the p2 run, same cases)' if p == 'cap' else ''}\n")
            dm = "Δ" + m.split("_")[-1]
            print(f"| policy | budget | {m.replace('_', ' ')} [95% CI] | share of full | KL(full‖policy) | top-1 agreement | vs random: {dm} [CI] a/b | vs random: ΔKL [CI] a/b | vs csp: {dm} [CI] a/b | vs csp: ΔKL [CI] a/b |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for r in sorted(v["summary"], key=lambda r: (r["budget"] or "", ORDER.index(r["policy"]) if r["policy"] in ORDER else 99)):
                if r["policy"] == "full":
                    continue
                b, pol = r["budget"], r["policy"]
                a = r.get(m)
                ci = r.get(m + "_ci")
                acc = "–" if a is None else f"{a:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                share = f"{100 * a / f:.0f}%" if a is not None and f else "–"
                kl = "–" if r.get("kl") is None else f"{r['kl']:.3f}"
                top1 = "–" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.3f}"
                vs = lambda other, met: "–" if pol == other else fmt_pair(pair(v, pol, other, b, met))
                print(f"| {pol} | {b} | {acc} | {share} | {kl} | {top1} | {vs('random', m)} | {vs('random', 'kl')} | {vs('csp', m)} | {vs('csp', 'kl')} |")
            print()


if __name__ == "__main__":
    main()
