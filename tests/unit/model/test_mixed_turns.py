"""Text-only and audio-in-only turns still give every trainable weight a gradient, and 2 ranks equal 1.

Samples whose learned turns are text only, or whose audio is input only, mixed with TTS samples.

Such a micro-batch has no audio-out position, so the model's audio head scores nothing and (with no audio
at all) the audio codebook embeddings are never used. The loss must still report C per-codebook zeros,
and every trainable weight must still get a gradient: DDP without find_unused_parameters (and FSDP2)
needs every rank to produce the same gradient set on every backward, whatever its data.
"""


import pytest
import torch
import yaml
from helpers import mix_manifest, mixed_val_manifest, read_metrics, tiny_config, torchrun, weights


def trainer_on_mixed_data(tmp_path, mode, *overrides):
    from higgs_ddp.runtime.distributed import DistEnv
    from higgs_ddp.training.trainer import Trainer

    cfg = tiny_config(tmp_path, f"train.mode={mode}", "data.shuffle=false", "train.micro_batch_size=1",
                      *overrides, samples=4)
    kinds = mix_manifest(tmp_path / "data" / "manifest.jsonl")
    return Trainer(cfg, DistEnv()), kinds


@pytest.mark.parametrize("mode", ["full", "audio_ffn", "lora"])
def test_every_trainable_weight_gets_a_gradient_whatever_the_turns(tmp_path, mode):
    lora_audio = ("lora.target_modules=[q_proj,v_proj,audio_mlp.up_proj]",) if mode == "lora" else ()
    trainer, kinds = trainer_on_mixed_data(tmp_path, mode, *lora_audio)
    C = trainer.raw.config.audio_num_codebooks
    for kind, batch in zip(kinds, trainer.loader):
        out = trainer.wrapped(**batch.model_inputs())
        dl = trainer.loss(out, batch, check=True, accuracy=True)
        dl.normalized(max(batch.text_targets, 1), max(batch.audio_targets, 1)).backward()
        missing = [n for n, p in trainer.named_params if p.grad is None]
        assert not missing, f"{kind} sample: no gradient for {missing}"
        assert dl.per_codebook_loss_sum.shape == dl.per_codebook_tokens.shape == (C,), kind
        assert dl.per_codebook_correct.shape == (C,), kind
        if kind != "tts":
            assert batch.audio_targets == 0 and int(dl.audio_tokens) == 0 and batch.text_targets > 0
            assert dl.per_codebook_loss_sum.abs().sum() == 0 and dl.per_codebook_tokens.sum() == 0
        trainer.optimizer.zero_grad(set_to_none=True)
    assert set(kinds) == {"text", "audio_in", "tts"}


def test_negative_control_the_bare_model_leaves_the_audio_embeddings_without_gradient(tmp_path):
    """What the test above guards against: called directly, HiggsAudioModel uses no audio embedding for a
    text-only batch, so a trained embedding table would get no gradient on that rank."""
    trainer, kinds = trainer_on_mixed_data(tmp_path, "full")
    batch = next(iter(trainer.loader))
    assert kinds[0] == "text"
    out = trainer.raw(**batch.model_inputs(), use_cache=False, return_dict=True)
    (out.logits.sum() + out.audio_logits.sum()).backward()
    assert trainer.raw.audio_codebook_embeddings.weight.grad is None


def test_a_text_only_step_trains_and_logs_zero_audio(tmp_path):
    """The reproduction from the bug report: 1 process, text-only and TTS micro-batches in turn."""
    from higgs_ddp.train import train

    cfg = tiny_config(tmp_path, "train.mode=full", "data.shuffle=false", "train.micro_batch_size=1",
                      "train.max_steps=4", samples=4)
    mix_manifest(tmp_path / "data" / "manifest.jsonl", kinds=("text",))
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["audio_targets"] == 0 for r in rows] == [True, False, True, False]
    text_only = rows[0]
    assert text_only["audio_loss"] == 0.0 and text_only["per_codebook_loss"] == [0.0] * 4
    assert text_only["text_targets"] > 0 and all(map(torch.isfinite, torch.tensor([r["loss"] for r in rows])))


@pytest.mark.slow
def test_text_only_rank_and_audio_rank_equal_one_process(tmp_path):
    """Rank 0 holds only samples without audio out, rank 1 only TTS samples, in every step (full fine-tuning,
    DataLoader workers on, validation on a set with text-only samples). The checkpoint's cross-rank
    checksum proves the ranks' weights identical; they equal 1 process with the same global batch."""
    common = ("train.mode=full", "data.shuffle=false", "train.micro_batch_size=1", "train.max_steps=4",
              "train.lr=5e-3", "train.warmup_steps=1", "train.save_every=2", "data.num_workers=1",
              "eval.max_batches=0")

    def config(name, *overrides):
        cfg = tiny_config(tmp_path / name, *common, *overrides, samples=6)
        data = tmp_path / name / "data"
        mix_manifest(data / "manifest.jsonl")
        val = mixed_val_manifest(data / "val", samples=6)
        cfg.data.val_manifest = [str(val)]
        cfg.eval.every = 2  # set with the validation set it needs
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        return path

    from higgs_ddp.config import load_config
    from higgs_ddp.train import train

    train(load_config(str(config("one", "train.grad_accum_steps=2"))))
    proc = torchrun(2, "--config", config("two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    w1, w2 = weights(one, "full"), weights(two, "full")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    m1, m2 = read_metrics(one), read_metrics(two)
    train1 = [r for r in m1 if r["split"] == "train"]
    train2 = [r for r in m2 if r["split"] == "train"]
    assert [r["loss"] for r in train2] == pytest.approx([r["loss"] for r in train1], rel=1e-5)
    assert [r["grad_norm"] for r in train2] == pytest.approx([r["grad_norm"] for r in train1], rel=1e-4)
    val1 = [r for r in m1 if r["split"] == "val"]
    val2 = [r for r in m2 if r["split"] == "val"]
    assert len(val1) == len(val2) == 2
    assert [r["loss"] for r in val2] == pytest.approx([r["loss"] for r in val1], rel=1e-5)
    assert val1[0]["samples"] == 12 and val1[0]["audio_targets"] > 0
