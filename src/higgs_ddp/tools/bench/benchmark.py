"""Benchmark the training step on random samples of one length, against a bare forward + backward and
against the transformers.Trainer loop of the public Higgs trainers, side by side in one process.

    higgs-ddp bench --config configs/bench_3b.yaml [dotted.key=value ...]
    higgs-ddp bench --nproc-per-node 2 --config configs/bench_data_scale.yaml --data-scale 100000   # data_scale.py
    higgs-ddp bench --nproc-per-node 2 --config configs/tiny.yaml --data-peer 48                    # peer_data.py
    make bench [BENCH_CONFIG=...] [ARGS="bench.seq_len=4096 train.activation_checkpointing=true"]

The last line printed is one JSON object (see BENCHMARKS.md for every field and the FLOPs convention):
tokens_per_s counts text + audio positions; overhead is our full step (data, copies, token counts,
forward, loss, backward, clipping, AdamW, schedule) over a bare forward + loss + backward of the same
model on the same batch; peer_ratio is our tokens/s over the peer's.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time

import torch

from higgs_ddp.config import Config, ConfigError, load_config
from higgs_ddp.runtime.distributed import cleanup, setup_distributed
from higgs_ddp.tools.bench.flops import device_peak_flops, step_flops, weight_costs
from higgs_ddp.tools.bench.memtrack import LiveTensorBytes
from higgs_ddp.training.shards import local_part


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_rate(trainer, n: int) -> float:
    """Micro-batches per second the DataLoader delivers in steady state (its workers, its prefetch)."""
    it = iter(trainer.loader)
    next(it)  # workers started
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def timed_steps(trainer, b, env) -> dict:
    """warmup + steps full optimizer steps as train.py runs them, each paired with a bare forward + loss +
    backward of the same micro-batches on the model alone (no DDP, counting, clipping or optimizer).

    The pair's order alternates: whichever of the two sees a batch first runs measurably slower on a
    CPU (~5 % here), so a fixed order would bias the ratio. The full step's time always includes
    taking its batches from the loader."""

    module = trainer.strategy.eval_module(trainer.wrapped)
    batches = trainer.batches()
    out = {"full": [], "bare": [], "tokens": [], "batches": []}

    def bare(micro) -> float:
        micro = [m.to(env.device) for m in micro]
        _sync(env.device)
        t0 = time.perf_counter()
        for m in micro:
            with trainer.autocast:
                trainer.loss(module(**m.model_inputs()), m, check=False).loss.backward()
        _sync(env.device)
        elapsed = time.perf_counter() - t0
        for p in trainer.params:
            p.grad = None
        return elapsed

    for i in range(b.warmup_steps + b.steps):
        if i == b.warmup_steps and env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        _sync(env.device)
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(trainer.cfg.train.grad_accum_steps)]
        fetch = time.perf_counter() - t0
        bare_first = i % 2 == 1 and trainer.verified  # the first step verifies labels: full step first
        t_bare = bare(micro) if bare_first else None
        _sync(env.device)
        t0 = time.perf_counter()
        r = trainer.train_step(micro)
        _sync(env.device)
        full = fetch + time.perf_counter() - t0
        if not bare_first:
            t_bare = bare(micro)
        if i >= b.warmup_steps:
            for key, value in (("full", full), ("bare", t_bare), ("tokens", r.tokens), ("batches", micro)):
                out[key].append(value)
    batches.close()
    return out


def tensor_bytes(trainer) -> int:
    """Weights, buffers and optimizer state this rank holds (its shards under fsdp): what stays allocated
    between steps."""
    seen, total = set(), 0
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    tensors += [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    from higgs_ddp.quantize import storage_parts

    for t in (part for t in map(local_part, tensors) for part in storage_parts(t)):  # NF4: its inner tensors
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def tracked_peak(trainer) -> int:
    """Peak tensor bytes of one more full step, counted op by op (for devices without allocator stats)."""
    batches = iter(trainer.loader)
    micro = [next(batches) for _ in range(trainer.cfg.train.grad_accum_steps)]
    base = tensor_bytes(trainer)
    with LiveTensorBytes() as live:
        trainer.train_step(micro)
    return base + live.peak


def largest_micro_batch(trainer, env, limit: int = 64):
    """Doubling micro-batch sizes until CUDA runs out of memory; the last one that ran two steps."""
    if env.device.type != "cuda":
        return None
    best, mbs = None, 1
    samples = [trainer.dataset[i % len(trainer.dataset)] for i in range(limit)]
    while mbs <= limit:
        try:
            for _ in range(2):
                trainer.train_step([trainer.collator(samples[:mbs])])
            best, mbs = mbs, mbs * 2
        except torch.OutOfMemoryError:
            break
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    return best


def bench_card(trainer, cfg: Config, partial_row=None) -> str:
    """The run card, saying what the benchmark does: synthetic samples, bench.warmup_steps + bench.steps
    steps (not train.max_steps), and nothing written (not train's output_dir)."""
    b, t = cfg.bench, cfg.train
    peer = "; then the same steps in the peer's transformers.Trainer loop" if b.peer else ""
    return trainer.run_card(
        data=f"{b.samples} synthetic samples of {b.seq_len} positions ({b.audio_fraction:.0%} audio, random codes); "
             f"no validation set",
        schedule=f"{b.warmup_steps} warm-up + {b.steps} timed steps (bench.warmup_steps, bench.steps), each beside a "
                 f"bare forward + backward; lr {t.lr:g}, warmup {t.warmup_steps}{peer}",
        output="none: nothing is written; the result is the last line printed (JSON)"
               + (f"; before the peer, also {partial_row}" if partial_row and cfg.bench.peer else ""))


def run(cfg: Config, env, source: str = "", partial_row=None) -> dict:
    """The result row. ``partial_row``: a file to hold it already before the peer runs (its fields then missing),
    so that a run cut off in the peer's part still leaves what it measured of ours (launch/gpu_acceptance.sh)."""
    from higgs_ddp.model import load_tokenizer, model_config
    from higgs_ddp.tools.bench.synthetic import synthetic_data
    from higgs_ddp.training.trainer import Trainer

    b, t = cfg.bench, cfg.train
    tokenizer = load_tokenizer(cfg)
    data = synthetic_data(tokenizer, model_config(cfg, tokenizer), b.samples, b.seq_len, b.audio_fraction, t.seed)
    trainer = Trainer(cfg, env, data=data)
    if env.is_main:
        print(bench_card(trainer, cfg, partial_row), flush=True)
    mc = trainer.raw.config.text_config
    costs = weight_costs(trainer.model)

    timed = timed_steps(trainer, b, env)
    # Medians: robust to the odd slow step (a shared CPU, a GPU clock dip).
    step_time, bare = statistics.median(timed["full"]), statistics.median(timed["bare"])
    tokens_per_s = statistics.median(timed["tokens"]) / step_time  # global: every rank's positions
    width = mc.num_attention_heads * mc.head_dim
    flops = sum(step_flops(costs, mc.num_hidden_layers, width, m) for m in timed["batches"])
    flops_per_token = flops * env.world_size / sum(timed["tokens"])
    peak = device_peak_flops(env.device, b.peak_tflops)
    if env.device.type == "cuda":
        peak_memory, memory_source = torch.cuda.max_memory_allocated(env.device), "cuda allocator, timed steps"
    else:
        peak_memory, memory_source = tracked_peak(trainer), "tensors counted op by op, one step"
    batches_per_s = data_rate(trainer, max(20, 2 * t.grad_accum_steps * b.steps))
    result = {
        "config": source, "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
        "world_size": env.world_size, "torch": torch.__version__, "precision": trainer.precision,
        "mode": t.mode, "trainable_parameters": trainer.num_trainable,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "seq_len": b.seq_len, "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
        "activation_checkpointing": t.activation_checkpointing, "text_logits": t.text_logits,
        "compile": t.compile, "steps": b.steps,
        "tokens_per_s": tokens_per_s, "step_time_s": step_time, "peak_memory_bytes": peak_memory,
        "memory_source": memory_source, "flops_per_token": flops_per_token,
        # this rank's weights, buffers, AdamW state and (fp32) gradients: what sharding divides
        "model_state_bytes": tensor_bytes(trainer) + 4 * sum(local_part(p).numel() for p in trainer.params),
        "parallel": trainer.strategy.describe(),
        "mfu": tokens_per_s * flops_per_token / (peak * env.world_size) if peak else None,
        "peak_flops": peak, "overhead": step_time / bare, "bare_step_time_s": bare, "overhead_s": step_time - bare,
        # Micro-batches the loader delivers per second over those one step consumes per second.
        "data_rate_ratio": batches_per_s / (t.grad_accum_steps / step_time),
        "largest_micro_batch": largest_micro_batch(trainer, env) if b.find_largest_micro_batch else None,
    }
    del trainer
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    if b.peer:
        from higgs_ddp.tools.bench.peer import run_peer

        if partial_row and env.is_main:
            from higgs_ddp.runtime.files import write_json_atomic

            write_json_atomic(partial_row, {**result, "peer_ratio": None, "peer": None})
        peer = run_peer(cfg, env, data, b.steps, b.warmup_steps)
        result["peer"] = {k: peer[k] for k in ("tokens_per_s", "step_time_s", "peak_memory_bytes")}
        result["peer_ratio"] = tokens_per_s / peer["tokens_per_s"]
    return result


def _gb(n) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB"


def table_rows(lines: list) -> str:
    """BENCHMARKS.md rows from the benchmark's JSON lines."""
    rows = []
    for line in lines:
        r = json.loads(line)
        n = r["parameters"]
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        setup = (f"{size} params, {r['mode']} {r['precision']}, {r['micro_batch_size']}×{r['seq_len']}"
                 f"{', act. ckpt' if r['activation_checkpointing'] else ''}, text logits {r['text_logits']}"
                 f"{', compiled' if r['compile'] else ''}")
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        peer = "—" if r.get("peer_ratio") is None else f"{r['peer_ratio']:.2f}×"
        rows.append(f"| {setup} | {r['device']} ×{r['world_size']} | {r['date']} | `{r['config']}` | "
                    f"{r['tokens_per_s']:,.0f} | {mfu} | {_gb(r['peak_memory_bytes'])} | {r['overhead']:.3f} | "
                    f"{peer} | {r['data_rate_ratio']:.0f}× |")
    return "\n".join(rows)


HELP = """Time the training step on random samples of one length (bench.seq_len, bench.samples), against a
bare forward + backward and against the transformers.Trainer loop of the public Higgs trainers, side by
side in one process. Nothing is written; the last line printed is one JSON object (BENCHMARKS.md
describes every field).

    higgs-ddp bench --config configs/bench_3b.yaml [bench.seq_len=4096 ...]
    higgs-ddp bench --nproc-per-node 2 --config configs/bench_data_scale.yaml --data-scale 100000
    higgs-ddp bench --nproc-per-node 2 --config configs/tiny.yaml --data-peer 48
    make bench [BENCH_CONFIG=...] [ARGS="bench.seq_len=4096 train.activation_checkpointing=true"]"""


def main(argv=None) -> int:
    from higgs_ddp.runtime.launch_options import LAUNCH_HELP

    parser = argparse.ArgumentParser(description=HELP, epilog=LAUNCH_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (e.g. configs/bench_3b.yaml)")
    parser.add_argument("--table", metavar="JSONL", help="print BENCHMARKS.md rows for saved result lines")
    parser.add_argument("--memory-table", action="store_true",
                        help="print the config's model state per GPU (GB, arithmetic) by mode, strategy and GPU count")
    parser.add_argument("--data-scale", type=int, metavar="N",
                        help="instead: start-up to the first step on a synthetic corpus of N cached clips "
                             "(cold and warm, phase by phase), written under output_dir")
    parser.add_argument("--cold", action="store_true",
                        help="with --data-scale above 100k clips: write audio files and cached codes and time the "
                             "cold start's preparation too (without it the corpus is written as a prepared index)")
    parser.add_argument("--data-peer", type=int, metavar="N",
                        help="instead: samples/s end to end on N WAV clips, ours (encoded once) against the "
                             "peers' codec run on every fetch; the clips are written under output_dir")
    parser.add_argument("--partial-row", metavar="FILE",
                        help="also write the row to FILE before the peer runs (without its fields), so that a run "
                             "cut off in the peer's part keeps what it measured")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. bench.seq_len=4096")
    args = parser.parse_intermixed_args(argv)  # overrides before or after --data-scale N
    if args.table:
        from higgs_ddp.tools.bench import data_scale, peer_data

        lines = [json.loads(line) for line in open(args.table, encoding="utf-8") if line.strip()]
        kinds = ((data_scale.table_rows, "data_scale"), (peer_data.table_rows, "data_peer"))
        for rows, key in kinds:
            if any(key in r for r in lines):
                print(rows([r for r in lines if key in r]))
        plain = [json.dumps(r) for r in lines if not any(key in r for _, key in kinds)]
        if plain:
            print(table_rows(plain))
        return 0
    if args.data_scale is not None and args.data_scale < 8:
        parser.error("--data-scale needs at least 8 clips")
    if not args.config:
        parser.error("--config is required")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"higgs-ddp: error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.memory_table:
        from higgs_ddp.model import load_tokenizer, model_config
        from higgs_ddp.training.memory_plan import table

        tokenizer = load_tokenizer(cfg)
        print(table(cfg, model_config(cfg, tokenizer)))
        return 0
    env = setup_distributed()
    source = " ".join([args.config, *args.overrides])
    try:
        if args.data_scale is not None:
            from higgs_ddp.tools.bench import data_scale

            result = data_scale.run(cfg, env, args.data_scale, f"{source} --data-scale {args.data_scale}"
                                    + (" --cold" if args.cold else ""), cold=args.cold)
        elif args.data_peer is not None:
            from higgs_ddp.tools.bench import peer_data

            result = peer_data.run(cfg, env, args.data_peer, f"{source} --data-peer {args.data_peer}")
        else:
            result = run(cfg, env, source, args.partial_row)
    finally:
        cleanup()
    if env.is_main:
        print(json.dumps(result), flush=True)
    return 0
