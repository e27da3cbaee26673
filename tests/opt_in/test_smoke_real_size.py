"""`higgs-ddp smoke` at the real vocabulary and head sizes trains, resumes and exports (marked smoke).

`higgs-ddp smoke` at the real vocabulary, head and codebook sizes with 2 decoder layers (1.2B parameters,
2.4 GB in bf16): the boson-format folder loaded through model.path, LoRA in bf16 with activation
checkpointing and the deferred head, resume, both exports, the merged folder loaded back.

Opt-in (`pytest -m smoke`, about 4 minutes and 7 GB of memory on 2 cores): the default suite cannot afford it.
`make smoke-3b` runs the same command at the full 28 layers."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.smoke


def test_the_real_sizes_build_load_train_resume_export_and_reload(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp", "smoke", "--config", str(ROOT / "configs/bench_3b.yaml"),
                           "--out", str(out), "--layers", "2", "--steps", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["smoke"] == "ok" and result["layers"] == 2
    assert 1.1e9 < result["parameters"] < 1.3e9  # 2 x 128,256 x 3,072 text embedding and head dominate
    losses = result["losses"]
    assert len(losses) == 4 and losses[2] < losses[0]  # 3 steps, then the resumed one
    assert result["merged_loss"] < losses[0]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["audio_out_token_idx"] == 128016 and config["text_config"]["vocab_size"] == 128256
    assert len(list((out / "model").glob("model-*-of-*.safetensors"))) >= 2  # sharded, with its index
    assert (out / "model" / "model.safetensors.index.json").exists()
    merged = json.loads((out / "export" / "merged" / "export.json").read_text())
    assert merged["dtype"] == "bfloat16" and merged["merged"]
    phases = {p["phase"]: p for p in result["phases"]}
    # bf16 all the way: no phase holds an fp32 copy of the model (4.8 GB at this size).
    assert all(p["peak_rss_gb"] < 2 * result["bf16_weights_gb"] for p in phases.values()), phases
