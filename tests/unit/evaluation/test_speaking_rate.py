"""`prefs build --rates-from MANIFEST`: each speaker's corpus speaking rate, measured as the detector measures it.

A speaker's rate is the median over their clips of spoken characters (letters and digits) per second of audio
(from the header); the prompts naming that speaker without a rate of their own take it (and with it a new
fingerprint: their candidates are scored against it). Lines without a speaker or audio are counted, a bad line is
one line naming it."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from higgs_ddp.evaluation.speaking_rate import RateError, corpus_rates
from higgs_ddp.tools.prefs import _corpus_rates, fingerprint, parser, read_prompts

RATE = 16_000


def clip(folder, name, seconds):
    sf.write(str(folder / name), np.zeros(int(seconds * RATE), np.float32), RATE)
    return name


def write_manifest(folder, lines):
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_each_speakers_rate_is_the_median_of_their_clips_and_fills_the_prompts_without_one(tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.zeros((4, 5), np.int16))
    manifest = write_manifest(tmp_path, [
        {"text": "Abcde, fghij!", "audio": clip(tmp_path, "a1.wav", 1.0), "speaker": "ann"},  # 10 characters: 10/s
        {"text": "abc def ghi jkl", "audio": clip(tmp_path, "a2.wav", 2.0), "speaker": "ann"},  # 12 in 2 s: 6/s
        {"text": "abcd efgh", "audio": clip(tmp_path, "a3.wav", 1.0), "speaker": "ann"},  # 8/s
        {"text": "hello", "audio": clip(tmp_path, "b1.wav", 0.5), "speaker": "bob"},  # 10/s
        {"text": "no speaker", "audio": clip(tmp_path, "x.wav", 1.0)},
        {"text": "codes only", "audio_codes": "c.npy", "speaker": "bob"}])
    rates = corpus_rates(manifest)
    assert rates.rates == {"ann": 8.0, "bob": 10.0} and rates.clips == {"ann": 3, "bob": 1} and rates.unmeasured == 2

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in [
        {"id": "a", "text": "one", "speaker": "ann"}, {"id": "b", "text": "two", "speaker": "ann", "speaking_rate": 14},
        {"id": "c", "text": "three", "speaker": "carl"}, {"id": "d", "text": "four"}]))
    prompts = read_prompts(prompts_file)
    before = [fingerprint(p) for p in prompts]
    args = parser().parse_args(["build", "--model", "m", "--prompts", str(prompts_file), "--out", "o",
                                "--rates-from", str(manifest)])
    _corpus_rates(args, prompts)
    assert [p.get("speaking_rate") for p in prompts] == [8.0, 14, None, None]
    assert [fingerprint(p) for p in prompts] != before and [fingerprint(p) for p in prompts][1:] == before[1:]
    line = capsys.readouterr().out
    assert "2 speaker(s) from 4 clip(s)" in line and "1 prompt(s) take their speaker's" in line and "'carl'" in line
    assert _corpus_rates(SimpleNamespace(rates_from=None), prompts) is None


@pytest.mark.parametrize("line, match", [
    ({"text": "t", "audio": "missing.wav", "speaker": "ann"}, r"corpus.jsonl:2: audio missing.wav"),
    ({"txt": "t"}, r"corpus.jsonl:2: unknown field"),
])
def test_a_line_it_cannot_measure_is_one_line_naming_it(tmp_path, line, match):
    manifest = write_manifest(tmp_path, [{"text": "ok", "audio": clip(tmp_path, "a.wav", 1.0), "speaker": "a"}, line])
    with pytest.raises(RateError, match=f"--rates-from .*{match}"):
        corpus_rates(manifest)
    with pytest.raises(RateError, match="manifest not found"):
        corpus_rates(tmp_path / "nowhere.jsonl")
