#!/usr/bin/env bash
# Writes a small multi-image eval set for the tiny model into DIR (default /tmp/csp-llava-eval):
# the tiny model's four sample images and 12 cases of 2–8 images each. The tiny model's weights
# are random, so accuracy means nothing here; KL / top-1 agreement / ROUGE-L against the full
# cache still measure how much each policy changes the model's output.
#   scripts/tiny-eval-cases.sh [DIR] && csp-llava eval --data DIR/cases.jsonl
set -euo pipefail
dir="${1:-/tmp/csp-llava-eval}"
bin="${CSP_LLAVA:-$(dirname "$0")/../target/release/csp-llava}"
"$bin" gen-tiny-model "$dir" >/dev/null
questions=("Which image shows a circle?" "What colour is the shape in image 2?" "Compare the first and the last image." "How many images show a square?")
{
  for i in $(seq 0 11); do
    n=$((2 + (i % 4) * 2))
    imgs=""
    for j in $(seq 0 $((n - 1))); do imgs+="\"img-$(((i + j) % 4)).png\","; done
    printf '{"id": %d, "images": [%s], "prompt": "%s", "answer": "circle"}\n' "$i" "${imgs%,}" "${questions[$((i % 4))]}"
  done
} > "$dir/cases.jsonl"
echo "$dir/cases.jsonl"
