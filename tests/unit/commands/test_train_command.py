"""The training entry point end to end: outputs, the saved adapter, modes, bad input, non-finite steps."""

import math

import pytest
import torch
from helpers import ROOT, read_metrics, tiny_config, torchrun

from higgs_ddp.model import HiggsForward, apply_training_mode, build_model, load_tokenizer
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.train import main, train
from higgs_ddp.training.trainer import Trainer, TrainingError


def test_lora_run_writes_metrics_and_a_peft_adapter_that_loads(tmp_path):
    from peft import PeftModel

    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.lr=1e-2", "train.warmup_steps=1")
    train(cfg)
    run = tmp_path / "run"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "text_loss", "audio_loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "final" / "adapter_config.json").is_file()

    # Base + adapter loaded by peft gives the trained model's logits.
    trainer_model = _trained_logits(cfg, run)
    tok = load_tokenizer(cfg)
    base = build_model(cfg, tok)  # same seed: the same random base weights
    loaded = PeftModel.from_pretrained(base, str(run / "final"))
    batch = _one_batch(cfg, tok, base.config)
    with torch.no_grad():
        got = HiggsForward(loaded).eval()(**batch.model_inputs())["logits"]
    torch.testing.assert_close(got, trainer_model(batch))
    plain = HiggsForward(build_model(cfg, tok)).eval()(**batch.model_inputs())["logits"]
    assert not torch.allclose(got, plain), "the adapter changed nothing"


def _one_batch(cfg, tok, model_config):
    from higgs_ddp.data.collator import HiggsCollator
    from higgs_ddp.data.dataset import ManifestDataset, load_data

    ds = ManifestDataset(load_data(cfg, DistEnv(), tok, model_config, quiet=True).train)
    return HiggsCollator.for_model(model_config)([ds[0], ds[1]])


def _trained_logits(cfg, run):
    """The trained weights, reassembled independently: base + the LoRA delta applied by hand."""
    from safetensors.torch import load_file

    tok = load_tokenizer(cfg)
    model = apply_training_mode(build_model(cfg, tok), cfg)
    state = load_file(str(run / "final" / "adapter_model.safetensors"))
    named = dict(model.named_parameters())
    for k, v in state.items():
        named[k.replace(".weight", ".default.weight")].data.copy_(v)
    fwd = HiggsForward(model).eval()
    return lambda batch: fwd(**batch.model_inputs())["logits"].detach()


@pytest.mark.parametrize("mode", ["audio_ffn", "full"])
def test_other_modes_save_trained_weights(tmp_path, mode):
    from safetensors.torch import load_file

    cfg = tiny_config(tmp_path, f"train.mode={mode}", "train.max_steps=2")
    train(cfg)
    state = load_file(str(tmp_path / "run" / "final" / "trainable.safetensors"))
    if mode == "audio_ffn":
        assert state and all(".audio_" in k for k in state)
    else:
        assert "embed_tokens.weight" in state and "audio_decoder_proj.text_lm_head.weight" in state


def test_the_demo_config_from_another_folder_says_what_writes_its_manifest_and_makes_no_folder(
        tmp_path, capsys, monkeypatch):
    """configs/tiny.yaml before `make demo`, or run from elsewhere: one line that names the demo's writer,
    and no runs/tiny/ (nor its status.json or data report) left where it was run."""
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"higgs-ddp: error: manifest not found: runs/tiny/data/manifest.jsonl (a relative path "
                          f"is read from the current folder, {tmp_path}, or beside the config); the demo's is "
                          f"written by `make demo` (or `higgs-ddp demo-data runs/tiny/data`, then "), err
    assert "on_error" not in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_a_hard_stop_that_status_json_records_as_failed(tmp_path, capsys):
    """A real SIGINT to this process mid-run: exit 130 with its one line, and status.json "failed" with that
    reason, as docs/checkpoints.md's "Stopping and preemption" says (it once said "running")."""
    import json
    import os
    import signal
    import threading
    import time

    cfg = tiny_config(tmp_path)
    status = tmp_path / "run" / "status.json"

    def interrupt_once_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (status.is_file() and '"running"' in status.read_text()):
            time.sleep(0.05)
        time.sleep(0.3)  # into the steps
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    assert main(["--config", "configs/tiny.yaml", f"output_dir={cfg.output_dir}",
                 f"data.manifest={cfg.data.manifest[0]}", f"data.cache_dir={cfg.data.cache_dir}",
                 "data.num_workers=0", "data.val_fraction=0", "eval.every=0", "eval.prompts=[]",
                 "logging.tensorboard=false", "train.max_steps=100000"]) == 130
    assert "higgs-ddp: error: interrupted (SIGINT): " in capsys.readouterr().err
    got = json.loads(status.read_text())
    assert got["state"] == "failed" and got["error"].startswith("interrupted (SIGINT)"), got
    doc = " ".join((ROOT / "docs" / "checkpoints.md").read_text().split())
    assert "`status.json` says `\"failed\"`, with that reason as its `error`" in doc


def test_bad_config_key_is_one_clear_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["--config", "configs/tiny.yaml", f"data.manifest={cfg.data.manifest[0]}", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("higgs-ddp: error: unknown config key 'train.lrr'") and "train.lr" in err
    assert "Traceback" not in err


def test_bad_manifest_line_is_named_before_training(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    lines = open(cfg.data.manifest[0]).read().splitlines()
    lines[2] = lines[2][:-1]  # truncated JSON on line 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    for rel in ("codes",):
        (tmp_path / rel).symlink_to(tmp_path / "data" / rel)
    assert main(["--config", "configs/tiny.yaml", f"data.manifest={bad}", f"output_dir={tmp_path/'o'}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: invalid JSON" in err and "Traceback" not in err
    assert f"at column {len(lines[2]) + 1})" in err  # where the line ends, not "column 1" of a next line


def test_non_finite_steps_are_skipped_counted_then_stop(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_bad_steps=2", "train.max_steps=10")
    trainer = Trainer(cfg, DistEnv())
    batches = iter(trainer.loader)
    lora_a = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
    good = lora_a.detach().clone()
    lora_a.data.fill_(float("nan"))
    before = [p.detach().clone() for p in trainer.params]
    r = trainer.train_step([next(batches)])
    assert r.skipped and trainer.skipped_steps == 1
    lora_a.data.copy_(good)  # recovered: the next step trains again and resets the streak
    assert all(torch.equal(a, b) or torch.isnan(a).all() for a, b in zip(before, trainer.params))
    r = trainer.train_step([next(batches)])
    assert not r.skipped and trainer.bad_in_row == 0
    lora_a.data.fill_(float("inf"))
    trainer.train_step([next(batches)])
    with pytest.raises(TrainingError, match="2 optimizer steps in a row"):
        trainer.train_step([next(batches)])
    assert trainer.skipped_steps == 3


@pytest.mark.slow
def test_demo_config_two_processes_from_wav_loss_falls(tmp_path):
    """What `make demo` does: an LJSpeech-style folder of WAV files, imported (`higgs-ddp manifest import`),
    prepared by 2 ranks with the tiny codec, then trained."""
    from higgs_ddp.data.importers import import_corpus, write_manifest
    from higgs_ddp.tools.demo_data import write_ljspeech_demo

    src = write_ljspeech_demo(tmp_path / "data", samples=48)
    manifest = write_manifest(import_corpus(src, "ljspeech", src / "manifest.jsonl", "tones").rows,
                              src / "manifest.jsonl")
    ref = src / "wavs" / "demo0001.wav"  # the demo's second prompt clones this voice
    proc = torchrun(2, "--config", "configs/tiny.yaml", f"data.manifest={manifest}",
                    f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                    "train.max_steps=80", "data.num_workers=1", "eval.every=40",
                    f"eval.prompts=[{{text: hello}}, {{text: again, reference_audio: {ref}, reference_text: quick the}}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoded, 0 with problems" in proc.stdout
    # The demo's validation, listening samples and TensorBoard, as configured in tiny.yaml.
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["split"] == "val"] == [40, 80]
    assert sorted(p.name for p in (tmp_path / "run" / "samples" / "step_000080").iterdir()) == [
        "sample_00.wav", "sample_01.wav", "samples.json"]
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert "best validation loss" in proc.stdout
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert "done: final loss" in proc.stdout


def test_pretrained_path_loads_a_local_checkpoint_folder(tmp_path):
    """model.init=pretrained goes through HiggsAudioModel.from_pretrained and AutoTokenizer."""
    cfg = tiny_config(tmp_path)
    tok = load_tokenizer(cfg)
    ckpt = tmp_path / "ckpt"
    model = build_model(cfg, tok)
    model.save_pretrained(str(ckpt), safe_serialization=True)
    tok.save_pretrained(str(ckpt))
    loaded = tiny_config(tmp_path / "b", "model.init=pretrained", f"model.path={ckpt}", "model.tokenizer=null",
                         "train.max_steps=2")
    last = train(loaded)
    assert math.isfinite(last["loss"])
    # Same weights as the folder, so the first-step loss equals a run from the random init itself.
    first = read_metrics(tmp_path / "b" / "run")[0]["loss"]
    train(tiny_config(tmp_path / "c", "train.max_steps=2"))
    assert first == pytest.approx(read_metrics(tmp_path / "c" / "run")[0]["loss"], rel=1e-6)
