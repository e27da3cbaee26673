"""The memory plan's NF4 rows equal the built model's bytes and hand arithmetic; the doctor and the run enforce them.

model.quantize=nf4 (quantize.py): 4 bits a weight, an int8 scale per 64 weights, a second-level scale per 64 x 256
weights and per tensor a mean and a 16-entry table, in the base's dtype. The tiny model's planned NF4 bytes are the
bytes its NF4 tensors hold; the 5.8B model's numbers are worked out below by hand, as docs/speed-and-memory.md
gives them; configs/higgs_v2_3b_qlora.yaml fits a 16 GB GPU by the plan, and a GPU too small is refused in one line."""

import copy

import pytest
import torch
from helpers import ROOT, tiny_config

from higgs_ddp.config import ConfigError, load_config
from higgs_ddp.model import build_for_training, load_tokenizer, model_config, unwrap
from higgs_ddp.quantize import is_nf4
from higgs_ddp.training import memory_plan as mp


def test_planned_nf4_bytes_are_the_built_models(tmp_path):
    cfg = tiny_config(tmp_path, "model.quantize=nf4", samples=2)
    tok = load_tokenizer(cfg)
    counts = mp.count_parameters(cfg, model_config(cfg, tok))
    raw = unwrap(build_for_training(cfg, tok, torch.float32))
    nf4 = [p for p in raw.parameters() if is_nf4(p)]
    held = sum(getattr(p, name).nbytes for p in nf4 for name in p.__tensor_flatten__()[0])
    assert counts.nf4 == sum(p.numel() for p in nf4) and counts.nf4_tensors == len(nf4) == 21
    assert counts.nf4_bytes(4) == held  # fp32 on the CPU: the scales and tables are fp32
    plain = sum(p.numel() * p.element_size() for p in raw.parameters() if not is_nf4(p) and not p.requires_grad)
    plan = mp.plan(counts, cfg, 1, bf16=False)
    assert plan.frozen_bytes == plain + held and plan.nf4_bytes == held
    assert plan.trainable_bytes == 16 * sum(p.numel() for p in raw.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def qlora():
    """configs/higgs_v2_3b_qlora.yaml's settings on the 5.8B architecture (bench_3b.yaml: no download)."""
    ours = load_config(str(ROOT / "configs" / "higgs_v2_3b_qlora.yaml"))
    cfg = load_config(str(ROOT / "configs" / "bench_3b.yaml"), ["model.quantize=nf4"])
    cfg.train, cfg.lora = ours.train, ours.lora
    assert ours.model.quantize == "nf4" and ours.train.activation_checkpointing
    assert ours.data.max_tokens_per_batch == 2048
    return cfg, mp.count_parameters(cfg, model_config(cfg, load_tokenizer(cfg)))


def test_the_5_8b_nf4_rows_by_hand(qlora):
    cfg, counts = qlora
    # Per decoder layer: q and o 3,072 x 3,072, k and v 1,024 x 3,072, and the text and the audio FFN three
    # 3,072 x 8,192 each: 2 * 9,437,184 + 2 * 3,145,728 + 6 * 25,165,824 = 176,160,768 weights, x 28 layers;
    # and the text head, 128,256 x 3,072.
    layers, head = 28 * 176_160_768, 128_256 * 3_072
    n = layers + head
    assert counts.nf4 == n == 4_932_501_504 + 394_002_432 == 5_326_503_936 and counts.nf4_tensors == 28 * 10 + 1
    # 0.5 B a weight; an int8 per 64; a bf16 per 64 x 256 (every weight's blocks split by 8: 256 for all, the
    # head's 6,156,288 blocks too: 3,006 x 2,048); a bf16 mean and 16 bf16 table entries per tensor.
    nf4 = n // 2 + n // 64 + 2 * (layers // 16_384 + head // 16_384) + 281 * 17 * 2
    assert nf4 == 2_663_251_968 + 83_226_624 + 2 * (301_056 + 24_048) + 9_554 == 2_747_138_354  # 0.5158 B a weight
    # The rest of the frozen base in bf16: embeddings 128,256 x 3,072, the audio head and the audio codebook
    # embeddings 8 x 1,026 x 3,072 each, 28 x 4 layer norms and the final one of 3,072.
    rest = 394_002_432 + 2 * 25_214_976 + 113 * 3_072
    assert counts.total - counts.trainable - counts.nf4 == rest == 444_779_520
    # LoRA r=16 on the 10 linears of 28 layers: 16 * (in + out) each, fp32 weight, gradient and 2 moments.
    lora = 28 * 16 * (2 * 6_144 + 2 * 4_096 + 6 * 11_264)
    assert counts.trainable == lora == 39_452_672
    plan = mp.plan(counts, cfg, 1, bf16=True)
    assert plan.nf4_bytes == nf4
    # 4.27 GB: the goal is <= 4.5 (12.2 without NF4; 4.85 with the text head in bf16)
    assert plan.per_gpu_bytes == nf4 + 2 * rest + 16 * lora == 4_267_940_146
    assert plan.describe().startswith("4.3 GB of model state per GPU (one device on 1: 3.6 frozen (of which 2.75 NF4)")
    fsdp = copy.deepcopy(cfg)
    fsdp.train.parallel = "fsdp"
    assert mp.plan(counts, fsdp, 2, bf16=True).nf4_bytes == nf4 / 2


def test_the_run_and_the_doctor_enforce_the_nf4_plan(qlora, tmp_path):
    cfg, counts = qlora
    plan = mp.plan(counts, cfg, 1, bf16=True)
    mp.check_fits(plan, 16e9, cfg, counts, True)  # one 16 GB GPU holds it
    with pytest.raises(ConfigError) as e:
        mp.check_fits(plan, 4e9, cfg, counts, True)
    assert "\n" not in str(e.value) and str(e.value).startswith("this run needs 4.3 GB of model state per GPU")
    cfg = copy.deepcopy(cfg)
    cfg.model.quantize = "none"  # an 8 GB card: refused without NF4 (12.2 GB), fits with it
    none = mp.count_parameters(cfg, model_config(cfg, load_tokenizer(cfg)))
    with pytest.raises(ConfigError, match="needs 12.2 GB"):
        mp.check_fits(mp.plan(none, cfg, 1, True), 8e9, cfg, none, True)
    mp.check_fits(plan, 8e9, cfg, counts, True)

    from higgs_ddp.tools.doctor.startup import check_memory_plan

    tiny = tiny_config(tmp_path, "model.quantize=nf4", samples=2)
    result, _speak = check_memory_plan(tiny)  # the training plan, then speak / score's
    assert "NF4)" in result.message, result.message
