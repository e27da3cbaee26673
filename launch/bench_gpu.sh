#!/usr/bin/env bash
# The measurements of BENCHMARKS.md in one go, on a GPU machine (after `make install-offline` where
# there is no registry):   bash launch/bench_gpu.sh [OUT_DIR]     (CONFIG=... to use another config)
# Appends one JSON line per run to OUT_DIR/results.jsonl and prints the table rows at the end.
set -euo pipefail
out=${1:-runs/bench}
config=${CONFIG:-configs/bench_3b.yaml}
py=${PY:-.venv/bin/python}
mkdir -p "$out"

run() {
    echo "== bench $config $*" >&2
    "$py" -m higgs_ddp.bench --config "$config" "$@" | tee -a "$out/log.txt" | tail -n 1 >> "$out/results.jsonl"
}

# 1. The 24 GB target: LoRA, 1 x 2,048, activation checkpointing; with the peer; the largest micro-batch.
run
# 2. Without recomputation: the speed when memory is not the limit.
run train.activation_checkpointing=false bench.find_largest_micro_batch=false
# 3. What the supervised-only text head saves (the model's own logits for every position).
run train.text_logits=all bench.find_largest_micro_batch=false bench.peer=false
"$py" -m higgs_ddp.bench --table "$out/results.jsonl"
