"""best/ holds the best evaluation's weights, early stopping stops, and both resume exactly.

eval.best_by and eval.early_stop_patience: best/ holds the weights of the best evaluation in final/'s
formats, the run stops when the metric has not improved for N evaluations, and both come back exactly on
resume. Scoring the listening samples (detectors, Whisper, WavLM) draws no training randomness."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import EARLY, read_metrics, tiny_config
from eval_models import tiny_wavlm, tiny_whisper
from safetensors.torch import load_file

from higgs_ddp.config import ConfigError
from higgs_ddp.train import train
from higgs_ddp.training.best import BestTracker


def adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tracker_counts_evaluations_without_improvement():
    t = BestTracker("wer", patience=2)
    assert t.update(1, 0.5) and not t.update(2, 0.5) and not t.exhausted  # equal is no improvement
    assert t.update(3, 0.4) and t.since_best == 0
    assert not t.update(4, None) and t.since_best == 0 and not t.exhausted  # not measured: counts for nothing
    assert not t.update(5, float("nan")) and not t.update(6, 0.9) and t.exhausted  # measured, and no better
    s = BestTracker("speaker_sim")
    assert s.update(1, 0.2) and s.update(2, 0.3) and not s.update(3, 0.1) and not s.exhausted  # higher is better
    again = BestTracker("wer", patience=2)
    assert again.load_state_dict(t.state_dict()) == "" and again.exhausted and again.best == 0.4
    assert "tracked wer" in BestTracker("val_loss").load_state_dict(t.state_dict())


@pytest.mark.slow
def test_best_and_early_stop_survive_a_resume(tmp_path):
    a = tmp_path / "a" / "run"
    train(tiny_config(tmp_path / "a", *EARLY))
    val = [r["loss"] for r in read_metrics(a) if r.get("split") == "val"]
    assert len(val) == 3 and val[1] < val[0] and val[2] > val[1], val  # the premise: improve, improve, worse
    status = json.loads((a / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 3 and status["early_stop"]["best_step"] == 2
    assert json.loads((a / "best" / "best.json").read_text()) == {"metric": "val_loss", "value": val[1], "step": 2}
    # best/ is final/'s format and holds step 2's weights; final/ the weights the run stopped with
    assert sorted(p.name for p in (a / "best").iterdir()) == sorted([*(p.name for p in (a / "final").iterdir()),
                                                                     "best.json"])
    ckpt = a / "checkpoints"
    assert same(adapter(a / "best"), adapter(ckpt / "step_000002" / "adapter"))
    assert same(adapter(a / "final"), adapter(ckpt / "step_000003" / "adapter"))
    assert not same(adapter(a / "best"), adapter(a / "final"))  # negative control
    assert json.loads((ckpt / "step_000003" / "state.json").read_text())["best"]["since_best"] == 1

    # Resumed from step 1 in another output_dir (best/ comes along only when it is the checkpoint's best:
    # here it is not, so it is rewritten at step 2) and from step 2 (it is: copied); both stop at step 3.
    for k in (1, 2):
        b = tmp_path / f"from{k}" / "run"
        train(tiny_config(tmp_path / f"from{k}", *EARLY, f"train.resume={ckpt / f'step_{k:06d}'}"))
        assert json.loads((b / "status.json").read_text())["step"] == 3
        assert (b / "best" / "best.json").read_text() == (a / "best" / "best.json").read_text()
        assert same(adapter(b / "best"), adapter(a / "best")) and same(adapter(b / "final"), adapter(a / "final"))
        assert [r for r in read_metrics(b) if r.get("split") == "val"] == \
            [r for r in read_metrics(a) if r.get("split") == "val"][k:]

    # The same command again: the run has stopped early and stays stopped.
    train(tiny_config(tmp_path / "a", *EARLY))
    assert json.loads((a / "status.json").read_text())["step"] == 3
    assert max(r["step"] for r in read_metrics(a)) == 3
    assert same(adapter(a / "final"), adapter(ckpt / "step_000003" / "adapter"))


def test_best_by_needs_its_metric(tmp_path):
    with pytest.raises(ConfigError, match="eval.best_by=wer needs an ASR model"):
        tiny_config(tmp_path, "eval.best_by=wer", samples=2)
    with pytest.raises(ConfigError, match="early_stop_patience needs a metric"):
        tiny_config(tmp_path, "eval.early_stop_patience=2", samples=2)
    with pytest.raises(ConfigError, match="eval.best_by=val_loss needs a validation set"):
        train(tiny_config(tmp_path, "eval.best_by=val_loss", samples=4))


SCORED = ("train.max_steps=4", "train.warmup_steps=1", "train.seed=5", "lora.dropout=0.2", "train.lr=5e-3",
          "train.save_every=0", "eval.max_audio_seconds=0.2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return tiny_whisper(root / "whisper"), tiny_wavlm(root / "wavlm")


@pytest.mark.slow
def test_scores_are_logged_and_draw_no_training_randomness(tmp_path, models, monkeypatch):
    whisper, wavlm = models
    voice = tmp_path / "voice.wav"  # a held-out clip of the voice the second prompt should have
    sf.write(str(voice), 0.1 * np.sin(np.arange(12_000) * 0.05).astype(np.float32), 24_000)
    prompts = f"eval.prompts=[{{text: hello there}}, {{text: say this, speaker_audio: {voice}}}]"
    train(tiny_config(tmp_path / "plain", *SCORED, samples=8))
    train(tiny_config(tmp_path / "scored", *SCORED, prompts, "eval.samples_every=2", f"eval.asr_model={whisper}",
                      f"eval.speaker_model={wavlm}", "eval.best_by=wer", "logging.tensorboard=true", samples=8))
    plain, scored = tmp_path / "plain" / "run", tmp_path / "scored" / "run"
    assert same(adapter(plain / "final"), adapter(scored / "final"))  # dropout drew the same masks

    rows = [r for r in read_metrics(scored) if r.get("split") == "samples"]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["samples"] == 2 and 0 <= r["silence_fraction"] <= 1 and r["seconds"] > 0
        assert r["wer"] >= 0 and r["cer"] >= 0 and -1 <= r["speaker_sim"] <= 1  # one prompt has a voice
    listing = json.loads((scored / "samples" / "step_000004" / "samples.json").read_text())
    first = listing["samples"][0]
    assert {"transcript", "wer", "cer", "speaker_sim", "silence_fraction", "stopped", "chars_per_second",
            "clipped_fraction"} <= set(first) and first["speaker_sim"] is None  # no voice to compare with
    assert listing["summary"]["wer"] == pytest.approx(rows[-1]["wer"])
    best = json.loads((scored / "best" / "best.json").read_text())
    assert best["metric"] == "wer" and best["value"] == min(r["wer"] for r in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(scored / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("samples/wer")] == pytest.approx([r["wer"] for r in rows])
    assert {"samples/silence_fraction", "samples/stopped_samples", "samples/speaker_sim"} <= set(
        events.Tags()["scalars"])

    # Negative control: a scorer that drew one number from the training RNG would change the weights.
    from higgs_ddp.evaluation import listening
    score = listening._score
    monkeypatch.setattr(listening, "_score", lambda *a: (score(*a), torch.rand(1))[0])
    train(tiny_config(tmp_path / "leaky", *SCORED, prompts, "eval.samples_every=2", f"eval.asr_model={whisper}",
                      samples=8))
    assert not same(adapter(plain / "final"), adapter(tmp_path / "leaky" / "run" / "final"))


@pytest.mark.slow
def test_a_metric_that_cannot_be_measured_is_warned_about_and_never_stops_the_run(tmp_path, models, capsys):
    """Clips shorter than the speaker encoder's 100 ms: no speaker_sim at any evaluation. That is not "no
    improvement": the run goes on to max_steps, each evaluation warns with the reason, and nothing names a
    best/ that was never written."""
    _, wavlm = models
    voice = tmp_path / "voice.wav"
    sf.write(str(voice), 0.1 * np.sin(np.arange(12_000) * 0.05).astype(np.float32), 24_000)
    train(tiny_config(tmp_path, "train.max_steps=3", "train.save_every=0", "eval.max_audio_seconds=0.05",
                      f"eval.prompts=[{{text: say this, speaker_audio: {voice}}}]", "eval.samples_every=1",
                      f"eval.speaker_model={wavlm}", "eval.best_by=speaker_sim", "eval.early_stop_patience=1",
                      samples=4))
    run, out = tmp_path / "run", capsys.readouterr().out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 3 and "early_stop" not in status
    assert not (run / "best").exists() and "/best" not in out and "early stop" not in out
    why = "1 of 1 sample: generated clip: too short for the speaker encoder (under 100 ms)"
    assert out.count(f"warning: eval.best_by=speaker_sim could not be measured ({why})") == 3, out
    rows = [r for r in read_metrics(run) if r.get("split") == "samples"]
    assert [(r["speaker_sim"], r["speaker_sim_unmeasured"]) for r in rows] == [(None, why)] * 3
    listing = json.loads((run / "samples" / "step_000003" / "samples.json").read_text())["samples"][0]
    assert listing["speaker_sim"] is None
    assert listing["speaker_sim_unmeasured"] == "generated clip: too short for the speaker encoder (under 100 ms)"
