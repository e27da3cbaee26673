"""The memory arithmetic equals the built model's counts, and a run that cannot fit is refused in one line.

The memory arithmetic the run checks before building any weight (training/memory_plan.py): counts equal
the built model's, the 5.8B numbers are docs/speed-and-memory.md's, and a run that cannot fit is refused in one line
that names a setting that fits."""

import copy

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
    # and 8-bit AdamW per mode, LoRA over an NF4 base (test_memory_plan_nf4.py) on ddp and fsdp, speak / score
    assert len(rows) == 2 + 3 * 2 + 3 + 2 + 2
    assert rows[2].startswith("| full | ddp | 92.3 |")
    assert rows[11].startswith("| lora, model.quantize=nf4 | ddp | 4.3 |")


def test_8bit_moments_and_bf16_inference_by_hand(real_size):
    """Worked by hand: 5.77B trained weights at 4 (weight) + 4 (gradient) + 2 x (1 + 4/256) (two 8-bit moments,
    a uint8 code each and an fp32 scale per 256) = 10.03 bytes is 57.9 GB, within the 62 GB goal for one 80 GB
    GPU; speak / score of the merged model: 5.77B x 2 bytes = 11.5 GB in bf16, 23.1 GB in fp32."""
    cfg, mc, counts = real_size
    n = counts.trainable
    cfg.train.parallel, cfg.train.fsdp.cpu_offload, cfg.train.optimizer = "ddp", False, "adamw8bit"
    one = mp.plan(counts, cfg, 1, bf16=True)
    assert one.trainable_bytes == n * (4 + 4 + 2 * (1 + 4 / 256))
    assert one.per_gpu_bytes / 1e9 == pytest.approx(57.9, abs=0.05) and one.per_gpu_bytes <= 62e9
    assert "8-bit AdamW moments" in one.describe()
    mp.check_fits(one, 80e9, cfg, counts, True)  # fits one 80 GB GPU
    cfg.train.optimizer = "adamw"
    with pytest.raises(ConfigError, match=r"fsdp on 2 or more GPUs .*, or train.optimizer=adamw8bit would fit \(57.9 GB each\)"):
        mp.check_fits(mp.plan(counts, cfg, 1, True), 80e9, cfg, counts, True)
    assert mp.inference_bytes(counts.total, "bf16") / 1e9 == pytest.approx(11.54, abs=0.01)
    assert mp.inference_bytes(counts.total, "fp32") == 2 * mp.inference_bytes(counts.total, "bf16")
    rows = mp.table(cfg, mc).splitlines()
    assert rows[8].startswith("| full | ddp, adamw8bit | 57.9 | 57.9 |")
    assert rows[-2:] == ["| speak / score | fp32 weights | 23.1 | | | |", "| speak / score | bf16 weights | 11.5 | | | |"]


def test_the_one_gpu_full_config_fits_its_goal(real_size):
    """configs/higgs_v2_3b_full_1gpu.yaml (the released model, bench_3b.yaml's architecture): <= 62 GB."""
    _, _, counts = real_size
    cfg = load_config(str(ROOT / "configs" / "higgs_v2_3b_full_1gpu.yaml"))
    one = mp.plan(counts, cfg, 1, bf16=True)
    assert one.per_gpu_bytes / 1e9 == pytest.approx(57.9, abs=0.05) and one.per_gpu_bytes <= 62e9


def test_dpo_counts_its_frozen_reference_copy(real_size):
    """train.objective=dpo in full mode holds a second model, the starting weights in the policy's dtypes (all
    trained here, so fp32): 5.77B x 4 bytes = 23.1 GB, an eighth of it per GPU under FSDP on 8. audio_ffn's copy
    shares the frozen weights with the policy, except under FSDP. LoRA's reference is the adapter switched off."""
    cfg, mc, counts = real_size
    cfg = copy.deepcopy(cfg)  # (the module's fixture: the modes changed below stay here)
    cfg.train.parallel, cfg.train.fsdp.cpu_offload, cfg.train.optimizer = "ddp", False, "adamw"
    sft = mp.plan(counts, cfg, 8, bf16=True)
    cfg.train.objective = "dpo"
    ddp = mp.plan(counts, cfg, 8, bf16=True)
    assert ddp.reference_bytes == counts.total * 4 and ddp.reference_bytes / 1e9 == pytest.approx(23.1, abs=0.05)
    assert ddp.per_gpu_bytes == sft.per_gpu_bytes + ddp.reference_bytes and "23.1 DPO reference" in ddp.describe()
    cfg.train.parallel = "fsdp"
    assert mp.plan(counts, cfg, 8, bf16=True).reference_bytes == ddp.reference_bytes / 8
    one = mp.plan(counts, cfg, 1, True)  # 92.3 + 23.1 GB: an H200 holds it, a 100 GB GPU does not
    mp.check_fits(one, 141e9, cfg, counts, True)
    with pytest.raises(ConfigError, match="fsdp on 2 or more GPUs"):
        mp.check_fits(one, 100e9, cfg, counts, True)
    cfg.train.mode = "audio_ffn"
    ffn = mp.count_parameters(cfg, mc)
    assert mp.plan(ffn, cfg, 8, bf16=True).reference_bytes == (ffn.trainable * 4 + (ffn.total - ffn.trainable) * 2) / 8
    cfg.train.parallel = "ddp"
    assert mp.plan(ffn, cfg, 8, bf16=True).reference_bytes == ffn.trainable * 4
    cfg.train.mode = "lora"
    assert mp.plan(mp.count_parameters(cfg, mc), cfg, 8, bf16=True).reference_bytes == 0
