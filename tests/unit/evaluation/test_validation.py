"""Validation on 2 ranks equals 1 rank, leaves training unchanged, and TensorBoard holds the logged numbers.

Validation, listening samples and TensorBoard: 2 ranks report exactly what 1 rank does (token-weighted
reduction; prompts shared out by rank), evaluating does not change the training, the rows are in
metrics.jsonl with a split, and TensorBoard holds the same numbers."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from helpers import listening_prompts, read_metrics, tiny_config, torchrun, val_rows
from safetensors.torch import load_file

from higgs_ddp.config import ConfigError
from higgs_ddp.train import train

COMMON = ("train.max_steps=2", "train.warmup_steps=1", "train.seed=7", "data.val_fraction=0.3", "eval.every=1")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [pytest.param("ddp", marks=pytest.mark.extended), "fsdp"])
def test_two_ranks_report_the_validation_and_samples_of_one(tmp_path, parallel):
    """Under fsdp a forward is a collective: the ranks validate in lockstep (the one with fewer batches
    repeats one, uncounted) and speak every prompt together."""
    # lr 0: the weights stay the initial ones, so both runs validate (and speak with) the very same model.
    one = tiny_config(tmp_path / "one", *COMMON, "train.lr=0.0", "train.micro_batch_size=2", samples=20)
    one.eval.prompts = listening_prompts(tmp_path)
    train(one)
    two = tiny_config(tmp_path / "two", *COMMON, "train.lr=0.0", "train.micro_batch_size=1",
                      f"train.parallel={parallel}", samples=20)
    two.eval.prompts = listening_prompts(tmp_path)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two.to_dict()))
    proc = torchrun(2, "--config", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = val_rows(tmp_path / "one" / "run"), val_rows(tmp_path / "two" / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    n = a[0]["samples"]
    assert n % 2 == 1, "an odd number of validation samples splits unevenly over 2 ranks"
    for x, y in zip(a, b):
        assert (x["samples"], x["text_targets"], x["audio_targets"]) == (y["samples"], y["text_targets"],
                                                                          y["audio_targets"])
        for key in ("loss", "text_loss", "audio_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key
        assert x["per_codebook_loss"] == pytest.approx(y["per_codebook_loss"], rel=1e-5)
        assert x["per_codebook_acc"] == pytest.approx(y["per_codebook_acc"], abs=1e-9)
        assert all(0 <= acc <= 1 for acc in x["per_codebook_acc"])

    # Listening samples: rank 1 spoke prompt 1, rank 0 the others; rank 0 wrote them all, as 1 rank does.
    for step in ("step_000001", "step_000002"):
        da, db = tmp_path / "one" / "run" / "samples" / step, tmp_path / "two" / "run" / "samples" / step
        assert sorted(p.name for p in db.iterdir()) == ["sample_00.wav", "sample_01.wav", "sample_02.wav",
                                                        "samples.json"]
        for i in range(3):  # same codes; the decoder's convolutions round differently with 1 or 2 threads
            wa, wb = (sf.read(str(d / f"sample_{i:02d}.wav"), dtype="int16")[0] for d in (da, db))
            assert len(wa) == len(wb) > 0 and np.abs(wa.astype(int) - wb).max() <= 2
        sa, sb = (json.loads((d / "samples.json").read_text()) for d in (da, db))
        for s in sa["samples"] + sb["samples"]:
            s.pop("generate_seconds")
        assert sa == sb


def test_validation_changes_nothing_in_training_and_is_logged_with_a_split(tmp_path):
    base = ("train.max_steps=4", "train.warmup_steps=1", "train.seed=3", "lora.dropout=0.2",
            "data.val_fraction=0.3", "train.lr=5e-3")
    train(tiny_config(tmp_path / "plain", *base))
    train(tiny_config(tmp_path / "eval", *base, "eval.every=2", "logging.tensorboard=true"))
    name = "final/adapter_model.safetensors"
    w0, w1 = load_file(str(tmp_path / "plain" / "run" / name)), load_file(str(tmp_path / "eval" / "run" / name))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # dropout draws the same masks: the RNG is untouched

    rows = read_metrics(tmp_path / "eval" / "run")
    assert {r["split"] for r in rows} == {"train", "val"}
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    plain_val = val_rows(tmp_path / "plain" / "run")
    assert [r["step"] for r in plain_val] == [4]  # at the end even without eval.every
    assert plain_val[0]["loss"] == pytest.approx(val[-1]["loss"], rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "eval" / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss",
            "val_codebook/acc_0"} <= set(tags)
    tb_val = [e.value for e in events.Scalars("val/loss")]
    assert tb_val == pytest.approx([r["loss"] for r in val], rel=1e-6)


def test_eval_every_without_a_validation_set_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="eval.every needs a validation set"):
        train(tiny_config(tmp_path, "eval.every=5"))
