"""DPO's update does not depend on how the global batch of pairs is split, nor on DDP or FSDP.

1 process x 2 pairs a micro-batch == 1 process x accumulation 2 == 2 DDP ranks == 2 FSDP ranks: the same
losses, rewards, gradient norms and final adapter after several steps. It holds only because the loss is
divided by the global number of pairs over ranks and micro-steps (and the reference, the adapter switched
off, is computed on each rank's own pairs).
"""

import pytest
import torch
from helpers import EQUIVALENCE_RUN, FSDP, dpo_overrides, read_metrics, run_two_ranks, tiny_config, weights, write_tiny_pairs

from higgs_ddp.train import train

pytestmark = pytest.mark.slow

LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "sft_loss", "pairs", "tokens")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    # sft_weight > 0: the supervised term's global normalisation (by the chosen candidates' targets) too
    return dpo_overrides(write_tiny_pairs(tmp_path_factory.mktemp("prefs") / "prefs", prompts=8, reference=True),
                         "dpo.sft_weight=0.5", "dpo.beta=0.5")


def in_process(tmp_path, name, *overrides):
    train(tiny_config(tmp_path / name, "train.mode=lora", *EQUIVALENCE_RUN, *overrides, samples=2))
    return tmp_path / name / "run"


@pytest.fixture(scope="module")
def batch2(tmp_path_factory, pairs):
    return in_process(tmp_path_factory.mktemp("batch2"), "batch2", *pairs, "train.micro_batch_size=2")


def assert_same_run(run, ref_run, name):
    ref, ref_rows, m = weights(ref_run, "lora"), read_metrics(ref_run), read_metrics(run)
    assert ref_rows[-1]["rewards/margins"] != 0 and max(float(v.abs().max()) for k, v in ref.items()
                                                        if "lora_B" in k) > 1e-4  # it did train
    for key in LOGGED:
        # (rewards are beta x a difference of two fp32 sums of hundreds of log-probabilities: ~1e-5 apart
        # when the batch is padded differently; a normalisation error would be a factor 2)
        assert [x[key] for x in m] == pytest.approx([x[key] for x in ref_rows], rel=1e-4, abs=1e-5), (name, key)
    assert [x["grad_norm"] for x in m] == pytest.approx([x["grad_norm"] for x in ref_rows], rel=1e-4), name
    w = weights(run, "lora")
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], rtol=1e-3, atol=1e-4, msg=f"{name}: {k}")


def test_batch2_equals_accumulation2_equals_two_ddp_ranks(tmp_path, pairs, batch2):
    assert_same_run(in_process(tmp_path, "accum2", *pairs, "train.micro_batch_size=1", "train.grad_accum_steps=2"),
                    batch2, "accum2")
    assert_same_run(run_two_ranks(tmp_path, "ddp2", "lora", *pairs, "train.micro_batch_size=1"), batch2, "ddp2")


@pytest.mark.extended
def test_two_fsdp_ranks_equal_one_process(tmp_path, pairs, batch2):
    """Under FSDP2 the reference forward (the adapter off) gathers the same sharded weights the policy uses."""
    assert_same_run(run_two_ranks(tmp_path, "fsdp2", "lora", *pairs, *FSDP, "train.micro_batch_size=1"), batch2,
                    "fsdp2")
