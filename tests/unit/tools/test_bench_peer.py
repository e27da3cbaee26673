"""The benchmark's peer (a transformers.Trainer) sees the same model and data: its first loss is ours.

The benchmark's peer (a transformers.Trainer with its own compute_loss, as the public Higgs trainers
write it) trains, counts tokens like us, frees its model, and sees the same model and data as our
Trainer: its first micro-batch loss is ours."""

import math
import weakref

import pytest
import transformers
from helpers import tiny_config

from higgs_ddp.model import load_tokenizer, model_config
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools.bench import peer
from higgs_ddp.tools.bench.synthetic import synthetic_data
from higgs_ddp.training.trainer import Trainer

SEQ_LEN = 256


def setup(tmp_path, *overrides, samples=16):
    cfg = tiny_config(tmp_path, "data.shuffle=false", *overrides)
    tokenizer = load_tokenizer(cfg)
    return cfg, synthetic_data(tokenizer, model_config(cfg, tokenizer), samples, SEQ_LEN, 0.85, cfg.train.seed)


def test_peer_trains_counts_tokens_and_frees_its_model(tmp_path, monkeypatch):
    # Accumulation, and the public trainers' gradient_checkpointing request, which the tiny model (no
    # audio tower) cannot take: the peer must run without it and say so.
    cfg, data = setup(tmp_path, "train.grad_accum_steps=2", "train.activation_checkpointing=true")
    models = []
    build = peer.build_for_training
    monkeypatch.setattr(peer, "build_for_training", lambda *a, **k: models.append(build(*a, **k)) or models[-1])
    verbosity = transformers.logging.get_verbosity()

    steps, warmup = 4, 1
    r = peer.run_peer(cfg, DistEnv(), data, steps=steps, warmup=warmup)

    assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0
    # Positions per step: 2 micro-batches x 2 samples x SEQ_LEN, from the batches themselves.
    assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(2 * 2 * SEQ_LEN, rel=1e-9)
    assert r["peak_memory_bytes"] is None
    assert r["gradient_checkpointing"] is False
    assert len(r["losses"]) == warmup + steps and all(math.isfinite(x) for x in r["losses"])
    assert r["losses"][-1] < r["losses"][0]  # it trains
    assert r["first_micro_loss"] != r["losses"][0]  # a step's loss is the mean of its two micro-batches
    assert transformers.logging.get_verbosity() == verbosity
    model = weakref.ref(models.pop())
    assert model() is None, "run_peer left its model alive"


def test_peer_first_micro_batch_loss_is_ours(tmp_path):
    cfg, data = setup(tmp_path)
    ours = Trainer(cfg, DistEnv(), data=data)
    batches = iter(ours.loader)
    losses = []
    for _ in range(2):
        batch = next(batches)
        losses.append(ours.loss(ours.wrapped(**batch.model_inputs()), batch, check=True).loss.item())
    del ours

    r = peer.run_peer(cfg, DistEnv(), data, steps=1, warmup=0)

    # Same initial weights (same builder, seed and LoRA init), same first batch, same loss.
    assert r["first_micro_loss"] == pytest.approx(losses[0], rel=1e-5)
    assert losses[1] != pytest.approx(losses[0], rel=1e-5)  # another batch would have been noticed
