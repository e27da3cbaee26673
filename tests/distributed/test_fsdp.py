"""train.parallel=fsdp (FSDP2, 2 gloo ranks) trains exactly what DDP and one process train.

- 2 ranks x accumulation 2 under fsdp == 1 process with the same global batch, for lora and full: losses,
  gradient norms and final weights within the DDP tests' tolerances (test_data_parallel_equivalence.py).
- Uneven data: text only on one rank and audio on the other, validation included (test_mixed_turns.py).
- Checkpoints are sharded (each rank writes its rows) and resume exactly; they load on another number of
  ranks and into DDP, and a DDP checkpoint loads under fsdp.
- Activation checkpointing keeps the DualFFN audio path trained.
- Negative control: leaving FSDP's gradient averaging in place (no grad_scale) changes the update.
"""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import (
    ROOT, TORCHRUN_ENV, assert_same_weights, final_weights, mix_manifest, mixed_val_manifest, read_metrics, rows,
    tiny_config, torchrun, train_two_ranks_each, weights,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = ("train.max_steps=3", "train.lr=5e-3", "train.warmup_steps=1", "train.seed=7", "train.micro_batch_size=1",
          "train.grad_accum_steps=2")


def write(tmp_path, name, *overrides, samples=16):
    cfg = tiny_config(tmp_path / name, *overrides, samples=samples)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def run2(path, *extra):
    proc = torchrun(2, "--config", path, *extra)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def in_process(path, *overrides):
    from higgs_ddp.config import load_config
    from higgs_ddp.train import train

    train(load_config(str(path), list(overrides)))


def assert_same_run(run, ref, mode):
    w, r = weights(run, mode), weights(ref, mode)
    assert w.keys() == r.keys()
    for k in r:
        torch.testing.assert_close(w[k], r[k], rtol=1e-3, atol=1e-4, msg=k)
    m = [x for x in read_metrics(run) if x["split"] == "train"]
    mr = [x for x in read_metrics(ref) if x["split"] == "train"]
    assert [x["loss"] for x in m] == pytest.approx([x["loss"] for x in mr], rel=1e-5)
    assert [x["grad_norm"] for x in m] == pytest.approx([x["grad_norm"] for x in mr], rel=1e-4)


EQUIVALENCE = {"lora": (), "full": (), "audio_ffn": ("data.max_tokens_per_batch=400",)}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Every independent 2-rank run of this module (the equivalence runs, uneven data, activation checkpointing
    and its reference, the bf16 policy, 6 straight steps), in one torchrun start: {name: its folder}."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    paths = {f"eq_{mode}": write(tmp, f"eq_{mode}", f"train.mode={mode}", *COMMON, *extra, "train.parallel=fsdp")
             for mode, extra in EQUIVALENCE.items()}
    paths["uneven"] = uneven_config(tmp, "uneven", "train.parallel=fsdp")
    paths["ac"] = write(tmp, "ac", "train.mode=full", *COMMON, "train.parallel=fsdp",
                        "train.activation_checkpointing=true")
    paths["ac_ref"] = write(tmp, "ac_ref", "train.mode=full", *COMMON, "train.parallel=fsdp")
    paths["bf16"] = write(tmp, "bf16", "train.mode=full", *COMMON, "train.parallel=fsdp",
                          "train.fsdp.mixed_precision=bf16")
    paths["straight"] = write(tmp, "straight", *STRAIGHT, "train.parallel=fsdp")
    train_two_ranks_each(*paths.values())
    return {name: tmp / name for name in paths}


@pytest.mark.parametrize("mode", list(EQUIVALENCE), ids=["lora", "full", "audio_ffn-token-budget"])
def test_fsdp_two_ranks_equal_one_process(tmp_path, fsdp_runs, mode):
    extra = EQUIVALENCE[mode]
    ref = write(tmp_path, "ref", f"train.mode={mode}", *COMMON, *extra)
    # The same micro-batches per step: 4 samples in 2 micro-steps of 2, or 4 token-budget micro-batches.
    in_process(ref, "train.grad_accum_steps=4" if extra else "train.micro_batch_size=2")
    run, base = fsdp_runs[f"eq_{mode}"] / "run", tmp_path / "ref" / "run"
    assert_same_run(run, base, mode)
    shards = sorted((run / "checkpoints" / "step_000003" / "shards").iterdir())
    assert [s.name for s in shards] == ["rank_00000.safetensors", "rank_00001.safetensors"]
    if mode == "full":  # each rank wrote half the rows of a weight, not all of it
        key = "layers.0.mlp.gate_proj.weight"
        halves = [load_file(str(s))[key] for s in shards]
        assert [h.shape[0] for h in halves] == [64, 64]
        torch.testing.assert_close(torch.cat(halves), weights(run, mode)[key])
    assert_same_exports(run / "checkpoints" / "step_000003", base / "checkpoints" / "step_000003", tmp_path, mode)


def assert_same_exports(sharded, replicated, tmp_path, mode):
    """Export from the fsdp checkpoint writes the files export writes from the other: the adapter (or the
    trainable tensors) as they are, and the merged model."""
    from higgs_ddp.tools.export import export

    for merge in (False, True):
        a, b = (tmp_path / f"export-{name}-{merge}" for name in ("fsdp", "ref"))
        export(sharded, a, merge=merge)
        export(replicated, b, merge=merge)
        files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
        tensors = [f for f in files if f.endswith(".safetensors")]
        assert tensors, files
        for f in tensors:
            x, y = load_file(str(a / f)), load_file(str(b / f))
            assert x.keys() == y.keys(), f
            for k in x:
                torch.testing.assert_close(x[k], y[k], rtol=1e-3, atol=1e-4, msg=f"{f}: {k}")
        if not merge and mode == "lora":
            assert (a / "README.md").read_text() == (b / "README.md").read_text()
            # peft keeps target_modules as a set: its order in the file differs between processes
            x, y = (json.loads((d / "adapter_config.json").read_text()) for d in (a, b))
            assert {**x, "target_modules": sorted(x["target_modules"])} == \
                {**y, "target_modules": sorted(y["target_modules"])}


def uneven_config(tmp_path, name, *overrides):
    """Rank 0's samples have no audio out, rank 1's all do (data.shuffle=false), with a validation set."""
    common = ("train.mode=full", "data.shuffle=false", "train.micro_batch_size=1", "train.max_steps=4",
              "train.lr=5e-3", "train.warmup_steps=1", "data.num_workers=1")
    cfg = tiny_config(tmp_path / name, *common, *overrides, samples=7)
    data = tmp_path / name / "data"
    mix_manifest(data / "manifest.jsonl")
    val = mixed_val_manifest(data / "val", samples=3)
    val.write_text("".join(val.read_text().splitlines(True)[:5]))  # 5 samples: 3 + 2 over the ranks
    cfg.data.val_manifest = [str(val)]
    cfg.eval.every = 2  # set with the validation set it needs
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_uneven_data_text_only_rank_and_audio_rank_under_fsdp(tmp_path, fsdp_runs):
    """Rank 0 holds only samples without audio out, rank 1 only TTS ones; FSDP's reduce-scatter needs the
    same gradient set on both. Validation runs too (a forward is a collective under FSDP)."""
    in_process(uneven_config(tmp_path, "one", "train.grad_accum_steps=2"))
    run, ref = fsdp_runs["uneven"] / "run", tmp_path / "one" / "run"
    assert_same_run(run, ref, "full")
    val = [x for x in read_metrics(run) if x["split"] == "val"]
    val_ref = [x for x in read_metrics(ref) if x["split"] == "val"]
    assert [x["samples"] for x in val] == [5, 5]
    assert [x["loss"] for x in val] == pytest.approx([x["loss"] for x in val_ref], rel=1e-5)


STRAIGHT = ("train.mode=full", "train.max_steps=6", "train.save_every=3", "train.keep_last=0", "train.lr=5e-3",
            "train.warmup_steps=1", "lora.dropout=0.1")


@pytest.fixture(scope="module")
def straight(fsdp_runs):
    """6 steps under fsdp without interruption, a checkpoint every 3."""
    return fsdp_runs["straight"] / "run"


def test_fsdp_resume_is_exact_and_reshards(tmp_path, straight):
    """From the step-3 checkpoint of 6 straight fsdp steps: resumed under fsdp == straight (torch.equal);
    the same sharded checkpoint resumes on 1 process and under DDP; a DDP checkpoint loads under fsdp."""
    base = STRAIGHT
    half = straight / "checkpoints" / "step_000003"
    again = run2(write(tmp_path, "fsdp", *base, "train.parallel=fsdp", f"train.resume={half}"))
    assert f"resuming from {half}" in again.stdout
    assert_same_weights(final_weights(tmp_path / "fsdp" / "run"), final_weights(straight))
    assert rows(tmp_path / "fsdp" / "run") == rows(straight)[3:]

    # fsdp on 1 process (nothing to shard; the same global batch through accumulation), and DDP on 2
    for name, parallel, extra in (("one", "fsdp", ("train.grad_accum_steps=2",
                                                   "train.resume_accept=[world_size,train.grad_accum_steps]")),
                                  ("ddp", "ddp", ())):
        path = write(tmp_path, name, *base, f"train.parallel={parallel}", f"train.resume={half}", *extra)
        in_process(path) if name == "one" else run2(path)
        w = final_weights(tmp_path / name / "run")
        for k, v in final_weights(straight).items():
            torch.testing.assert_close(w[k], v, rtol=1e-3, atol=1e-4, msg=f"{name}: {k}")
    # ...and back: the DDP run's last checkpoint loads under fsdp (it is at max_steps: load, then save final)
    ddp_last = tmp_path / "ddp" / "run" / "checkpoints" / "step_000006"
    proc = run2(write(tmp_path, "back", *base, "train.parallel=fsdp", f"train.resume={ddp_last}"))
    assert "already finished at step 6" in proc.stdout
    assert_same_weights(final_weights(tmp_path / "back" / "run"), final_weights(tmp_path / "ddp" / "run"))


def test_activation_checkpointing_under_fsdp_trains_the_audio_path(fsdp_runs):
    assert_same_run(fsdp_runs["ac"] / "run", fsdp_runs["ac_ref"] / "run", "full")
    from higgs_ddp.config import load_config
    from higgs_ddp.model import build_model, load_tokenizer
    cfg = load_config(str(fsdp_runs["ac"].with_suffix(".yaml")))
    start = dict(build_model(cfg, load_tokenizer(cfg)).named_parameters())
    trained = weights(fsdp_runs["ac"] / "run", "full")
    moved = [k for k in trained if "audio_mlp" in k and not torch.equal(trained[k], start[k].detach())]
    assert moved, "audio_mlp did not train with activation checkpointing under fsdp"


def test_bf16_mixed_precision_policy_trains_close_to_fp32(tmp_path, fsdp_runs):
    """train.fsdp.mixed_precision=bf16: weights gathered in bf16 (8 significant bits), gradients reduced in
    fp32. The losses of 3 steps stay within 2 % of the fp32 run (measured: ~0.1 %); the trainable weights
    stay fp32."""
    ref = write(tmp_path, "ref", "train.mode=full", *COMMON)
    in_process(ref, "train.micro_batch_size=2")
    m, r = read_metrics(fsdp_runs["bf16"] / "run"), read_metrics(tmp_path / "ref" / "run")
    assert [x["loss"] for x in m] == pytest.approx([x["loss"] for x in r], rel=2e-2)
    assert [x["loss"] for x in m] != [x["loss"] for x in r]  # the policy was in effect
    assert all(t.dtype == torch.float32 for t in weights(fsdp_runs["bf16"] / "run", "full").values())


def test_negative_control_fsdp_gradient_averaging_left_in_place_changes_the_update(tmp_path):
    """The worker runs one fsdp step with grad_scale=1 (FSDP's own mean over ranks not undone): its gradient
    norm is half the correct one, so the normalisation test above would fail."""
    path = write(tmp_path, "cfg", "train.mode=full", "train.micro_batch_size=1", "train.parallel=fsdp",
                 "data.shuffle=false")
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "rank_sync_worker.py"), str(path), str(out), "unscaled"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=TORCHRUN_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["grad_norm"] == pytest.approx(result["grad_norm_correct"] / 2, rel=1e-4)


def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(tmp_path, straight):
    """A rank file cut short (a full disk) makes its checkpoint unloadable: the resume takes the one before,
    naming the file (the doctor's look, which renames nothing)."""
    import shutil

    from higgs_ddp.training.checkpoint import resume_point

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shard = run / "checkpoints" / "step_000006" / "shards" / "rank_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    chosen, note = resume_point(run, "auto")
    assert chosen.name == "step_000003"
    assert str(shard) in note and "\n" not in note
    assert shard.exists()  # looking only
