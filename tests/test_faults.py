"""Faults under torchrun with 2 gloo ranks: a stop signal to one rank, a worker killed outright, ranks
whose weights diverged. Each ends with the same weights as an uninterrupted run, or stops loudly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TORCHRUN_ENV, read_metrics, tiny_config, torchrun, torchrun_cmd
from test_checkpoint import assert_same_weights, final_weights, rows

pytestmark = pytest.mark.slow

MAX_STEPS = 160  # about 5 s at ~30 steps/s: long enough that a fault surely lands mid-run
COMMON = (f"train.max_steps={MAX_STEPS}", "train.save_every=4", "train.keep_last=2", "train.lr=5e-3",
          "train.warmup_steps=1", "train.seed=5", "lora.dropout=0.1", "train.micro_batch_size=1")


def write_config(tmp_path, name, *overrides) -> Path:
    cfg = tiny_config(tmp_path / name, *COMMON, *overrides, samples=24)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def workers(launcher_pid: int) -> dict:
    """rank -> pid of torchrun's worker processes."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher_pid:
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
                if "RANK" in env:
                    found[int(env["RANK"])] = int(d.name)
        except (OSError, ValueError):
            continue
    return found


def wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = torchrun(2, "--config", write_config(tmp, "ref"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "ref" / "run"


@pytest.mark.parametrize("sig,rank", [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)], ids=["usr1-rank1", "term-rank0"])
def test_stop_signal_to_one_rank_stops_all_then_resumes_exactly(tmp_path, uninterrupted, sig, rank):
    config = write_config(tmp_path, "run")
    run = tmp_path / "run" / "run"
    proc = subprocess.Popen(torchrun_cmd(2, "--config", config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=TORCHRUN_ENV, cwd=ROOT)
    wait_for(lambda: logged_steps(run) >= 5, "training to start")
    os.kill(workers(proc.pid)[rank], sig)  # one rank only: the other learns it through the all-reduce
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["signal"] == sig.name
    stopped_at = status["step"]
    assert stopped_at < MAX_STEPS and f"stopped by {sig.name} after step {stopped_at}" in out
    assert (run / "checkpoints" / f"step_{stopped_at:06d}").is_dir()

    again = torchrun(2, "--config", config)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped_at:06d}'}" in again.stdout
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert_same_weights(final_weights(run), final_weights(uninterrupted))
    assert rows(run) == rows(uninterrupted)


def test_sigkill_under_max_restarts_resumes_from_last_checkpoint(tmp_path, uninterrupted):
    config = write_config(tmp_path, "run")
    run = tmp_path / "run" / "run"
    proc = subprocess.Popen(torchrun_cmd(2, "--config", config, launcher=("--max-restarts=1",)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TORCHRUN_ENV, cwd=ROOT)
    wait_for(lambda: (run / "checkpoints" / "step_000008").is_dir(), "the second checkpoint")
    killed = workers(proc.pid)[1]
    os.kill(killed, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    resumed = [line for line in out.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1, out[-4000:]  # the restart continued from a checkpoint, not from scratch
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert_same_weights(final_weights(run), final_weights(uninterrupted))
    assert rows(run) == rows(uninterrupted)


def test_ranks_with_different_weights_refuse_to_checkpoint(tmp_path):
    """Bypass DDP for one step (what public trainers did): the checkpoint's checksum all-reduce catches it."""
    cfg = tiny_config(tmp_path, "train.micro_batch_size=1", "train.lr=1e-2")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "rank_sync_worker.py"), str(path), str(out), "bypass", "checkpoint"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=TORCHRUN_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_param_diff"] > 0
    assert "ranks hold different trainable weights at step 1" in result["checkpoint_error"]
    assert "gradients were not synchronised" in result["checkpoint_error"]
    assert not (tmp_path / "run" / "checkpoints" / "step_000001").exists()
