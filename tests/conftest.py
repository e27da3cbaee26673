"""Shared helpers: the tiny config (the same file the demo uses), its tokenizer, a synthetic corpus,
and a torchrun launcher for multi-process tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# The demo's validation split, listening samples and TensorBoard: off unless a test asks for them. Like
# data.num_workers=0 below, not what users run: test_faults.write_user_config turns them all back on for
# one test of each fault kind (stop signals, a killed rank, Slurm).
QUIET = ("data.val_fraction=0", "eval.every=0", "eval.prompts=[]", "logging.tensorboard=false")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (pytest.ini) are skipped where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-acceptance runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def tiny_config(tmp_path, *overrides, samples=16, audio=False):
    """configs/tiny.yaml on a fresh synthetic corpus: .npy codes, or WAV files (audio=True) for the codec."""
    from higgs_ddp.config import load_config
    from higgs_ddp.tools.demo_data import write_demo_corpus

    manifest = write_demo_corpus(tmp_path / "data", samples=samples, audio=audio)
    return load_config(str(TINY), [f"output_dir={tmp_path / 'run'}", f"data.manifest={manifest}",
                                   f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", *QUIET, *overrides])


@pytest.fixture(scope="session")
def tokenizer():
    from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun_cmd(nproc, *args, launcher=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *launcher, str(ROOT / "src" / "higgs_ddp" / "train.py"), *map(str, args)]


def torchrun(nproc, *args, timeout=300):
    """Run train.py under torchrun on CPU; returns the CompletedProcess (output captured)."""
    return subprocess.run(torchrun_cmd(nproc, *args), capture_output=True, text=True, timeout=timeout,
                          env=TORCHRUN_ENV, cwd=ROOT)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# The uninterrupted 2-rank reference runs that several modules compare with (faults, Slurm, several
# nodes): each runs once per session.
@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """test_faults.write_config's run on 2 ranks, uninterrupted. No DataLoader workers: their number changes
    nothing in the batches, so every run compares with it (the Slurm runs have one)."""
    from test_faults import uninterrupted_run, write_config

    return uninterrupted_run(tmp_path_factory, "uninterrupted", write_config)


@pytest.fixture(scope="session")
def uninterrupted_user_path(tmp_path_factory):
    """test_faults.write_user_config's run (the user's whole path) on 2 ranks, uninterrupted."""
    from test_faults import uninterrupted_run, write_user_config

    return uninterrupted_run(tmp_path_factory, "uninterrupted_user_path", write_user_config)


@pytest.fixture(scope="session")
def uninterrupted_fsdp(tmp_path_factory):
    """test_faults.write_config's run under train.parallel=fsdp (test_faults.FSDP) on 2 ranks, uninterrupted."""
    from test_faults import FSDP, uninterrupted_run, write_config

    return uninterrupted_run(tmp_path_factory, "uninterrupted_fsdp", lambda tmp, name: write_config(tmp, name, *FSDP))
