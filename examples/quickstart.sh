#!/usr/bin/env bash
# The README's command-line quickstart, as written, on SmolLM2 and 200 drug
# reviews (offline), in a folder of your choice:
#     bash examples/quickstart.sh /tmp/quickstart
# Prints the seconds of every step; the outputs stay in that folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-quickstart}"
mkdir -p "$out" && cd "$out"
step() { local t0=$SECONDS; "$@"; echo "[$((SECONDS - t0)) s] $*" >&2; }
start=$SECONDS
step python "$here/drugreview_csv.py" data/
step laplace-lora finetune --base-model smollm2 --data data/train.csv --output adapter/ \
    --template $'Review: {text}\nSentiment:' --max-length 48
step laplace-lora fit --base-model smollm2 --adapter adapter/ --data data/train.csv \
    --val-data data/val.csv
step laplace-lora evaluate --base-model smollm2 --adapter adapter/ --data data/test.csv \
    --output eval/
step laplace-lora predict --base-model smollm2 --adapter adapter/ --data data/new.csv \
    --output pred.jsonl
echo "[$((SECONDS - start)) s] in all" >&2
