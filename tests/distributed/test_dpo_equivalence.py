"""DPO's update does not depend on how the pairs are split over micro-steps and ranks, on DDP or FSDP, nor on a kill.

1 process x 2 pairs a micro-batch == 1 process x accumulation 2 == 2 DDP ranks == 2 FSDP ranks: the same
losses, rewards, gradient norms and final weights after several steps, for LoRA (the reference: the adapter
switched off) and for train.mode=full (the reference: a frozen copy of the starting weights, on each rank under
DDP, sharded like the policy under FSDP; compared with 1 process x accumulation 2). It holds only because the
loss is divided by the global number of pairs over ranks and micro-steps (and the reference is computed on each
rank's own pairs). The same full-mode run SIGKILLed after a checkpoint and run again ends bit for bit where the
uninterrupted one did: the resumed run rebuilds the same reference (it is in no checkpoint).
"""


import pytest
import torch
import yaml
from helpers import (EQUIVALENCE_RUN, FSDP, assert_same_weights, dpo_overrides, final_weights,
                     kill_after_logged_steps,
                     read_metrics, run_two_ranks, run_two_ranks_each, tiny_config, weights, write_tiny_pairs)

from higgs_ddp.config import load_config
from higgs_ddp.train import train

pytestmark = pytest.mark.slow

LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "sft_loss", "pairs", "tokens")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    # sft_weight > 0: the supervised term's global normalisation (by the chosen candidates' targets) too
    return dpo_overrides(write_tiny_pairs(tmp_path_factory.mktemp("prefs") / "prefs", prompts=8, reference=True),
                         "dpo.sft_weight=0.5", "dpo.beta=0.5")


def in_process(tmp_path, name, *overrides, mode="lora"):
    train(tiny_config(tmp_path / name, f"train.mode={mode}", *EQUIVALENCE_RUN, *overrides, samples=2))
    return tmp_path / name / "run"


@pytest.fixture(scope="module")
def batch2(tmp_path_factory, pairs):
    return in_process(tmp_path_factory.mktemp("batch2"), "batch2", *pairs, "train.micro_batch_size=2")


def assert_same_run(run, ref_run, name, mode="lora"):
    ref, ref_rows, m = weights(ref_run, mode), read_metrics(ref_run), read_metrics(run)
    assert ref_rows[-1]["rewards/margins"] != 0
    if mode == "lora":
        assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-4  # it did train
    for key in LOGGED:
        # (rewards are beta x a difference of two fp32 sums of hundreds of log-probabilities: ~1e-5 apart
        # when the batch is padded differently; a normalisation error would be a factor 2)
        assert [x[key] for x in m] == pytest.approx([x[key] for x in ref_rows], rel=1e-4, abs=1e-5), (name, key)
    assert [x["grad_norm"] for x in m] == pytest.approx([x["grad_norm"] for x in ref_rows], rel=1e-4), name
    w = weights(run, mode)
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], rtol=1e-3, atol=1e-4, msg=f"{name}: {k}")


@pytest.fixture(scope="module")
def ddp2(tmp_path_factory, pairs):
    """The 2 DDP ranks' runs, LoRA and full, in one torchrun start."""
    return run_two_ranks_each(tmp_path_factory.mktemp("ddp2"), {
        "lora": ("lora", (*pairs, "train.micro_batch_size=1")),
        "full": ("full", (*pairs, *FULL, "train.micro_batch_size=1")),
    })


def test_batch2_equals_accumulation2_equals_two_ddp_ranks(tmp_path, pairs, batch2, ddp2):
    assert_same_run(in_process(tmp_path, "accum2", *pairs, "train.micro_batch_size=1", "train.grad_accum_steps=2"),
                    batch2, "accum2")
    assert_same_run(ddp2["lora"], batch2, "ddp2")


@pytest.mark.extended
def test_two_fsdp_ranks_equal_one_process(tmp_path, pairs, batch2):
    """Under FSDP2 the reference forward (the adapter off) gathers the same sharded weights the policy uses."""
    assert_same_run(run_two_ranks(tmp_path, "fsdp2", "lora", *pairs, *FSDP, "train.micro_batch_size=1"), batch2,
                    "fsdp2")


# train.mode=full: long enough to be killed mid-run, past a checkpoint (each full-mode run of this module runs it).
FULL = ("train.mode=full", *EQUIVALENCE_RUN, "train.max_steps=10", "train.save_every=3", "train.keep_last=0")


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs with one intra-op thread, as the subprocesses (OMP_NUM_THREADS=1): a killed run's first
    steps and its resumption then sum in the in-process run's order, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def full_config(tmp_path, name, pairs, *overrides):
    cfg = tiny_config(tmp_path / name, *FULL, *pairs, *overrides, samples=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


ACCUM2 = ("train.micro_batch_size=1", "train.grad_accum_steps=2")


@pytest.fixture(scope="module")
def full_accum2(tmp_path_factory, pairs, one_thread):
    """train.mode=full in one process, accumulation 2 (the batch-2 == accumulation-2 proof is the LoRA one's)."""
    tmp = tmp_path_factory.mktemp("full")
    train(load_config(str(full_config(tmp, "accum2", pairs, *ACCUM2))))
    return tmp / "accum2" / "run"


def test_full_mode_two_ddp_ranks_equal_one_process_with_accumulation(pairs, full_accum2, ddp2):
    """Each rank's frozen copy scores its own pairs; the policy's update is the same."""
    assert_same_run(ddp2["full"], full_accum2, "full ddp2", mode="full")


@pytest.mark.extended
def test_full_mode_two_fsdp_ranks_equal_one_process(tmp_path, pairs, full_accum2):
    """The frozen copy sharded with the policy's plan: each rank holds half of it, and its forward gathers it."""
    assert_same_run(run_two_ranks(tmp_path, "fsdp2", "full", *pairs, *FULL, *FSDP, "train.micro_batch_size=1"),
                    full_accum2, "full fsdp2", mode="full")


def test_full_mode_killed_run_resumes_exactly(tmp_path, pairs, full_accum2):
    """SIGKILL after the step-3 checkpoint (SIGSTOP first, so that it cannot finish meanwhile), then the same
    command: the reference is rebuilt from the starting weights, not from the checkpoint's."""
    path = full_config(tmp_path, "killed", pairs, *ACCUM2)
    run = tmp_path / "killed" / "run"
    kill_after_logged_steps(path, run)  # step 4 logged: past the step-3 checkpoint
    train(load_config(str(path)))  # the same command again: resumes from step 3
    assert_same_weights(final_weights(run), final_weights(full_accum2))
    keys = ("step", *LOGGED, "rewards/accuracies", "grad_norm", "lr")
    got, want = ([{k: row[k] for k in keys} for row in read_metrics(folder)] for folder in (run, full_accum2))
    assert got == want and len(want) == 10
