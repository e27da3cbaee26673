"""A short DPO run on pairs that prefer stopping raises the share of generated samples that stop by themselves.

Each pair's chosen candidate stops after a few frames and its rejected one runs on past the length limit with
the same first frames, marked as cut (what a candidate that stopped and one that hit the limit look like to the
loss: the shared frames cancel in the margin, the decision to stop does not, and the cut one has no end target). Six steps raise the stop rate of sampled
generations on the pairs' prompts; the same run with the pairs swapped (the negative control) lowers it. Seeds
are fixed, so the rates are the same on every run.
"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import dpo_overrides, tiny_config

from higgs_ddp.data.preferences import run_identity, write_pairs
from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer
from higgs_ddp.evaluation.generation import Sampling, generate_codes, generation_state
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.training.trainer import Trainer

pytestmark = pytest.mark.extended  # two short runs and 64 generations: 274 s measured on 2 cores shared at load ~10

TEXTS = [f"the quick fox {i} jumps" for i in range(8)]
LIMIT_SECONDS = 0.6  # 15 frames of the tiny codec: the rejected candidates (20-30 frames) hit it
RUN = ("train.micro_batch_size=4", "train.lr=5e-3", "train.warmup_steps=0", "dpo.beta=0.5", "train.max_steps=6")


def write(folder: Path, swapped: bool) -> Path:
    rng = np.random.default_rng(0)
    codes, lines = {}, []
    for i, text in enumerate(TEXTS):
        for j in range(2):
            long = rng.integers(0, 64, (4, int(rng.integers(20, 30))))
            codes[f"p{i}/long{j}"], codes[f"p{i}/short{j}"] = long, long[:, :int(rng.integers(3, 6))]
            stops, runs_on = {"key": f"p{i}/short{j}"}, {"key": f"p{i}/long{j}", "stopped": False}
            lines.append({"id": f"p{i}", "text": text, "chosen": runs_on if swapped else stops,
                          "rejected": stops if swapped else runs_on})
    header = {**run_identity("tiny", None, build_tiny_tokenizer(vocab_size=272), 4, 64), "model": "random codes"}
    return write_pairs(folder, header, lines, codes)


def stop_rate(trainer, n: int = 16) -> float:
    stopped = 0
    for i in range(n):
        with generation_state(trainer.raw, 10_000 + i):
            g = generate_codes(trainer.raw, trainer.tokenizer, SimpleNamespace(frame_rate=25), trainer.cfg,
                               TEXTS[i % len(TEXTS)],
                               sampling=Sampling(temperature=1.0, max_audio_seconds=LIMIT_SECONDS, seed=10_000 + i))
        stopped += not g.hit_limit
    return stopped / n


def trained(tmp_path: Path, swapped: bool) -> tuple[float, float, float]:
    """-> (stop rate before, after, the last step's margin)."""
    name = "swapped" if swapped else "prefer_stop"
    pairs = write(tmp_path / f"{name}_pairs", swapped)
    trainer = Trainer(tiny_config(tmp_path / name, *dpo_overrides(pairs, *RUN), samples=2), DistEnv())
    before = stop_rate(trainer)
    batches = trainer.batches()
    try:
        for _ in range(trainer.cfg.train.max_steps):
            r = trainer.train_step([next(batches)])
    finally:
        batches.close()
    return before, stop_rate(trainer), r.margin


def test_pairs_that_prefer_stopping_raise_the_stop_rate_and_swapped_ones_lower_it(tmp_path):
    before, after, margin = trained(tmp_path, swapped=False)
    assert margin > 1  # the pairs were learned
    assert after >= before + 0.2, (before, after)
    before_too, after_swapped, margin = trained(tmp_path, swapped=True)
    assert before_too == before and margin > 1
    assert after_swapped <= before - 0.2, (before, after_swapped)
