"""The real size, end to end, on this machine: the path a user's downloaded 5.8B model takes, on a CPU.

    higgs-ddp smoke --config configs/bench_3b.yaml --out runs/smoke_3b        # make smoke-3b
    higgs-ddp smoke --config configs/bench_3b.yaml --out /tmp/s --layers 2    # the same, 2 decoder layers

Each phase runs as its own process, the commands a user runs where there is one, so that its peak host
memory (``ru_maxrss``) and time are its own:

1. ``build``: the config's architecture (``model.config``: 128,256-token vocabulary, 28 DualFFN layers,
   8 x 1026 codebooks for bench_3b) drawn at random directly in bf16, saved as a boson_multimodal-format
   folder (``config.json`` + sharded safetensors + index) with a tokenizer that has Llama-3's special-token
   layout (ids 128,000 and up, as the real model's config names them); one training sample of about
   ``--seq-len`` positions (random codes, 8 codebooks); the run's config, which loads the folder through
   ``model.path`` exactly as a downloaded model is loaded.
2. ``train``: ``higgs-ddp train`` on it, LoRA in bf16 (CPU autocast), activation checkpointing and the
   deferred text head, ``--steps`` optimizer steps on the one repeated batch: the loss must be finite and
   fall; the run ends with a checkpoint.
3. ``resume``: the same command one step longer: it must resume from that checkpoint and take one step.
4. ``export adapter`` and 5. ``export merged``: ``higgs-ddp export``, without and with ``--merge``.
6. ``reload merged``: ``higgs-ddp train`` one step on the merged folder as ``model.path``: it loads, and its
   first loss (taken before its update) must be below the first loss of phase 2 (the merge carried the
   training).

The last line is JSON (phases with seconds and peak RSS, the losses, the arithmetic: bf16 weights are
2 bytes per parameter). A phase that fails ends the command with its one-line error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from higgs_ddp.errors import HiggsError
from higgs_ddp.runtime.layout import METRICS

GB = 1e9


class SmokeError(HiggsError, RuntimeError):
    pass


def run_config(out: Path, steps: int) -> dict:
    """Overrides for ``configs/bench_3b.yaml`` (or any config with ``model.config``) that make it a run on
    the folder phase 1 wrote, as a user's config for a downloaded model would."""
    return {
        "output_dir": str(out / "run"),
        "model.init": "pretrained", "model.path": str(out / "model"), "model.tokenizer": "null",
        "data.manifest": str(out / "data" / "manifest.jsonl"), "data.val_fraction": "0", "data.num_workers": "1",
        "train.mode": "lora", "train.precision": "bf16", "train.activation_checkpointing": "true",
        "train.text_logits": "supervised", "train.micro_batch_size": "1", "train.grad_accum_steps": "1",
        "train.max_steps": str(steps), "train.save_every": "0", "train.lr": "1e-3", "train.warmup_steps": "0",
        "train.min_lr_ratio": "1", "train.log_every": "1", "lora.dropout": "0", "train.check_memory": "false",
        "eval.every": "0",
    }


def random_bf16_model(model_class, hf_config, seed: int):
    """The architecture with random bf16 weights, drawn fast: 5.8B weights through the model's own init (or
    ``normal_`` in bf16) take minutes on 2 cores, ``uniform_`` in bf16 about a minute. An fp32 draw would also
    need 23 GB before the cast. The values only have to be random at the init's scale: uniform(-a, a) with
    a = sqrt(3) * init_std has the init's standard deviation; biases are zero and norm weights one, as the
    model's own init makes them."""
    import torch
    from transformers.modeling_utils import no_init_weights

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():  # allocate only; every weight is filled below
            model = model_class(hf_config)
    finally:
        torch.set_default_dtype(previous)
    bound = math.sqrt(3) * getattr(hf_config, "init_std", 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.uniform_(-bound, bound)
            elif name.endswith("bias"):
                p.zero_()
            elif not torch.equal(p, torch.ones_like(p)):  # norm weights: created as ones, not by an init function
                raise SmokeError(f"{name}: a 1-d weight the smoke build does not know how to initialise")
    return model


def build(config: str, out: Path, layers: int, seq_len: int, steps: int, seed: int) -> dict:
    """Phase 1 (in its own process): the model folder, the tokenizer, the data and the run config."""
    from higgs_ddp.config import load_config
    from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer
    from higgs_ddp.model import _import_higgs, _random_config

    overrides = [] if not layers else [
        f"model.config.text_config.num_hidden_layers={layers}",
        f"model.config.audio_dual_ffn_layers=[{','.join(map(str, range(layers)))}]"]
    cfg = load_config(config, overrides)
    tokenizer = build_tiny_tokenizer(layout="llama3")
    hf_config = _random_config(cfg, tokenizer)
    _, HiggsAudioModel = _import_higgs()
    model = random_bf16_model(HiggsAudioModel, hf_config, seed)
    params = sum(p.numel() for p in model.parameters())
    # The official folder's shape: config.json + model-0000k-of-0000n.safetensors + the index.
    model.save_pretrained(str(out / "model"), safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(str(out / "model"))
    del model

    data = out / "data"
    (data / "codes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    from higgs_ddp.tools.demo_data import WORDS
    text = " ".join(rng.choice(WORDS, size=max(3, int(0.15 * seq_len) // 5)))
    frames = max(8, int(0.85 * seq_len) - hf_config.audio_num_codebooks)
    codes = rng.integers(0, hf_config.audio_codebook_size, size=(hf_config.audio_num_codebooks, frames))
    np.save(data / "codes" / "0000.npy", codes.astype(np.int64))
    (data / "manifest.jsonl").write_text(json.dumps({"id": "smoke0", "text": text, "audio_codes": "codes/0000.npy",
                                                     "speaker": "smoke"}) + "\n")
    return {"parameters": params, "model_bytes": sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))}


def phase(name: str, argv: list, log: Path) -> dict:
    """Run one phase as a child process; its wall time, its own peak RSS, and its last line."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    row = {"phase": name, "seconds": round(time.time() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 2)}
    print(f"smoke: {name:<15} {row['seconds']:>7.1f} s  peak RSS {row['peak_rss_gb']:6.2f} GB  ({log})", flush=True)
    if code != 0:
        errors = [ln for ln in lines if "error:" in ln]
        last = (errors or lines or ["(no output)"])[-1].strip()
        if code == -9:  # the kernel's OOM killer, most likely
            last = f"killed by SIGKILL after reaching {row['peak_rss_gb']} GB: out of memory? ({last})"
        raise SmokeError(f"phase {name} failed (exit {code}): {last}")
    return row


def losses(run_dir: Path) -> list:
    rows = [json.loads(ln) for ln in (run_dir / METRICS).read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("split", "train") == "train" and "loss" in r]


def smoke(config: str, out: Path, layers: int, seq_len: int, steps: int, seed: int) -> dict:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, "-m", "higgs_ddp.tools.smoke"]
    cli = [sys.executable, "-m", "higgs_ddp"]
    args = {"config": str(Path(config).resolve()), "layers": layers, "seq_len": seq_len, "steps": steps, "seed": seed}
    done = out / "build.json"
    if done.exists() and json.loads(done.read_text()).get("args") == args:
        # Building the 5.8B folder takes minutes: a second try after a failed later phase reuses it.
        phases = [{"phase": "build", "seconds": 0.0, "peak_rss_gb": 0.0, "reused": True}]
        print(f"smoke: build           reused ({out / 'model'})", flush=True)
    elif any(out.iterdir()):
        raise SmokeError(f"{out} holds something other than this smoke run's model: remove it or pick another --out")
    else:
        phases = [phase("build", [*me, "--phase", "build", "--config", config, "--out", str(out), "--layers",
                                  str(layers), "--seq-len", str(seq_len), "--steps", str(steps), "--seed", str(seed)],
                        out / "build.log")]
        done.write_text(json.dumps({**json.loads(done.read_text()), "args": args}))
    for later in ("run", "export", "reload"):  # every phase after the build starts from nothing
        shutil.rmtree(out / later, ignore_errors=True)
    built = json.loads((out / "build.json").read_text())
    need = 1.2 * built["model_bytes"] / GB + 2  # the bf16 weights, LoRA, activations at a short sequence
    if memory_available() < need:
        raise SmokeError(f"the next phases need about {need:.1f} GB of free memory, {memory_available():.1f} GB "
                         f"is available (the model folder in {out / 'model'} is kept)")
    train = [*cli, "train", "--config", config, *(f"{k}={v}" for k, v in run_config(out, steps).items())]

    phases.append(phase("train", train, out / "train.log"))
    first = losses(out / "run")
    if len(first) != steps or not all(math.isfinite(v) for _, v in first):
        raise SmokeError(f"phase train: expected {steps} finite losses in metrics.jsonl, got {first}")
    if not first[-1][1] < first[0][1]:
        raise SmokeError(f"phase train: the loss did not fall on a repeated batch: {first}")

    phases.append(phase("resume", [*train, f"train.max_steps={steps + 1}", "train.resume_accept=[train.max_steps]"],
                        out / "resume.log"))
    resumed = losses(out / "run")
    if [s for s, _ in resumed] != list(range(1, steps + 2)) or not math.isfinite(resumed[-1][1]):
        raise SmokeError(f"phase resume: expected steps 1..{steps + 1} (one resumed step), got {resumed}")

    export = [*cli, "export", "--checkpoint", str(out / "run")]
    phases.append(phase("export adapter", [*export, "--out", str(out / "export" / "adapter")], out / "export_adapter.log"))
    phases.append(phase("export merged", [*export, "--out", str(out / "export" / "merged"), "--merge"],
                        out / "export_merged.log"))

    reload = [*train, f"model.path={out / 'export' / 'merged'}", f"output_dir={out / 'reload'}", "train.max_steps=1"]
    phases.append(phase("reload merged", reload, out / "reload.log"))
    merged_loss = losses(out / "reload")[0][1]
    if not merged_loss < first[0][1]:
        raise SmokeError(f"phase reload merged: its loss {merged_loss:.4f} on the training batch is not below the "
                         f"untrained {first[0][1]:.4f}: the merge lost the training")
    params = built["parameters"]
    return {"smoke": "ok", "config": config, "layers": layers or "all", "parameters": params,
            "bf16_weights_gb": round(2 * params / GB, 2), "model_folder_gb": round(built["model_bytes"] / GB, 2),
            "seq_len": seq_len, "losses": [round(v, 4) for _, v in resumed], "merged_loss": round(merged_loss, 4),
            "phases": phases}


def memory_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return float("inf")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="higgs-ddp smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/bench_3b.yaml", help="a config whose model.config is the architecture")
    p.add_argument("--out", required=True, type=Path, help="an empty or new folder (the model is written there)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the config's own)")
    p.add_argument("--seq-len", type=int, default=256, help="positions of the training sample (about)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps before the checkpoint")
    p.add_argument("--seed", type=int, default=0, help="of the random weights and sample (default %(default)s)")
    p.add_argument("--phase", choices=("build",), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        if a.phase == "build":
            built = build(a.config, a.out, a.layers, a.seq_len, a.steps, a.seed)
            (a.out / "build.json").write_text(json.dumps(built))
            print(f"built {built['parameters']:,} parameters, {built['model_bytes'] / GB:.2f} GB on disk")
            return 0
        result = smoke(a.config, a.out, a.layers, a.seq_len, a.steps, a.seed)
    except SmokeError as e:
        print(f"higgs-ddp: error: {e}", file=sys.stderr, flush=True)
        return 2
    (a.out / "smoke.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
