"""What only a GPU runs (marked cuda): pinned batches, bf16 autocast, fused AdamW, NCCL, exact CUDA resume.

What only a GPU runs: pinned batches copied on a side stream, bf16 autocast on CUDA with fp32 trainable
weights and AdamW state, fused AdamW, an NCCL process group, the CUDA generator in checkpoints and an exact
resume, and the memory figure logged from ``max_memory_allocated``. Marked ``cuda``: skipped without a CUDA
device (conftest), run by ``pytest -m cuda`` (``make gpu-acceptance``)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY, TORCHRUN_ENV, read_metrics, tiny_config
from safetensors.torch import load_file

from higgs_ddp.data.prefetch import Prefetcher
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.train import train
from higgs_ddp.training import checkpoint
from higgs_ddp.training.trainer import Trainer

pytestmark = pytest.mark.cuda

STEPS = ("train.max_steps=4", "train.lr=5e-3", "train.warmup_steps=1", "train.seed=7")


def gpu() -> DistEnv:
    """One rank on GPU 0, as setup_distributed makes it for a single process."""
    torch.cuda.set_device(0)
    return DistEnv(device=torch.device("cuda", 0), backend="nccl")


def test_pinned_batches_are_copied_on_a_side_stream(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, *STEPS), gpu())
    it = iter(trainer.loader)
    cpu = [next(it) for _ in range(3)]
    assert all(b.input_ids.is_pinned() and b.audio_out_ids.is_pinned() for b in cpu)  # pin_memory on CUDA
    streams, make_stream = [], torch.cuda.Stream
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: streams.append(make_stream(*a, **k)) or streams[-1])
    prefetcher = Prefetcher(iter(cpu), trainer.env.device)
    try:
        got = [next(prefetcher) for _ in range(3)]
    finally:
        prefetcher.close()
    assert len(streams) == 1 and streams[0] != torch.cuda.default_stream(0)  # the copies' own stream
    assert torch.cuda.current_stream(0) == torch.cuda.default_stream(0)  # the step's stream is untouched
    for g, c in zip(got, cpu):
        for name in c.__dataclass_fields__:
            a, b = getattr(g, name), getattr(c, name)
            if isinstance(b, torch.Tensor):
                assert a.device.type == "cuda" and torch.equal(a.cpu(), b), name


def test_bf16_autocast_on_cuda_keeps_trainable_weights_and_fused_adamw_state_in_fp32(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, *STEPS), gpu())  # train.precision=auto: bf16 on a GPU
    assert trainer.precision == "bf16"
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters() if not p.requires_grad)
    seen = {}

    def hook(module, args, out):
        seen["dtype"], seen["autocast"] = out.dtype, torch.is_autocast_enabled("cuda")

    handle = trainer.raw.layers[0].mlp.register_forward_hook(hook)
    batches = trainer.batches()
    try:
        r = trainer.train_step([next(batches)])
    finally:
        batches.close()
        handle.remove()
    assert seen == {"dtype": torch.bfloat16, "autocast": True}
    assert not r.skipped and torch.isfinite(torch.tensor([r.loss, r.grad_norm])).all()
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainer.params)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)  # one kernel for all tensors
    states = [trainer.optimizer.state[p] for p in trainer.params]
    assert len(states) == len(trainer.params)
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 and s["exp_avg"].is_cuda for s in states)


def test_nccl_process_group_of_one_rank(tmp_path):
    """In a process of its own (a process group is process-wide): NCCL set up as setup_distributed sets it up
    for several ranks, then the collectives a run uses, a checkpoint's RNG gather among them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = """
import datetime, torch, torch.distributed as dist
from higgs_ddp.runtime.distributed import all_gather_objects, all_reduce_max, all_reduce_sum, barrier, cleanup
from higgs_ddp.training.checkpoint import _rng_state
torch.cuda.set_device(0)
dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=2), device_id=torch.device("cuda", 0))
assert dist.get_backend() == "nccl"
t = all_reduce_sum(torch.ones(3, device="cuda"))
assert t.tolist() == [1.0, 1.0, 1.0] and all_reduce_max(torch.tensor([2.0], device="cuda")).item() == 2.0
(tensors, plain), = all_gather_objects(_rng_state())
assert "torch_cuda" in tensors
barrier()
cleanup()
print("nccl ok")
"""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_cuda_rng_in_checkpoints_and_exact_resume_on_the_gpu(tmp_path, monkeypatch, deterministic_algorithms):
    """LoRA dropout draws from the CUDA generator. Step 3 after a resume from step 2 sees the same weights,
    batch and dropout masks as the uninterrupted run: its loss is equal bit for bit (a forward only). The
    later values are compared to 1e-5 relative: sdpa's memory-efficient attention backward adds with atomics
    by default, so two backwards need not sum in the same order (deterministic algorithms are asked for,
    warn-only, which should make them equal). Negative control: the same resume without the CUDA
    generator's state gets other masks, so another step-3 loss."""
    common = (*STEPS, "train.save_every=2", "train.keep_last=0", "lora.dropout=0.3")
    train(tiny_config(tmp_path / "straight", *common))
    straight = tmp_path / "straight" / "run"
    half = straight / "checkpoints" / "step_000002"
    rng = load_file(str(half / "rng.safetensors"))
    assert rng["rank0.torch_cuda"].numel() == torch.cuda.get_rng_state().numel()

    train(tiny_config(tmp_path / "resumed", *common, f"train.resume={half}"))
    a, b = read_metrics(tmp_path / "resumed" / "run"), read_metrics(straight)[2:]
    assert [x["step"] for x in a] == [3, 4]
    assert a[0]["loss"] == b[0]["loss"] and a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-5)
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-5)
    wa = load_file(str(tmp_path / "resumed" / "run" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(straight / "final" / "adapter_model.safetensors"))
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)

    restore = checkpoint._set_rng_state
    monkeypatch.setattr(checkpoint, "_set_rng_state",
                        lambda tensors, plain: restore({k: v for k, v in tensors.items() if k != "torch_cuda"}, plain))
    train(tiny_config(tmp_path / "no_cuda_rng", *common, f"train.resume={half}"))
    assert read_metrics(tmp_path / "no_cuda_rng" / "run")[0]["loss"] != b[0]["loss"]


def test_peak_gpu_memory_is_logged(tmp_path):
    train(tiny_config(tmp_path, *STEPS))
    rows = read_metrics(tmp_path / "run")
    memory = [r["gpu_memory_gb"] for r in rows]
    assert len(memory) == 4 and all(0 < m <= torch.cuda.get_device_properties(0).total_memory / 1e9 for m in memory)
    assert memory == sorted(memory)  # a peak since the start: it never goes down
    assert memory[-1] <= torch.cuda.max_memory_allocated(0) / 1e9  # this process's peak includes the run's


def test_more_ranks_per_node_than_gpus_is_one_line(tmp_path):
    """make demo starts 2 ranks; on a 1-GPU machine rank 1 would ask for cuda:1. Every rank refuses first, and
    the run ends with the one line that says what to start instead."""
    env = {**TORCHRUN_ENV, "CUDA_VISIBLE_DEVICES": "0"}  # one GPU visible, two ranks asked for
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp", "train", "--nproc-per-node", "2", "--config", str(TINY),
                           f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.rstrip().splitlines()[-1] == ("higgs-ddp: error: 2 processes per node but 1 GPU(s) visible: "
                                                     "start one per GPU (--nproc-per-node 1), or make more GPUs "
                                                     "visible (CUDA_VISIBLE_DEVICES)")
