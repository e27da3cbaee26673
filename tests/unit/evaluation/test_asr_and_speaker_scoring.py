"""WER/CER against hand-worked strings, and ASR and speaker similarity through real toy Whisper and WavLM.

WER/CER with Seed-TTS-eval's normalisation against hand-worked strings, and the ASR and speaker paths
through transformers' real Whisper and WavLM classes at tiny random sizes, loaded as eval.asr_model and
eval.speaker_model name them."""

import numpy as np
import pytest
import soundfile as sf
from helpers import tiny_config, torchrun
from eval_models import tiny_wavlm, tiny_whisper

from higgs_ddp.evaluation.asr import character_error_rate, error_rate, normalize
from higgs_ddp.evaluation.scoring import Scorer, check_models, locate, mean_scores


def test_normalisation_follows_seed_tts_eval():
    # punctuation goes, the apostrophe stays, English is lower-cased; numbers are not rewritten
    assert normalize("Hello, World! It's 2 o'clock.", "en") == "hello world it's 2 o'clock"
    assert normalize("“Quoted” text — more…", "en") == "quoted text more"  # CJK/typographic marks too (zhon)
    # Chinese: CJK punctuation goes, traditional becomes simplified, one token per character
    assert normalize("我們說話，好嗎？", "zh") == "我 们 说 话 好 吗"
    assert normalize("你好 世界", "zh") == "你 好 世 界"  # spaces between characters are not tokens


def test_error_rates_on_hand_worked_strings():
    # 5 reference words; "world" -> "word" and "it's" -> "its": 2 substitutions
    r = error_rate("Hello, world! It's a test.", "hello word its a test", "en")
    assert (r.rate, r.unit, r.reference) == (pytest.approx(0.4), "word", "hello world it's a test")
    assert error_rate("Hello, world!", "HELLO WORLD", "en").rate == 0.0  # case and punctuation do not count
    # Seed-TTS-eval does not normalise numbers: "2" vs "two" is an error
    assert error_rate("2 cats", "two cats", "en").rate == pytest.approx(0.5)
    assert error_rate("a b", "a b c d", "en").rate == pytest.approx(1.0)  # insertions count: WER can pass 1
    assert error_rate("a b c d", "", "en").rate == 1.0  # nothing heard
    # Chinese is scored per character, traditional and simplified alike
    zh = error_rate("我们说话。", "我們說話", "zh")
    assert (zh.rate, zh.unit) == (0.0, "character")
    assert error_rate("我们说话。", "我们说", "zh").rate == pytest.approx(0.25)
    # CER over letters (spaces left out): "world" -> "word" is 1 of 10
    assert character_error_rate("Hello world", "hello word", "en") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="nothing to score"):
        error_rate("?!", "anything", "en")


def test_mean_scores_skip_what_could_not_be_measured():
    got = mean_scores([{"wer": 0.5, "cer": 0.2, "speaker_sim": None}, {"wer": 0.0, "cer": 0.0, "speaker_sim": 0.8}])
    assert got == {"wer": 0.25, "cer": 0.1, "speaker_sim": 0.8}
    assert mean_scores([{}, {}]) == {}
    # none measured: the summary's null says why, each reason once with its count
    why = [{"speaker_sim": None, "speaker_sim_unmeasured": "generated clip: silent"},
           {"speaker_sim": None, "speaker_sim_unmeasured": "no reference voice"},
           {"speaker_sim": None, "speaker_sim_unmeasured": "generated clip: silent"}]
    assert mean_scores(why) == {"speaker_sim": None, "speaker_sim_unmeasured":
                                "2 of 3 samples: generated clip: silent; 1 of 3 samples: no reference voice"}


def test_missing_weights_are_one_line_naming_them_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError) as e:
        locate("openai/whisper-large-v3", "eval.asr_model")
    msg = str(e.value)
    assert "\n" not in msg and "openai/whisper-large-v3" in msg and "huggingface-cli download" in msg
    with pytest.raises(ValueError, match="eval.speaker_model: .*nowhere is not a folder"):
        locate(str(tmp_path / "nowhere"), "eval.speaker_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        locate(str(tmp_path / "empty"), "eval.asr_model")
    cfg = tiny_config(tmp_path, f"eval.asr_model={tmp_path / 'nowhere'}", "eval.speaker_model=nobody/nothing",
                      samples=2)
    assert len(check_models(cfg)) == 2
    cfg.eval.prompts = [{"text": "hi", "speaker_audio": str(tmp_path / "missing.wav")}]
    problems = check_models(cfg)
    assert len(problems) == 3 and problems[2].startswith("eval.prompts[0].speaker_audio:")
    from higgs_ddp.tools.doctor import FAIL, check_eval_models
    assert [r.status for r in check_eval_models(cfg)] == [FAIL] * 3  # the doctor says the same, before a run


@pytest.mark.slow
def test_missing_weights_stop_every_rank_at_start_with_one_line(tmp_path):
    """Two ranks: both check at start (neither waits for the other at a collective), the run exits 2 with
    one line naming the model, before any step."""
    import yaml

    cfg = tiny_config(tmp_path, "eval.asr_model=openai/whisper-tiny-not-cached", samples=4)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = torchrun(2, "--config", path, timeout=240)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("higgs-ddp: error:")]
    assert lines and "eval.asr_model: openai/whisper-tiny-not-cached" in lines[-1], proc.stderr[-2000:]
    assert "huggingface-cli download" in lines[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "train" not in (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return tiny_whisper(root / "whisper"), tiny_wavlm(root / "wavlm")


def test_scorer_runs_whisper_and_wavlm_from_their_folders(tmp_path, models):
    whisper, wavlm = models
    cfg = tiny_config(tmp_path, f"eval.asr_model={whisper}", f"eval.speaker_model={wavlm}", samples=2, audio=True)
    ref = tmp_path / "data" / "clips" / "0000_ref.wav"
    scorer = Scorer(cfg)
    rng = np.random.RandomState(0)
    wave = (0.1 * rng.randn(24000)).astype(np.float32)
    scored = scorer.score(wave, 24000, {"text": "hello there", "reference_audio": str(ref)})
    assert set(scored) == {"transcript", "wer", "cer", "speaker_sim"}
    assert isinstance(scored["transcript"], str)
    # the random model's transcript is gibberish: scored as such, whatever it is
    assert scored["wer"] == error_rate("hello there", scored["transcript"], "en").rate
    assert -1.0 <= scored["speaker_sim"] <= 1.0
    # no voice to compare with: not measured, and said why; the same clip against itself: the same voice
    unmeasured = scorer.score(wave, 24000, {"text": "hi"})
    assert unmeasured["speaker_sim"] is None and unmeasured["speaker_sim_unmeasured"] == \
        "no reference voice (the prompt has neither speaker_audio nor reference_audio)"
    assert scorer.encoder.similarity(wave, 24000, wave, 24000) == pytest.approx(1.0, abs=1e-5)
    # a clip too short to embed is not a speaker, generated or reference
    assert scorer.encoder.embed(wave[:100], 24000) is None
    short = tmp_path / "short.wav"
    sf.write(str(short), wave[:1200], 24000)
    for clip, prompt, why in ((wave[:100], {"reference_audio": str(ref)}, "generated clip"),
                              (wave, {"speaker_audio": str(short)}, f"reference voice {short}")):
        got = scorer.score(clip, 24000, {"text": "hi", **prompt})
        assert got["speaker_sim"] is None
        assert got["speaker_sim_unmeasured"] == f"{why}: too short for the speaker encoder (under 100 ms)"


@pytest.fixture(scope="module")
def espeak(tmp_path_factory):
    """espeak-ng (Debian's package, installed here if missing and we are root): real speech, offline."""
    import os
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        if os.geteuid() != 0:
            pytest.skip("espeak-ng is not installed and installing it needs root")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        done = subprocess.run("apt-get update -q && apt-get install -y -q --no-install-recommends espeak-ng",
                              shell=True, capture_output=True, text=True, env=env)
        if done.returncode or shutil.which("espeak-ng") is None:
            pytest.skip(f"cannot install espeak-ng: {done.stderr[-500:]}")
    folder = tmp_path_factory.mktemp("espeak")

    def say(voice: str, text: str):
        import soundfile as sf

        path = folder / f"{voice}-{abs(hash(text))}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        wave, sr = sf.read(str(path), dtype="float32")
        return wave, sr

    return say


@pytest.mark.slow
def test_resemblyzer_hears_one_voice_in_two_clips_and_two_voices_apart(tmp_path, espeak):
    """The offline encoder (its weights come with the package) on real speech: two sentences of one
    espeak-ng voice are closer than the same sentence in two voices."""
    cfg = tiny_config(tmp_path, "eval.speaker_model=resemblyzer", samples=2)
    assert check_models(cfg) == []
    encoder = Scorer(cfg).encoder
    one = "The quick brown fox jumps over the lazy dog near the river bank."
    two = "Seven people walked slowly to the market on a cold winter morning."
    a1, a2, b1 = espeak("en-us", one), espeak("en-us", two), espeak("en-us+f3", one)
    same_voice = encoder.similarity(*a1, *a2)
    other_voice = encoder.similarity(*a1, *b1)
    assert same_voice > other_voice + 0.1, (same_voice, other_voice)  # measured: ~0.91 vs ~0.69
    assert encoder.embed(np.zeros(24000, np.float32), 24000) is None  # silence is nobody
