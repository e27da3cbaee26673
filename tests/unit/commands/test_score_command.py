"""`higgs-ddp score` compares two checkpoints' speech through real toy Whisper and WavLM; bad prompts are one line.

higgs-ddp score: two checkpoints of a tiny LoRA run speak the same prompts with the same seed, through the
real Whisper and WavLM classes at toy sizes; a table on stdout, every number in scores.json; bad prompts
are one line, exit 2."""

import json

import numpy as np
import pytest
import soundfile as sf
from helpers import tiny_config
from eval_models import tiny_wavlm, tiny_whisper

from higgs_ddp.tools.score import main as score_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from higgs_ddp.train import train

    tmp = tmp_path_factory.mktemp("score")
    train(tiny_config(tmp, "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=1", "train.save_every=1",
                      samples=4))
    voice = tmp / "voice.wav"
    sf.write(str(voice), 0.1 * np.sin(np.arange(12_000) * 0.05).astype(np.float32), 24_000)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "hello there"}) + "\n\n"
                       + json.dumps({"text": "say this", "speaker_audio": "voice.wav"}) + "\n")
    return tmp, tiny_whisper(tmp / "whisper"), tiny_wavlm(tmp / "wavlm")


@pytest.mark.slow
def test_two_checkpoints_on_the_same_prompts_and_seed(setup, capsys):
    tmp, whisper, wavlm = setup
    run = tmp / "run"
    common = ["--prompts", str(tmp / "prompts.jsonl"), "--asr-model", str(whisper), "--speaker-model", str(wavlm),
              "--max-audio-seconds", "0.2", "--seed", "3", "--device", "cpu"]
    step1 = str(run / "checkpoints" / "step_000001")
    assert score_main(["--model", step1, "--model", str(run), "--model", step1, *common,
                       "--out", str(tmp / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "samples", "stopped", "silent", "seconds", "chars/s", "WER", "CER", "SIM"]
    assert [line.split()[0] for line in lines[1:]] == [step1, str(run), step1]
    report = json.loads((tmp / "out" / "scores.json").read_text())
    first, final, again = report["models"]
    assert (first["step"], final["step"]) == (1, 2)
    for m in report["models"]:
        s = m["summary"]
        assert s["samples"] == 2 and s["wer"] >= 0 and -1 <= s["speaker_sim"] <= 1
        assert [x["line"] for x in m["samples"]] == [1, 3] and m["samples"][0]["speaker_sim"] is None
    # the same model with the same seed: the same audio, the same numbers
    assert again["samples"] == first["samples"]
    for i in range(2):
        assert (tmp / "out" / "model_0" / f"prompt_{i:02d}.wav").read_bytes() == \
            (tmp / "out" / "model_2" / f"prompt_{i:02d}.wav").read_bytes()


def test_bad_prompts_are_one_line(setup, tmp_path, capsys):
    tmp, _, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert score_main(["--model", str(tmp / "run"), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"higgs-ddp: error: {bad}:2: a prompt is a JSON object with a non-empty \"text\""]
    bad.write_text('{"text": "x", "speaker_audio": "nowhere.wav"}\n')
    assert score_main(["--model", str(tmp / "run"), "--prompts", str(bad)]) == 2
    assert "speaker_audio" in capsys.readouterr().err
    assert score_main(["--model", str(tmp / "run"), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"higgs-ddp: error: --prompts {tmp_path / 'none.jsonl'} not found"
    bad.write_text('{"text": "x", "reference_audio": "ref.wav"}\n')  # a reference is its audio and its words
    assert score_main(["--model", str(tmp / "run"), "--prompts", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (f"higgs-ddp: error: {bad}:1: a reference needs both its audio "
                                               f"(reference_audio) and its transcript (reference_text)")


def test_errors_name_the_flag_and_the_prompts_line_the_user_typed(tmp_path, capsys):
    """Not the config keys score maps them to (eval.asr_model, eval.prompts[1].speaker_audio)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "fine"}\n\n{"text": "x", "speaker_audio": "nowhere.wav"}\n')
    fine = tmp_path / "fine.jsonl"
    fine.write_text('{"text": "fine"}\n')
    cases = [((prompts, "--asr-model", tmp_path / "no_whisper"),
              f"--asr-model: {tmp_path / 'no_whisper'} is not a folder"),
             ((fine, "--speaker-model", "/no/wavlm"), "--speaker-model: /no/wavlm is not a folder"),
             ((prompts,), f"{prompts}:3: speaker_audio: audio {tmp_path / 'nowhere.wav'} not found"),
             ((fine, "--max-audio-seconds", "0"), "--max-audio-seconds must be > 0"),
             ((fine, "--temperature", "-1"), "--temperature must be >= 0")]
    for (file, *flags), expected in cases:
        assert score_main(["--model", str(tmp_path / "run"), "--prompts", str(file), *map(str, flags)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"higgs-ddp: error: {expected}") and err.count("\n") == 1, err
        assert "eval." not in err, err


def test_every_dash_in_the_table_says_why():
    from higgs_ddp.tools.score import table

    base = {"samples": 2, "stopped_samples": 2, "silent_samples": 0, "seconds": 0.04, "chars_per_second": 5.0}
    why = "2 of 2 samples: generated clip: too short for the speaker encoder (under 100 ms)"
    lines = table([("a", {**base, "speaker_sim": None, "speaker_sim_unmeasured": why}),
                   ("b", {**base, "speaker_sim": 0.5, "chars_per_second": None})]).splitlines()
    assert lines[1].split()[-3:] == ["-", "-", "-"] and lines[2].split()[-3:] == ["-", "-", "0.500"]
    assert lines[3:] == ["", "WER, CER -: no --asr-model given", f"SIM - for a: {why}",
                         "chars/s - for b: every clip is empty (the model ended each stream at once)"]
