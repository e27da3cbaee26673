"""The memory arithmetic equals the built model's counts, and a run that cannot fit is refused in one line.

The memory arithmetic the run checks before building any weight (training/memory_plan.py): counts equal
the built model's, the 5.8B numbers are docs/speed-and-memory.md's, and a run that cannot fit is refused in one line
that names a setting that fits."""

import pytest
from helpers import ROOT, tiny_config

from higgs_ddp.config import ConfigError, load_config
from higgs_ddp.model import build_for_training, load_tokenizer, model_config
from higgs_ddp.training import memory_plan as mp


@pytest.mark.parametrize("mode", ["lora", "audio_ffn", "full"])
def test_counts_on_the_meta_device_equal_the_built_model(tmp_path, mode):
    import torch

    cfg = tiny_config(tmp_path, f"train.mode={mode}")
    tok = load_tokenizer(cfg)
    counts = mp.count_parameters(cfg, model_config(cfg, tok))
    model = build_for_training(cfg, tok, torch.float32)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < counts.largest_unit < counts.total


@pytest.fixture(scope="module")
def real_size():
    cfg = load_config(str(ROOT / "configs" / "bench_3b.yaml"), ["train.mode=full"])
    mc = model_config(cfg, load_tokenizer(cfg))
    return cfg, mc, mp.count_parameters(cfg, mc)


def test_the_full_model_needs_92_gb_under_ddp_and_an_eighth_under_fsdp_on_8(real_size):
    cfg, _, counts = real_size
    assert counts.total == counts.trainable == pytest.approx(5.77e9, rel=1e-3)
    ddp = mp.plan(counts, cfg, 8, bf16=True)
    assert ddp.per_gpu_bytes / 1e9 == pytest.approx(92.3, abs=0.05)
    cfg.train.parallel = "fsdp"
    fsdp = mp.plan(counts, cfg, 8, bf16=True)
    assert fsdp.trainable_bytes == pytest.approx(ddp.trainable_bytes / 8)
    assert fsdp.per_gpu_bytes / 1e9 == pytest.approx(11.5 + fsdp.gathered_bytes / 1e9, abs=0.05)
    cfg.train.fsdp.cpu_offload = True
    assert mp.plan(counts, cfg, 8, bf16=True).per_gpu_bytes == fsdp.gathered_bytes


def test_a_run_that_cannot_fit_is_refused_naming_what_fits(real_size):
    cfg, _, counts = real_size
    cfg.train.parallel, cfg.train.fsdp.cpu_offload = "ddp", False
    with pytest.raises(ConfigError) as e:
        mp.check_fits(mp.plan(counts, cfg, 8, True), 80e9, cfg, counts, True)
    msg = str(e.value)
    assert "\n" not in msg and "92.3 GB" in msg and "train.parallel=fsdp on 2 or more GPUs" in msg
    assert "train.check_memory=false" in msg
    mp.check_fits(mp.plan(counts, cfg, 8, True), 141e9, cfg, counts, True)  # an H200 holds it
    cfg.train.parallel = "fsdp"
    mp.check_fits(mp.plan(counts, cfg, 8, True), 80e9, cfg, counts, True)
    with pytest.raises(ConfigError, match="fsdp on 11 or more GPUs .*, or train.fsdp.cpu_offload=true"):
        mp.check_fits(mp.plan(counts, cfg, 8, True), 12e9, cfg, counts, True)  # 8 GPUs of 12 GB: too few


def test_the_table_has_every_mode_and_strategy(real_size):
    cfg, mc, _ = real_size
    rows = mp.table(cfg, mc).splitlines()
    assert len(rows) == 2 + 3 * 2 + 2  # and LoRA over an NF4 base (test_memory_plan_nf4.py), ddp and fsdp
    assert rows[2].startswith("| full | ddp | 92.3 |")
    assert rows[8].startswith("| lora, model.quantize=nf4 | ddp | 4.9 |")
