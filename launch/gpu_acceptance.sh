#!/usr/bin/env bash
# The first thing to run on a GPU machine (after `make install-offline` where there is no registry):
#   make gpu-acceptance            # = bash launch/gpu_acceptance.sh [OUT_DIR=runs/gpu_acceptance]
# In one go, about 8 minutes on one H100/H200, each step under its own time limit (it never hangs):
#   1. preflight     a CUDA device that torch sees
#   2. cuda tests    pytest -m cuda: pinned batches + side-stream prefetch, bf16 autocast with fp32 weights,
#                    fused AdamW, NCCL, CUDA RNG in checkpoints and exact resume, max_memory_allocated
#   3. tiny bf16     configs/tiny.yaml trained on the GPU in bf16 (1 process): prepare with the codec on
#                    the GPU, training, validation, listening samples, checkpoints; the loss must fall
#   4. benchmarks    launch/bench_suite.sh gpu: the BENCHMARKS.md GPU rows (full 5.8B architecture)
# It stops at the first step that fails or runs out of time, and says which, loudly. It writes OUT_DIR/:
#   results.jsonl   one JSON line per benchmark; `higgs-ddp bench --table OUT_DIR/results.jsonl`
#                   (= python -m higgs_ddp bench --table ...) prints them as BENCHMARKS.md rows
#   rows.md         those rows, printed at the end too;  summary.txt  each step's result and seconds
#   *.log           each step's full output;  tiny/  the tiny run (metrics.jsonl, samples/, checkpoints/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_acceptance}
py=${PY:-.venv/bin/python}
export PY=$py
mkdir -p "$out"
rm -rf "$out/tiny" "$out/results.jsonl" "$out/log.txt" "$out/rows.md" "$out/summary.txt"  # a rerun starts over
t_all=$(date +%s)

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, its output to the terminal and OUT_DIR/NAME.log
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "==== gpu_acceptance: $name (limit ${limit}s) $(date -u +%H:%M:%SZ)"
    set +e
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    local took=$(( $(date +%s) - t0 ))
    if [ "$rc" -ne 0 ]; then
        local why="exit code $rc"
        { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && why="TIMED OUT after ${limit}s"
        echo "FAILED $name: $why (${took}s)" >> "$out/summary.txt"
        {
            echo
            echo "########################################################################"
            echo "#### gpu_acceptance FAILED at step '$name': $why"
            echo "#### its output: $out/$name.log    (steps so far: $out/summary.txt)"
            echo "########################################################################"
        } >&2
        exit 1
    fi
    echo "ok     $name (${took}s)" >> "$out/summary.txt"
}

step preflight 60 "$py" -c '
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device (CUDA_VISIBLE_DEVICES, driver, a CPU build of torch?)"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {p.name} "
      f"({p.total_memory / 2**30:.0f} GiB), bf16 {torch.cuda.is_bf16_supported()}")
assert torch.cuda.is_bf16_supported(), "this GPU has no bf16: the runs here use it"
'

step cuda_tests 150 "$py" -m pytest -m cuda -q -p no:cacheprovider tests

# make demo's own data steps (synthetic LJSpeech-style WAVs, imported), then one GPU process in bf16.
read -r -d '' check_tiny <<'EOF' || true
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
train = [r for r in rows if r.get("split", "train") == "train"]
val = [r for r in rows if r.get("split") == "val"]
status = json.load(open(run / "status.json"))
assert status["state"] == "finished", status
assert len(train) == 60 and not any(r["skipped"] for r in train), "steps missing or skipped"
first, last = train[0]["loss"], train[-1]["loss"]
assert last < 0.7 * first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
assert val and all(v["loss"] == v["loss"] for v in val), "no (finite) validation loss"
assert all(r["gpu_memory_gb"] > 0 for r in train), "no GPU memory logged"
samples = sorted((run / "samples").rglob("*.wav"))
assert samples, "no listening samples"
print(f"tiny bf16 on the GPU: loss {first:.3f} -> {last:.3f}, validation {val[-1]['loss']:.3f}, "
      f"peak {train[-1]['gpu_memory_gb']:.2f} GB, {len(samples)} listening samples")
EOF
step tiny_data 90 make --no-print-directory demo-data
step tiny_bf16 150 "$py" -m higgs_ddp train --nproc-per-node 1 --config configs/tiny.yaml "output_dir=$out/tiny" \
    train.precision=bf16 train.max_steps=60 train.save_every=30 eval.every=30
step tiny_check 30 "$py" -c "$check_tiny" "$out/tiny"

# Each benchmark appends its JSON line to OUT_DIR/results.jsonl as it finishes (kept if a later one fails).
step benchmarks 330 bash launch/bench_suite.sh gpu "$out"

"$py" -m higgs_ddp bench --table "$out/results.jsonl" > "$out/rows.md"
echo "==== gpu_acceptance: all steps passed in $(( $(date +%s) - t_all ))s"
cat "$out/summary.txt"
echo "BENCHMARKS.md rows ($out/rows.md, from $out/results.jsonl):"
cat "$out/rows.md"
