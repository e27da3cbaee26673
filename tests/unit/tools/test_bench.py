"""The benchmark's JSON line, its FLOPs count against the formula by hand, and the memory each switch saves.

The benchmark: its JSON line, its FLOPs count against the formula worked out by hand, and the memory
that activation checkpointing and the supervised-only text head save (counted tensor by tensor, on CPU).
No timing is asserted: speed belongs in BENCHMARKS.md, not in a test."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TORCHRUN_ENV, tiny_config

from higgs_ddp.config import load_config
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools.bench.flops import step_flops, weight_costs
from higgs_ddp.tools.bench.memtrack import LiveTensorBytes

FIELDS = {"tokens_per_s", "step_time_s", "peak_memory_bytes", "flops_per_token", "mfu", "overhead",
          "data_rate_ratio", "peer_ratio", "peer"}


def test_bench_prints_one_json_line_with_every_field(tmp_path):
    partial = tmp_path / "partial.json"
    cmd = [sys.executable, "-m", "higgs_ddp", "bench", "--config", "configs/bench_tiny.yaml", "bench.seq_len=256",
           "bench.samples=16", "bench.warmup_steps=1", "bench.steps=2", "train.micro_batch_size=2",
           f"output_dir={tmp_path / 'out'}", "--partial-row", str(partial)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=TORCHRUN_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The run card says what the benchmark does: its samples and steps, not train.max_steps; no output folder.
    card = {line.split()[0]: line.split(None, 1)[1] for line in proc.stdout.split("\n\n")[0].splitlines()[1:8]}
    assert card["data"].startswith("16 synthetic samples of 256 positions (85% audio")
    assert card["schedule"].startswith("1 warm-up + 2 timed steps (bench.warmup_steps, bench.steps)")
    assert "1000" not in card["schedule"] and card["schedule"].endswith("the peer's transformers.Trainer loop")
    assert card["output"] == f"none: nothing is written; the result is the last line printed (JSON); before the peer, also {partial}"
    assert not (tmp_path / "out").exists()
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert FIELDS <= result.keys()
    assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0 and result["overhead"] > 0
    assert result["mfu"] is None and result["device"] == "cpu"  # no bf16 peak to compare with on a CPU
    assert result["peak_memory_bytes"] > 0 and result["peer"]["tokens_per_s"] > 0
    assert result["peer_ratio"] == pytest.approx(result["tokens_per_s"] / result["peer"]["tokens_per_s"])
    # 2 samples x 256 positions per step: the token count is exact.
    assert result["tokens_per_s"] * result["step_time_s"] == pytest.approx(512)
    # --partial-row: the same row, written before the peer ran (what a run cut off in the peer keeps).
    ours = json.loads(partial.read_text())
    assert ours == {**result, "peer": None, "peer_ratio": None}


def test_bench_config_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp", "bench", "--config", "configs/bench_tiny.yaml",
                           "bench.sequence=3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "bench.sequence" in proc.stderr


def test_flops_of_the_3b_architecture_match_the_formula_by_hand():
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from peft import LoraConfig, get_peft_model

    from higgs_ddp.data.collator import Batch
    from higgs_ddp.model import load_tokenizer, model_config

    cfg = load_config(str(ROOT / "configs" / "bench_3b.yaml"))
    with torch.device("meta"):
        model = HiggsAudioModel(model_config(cfg, load_tokenizer(cfg)))
        model.requires_grad_(False)
    costs = weight_costs(model)
    H, L, V, FF, kv, hd = 3072, 28, 128256, 8192, 8, 128
    attn = L * (H * H + 2 * H * kv * hd + H * H)
    ffn = L * 3 * H * FF
    assert costs["attention"] == 4 * attn and costs["text_ffn"] == costs["audio_ffn"] == 4 * ffn
    assert costs["text_head"] == 4 * H * V and costs["audio_head"] == 4 * H * 8 * 1026

    # One sample of 2048 positions, 1800 of them audio, 5 supervised text targets.
    empty = torch.zeros(0, dtype=torch.long)
    batch = Batch(input_ids=empty, attention_mask=empty, label_ids=empty, audio_in_ids=None, audio_in_ids_start=None,
                  audio_out_ids=torch.zeros(8, 1800, dtype=torch.long), audio_out_ids_start=empty,
                  audio_out_ids_start_group_loc=empty, label_audio_ids=empty, text_targets=5, audio_targets=0,
                  num_positions=2048, padded_positions=2048, num_samples=1)
    want = (2048 * 4 * (attn + ffn) + 1800 * 4 * H * 8 * 1026 + 5 * 4 * H * V
            + 2048 * 12 * L * 24 * hd * 2048)
    assert step_flops(costs, L, 24 * hd, [batch]) == want
    # ~13.5 GFLOPs per position for LoRA at 2048: 4·N of the backbone plus attention.
    assert 13e9 < want / 2048 < 14e9

    lora = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj"]))
    trained = weight_costs(lora)["attention"] - 4 * attn  # 6 per trained LoRA parameter, on top
    assert trained == 6 * L * 16 * (H + H)


def test_live_tensor_bytes_counts_what_is_alive_at_once():
    with LiveTensorBytes() as live:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB alive
        del b
        c = a[:10]  # a view: no new storage
        a += 1  # in place: no new storage
    assert live.peak == 8_000_000 and live.live == 4_000_000
    del a, c


def step_peak(tmp_path, name, *overrides) -> int:
    from higgs_ddp.training.trainer import Trainer

    cfg = tiny_config(tmp_path / name, "train.micro_batch_size=4", "model.config.text_config.vocab_size=32000",
                      "model.config.text_config.hidden_size=128", "model.config.text_config.num_hidden_layers=4",
                      "model.config.text_config.intermediate_size=256", *overrides)
    trainer = Trainer(cfg, DistEnv())
    batch = next(iter(trainer.loader))
    with LiveTensorBytes() as live:
        trainer.train_step([batch])
    return live.peak


def test_activation_checkpointing_and_supervised_text_logits_cut_peak_memory(tmp_path):
    plain = step_peak(tmp_path, "plain", "train.text_logits=all")
    ckpt = step_peak(tmp_path, "ckpt", "train.text_logits=all", "train.activation_checkpointing=true")
    sup = step_peak(tmp_path, "sup", "train.text_logits=supervised")
    both = step_peak(tmp_path, "both", "train.text_logits=supervised", "train.activation_checkpointing=true")
    assert sup < plain / 4  # (B, T, 32000) logits and their gradient were most of it
    assert ckpt < plain and both < 0.8 * sup  # with the head gone, the layers' activations dominate


def test_build_on_device_draws_the_random_model_where_it_runs(tmp_path):
    """bench.build_on_device: the random model is made on the run's device (the meta device stands in for a
    GPU here), with no CPU tensor the size of the model on the way, and in the run's dtype (peak: the bf16
    model); without it the draw is made on the CPU in fp32 (the one export rebuilds from the seed) and only
    then cast and moved."""
    from higgs_ddp.model import build_model, load_tokenizer

    tok = load_tokenizer(tiny_config(tmp_path / "tok"))
    peaks = {}
    for on_device in (True, False):
        cfg = tiny_config(tmp_path / str(on_device), f"bench.build_on_device={str(on_device).lower()}")
        with LiveTensorBytes() as host:  # counts every tensor made off the meta device
            model = build_model(cfg, tok, device=torch.device("meta"))
        assert {p.device.type for p in model.parameters()} == {"meta"}
        peaks[on_device] = host.peak
    weights = 4 * sum(p.numel() for p in model.parameters())
    assert peaks[False] >= weights and peaks[True] < 0.01 * weights
    # Drawn in the run's dtype where it runs (the CPU stands in for the GPU): the peak is the bf16 model, not an
    # fp32 draw cast afterwards; the same shapes as the CPU draw, initialised (another draw: not the same values).
    cpu_drawn = build_model(cfg, tok, dtype=torch.bfloat16)
    cfg.bench.build_on_device = True
    with LiveTensorBytes() as live:
        model = build_model(cfg, tok, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert torch.get_default_dtype() == torch.float32  # restored
    shapes = {n: p.shape for n, p in cpu_drawn.state_dict().items()}
    assert {n: p.shape for n, p in model.state_dict().items()} == shapes
    assert {p.dtype for p in model.state_dict().values()} == {torch.bfloat16}
    assert weights / 2 <= live.peak < 1.01 * weights / 2
    a, b = model.layers[0].mlp.up_proj.weight.float(), cpu_drawn.layers[0].mlp.up_proj.weight.float()
    assert float(a.std()) == pytest.approx(float(b.std()), rel=0.1) and not torch.equal(a, b)


@pytest.mark.extended
def test_data_scale_cold_above_the_index_size_prepares_audio_files(tmp_path, monkeypatch):
    """--data-scale past the size written as an index: with --cold the corpus is audio files and short cached
    codes that a cold start prepares (then a warm one maps); without it only the warm start runs."""
    import numpy as np

    from higgs_ddp.tools.bench import data_scale
    from higgs_ddp.tools.bench.data_corpus import SHORT_FRAMES

    monkeypatch.setattr(data_scale, "PREPARED_ABOVE", 16)

    def run(name, cold):
        cfg = load_config(str(ROOT / "configs" / "bench_data_scale.yaml"),
                          [f"output_dir={tmp_path / name}", "data.val_fraction=0"])
        return data_scale.run(cfg, DistEnv(), 24, cold=cold)

    r = run("cold", True)
    assert r["cold"]["samples"] == r["warm"]["samples"] == 24 and r["cold"]["load_after"] >= 0
    (frames,) = (tmp_path / "cold").rglob("index/*/code_frames.npy")
    assert np.all((np.load(frames) >= SHORT_FRAMES[0]) & (np.load(frames) < SHORT_FRAMES[1]))
    assert len(list((tmp_path / "cold").rglob("*.wav"))) == 24
    assert "cold" not in run("index", False) and not list((tmp_path / "index").rglob("*.wav"))
