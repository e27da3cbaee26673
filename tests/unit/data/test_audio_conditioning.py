"""Loudness, peak limit, trimming and duration limits are applied before the codec, and key the code cache.

data.audio: loudness (measured by pyloudnorm, ITU-R BS.1770), the peak limit, silence trimming and the
duration limits, applied by prepare before the codec; the code cache key changes with them and only with
them. Real WAV files, the tiny real codec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch
from helpers import QUIET, TINY, tiny_config

from higgs_ddp.config import AudioConditioning, ConfigError, load_config
from higgs_ddp.data import prepare
from higgs_ddp.data.audio import AudioProblem, condition
from higgs_ddp.data.codec import codec_identity, load_codec
from higgs_ddp.data.dataset import DataError, load_data
from higgs_ddp.data.manifest import read_manifest
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools.demo_data import text_to_wave

SR = 8000  # the tiny codec's rate


def speech(seconds: float, text="the quick brown fox jumps over a lazy dog ", gain=1.0) -> np.ndarray:
    return (gain * np.resize(text_to_wave(text), int(seconds * SR))).astype(np.float32)


def padded(lead: float, body: float, tail: float, noise_db=-80.0) -> np.ndarray:
    """Silence (a faint noise floor), speech, silence: lengths known to the sample."""
    rng = np.random.default_rng(0)
    n = int((lead + body + tail) * SR)
    w = (10 ** (noise_db / 20) * rng.standard_normal(n)).astype(np.float32)
    w[int(lead * SR): int((lead + body) * SR)] += speech(body)
    return w


def lufs(wave, sr=SR) -> float:
    return pyloudnorm.Meter(sr).integrated_loudness(wave.astype(np.float64))


def settings(**kw) -> AudioConditioning:
    s = AudioConditioning(**kw)
    s.validate()
    return s


def test_loudness_reaches_the_target_measured_by_pyloudnorm():
    for gain, target in ((0.05, -20.0), (1.0, -30.0), (0.3, -16.0)):
        wave = speech(2.0, gain=gain)
        out = condition(wave, SR, settings(loudness_lufs=target), "x.wav")
        assert abs(lufs(out) - target) < 0.5, (gain, target, lufs(out))
        assert abs(lufs(wave) - target) > 3  # it did have to move


def test_the_peak_limit_holds_and_never_clips():
    wave = speech(2.0, gain=0.2)
    wave[5000] = 0.9  # one click far above the speech
    out = condition(wave, SR, settings(loudness_lufs=-14.0, peak_dbfs=-3.0), "x.wav")
    assert np.abs(out).max() <= 10 ** (-3 / 20) * (1 + 1e-6)
    assert lufs(out) < -14.0  # the limit won: quieter than the target, the shape untouched
    np.testing.assert_allclose(out / out[5000], wave / wave[5000], rtol=1e-5, atol=1e-6)
    quiet = speech(2.0, gain=0.01)  # under the limit: left as it is
    assert np.array_equal(condition(quiet, SR, settings(peak_dbfs=-1.0), "q.wav"), quiet)


def test_trimming_removes_leading_and_trailing_silence_to_the_margin():
    wave = padded(0.5, 1.0, 0.7)
    out = condition(wave, SR, settings(trim_silence=True, trim_keep_seconds=0.05), "x.wav")
    assert abs(len(out) / SR - 1.1) <= 0.02, len(out) / SR  # 1 s of speech + 2 x 50 ms, to a 10 ms frame
    lead = int(np.flatnonzero(np.abs(wave) > 1e-3)[0])
    kept_before = np.flatnonzero(np.abs(out) > 1e-3)[0]
    assert abs(kept_before / SR - 0.05) <= 0.011 and lead / SR == pytest.approx(0.5, abs=0.011)
    assert np.array_equal(condition(speech(1.0), SR, settings(trim_silence=True), "s.wav"), speech(1.0))
    with pytest.raises(AudioProblem, match="silent") as ei:
        condition(np.zeros(SR, np.float32), SR, settings(trim_silence=True), "z.wav")
    assert ei.value.reason == "audio_silent"
    with pytest.raises(AudioProblem, match="BS.1770's absolute gate"):
        condition(padded(0.5, 0.0, 0.5, noise_db=-100), SR, settings(loudness_lufs=-20.0), "n.wav")
    with pytest.raises(AudioProblem, match="too short to measure its loudness"):
        condition(speech(0.3), SR, settings(loudness_lufs=-20.0), "s.wav")


def write_wav(base: Path, name: str, wave) -> str:
    (base / "clips").mkdir(parents=True, exist_ok=True)
    sf.write(base / "clips" / name, wave, SR, subtype="FLOAT")
    return f"clips/{name}"


def manifest(base: Path, clips: list) -> Path:
    p = base / "manifest.jsonl"
    p.write_text("".join(json.dumps({"text": f"line {i}", "audio": c}) + "\n" for i, c in enumerate(clips)))
    return p


def cfg(tmp_path, m, *overrides):
    return load_config(str(TINY), [*QUIET, f"output_dir={tmp_path / 'run'}", f"data.manifest={m}",
                                   f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", *overrides])


def refs(m):
    entries, problems = read_manifest(str(m))
    assert not problems
    return [r for e in entries for r in e.audio]


@pytest.fixture(scope="module")
def codec():
    return load_codec("tiny")


def test_prepare_encodes_the_conditioned_audio_and_reports_durations_by_line(tmp_path, tokenizer, monkeypatch, codec):
    monkeypatch.setattr(prepare, "load_codec", lambda *args, **kwargs: codec)  # one codec, loaded once
    base = tmp_path / "ds"
    m = manifest(base, [write_wav(base, "padded.wav", padded(0.5, 1.0, 0.7)),  # 2.2 s, 1.1 s once trimmed
                        write_wav(base, "short.wav", padded(0.1, 0.3, 0.1)),  # 0.4 s once trimmed
                        write_wav(base, "long.wav", padded(0.1, 2.4, 0.1))])  # 2.5 s once trimmed
    audio = ["data.audio.trim_silence=true", "data.audio.trim_keep_seconds=0.05", "data.audio.min_seconds=0.5",
             "data.max_audio_seconds=2", "data.audio.loudness_lufs=-20"]
    with pytest.raises(DataError) as ei:
        c = cfg(tmp_path, m, *audio)
        load_data(c, DistEnv(), tokenizer, model_config(c, tokenizer), quiet=True)
    assert str(ei.value).splitlines()[1:] == [
        f"{m}:2: audio clips/short.wav lasts 0.40 s after trimming silence, less than data.audio.min_seconds=0.5",
        f"{m}:3: audio clips/long.wav lasts 2.5 s after trimming silence, more than data.max_audio_seconds=2"]
    c = cfg(tmp_path, m, *audio, "data.on_error=skip")
    data = load_data(c, DistEnv(), tokenizer, model_config(c, tokenizer), quiet=True)
    assert data.report["skipped_by_reason"] == {"audio_too_long": 1, "audio_too_short": 1}
    # What the codec encoded is the trimmed, normalised clip: 1.1 s, 28 frames at 25 frames/s (55 untrimmed).
    want = condition(padded(0.5, 1.0, 0.7), SR, c.data.audio, "padded.wav")
    assert np.array_equal(data.train[0].codes[0], codec.encode(torch.from_numpy(want)).numpy())
    assert data.train[0].codes[0].shape[1] == 28
    # Without trimming the same 2.2 s clip is over data.max_audio_seconds, judged from its header.
    c = cfg(tmp_path, m, "data.max_audio_seconds=2", "data.on_error=skip")
    plain = load_data(c, DistEnv(), tokenizer, model_config(c, tokenizer), quiet=True)
    assert plain.report["skipped_by_reason"] == {"audio_too_long": 2}
    assert "audio clips/padded.wav lasts 2.2 s, more than data.max_audio_seconds=2" in \
        [p["message"] for p in plain.report["problems"]]


def test_the_cache_key_changes_with_the_settings_and_only_with_them(tmp_path, monkeypatch, codec):
    monkeypatch.setattr(prepare, "load_codec", lambda *args, **kwargs: codec)  # one codec, loaded once
    base = tmp_path / "ds"
    m = manifest(base, [write_wav(base, "a.wav", padded(0.2, 0.6, 0.2))])

    def run(**kw):
        out = prepare.prepare_audio(refs(m), str(tmp_path / "cache"), "tiny", None, 30, DistEnv(), 0, quiet=True,
                                    audio=settings(**kw))
        return out.stats["cached"], out.stats["encoded"]

    assert run() == (0, 1)
    assert run(min_seconds=0.1) == (1, 0)  # a filter, not a change to the audio: nothing re-encoded
    assert run(trim_db=30.0, trim_keep_seconds=0.3) == (1, 0)  # trimming is off: its settings change nothing
    assert run(loudness_lufs=-20.0) == (0, 1)
    assert run(loudness_lufs=-20.0, min_seconds=0.1) == (1, 0)
    assert run(loudness_lufs=-23.0) == (0, 1)
    assert run(loudness_lufs=-20.0, peak_dbfs=-1.0, trim_silence=True) == (0, 1)
    assert run(loudness_lufs=-20.0, peak_dbfs=-1.0, trim_silence=True) == (1, 0)
    assert run(loudness_lufs=-20.0) == (1, 0)  # back to earlier settings: their codes are still there
    # Everything off is the key caches had before data.audio existed: they stay valid.
    assert prepare.cache_identity("tiny", None, AudioConditioning()) == codec_identity("tiny")
    keys = {settings(**kw).cache_key() for kw in ({"loudness_lufs": -20.0}, {"peak_dbfs": -1.0},
                                                   {"trim_silence": True}, {"trim_silence": True, "trim_db": 30.0},
                                                   {"trim_silence": True, "trim_keep_seconds": 0.2})}
    assert len(keys) == 5 and "" not in keys


@pytest.mark.parametrize("override, key", [
    ("data.audio.loudness_lufs=5", "data.audio.loudness_lufs"), ("data.audio.peak_dbfs=1", "data.audio.peak_dbfs"),
    ("data.audio.trim_db=0", "data.audio.trim_db"), ("data.audio.min_seconds=-1", "data.audio.min_seconds"),
    ("data.audio.loud=1", "data.audio.loud"), ("data.reference=random", "data.reference"),
    ("data.reference_seconds=[5,3]", "data.reference_seconds"), ("data.reference_seconds=3", "data.reference_seconds"),
])
def test_bad_settings_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(TINY), [override])
    ok = load_config(str(TINY), ["data.audio.loudness_lufs=-20", "data.audio.peak_dbfs=null"])
    assert ok.data.audio.loudness_lufs == -20.0 and ok.data.audio.peak_dbfs is None


CONDITIONED = ("data.audio.loudness_lufs=-20", "data.audio.peak_dbfs=-3", "data.audio.trim_silence=true")


def test_speak_and_the_samples_hear_a_reference_as_training_encoded_it(tmp_path, capsys):
    """With data.audio on, a reference file becomes the same codes in the listening samples and in speak as
    in training's code cache; speak says it conditioned it."""
    from higgs_ddp.evaluation.generation import Sampling, generation_state, speak_text
    from higgs_ddp.evaluation.listening import _encode_reference
    from higgs_ddp.tools.inference import load_for_inference
    from higgs_ddp.tools.speak import _write_wav
    from higgs_ddp.tools.speak import main as speak
    from higgs_ddp.train import train

    base = tmp_path / "ds"  # a reference at twice the codec's rate, with silence around it and quiet
    (base / "clips").mkdir(parents=True)
    sf.write(base / "clips" / "ref.wav", np.repeat(padded(0.4, 1.0, 0.3) * 0.3, 2), 2 * SR, subtype="PCM_16")
    lines = [{"text": "line zero", "audio": write_wav(base, "a.wav", padded(0.1, 0.8, 0.1)),
              "ref_audio": "clips/ref.wav", "ref_text": "the fox"},
             {"text": "line one", "audio": write_wav(base, "b.wav", padded(0.1, 0.6, 0.1))}]
    (base / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    c = tiny_config(tmp_path, *CONDITIONED, f"data.manifest={base / 'manifest.jsonl'}", "train.max_steps=1",
                    "train.save_every=0", "train.micro_batch_size=1")
    train(c)
    [ref] = [r for r in refs(base / "manifest.jsonl") if r.path.name == "ref.wav"]
    trained = prepare.prepare_audio([ref], c.data.cache_dir, "tiny", None, c.data.max_audio_seconds, DistEnv(), 0,
                                    quiet=True, audio=c.data.audio)
    assert trained.stats["encoded"] == 0  # the codes training encoded, from its cache
    want = torch.as_tensor(trained.codes[ref.path]).long()

    loaded = load_for_inference(tmp_path / "run", "cpu")
    samples = _encode_reference(loaded.cfg, 0, {"text": "hi", "reference_audio": str(ref.path), "reference_text": "hi"}, loaded.codec)
    assert torch.equal(samples.long(), want)

    out = tmp_path / "spoken.wav"
    assert speak(["--model", str(tmp_path / "run"), "--text", "say this", "--ref-audio", str(ref.path), "--ref-text", "hi",
                  "--out", str(out), "--max-audio-seconds", "0.2", "--device", "cpu"]) == 0
    said = "data.audio loudness_lufs=-20, peak_dbfs=-3, trim_silence (trim_db=40, trim_keep_seconds=0.1)"
    assert f"--ref-audio conditioned as the run's training audio was: {said}" in capsys.readouterr().out.splitlines()
    assert json.loads(out.with_suffix(".json").read_text())["reference_conditioning"] == said[len("data.audio "):]

    def spoken_with(codes, path):  # speak's generation, given the reference codes
        with generation_state(loaded.model, 0):
            got = speak_text(loaded.model, loaded.tokenizer, loaded.codec, loaded.cfg, "say this", None, codes,
                             sampling=Sampling(max_audio_seconds=0.2, seed=0))
        _write_wav(path, got.wave, loaded.codec.sample_rate)
        return path.read_bytes()

    assert out.read_bytes() == spoken_with(want, tmp_path / "want.wav")
    # Negative control: the file as it is on disk gives other codes (longer: untrimmed), and another sample
    wave, sr = sf.read(str(ref.path), dtype="float32")
    raw = loaded.codec.encode(prepare.resample(torch.from_numpy(wave), sr, loaded.codec.sample_rate))
    assert raw.shape[1] > want.shape[1]
    assert out.read_bytes() != spoken_with(raw, tmp_path / "raw.wav")
