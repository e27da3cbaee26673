"""model.quantize=nf4 stores the frozen decoder linears and text head in 4 bits, refuses bad runs, exports full precision.

What is quantised (every frozen linear of the decoder layers and the text head, under LoRA too; the embeddings, the
audio head and the LoRA weights are not; a text head tied to the embeddings would not be), the
one-line refusals before any weight is built (another train.mode, torchao missing, an FSDP rank count the 4-bit
shards cannot split over), and export: the merged model computes what the full-precision base plus the adapter
computes (1e-5), not what the NF4 base plus the adapter computes, which differs from it by NF4's rounding only
(bound stated below)."""

import importlib.util

import pytest
import torch
from helpers import TINY, make_checkpoint, tiny_config, two_samples
from torch import nn

from higgs_ddp.config import ConfigError, check_machine, load_config
from higgs_ddp.model import HiggsForward, apply_training_mode, build_for_training, build_model, load_tokenizer, unwrap
from higgs_ddp.quantize import check, is_nf4, quantize_base, scaler_block
from higgs_ddp.tools.export import merged_model


@torch.no_grad()
def logits(model, b):
    out = HiggsForward(model).eval()(**b.model_inputs())
    return out["logits"], out["audio_logits"]


def test_the_frozen_decoder_linears_and_the_text_head_are_nf4_and_nothing_else(tmp_path):
    cfg = tiny_config(tmp_path, "model.quantize=nf4", samples=2)
    tok = load_tokenizer(cfg)
    raw = unwrap(build_for_training(cfg, tok, torch.float32))
    quantised = {n for n, p in raw.named_parameters() if is_nf4(p)}
    linears = {f"{n}.weight" for n, m in raw.layers.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n}
    head = "audio_decoder_proj.text_lm_head.weight"
    assert quantised == {f"layers.{n}" for n in linears} | {head}
    assert len(quantised) == 2 * (4 + 3 + 3) + 1  # attention, FFN, audio FFN; the text head
    assert all(p.dtype == torch.float32 and p.requires_grad for n, p in raw.named_parameters() if "lora_" in n)
    for kept in ("embed_tokens.weight", "audio_codebook_embeddings.weight", "audio_decoder_proj.audio_lm_head.weight"):
        assert not is_nf4(dict(raw.named_parameters())[kept]), kept
    # LoRA on the text head: the base layer it wraps is the 4-bit one.
    cfg.lora.target_modules = [*cfg.lora.target_modules, "text_lm_head"]
    raw = unwrap(build_for_training(cfg, tok, torch.float32))
    assert is_nf4(raw.audio_decoder_proj.text_lm_head.base_layer.weight)
    # A text head tied to the embedding table (not this model's way) stays plain: the lookup needs the table.
    cfg.lora.target_modules = cfg.lora.target_modules[:-1]
    model = build_model(cfg, tok)
    model.audio_decoder_proj.text_lm_head.weight = model.embed_tokens.weight
    quantize_base(apply_training_mode(model, cfg))
    assert model.audio_decoder_proj.text_lm_head.weight is model.embed_tokens.weight
    assert not is_nf4(model.embed_tokens.weight) and is_nf4(model.layers[0].mlp.up_proj.weight)
    # Block sizes: 64 a scale, second-level blocks of up to 256 that split over 8 FSDP ranks.
    assert scaler_block(3072 * 1024) == 256 and scaler_block(32 * 64) == 4 and scaler_block(100) is None
    assert scaler_block(272 * 64) == 2 and scaler_block(128_256 * 3_072) == 256  # the text heads: tiny, 5.8B


def test_what_nf4_cannot_do_is_one_line_before_any_weight(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, "model.quantize=nf4", "train.mode=full", samples=2)
    assert str(e.value) == ("model.quantize=nf4 quantises the frozen base of train.mode=lora; train.mode=full trains "
                            "the base weights themselves: set model.quantize=none")
    cfg = load_config(str(TINY), ["model.quantize=nf4", "train.parallel=fsdp"])
    with pytest.raises(ConfigError) as e:
        check(cfg, 3)
    assert str(e.value) == ("model.quantize=nf4 under train.parallel=fsdp shards each 4-bit weight evenly over 1, 2, "
                            "4 or 8 ranks, not 3: use train.parallel=ddp")
    check(cfg, 2)  # 2 ranks split every NF4 weight evenly
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(ConfigError) as e:
        check_machine(cfg, "cuda")
    assert str(e.value) == ("model.quantize=nf4 needs the torchao package, which is not installed: pip install "
                            "torchao==0.18.0, or set model.quantize=none")


def test_export_merges_into_the_full_precision_base_not_the_nf4_one(tmp_path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg, tok, peft_model, ckpt = make_checkpoint(tmp_path, "lora", "model.quantize=nf4")
    merged = merged_model(ckpt, cfg, tok)
    assert not any(is_nf4(p) for p in merged.parameters())
    trained = build_for_training(cfg, tok, torch.float32)  # what the run trained: NF4 base + the adapter
    set_peft_model_state_dict(trained, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
    b = two_samples(tok, merged.config)
    want, got, nf4 = logits(peft_model, b), logits(merged, b), logits(trained, b)
    fp_base = build_model(cfg, tok)
    base = logits(fp_base, b)
    # NF4's rounding, weight by weight: 16 levels per block of 64 leave ~9 % of a Gaussian weight's norm (the
    # same at the real model's block sizes, measured), ...
    originals = dict(fp_base.named_parameters())
    for name, p in unwrap(trained).named_parameters():
        if is_nf4(p):
            w = originals[name.replace(".base_layer", "")].detach()
            assert 0.05 < float((p.get_original_weight() - w).norm() / w.norm()) < 0.1, name
    for w, g, q, o in zip(want, got, nf4, base):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # the full-precision base + the adapter, merged
        # ... compounded through the 10 linears of the random tiny model's 2 layers (and the text head, for the text
        # logits): the NF4 model's logits differ from the merged model's by 0.28-0.32 of their norm (measured). A
        # merge into the NF4 base would match them to ~1e-6; NF4 rounding wrongly applied (a wrong scale) would be off by more than their norm.
        gap = float((q - g).norm() / g.norm())
        assert 0.05 < gap < 0.45, gap
        assert float((g - o).abs().max()) > 1e-2  # and the adapter does change the output
