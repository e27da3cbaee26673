#!/usr/bin/env bash
# The first thing to run on a GPU machine lent for a short while (15 minutes in all, at most 10 per command):
#   bash launch/gpu_acceptance.sh [OUT_DIR]   # (= make gpu-acceptance) DEVELOPERS.md has the device call
#   bash launch/gpu_acceptance.sh --dry-run   # the plan: each step, its time limit, whether it would run
# OUT_DIR: $OUT when set (the device tool brings it back), else runs/gpu_acceptance.
#
# All of it within one global budget (BUDGET_S, 480 s from the start, the install included): whatever the steps
# before left is all a step gets; a step that would get less than its minimum is skipped and says so. On a machine
# without a registry it first installs .venv from wheels/ (`make wheels` made them where PyPI is reachable;
# launch/install_offline.sh; at most INSTALL_S, 90 s), unless .venv is installed already. Then, most valuable
# first, each step under its own limit:
#   preflight     a CUDA device that torch sees, with bf16
#   cuda_tests    pytest -m cuda: pinned batches + side-stream prefetch, bf16 autocast, fused AdamW, NCCL,
#                 CUDA RNG in checkpoints and exact resume, max_memory_allocated
#   tiny_bf16     configs/tiny.yaml trained on the GPU in bf16: prepare, training, validation, listening
#                 samples, checkpoints; the loss must fall
#   lora_5.8b     the 5.8B LoRA benchmark row (MFU, tokens/s, peak memory, peer ratio): the random model
#                 drawn on the GPU (bench.build_on_device), not on the CPU
#   nf4_lora      the same with the 4-bit base (model.quantize=nf4)
#   largest_mb    the largest micro-batch of 2,048 positions that fits (LoRA, activation checkpointing)
#   full_1gpu     full fine-tuning on this one GPU with 8-bit AdamW moments, if time is left
# A step that fails does not stop the next (each measures something else); the exit code says if any did.
# Every result is written as soon as it exists, so a run cut off from outside still returns what it measured:
#   OUT_DIR/results.jsonl   one JSON line per benchmark row (`higgs-ddp bench --table OUT_DIR/results.jsonl`);
#                           a row cut off in the peer's part is kept without it (bench --partial-row)
#   OUT_DIR/summary.txt     one line per step: ok / FAILED / TIMED OUT / skipped, with seconds
#   OUT_DIR/NAME.log        each step's output;  OUT_DIR/tiny/  the tiny run;  OUT_DIR/rows.md  the table
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-runs/gpu_acceptance}}
py=${PY:-.venv/bin/python}
export PY=$py
budget=${BUDGET_S:-480}
install_s=${INSTALL_S:-90}
wheels=${WHEELS:-wheels}
t_start=$(date +%s)
failed=0

# What the steps run (functions, exported for the `bash -c` each step runs in).
preflight() {
    "$py" -c '
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device (CUDA_VISIBLE_DEVICES, driver, a CPU build of torch?)"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {p.name} "
      f"({p.total_memory / 2**30:.0f} GiB), bf16 {torch.cuda.is_bf16_supported()}")
assert torch.cuda.is_bf16_supported(), "this GPU has no bf16: the runs here use it"
'
}
tiny_bf16() {  # make demo-data's steps (not make: the image may lack it), one GPU process in bf16, then checks
    "$py" -m higgs_ddp demo-data runs/tiny/data --samples 160 || return 1
    "$py" -m higgs_ddp manifest import --format ljspeech runs/tiny/data --out runs/tiny/data/manifest.jsonl \
        --speaker tones || return 1
    "$py" -m higgs_ddp train --nproc-per-node 1 --config configs/tiny.yaml "output_dir=$out/tiny" \
        train.precision=bf16 train.max_steps=60 train.save_every=30 eval.every=30 || return 1
    "$py" - "$out/tiny" <<'CHECK'
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
CHECK
}
bench_row() {  # one benchmark of the 5.8B architecture; its JSON line into results.jsonl the moment it exists
    local line   # (and our part of it in STEP.partial.json before the peer runs: the loop keeps it if cut off)
    line=$("$py" -m higgs_ddp bench --config configs/bench_3b.yaml --partial-row "$out/$step.partial.json" \
           bench.build_on_device=true "$@" | tee /dev/stderr | tail -n 1) || return 1
    echo "$line" >> "$out/results.jsonl"
    rm -f "$out/$step.partial.json"
}
export -f preflight tiny_bf16 bench_row
export out py

# The steps, most valuable first: NAME|LIMIT_S|MIN_S|COMMAND. The limits may add up to more than the budget:
# the last steps then get what is left, or are skipped. Each 5.8B row is one process that draws its model once,
# on the GPU, in bf16 (bench.build_on_device; the peer of lora_5.8b draws its own copy there too).
once="bench.find_largest_micro_batch=false"
short="bench.warmup_steps=1 bench.steps=3"
steps=(
    "preflight|20|10|preflight"
    "cuda_tests|80|30|$py -m pytest -m cuda -q -p no:cacheprovider tests"
    "tiny_bf16|120|60|tiny_bf16"
    "lora_5.8b|120|60|bench_row $once bench.steps=6"
    "nf4_lora|60|40|bench_row model.quantize=nf4 bench.peer=false $once bench.steps=6"
    "largest_mb|60|40|bench_row bench.peer=false bench.find_largest_micro_batch=true $short"
    "full_1gpu|120|60|bench_row train.mode=full train.optimizer=adamw8bit bench.peer=false $once $short"
)

if [ $dry -eq 1 ]; then
    echo "gpu_acceptance plan: budget ${budget}s, install included, results in $out"
    # "worst case": what the step gets when every step before it used its whole limit, on a fresh machine (the
    # install runs: no .venv is installed there).
    printf '%-12s limit %4ss  min %3ss  worst case %ss: %s\n' install "$install_s" 0 "$install_s" \
        "launch/install_offline.sh $wheels (only where .venv is not installed)"
    total=$install_s
    for s in "${steps[@]}"; do
        IFS='|' read -r name limit min cmd <<<"$s"
        gets=$(( budget - total < limit ? budget - total : limit ))
        [ $gets -lt 0 ] && gets=0
        [ $gets -ge "$min" ] && worst="worst case ${gets}s" || worst="worst case skipped (${gets}s left)"
        printf '%-12s limit %4ss  min %3ss  %s: %s\n' "$name" "$limit" "$min" "$worst" "$cmd"
        [ $gets -ge "$min" ] && total=$(( total + gets ))
    done
    exit 0
fi

mkdir -p "$out"
rm -rf "$out/tiny" "$out/results.jsonl" "$out/rows.md" "$out/summary.txt" "$out"/*.partial.json  # a rerun starts over
note() { echo "$*" | tee -a "$out/summary.txt"; }

installed() { compgen -G ".venv/.installed-*" >/dev/null && [ -x "$py" ]; }
if ! installed; then
    [ -f "$wheels/requirements.txt" ] || { echo "gpu_acceptance: no .venv and no $wheels/ to install it from: run 'make wheels' where PyPI is reachable and bring $wheels/ along" >&2; exit 1; }
    t0=$(date +%s)
    if timeout --kill-after=5 "$install_s" launch/install_offline.sh "$wheels" 2>&1 | tee "$out/install.log"; then
        note "ok      install ($(( $(date +%s) - t0 ))s)"
    else
        note "FAILED  install: see $out/install.log"; exit 1
    fi
fi

for s in "${steps[@]}"; do
    IFS='|' read -r name limit min cmd <<<"$s"
    left=$(( budget - ($(date +%s) - t_start) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt "$min" ]; then note "skipped $name: ${left}s of the budget left, it needs ${min}s"; continue; fi
    echo "==== gpu_acceptance: $name (limit ${limit}s, ${left}s of the budget left) $(date -u +%H:%M:%SZ)"
    t0=$(date +%s)
    step=$name timeout --kill-after=10 "$limit" bash -c "$cmd" > >(tee "$out/$name.log") 2>&1
    rc=$?
    if [ $rc -ne 0 ] && [ -s "$out/$name.partial.json" ]; then  # cut off in the peer: our measurement stays
        cat "$out/$name.partial.json" >> "$out/results.jsonl" && echo >> "$out/results.jsonl"
        note "partial $name: the row without the peer's part kept in results.jsonl"
    fi
    took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        note "ok      $name (${took}s)"
    else
        failed=1
        { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && note "TIMEOUT $name after ${limit}s: see $out/$name.log" ||
            note "FAILED  $name: exit code $rc (${took}s): see $out/$name.log"
    fi
done

if [ -s "$out/results.jsonl" ]; then
    "$py" -m higgs_ddp bench --table "$out/results.jsonl" > "$out/rows.md" 2>/dev/null && cat "$out/rows.md"
fi
echo "==== gpu_acceptance: $(( $(date +%s) - t_start ))s of ${budget}s"
cat "$out/summary.txt"
exit $failed
