"""DDP really synchronises: two gloo ranks with different data end a step with identical weights.

The negative control shows the test can fail: calling the wrapped module directly (``ddp.module``),
as public Higgs trainers did, leaves the ranks with different weights.
"""

import json
import sys

import pytest
import yaml

from conftest import ROOT, tiny_config

pytestmark = pytest.mark.slow


def run_worker(tmp_path, *flags, mode="lora"):
    cfg = tiny_config(tmp_path, f"train.mode={mode}", "train.micro_batch_size=2", "train.lr=1e-2",
                      "train.warmup_steps=1", "data.shuffle=false")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "result.json"
    import subprocess
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "rank_sync_worker.py"), str(path), str(out), *flags],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    # Known torch/gloo teardown abort at interpreter exit (pytorch/pytorch#179291), seen about once in 30
    # worker runs here, after the result below was written: tolerated only in exactly that form.
    teardown_abort = "terminate called without an active exception" in proc.stderr and out.is_file()
    assert proc.returncode == 0 or teardown_abort, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ranks_stay_identical_after_a_step(tmp_path, mode):
    r = run_worker(tmp_path, mode=mode)
    assert not r["same_data"], "the ranks must see different samples for this test to mean anything"
    assert r["max_param_diff"] == 0.0


def test_bypassing_ddp_forward_desynchronises_ranks(tmp_path):
    r = run_worker(tmp_path, "bypass")
    assert not r["same_data"]
    assert r["max_param_diff"] > 1e-6
