#!/usr/bin/env bash
# Every measurement in BENCHMARKS.md, one JSON line each, then the table rows:
#   bash launch/bench_suite.sh gpu [OUT_DIR]   # on a GPU (after `make install-offline` where there is no registry)
#   bash launch/bench_suite.sh cpu [OUT_DIR]   # the CPU rows (ratios only)
set -euo pipefail
suite=${1:?usage: bench_suite.sh gpu|cpu [OUT_DIR]}
out=${2:-runs/bench_$suite}
py=${PY:-.venv/bin/python}
mkdir -p "$out"

run() {  # run CONFIG [overrides...]
    echo "== bench $*" >&2
    "$py" -m higgs_ddp bench --config "$@" | tee -a "$out/log.txt" | tail -n 1 >> "$out/results.jsonl"
}

case $suite in
gpu)
    # The 24 GB target: LoRA, 1 x 2,048, activation checkpointing; with the peer; the largest micro-batch.
    run configs/bench_3b.yaml
    # Without recomputation: the speed when memory is not the limit.
    run configs/bench_3b.yaml train.activation_checkpointing=false bench.find_largest_micro_batch=false
    # What the supervised-only text head saves: the model's own logits for every position.
    run configs/bench_3b.yaml train.text_logits=all bench.find_largest_micro_batch=false bench.peer=false
    ;;
cpu)
    big_vocab=model.config.text_config.vocab_size=128256
    short="bench.warmup_steps=2 bench.steps=10"  # the slow rows: memory and throughput ratios, not overhead
    wider="model.config.text_config.hidden_size=256 model.config.text_config.intermediate_size=1024 model.config.text_config.num_hidden_layers=8"
    run configs/bench_tiny.yaml                                             # loop overhead, data rate
    run configs/bench_tiny.yaml train.micro_batch_size=1 bench.seq_len=512  # fixed per-step costs, small step
    run configs/bench_tiny.yaml $big_vocab train.micro_batch_size=2 $short # Llama-3's vocabulary: the peer's full logits
    run configs/bench_tiny.yaml $big_vocab train.micro_batch_size=2 train.text_logits=all bench.peer=false $short
    run configs/bench_tiny.yaml $wider bench.peer=false $short              # activations: without / with checkpointing
    run configs/bench_tiny.yaml $wider bench.peer=false train.activation_checkpointing=true $short
    ;;
*) echo "bench_suite: unknown suite $suite (gpu or cpu)" >&2; exit 2 ;;
esac
"$py" -m higgs_ddp bench --table "$out/results.jsonl"
