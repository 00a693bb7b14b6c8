#!/usr/bin/env bash
# The headline quality table (docs/BENCHMARKS.md): every policy × budget on held-out easy-vqa
# test cases with the project's small VLM, per image count K, under the eval protocols:
#
#   p1   enum-K*.jsonl       question in the prompt ("Describe each image.": long answers, so
#                            prefill-time pruning can change them), per-image accuracy + KL
#   p2   tasks-K*.jsonl      question after pruning (image-k, compare, count, find)
#   p3   questions-K*.jsonl  three questions of one pruned cache (multi-question)
#   cap  tasks-K*.jsonl      question after pruning, every policy reading the prompt within 25%
#                            of it (--kv-max-cells 0.25)
#
# Writes OUT/K{k}-{p1,p2,p3,cap}.json (eval -o json: summary + paired) and .jsonl (per case;
# a rerun resumes), then OUT/headline.md (scripts/headline_table.py) and OUT/quality.svg.
#
#   python3 models/make_eval_set.py --seed 5 --n 240 --n-single 240 --out /tmp/evs5   # held out
#   scripts/headline.sh /tmp/evs5 /tmp/headline            # N=200 KS="4 8 16" PROTOCOLS="p2 p3 p1 cap"
#
# Environment: N (cases per file, default 200), KS, PROTOCOLS, POLICIES, BUDGETS, THREADS,
# MODEL (directory with text.gguf and mmproj.gguf; default models/cache/smolvlm-dino), EXE;
# EXTRA (more eval flags, e.g. "--kv-protect-first 4 --kv-protect-image 1") with TAG (a suffix
# for the output names, so such a variant sits next to the plain run: K8-p2-sinks.json).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${1:?usage: scripts/headline.sh EVAL_DIR OUT_DIR}"
OUT="${2:?usage: scripts/headline.sh EVAL_DIR OUT_DIR}"
N="${N:-200}"
KS="${KS:-4 8 16}"
PROTOCOLS="${PROTOCOLS:-p2 p3 p1 cap}"
POLICIES="${POLICIES:-full,csp,h2o,snapkv,aircache,prefixkv,streaming,random}"
BUDGETS="${BUDGETS:-0.1,0.2,0.5}"
THREADS="${THREADS:-2}"
TAG="${TAG:+-$TAG}"
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
MODEL="${MODEL:-$ROOT/models/cache/smolvlm-dino}"
EXE="${EXE:-$ROOT/target/release/csp-llava}"
mkdir -p "$OUT"

run() { # name data-file n-predict extra-flags...
  local name=$1$TAG file=$2 npred=$3
  shift 3
  local sub="$OUT/$name.cases.jsonl"
  # the first N cases, taken in turn from each task (tasks-K* files hold one task after the
  # other); image paths are relative to the data file: made absolute
  python3 - "$file" "$N" > "$OUT/$name.data.jsonl" <<'PY'
import json, os, sys
src, n = sys.argv[1], int(sys.argv[2])
base = os.path.dirname(os.path.abspath(src))
by_task = {}
for line in open(src):
    c = json.loads(line)
    c["images"] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in c["images"]]
    by_task.setdefault(c.get("task", ""), []).append(c)
queues, out = list(by_task.values()), []
while len(out) < n and any(queues):
    for q in queues:
        if q and len(out) < n:
            out.append(q.pop(0))
for c in out:
    print(json.dumps(c))
PY
  local resume=()
  [[ -s "$sub" ]] && resume=(--resume)
  echo "headline: $name ($(wc -l < "$OUT/$name.data.jsonl") cases) $*" >&2
  local t0=$SECONDS
  "$EXE" eval -m "$MODEL/text.gguf" --mmproj "$MODEL/mmproj.gguf" --data "$OUT/$name.data.jsonl" \
    --kv-policy "$POLICIES" --kv-budget "$BUDGETS" -n "$npred" -t "$THREADS" -o json \
    --cases-out "$sub" "${resume[@]}" "${EXTRA_FLAGS[@]}" "$@" > "$OUT/$name.json"
  echo "headline: $name done in $((SECONDS - t0)) s" >&2
}

for p in $PROTOCOLS; do
  for k in $KS; do
    case $p in
      p1) run "K$k-p1" "$DATA/enum-K$k.jsonl" $((8 * k + 8)) ;;
      p2) run "K$k-p2" "$DATA/tasks-K$k.jsonl" 8 --question-after-pruning ;;
      p3) run "K$k-p3" "$DATA/questions-K$k.jsonl" 8 ;;
      cap) POLICIES="${POLICIES/full,/}" BUDGETS=1.0 run "K$k-cap" "$DATA/tasks-K$k.jsonl" 8 --question-after-pruning --kv-max-cells 0.25 ;;
      *) echo "headline: unknown protocol $p" >&2; exit 2 ;;
    esac
  done
done
python3 "$ROOT/scripts/headline_table.py" "$OUT" > "$OUT/headline.md"
plots=()
for k in $KS; do
  for p in p2 p1; do
    [[ -s "$OUT/K$k-$p.json" ]] && plots+=("K$k $p=$OUT/K$k-$p.json")
  done
done
[[ ${#plots[@]} -gt 0 ]] && "$EXE" plot "${plots[@]}" --metric accuracy,per_image_accuracy,kl -o "$OUT/quality.svg"
echo "headline: wrote $OUT/headline.md" >&2
