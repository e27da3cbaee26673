"""train.precision=bf16 on CPU: bf16 matmuls, fp32 trainable state, equivalence and exact resume within tolerances.

train.precision=bf16 on CPU: the GPU's numerics (bf16 autocast, a bf16 frozen base, trainable weights and
AdamW state in fp32) under CPU autocast, through the same tests the fp32 suite runs.

Tolerances. bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 ~ 2e-3 relative, one unit in
the last place (ulp) is 2^-8 ~ 4e-3. Two runs that are the same computation split differently (a padded
batch of 2 against two batches of 1, one process against two) feed GEMMs of other shapes; their fp32
accumulators sum in another order, so here and there an output rounds to the neighbouring bf16 value.
What that does, measured on the tiny model (3 steps, lr 5e-3; lora / full):

- losses: <= 8e-4 / 3e-4 relative. LOSS_REL = 3e-3 (under one ulp): a loss is a mean over ~300 targets
  whose rounding errors are independent, so it moves far less than one ulp; a whole ulp would take an
  error in every logit in the same direction, which is a bug, not rounding.
- gradient norms: <= 9e-4 / 1.3e-3. GRAD_NORM_REL = 5e-3 (about one ulp), for the same reason.
- weights: AdamW's first update is lr * g / |g| (+-lr per entry whatever |g|), so an entry whose gradient
  is smaller than the rounding noise can flip its update's sign. Compared as the distance between the two
  runs' weights over the length of the update itself (update_distance): 1.2e-2 / 1.5e-2.
  UPDATE_REL = 4e-2.

They are still tight enough for a real bug (test_a_real_difference_exceeds_the_tolerances, measured): the
loss normalised per micro-batch instead of by the global token counts (the bug the equivalence exists to
catch) moves the weights by 0.16 (lora) of the update, a learning rate 25 % higher by 0.24 and the step-3
loss by 4e-2. DDP and FSDP over 2 ranks give bit for bit what 1 process with accumulation 2 gives (same
micro-batch shapes), and so does an exact resume.
"""

import json
import math

import pytest
import soundfile as sf
import torch
import yaml
from helpers import (
    PLAIN, assert_same, first_step, listening_prompts, read_metrics, run_two_ranks, tiny_config, val_rows, weights,
)
from safetensors.torch import load_file

from higgs_ddp import dual_loss
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.train import train
from higgs_ddp.training.trainer import Trainer

BF16 = "train.precision=bf16"
# Clipping off: under fsdp the gradient norm is summed over the shards, whose rounding differs from one
# process's norm by the machine's SIMD reduction order; with clipping on (the norm here is above 1) the clip
# factor then differs in its last bit and every weight by 1-3 ulp (measured on an AMD EPYC; an earlier
# machine happened to agree), so the bit-for-bit comparisons below would be luck. Clipping is the same code
# in every precision; tests/distributed/test_fsdp.py checks the sharded norm against one process's.
COMMON = ("train.max_grad_norm=0", "train.max_steps=3", "train.lr=5e-3", "train.warmup_steps=1", "train.seed=7", BF16)
LOSS_REL, GRAD_NORM_REL, UPDATE_REL = 3e-3, 5e-3, 4e-2


def run(tmp, name, mode, *overrides):
    train(tiny_config(tmp / name, f"train.mode={mode}", *COMMON, *overrides))
    return tmp / name / "run"


def start_weights(tmp, mode) -> dict:
    """What training started from, under the names the saved weights have (lora: B starts at zero)."""
    if mode == "lora":
        return {}
    from higgs_ddp.model import apply_training_mode, build_model, load_tokenizer
    cfg = tiny_config(tmp / "fresh", f"train.mode={mode}", *COMMON)
    return {k: v.detach().float() for k, v in apply_training_mode(build_model(cfg, load_tokenizer(cfg)), cfg)
            .named_parameters()}


def update_distance(run, ref, mode, start) -> float:
    """|w_run - w_ref| / |w_ref - w_start| over the tensors whose start is known (lora: every lora_B)."""
    a, b = weights(run, mode), weights(ref, mode)
    keys = [k for k in b if k in start or "lora_B" in k]
    diff = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in keys)
    moved = sum(float((b[k].double() - start.get(k, torch.zeros_like(b[k])).double()).norm() ** 2) for k in keys)
    assert moved > 0, "the reference did not train"
    return math.sqrt(diff / moved)


def differences(run, ref, mode, start) -> dict:
    m, r = read_metrics(run), read_metrics(ref)
    assert [x["audio_targets"] for x in m] == [x["audio_targets"] for x in r], "not the same data"
    return {"loss": [abs(x["loss"] / y["loss"] - 1) for x, y in zip(m, r)],
            "grad_norm": [abs(x["grad_norm"] / y["grad_norm"] - 1) for x, y in zip(m, r)],
            "update": update_distance(run, ref, mode, start)}


def assert_equivalent(d: dict, name: str) -> None:
    assert max(d["loss"]) <= LOSS_REL, (name, d)
    assert max(d["grad_norm"]) <= GRAD_NORM_REL, (name, d)
    assert d["update"] <= UPDATE_REL, (name, d)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """bf16, lora, 3 steps: batch 2, accumulation 2, and two runs that differ for real."""
    tmp = tmp_path_factory.mktemp("bf16_lora")
    runs = {"batch2": run(tmp, "batch2", "lora", "train.micro_batch_size=2"),
            "accum2": run(tmp, "accum2", "lora", "train.micro_batch_size=1", "train.grad_accum_steps=2"),
            "lr": run(tmp, "lr", "lora", "train.micro_batch_size=2", "train.lr=6.25e-3")}
    with pytest.MonkeyPatch.context() as mp:
        # Each micro-batch's own mean loss, averaged over the accumulation: every micro-batch weighs the same
        # however many targets it has (what the global token counts prevent).
        mp.setattr(dual_loss.DualLoss, "normalized", lambda self, text, audio, scale=1.0: self.loss * scale / 2)
        runs["per_micro_mean"] = run(tmp, "per_micro_mean", "lora", "train.micro_batch_size=1",
                                     "train.grad_accum_steps=2")
    return tmp, runs


def test_bf16_on_cpu_trains_fp32_weights_and_adamw_state_under_bf16_autocast(tmp_path):
    cfg = tiny_config(tmp_path, "train.mode=lora", *COMMON)
    trainer = Trainer(cfg, DistEnv())
    assert trainer.precision == "bf16" and "bf16" in trainer.run_card()
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the base: 2 bytes a weight, as on a GPU
    before = [p.detach().clone() for p in trainer.params]
    seen = {}

    def dtype_of(name):
        def hook(module, args, out):
            seen[name] = out.dtype  # (returns None: the output is left as it is)
        return hook

    layer = trainer.raw.layers[0]
    hooks = [layer.self_attn.q_proj.register_forward_hook(dtype_of("q_proj")),
             layer.mlp.register_forward_hook(dtype_of("mlp"))]
    r = trainer.train_step([next(iter(trainer.loader))])
    for h in hooks:
        h.remove()
    assert seen == {"q_proj": torch.bfloat16, "mlp": torch.bfloat16}  # the matmuls ran in bf16 (CPU autocast)
    assert math.isfinite(r.loss) and math.isfinite(r.grad_norm) and not r.skipped
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert any(not torch.equal(p, b) for p, b in zip(trainer.params, before))  # the step was taken
    states = [trainer.optimizer.state[p] for p in trainer.params]
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    assert all(s["exp_avg_sq"].shape == p.shape for s, p in zip(states, trainer.params))  # one per trainable tensor


def test_batch2_equals_accumulation2_in_bf16(lora_runs):
    tmp, runs = lora_runs
    assert_equivalent(differences(runs["accum2"], runs["batch2"], "lora", {}), "accum2")


def test_a_real_difference_exceeds_the_tolerances(lora_runs):
    """Negative controls for the tolerances above: two changes that are bugs exceed them."""
    tmp, runs = lora_runs
    per_micro = differences(runs["per_micro_mean"], runs["batch2"], "lora", {})
    assert per_micro["update"] > 2 * UPDATE_REL, per_micro  # measured 0.16
    lr = differences(runs["lr"], runs["batch2"], "lora", {})
    assert lr["update"] > 3 * UPDATE_REL and lr["loss"][-1] > 5 * LOSS_REL, lr  # measured 0.24, 4.4e-2
    assert lr["grad_norm"][-1] > 5 * GRAD_NORM_REL, lr  # measured 6e-2


@pytest.mark.slow  # (not torchrun, but ~15 s more of what the lora runs above show already)
def test_full_fine_tuning_batch2_equals_accumulation2_in_bf16(tmp_path):
    start = start_weights(tmp_path, "full")
    batch2 = run(tmp_path, "batch2", "full", "train.micro_batch_size=2")
    accum2 = run(tmp_path, "accum2", "full", "train.micro_batch_size=1", "train.grad_accum_steps=2")
    assert_equivalent(differences(accum2, batch2, "full", start), "full accum2")
    assert all(t.dtype == torch.float32 for t in weights(batch2, "full").values())


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [pytest.param("ddp", marks=pytest.mark.extended), "fsdp"])
def test_two_ranks_equal_one_process_in_bf16(tmp_path, lora_runs, parallel):
    """2 gloo ranks x batch 1: within the tolerances of batch 2, and bit for bit accumulation 2 (the same
    micro-batches, so the same GEMMs; the gradients are summed over ranks in fp32)."""
    _, runs = lora_runs
    two = run_two_ranks(tmp_path, parallel, "lora", *COMMON, "train.micro_batch_size=1", f"train.parallel={parallel}")
    assert_equivalent(differences(two, runs["batch2"], "lora", {}), parallel)
    assert [x["loss"] for x in read_metrics(two)] == [x["loss"] for x in read_metrics(runs["accum2"])]
    w2, w1 = weights(two, "lora"), weights(runs["accum2"], "lora")
    assert all(torch.equal(w2[k], w1[k]) for k in w1)


def test_resume_in_bf16_is_exact(tmp_path):
    """4 steps straight == 2 steps, then a new run resuming from that checkpoint (dropout on: the RNG too).
    Bit for bit: the same machine runs the same kernels on the same fp32 weights and AdamW state."""
    common = (*COMMON, "train.max_steps=4", "train.save_every=2", "train.keep_last=0", "lora.dropout=0.1")
    train(tiny_config(tmp_path / "straight", *common))
    straight = tmp_path / "straight" / "run"
    half = straight / "checkpoints" / "step_000002"
    train(tiny_config(tmp_path / "resumed", *common, f"train.resume={half}"))
    resumed = tmp_path / "resumed" / "run"
    a, b = weights(resumed, "lora"), weights(straight, "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "loss", "grad_norm", "lr", "audio_targets")
    assert [{k: m[k] for k in keys} for m in read_metrics(resumed)] == \
        [{k: m[k] for k in keys} for m in read_metrics(straight)][2:]
    moments = load_file(str(half / "optimizer.safetensors"))  # saved as the run holds them: fp32
    assert moments and all(v.dtype == torch.float32 for k, v in moments.items() if "exp_avg" in k)
    assert all(v.dtype == torch.float32 for v in load_file(str(half / "adapter" / "adapter_model.safetensors")).values())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_deferred_text_head_and_activation_checkpointing_in_bf16(tmp_path, mode):
    """The first step's loss and gradients under bf16 autocast: activation checkpointing recomputes the very
    same bf16 operations (bit for bit); the head applied to the supervised rows only (chunked) multiplies
    fewer rows, so its own weight gradient may round differently (full: measured 2.6e-3 relative, under one
    ulp); GRADIENT_REL bounds each tensor's relative distance."""
    GRADIENT_REL = 1e-2
    plain = first_step(tmp_path, "plain", BF16, *PLAIN, mode=mode)
    ckpt = first_step(tmp_path, "ckpt", BF16, "train.text_logits=all", "train.activation_checkpointing=true", mode=mode)
    assert_same(plain[:2], ckpt[:2], exact=True)
    sup = first_step(tmp_path, "sup", BF16, "train.text_logits=supervised", "train.text_logits_chunk=3", mode=mode)
    (dl_p, g_p), (dl_s, g_s) = plain[:2], sup[:2]
    for part in ("loss", "text_loss", "audio_loss"):
        torch.testing.assert_close(getattr(dl_s, part), getattr(dl_p, part), rtol=1e-3, atol=0, msg=part)
    assert g_s.keys() == g_p.keys()
    for k in g_p:
        assert float((g_s[k] - g_p[k]).norm()) <= GRADIENT_REL * float(g_p[k].norm()), k
    assert len(sup[2]) > 2 and sup[2][0][-1] == 64, "the head was deferred (hidden states), then chunked"
    assert all(g.dtype == torch.float32 for g in g_p.values())
    # Not vacuous: the same step in fp32 differs by more than GRADIENT_REL somewhere (measured 2e-2).
    if mode == "lora":
        fp32 = first_step(tmp_path, "fp32", *PLAIN, mode=mode)[1]
        assert max(float((fp32[k] - g_p[k]).norm() / g_p[k].norm()) for k in g_p if g_p[k].norm() > 0) > GRADIENT_REL


def test_validation_and_listening_samples_in_bf16(tmp_path):
    """Validation (loss, per-codebook accuracy) and listening samples (generation under bf16 autocast with
    boson's dynamic KV cache, then the fp32 codec) at lr 0, against the same run in fp32: the validation
    loss agrees to the bf16 forward's rounding (measured ~1e-3; bound 1e-2), and every prompt is spoken."""
    common = ("train.max_steps=1", "train.warmup_steps=1", "train.seed=7", "train.lr=0.0", "data.val_fraction=0.3",
              "eval.every=1", "eval.max_audio_seconds=0.2")
    vals = {}
    for precision in ("bf16", "fp32"):  # (the fp32 run for its validation loss only)
        cfg = tiny_config(tmp_path / precision, *common, f"train.precision={precision}", samples=12)
        # One prompt, cloning a reference clip's voice (bf16 generation on a CPU without native bf16 is slow)
        cfg.eval.prompts = listening_prompts(tmp_path)[1:2] if precision == "bf16" else []
        train(cfg)
        vals[precision] = val_rows(tmp_path / precision / "run")
    (b,), (f,) = vals["bf16"], vals["fp32"]
    assert b["step"] == 1 and b["samples"] == f["samples"] and b["audio_targets"] == f["audio_targets"]
    assert b["loss"] == pytest.approx(f["loss"], rel=1e-2) and b["loss"] != f["loss"]  # bf16 was in effect
    assert all(0 <= a <= 1 for a in b["per_codebook_acc"])
    folder = tmp_path / "bf16" / "run" / "samples" / "step_000001"
    written = json.loads((folder / "samples.json").read_text())["samples"]
    assert len(written) == 1 and written[0]["reference_audio"]
    for i in range(1):
        wave, rate = sf.read(str(folder / f"sample_{i:02d}.wav"), dtype="float32")
        assert len(wave) > 0 and rate > 0
    assert yaml.safe_load((tmp_path / "bf16" / "run" / "config.yaml").read_text())["train"]["precision"] == "bf16"
