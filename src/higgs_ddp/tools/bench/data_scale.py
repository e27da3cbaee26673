"""The data path at scale: start-up to the first optimizer step on a corpus of N clips in the code cache.

    higgs-ddp bench --nproc-per-node 2 --config configs/bench_data_scale.yaml --data-scale 100000

Rank 0 writes the synthetic corpus once (data_corpus.py: a real manifest, WAV files, the code cache in its
own format), and forgets what start-ups derive from it (file hashes, tokenized prompts). Every rank then
starts twice, in this process: *cold* (codes cached, nothing else) and *warm* (as the next run finds the
cache). A start is what ``train`` does before its first step: load the tokenizer, build the model,
``load_data`` (manifest, file hashes, code cache, tokens, lengths, split), the batching plan, DDP, the
optimizer, and one optimizer step. The last line is one JSON object: per start, the time to the first
step and its phases (rank 0's), the slowest rank's time, each rank's ``load_data`` time and CPU seconds (by
phase: how the work splits over ranks, whatever else the machine runs), the data fingerprint's time, each rank's
resident memory for the dataset against the bytes of the codes and token ids it holds (and its private
memory from before ``load_data`` to after the first step: the batching plan, model and optimizer included).

Above PREPARED_ABOVE clips the corpus is written directly as a corpus index (data_corpus.build_prepared_corpus:
minutes at 10M clips), and only the warm start is measured; with ``--cold`` it is written as below that size
(a WAV file per clip, its codes cached, short ones), and the cold start prepares it: 1M clips take about 10
minutes to write and 4 GB of disk.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import resource
import time
from pathlib import Path

from higgs_ddp.config import Config
from higgs_ddp.runtime.distributed import DistEnv, all_gather_objects, barrier
from higgs_ddp.tools.bench.data_corpus import (PREPARED_ABOVE, build_corpus, build_prepared_corpus, corpus_dir,
                                                disk_bytes, forget_derived)


def resident() -> dict:
    """This process's resident memory, bytes: anonymous (its own) and file-backed (shareable) pages."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, kb = line.split()[:2]
                out[name[3:-1].lower()] = int(kb) * 1024
    return out


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS, so the next start's resident growth is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def dataset_bytes(data) -> int:
    """The bytes of codes and token ids the records hold, each array's bytes once (ids may share one;
    codes are views into their mapped shards); from a corpus index, its columns' bytes."""
    from higgs_ddp.data.corpus_index import IndexedRecords

    if isinstance(data.train, IndexedRecords):
        return data.train.index.nbytes
    seen, total = set(), 0
    for r in data.train + data.val:
        for arr in (r.input_ids, r.label_ids, *r.codes):
            where = (arr.__array_interface__["data"][0], arr.nbytes)
            if where not in seen:
                seen.add(where)
                total += arr.nbytes
    return total


def one_start(cfg: Config, env: DistEnv) -> dict:
    from higgs_ddp.data.dataset import fingerprint, load_data
    from higgs_ddp.model import load_tokenizer, model_config
    from higgs_ddp.training.trainer import Trainer

    release_free_memory()
    barrier()  # the ranks start together
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    mc = model_config(cfg, tokenizer)
    before = resident()
    t_data = time.perf_counter()
    data = load_data(cfg, env, tokenizer, mc, quiet=not env.is_main)
    t_data = time.perf_counter() - t_data
    after = resident()
    trainer = Trainer(cfg, env, data=data)  # the model, the batching plan, DDP, the optimizer
    t_setup = time.perf_counter() - t0
    batches = trainer.batches()
    trainer.train_step([next(batches) for _ in range(cfg.train.grad_accum_steps)])
    first_step = time.perf_counter() - t0
    stepped = resident()  # with the batching plan, the model, the optimizer and one step: an upper bound
    batches.close()
    t_fp = time.perf_counter()
    if hasattr(data.train, "fingerprint") and data.train.fingerprint() is None:
        t_fp = None  # a corpus written as an index by the benchmark: computed at the first checkpoint
    else:
        fingerprint(data.train)
        t_fp = time.perf_counter() - t_fp
    held = dataset_bytes(data)
    out = {
        "first_step_s": first_step, "load_data_s": t_data, "setup_s": t_setup,
        "phases_s": dict(data.report["startup_seconds"]), "phases_cpu_s": dict(data.report["startup_cpu_seconds"]),
        "load_data_cpu_s": sum(data.report["startup_cpu_seconds"].values()), "fingerprint_s": t_fp,
        "dataset_bytes": held, "rss_anon_delta_bytes": after["anon"] - before["anon"],
        "rss_file_delta_bytes": after["file"] - before["file"],
        "rss_anon_to_first_step_bytes": stepped["anon"] - before["anon"],
        "samples": len(data.train) + len(data.val),
        # the machine's 1-minute load average around this start (other jobs share the cores); this process's
        # peak resident memory so far (a cold start's join on rank 0 holds every piece for a while)
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    del trainer, data, batches
    release_free_memory()
    return out


def run(cfg: Config, env: DistEnv, clips: int, source: str = "", cold: bool = False) -> dict:
    """``cold``: above PREPARED_ABOVE clips too, a corpus of audio files and cached codes (short ones) that the
    cold start prepares, as below it."""
    from higgs_ddp.model import load_tokenizer, model_config

    tokenizer = load_tokenizer(cfg)
    mc = model_config(cfg, tokenizer)
    root = corpus_dir(cfg.output_dir, clips)
    prepared = clips > PREPARED_ABOVE and not cold  # past what the full path builds quickly: the index directly
    cfg.data.manifest, cfg.data.val_manifest = [str(root / "manifest.jsonl")], []
    cfg.data.cache_dir = str(root / ".higgs_codes")
    if env.is_main:
        if prepared:
            build_prepared_corpus(root, clips, cfg, mc, tokenizer, cfg.data.val_fraction, cfg.train.seed)
        else:
            build_corpus(root, clips, cfg.data.codec, mc.audio_num_codebooks, mc.audio_codebook_size, cfg.train.seed,
                         short=clips > PREPARED_ABOVE)
            forget_derived(root)
        print(f"data-scale: corpus of {clips} clips in {root}" + (" (written as a corpus index)" if prepared else ""),
              flush=True)
    barrier()
    cfg.output_dir = str(root / "run")
    starts = {}
    for name in ("warm",) if prepared else ("cold", "warm"):
        ranks = all_gather_objects(one_start(cfg, env))
        starts[name] = {**ranks[0], "first_step_s_slowest_rank": max(r["first_step_s"] for r in ranks),
                        "load_data_s_per_rank": [r["load_data_s"] for r in ranks],
                        # CPU seconds: what the ranks' wall times would be on cores free of other work
                        "load_data_cpu_s_per_rank": [r["load_data_cpu_s"] for r in ranks],
                        "phases_cpu_s_per_rank": [r["phases_cpu_s"] for r in ranks],
                        "rss_anon_delta_bytes_per_rank": [r["rss_anon_delta_bytes"] for r in ranks],
                        "rss_anon_to_first_step_bytes_per_rank": [r["rss_anon_to_first_step_bytes"] for r in ranks],
                        "max_rss_bytes_per_rank": [r["max_rss_bytes"] for r in ranks]}
        if env.is_main:
            print(f"data-scale: {name} start, first step after {starts[name]['first_step_s']:.1f} s", flush=True)
    info = __import__("json").loads((root / "corpus.json").read_text())
    cache = Path(cfg.data.cache_dir)
    tokens = cache / "tokens"
    return {
        "data_scale": clips, "config": source, "date": datetime.date.today().isoformat(), "device": "cpu"
        if env.device.type == "cpu" else str(env.device), "world_size": env.world_size,
        "audio_hours": info["audio_hours"], "corpus_build_s": info["seconds"],
        "cache_bytes": {"total": disk_bytes(cache), "tokens": disk_bytes(tokens) if tokens.is_dir() else 0},
        **starts,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def table_rows(results: list) -> str:
    """BENCHMARKS.md rows from data-scale JSON results: one row per corpus size and start."""
    rows = []
    for r in results:
        for name in [k for k in ("cold", "warm") if k in r]:
            s = r[name]
            phases = ", ".join(f"{k} {v:.1f}" for k, v in s["phases_s"].items() if v >= 0.05)
            rss = max(s["rss_anon_delta_bytes_per_rank"])
            rows.append(
                f"| {r['data_scale']:,} | {r['audio_hours']:,.0f} h | {name} | {s['first_step_s']:.1f} s "
                f"({s['first_step_s_slowest_rank']:.1f} s) | {s['load_data_s']:.1f} s: {phases} | "
                f"{'-' if s['fingerprint_s'] is None else format(s['fingerprint_s'], '.2f') + ' s'} | {_mb(rss)} / {_mb(s['dataset_bytes'])} = {rss / s['dataset_bytes']:.2f}× | "
                f"{_mb(r['cache_bytes']['total'])} ({_mb(r['cache_bytes']['tokens'])} tokens) |")
    return "\n".join(rows)
