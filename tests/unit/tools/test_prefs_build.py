"""`higgs-ddp prefs build` writes pairs the DPO reader accepts, each candidate as speak generates it, and resumes.

On a tiny LoRA checkpoint (helpers.prefs_inputs, built once per session: conftest's prefs_built): every
candidate's seed and scores are recorded, every pair is the best valid candidate against the worst, a chosen
candidate's codes are those speak's generation path gives for its seed, a prompt without a pair is listed
with why; a build with prompts already done generates only the rest and writes the same files; scorer
weights that are not here are one line saying what to get, or skipped when asked (and recorded); bad
prompts are one line naming the file and line."""

import json
import shutil

import numpy as np
import pytest
import torch
from eval_models import tiny_wavlm, tiny_whisper
from helpers import PREFS_SETTINGS, prefs_files

from higgs_ddp.tools.prefs import main


def build(*args):
    return main(["build", *map(str, args)])


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_pairs_read_back_and_every_candidate_is_recorded(prefs_built):
    from higgs_ddp.data.preferences import read_pairs, run_identity
    from higgs_ddp.evaluation.candidates import candidate_seed
    from higgs_ddp.evaluation.generation import Sampling, generation_state, speak_text
    from higgs_ddp.tools.inference import load_for_inference

    ckpt, prompts, out = prefs_built
    loaded = load_for_inference(ckpt, "cpu")
    expected = run_identity("tiny", None, loaded.tokenizer, 4, 64)
    header, pairs = read_pairs(out / "pairs.jsonl", expected)  # the DPO reader's own checks, codes loaded
    assert header["candidates"] == 3 and header["seed"] == 7 and header["model"]["kind"] == "checkpoint"
    assert header["scorers"]["used"] == {} and header["reward"]["filters"]["must_stop"] is True
    cands = lines(out / "candidates.jsonl")
    ids = ["hello", "clone", "3", "four"]  # a prompt without an id is named by its line
    assert [c["id"] for c in cands] == [i for i in ids for _ in range(3)]
    assert all(c["seed"] == candidate_seed(7, c["id"], c["index"]) for c in cands)
    assert len({c["seed"] for c in cands}) == 12
    unpaired = lines(out / "unpaired.jsonl")
    assert header["counts"] == {"prompts": 4, "pairs": len(pairs), "unpaired": len(unpaired)}
    assert len(pairs) >= 2, "the tiny model at these settings stops in some candidates (else nothing is tested)"
    assert sorted([p.id for p in pairs] + [u["id"] for u in unpaired]) == sorted(ids)
    for u in unpaired:
        assert u["why"] and len(u["rewards"]) == 3
    for pair in pairs:
        mine = [c for c in cands if c["id"] == pair.id]
        chosen = next(c for c in mine if c["role"] == "chosen")
        rejected = next(c for c in mine if c["role"] == "rejected")
        assert (pair.chosen.key, pair.rejected.key) == (chosen["key"], rejected["key"])
        assert chosen["rejections"] == [] and chosen["stopped"]  # the default filters
        # each end's detector verdict is in the pair: a cut candidate is not trained to end (collator.py)
        assert (pair.chosen.stopped, pair.rejected.stopped) == (True, rejected["stopped"])
        assert chosen["reward"] == max(c["reward"] for c in mine if not c["rejections"])
        assert rejected["reward"] == min(c["reward"] for c in mine if c["frames"])
        assert chosen["reward"] > rejected["reward"]
        assert pair.chosen.codes.dtype == np.int16 and pair.chosen.codes.shape == (4, chosen["frames"])
    clone = next(p for p in pairs if p.id == "clone") if any(p.id == "clone" for p in pairs) else None
    if clone is not None:
        assert clone.ref_text == "a tone" and clone.ref.path == (prompts.parent / "voice.wav").resolve()
    assert all("rate_error" in c for c in cands if c["id"] == "clone")  # its speaking_rate is known
    # The same generation path as speak: the chosen candidate again, from its recorded seed alone.
    pair = pairs[0]
    text = next(json.loads(line)["text"] for line in (out / "pairs.jsonl").read_text().splitlines())
    seed = pair.chosen.seed
    with generation_state(loaded.model, seed):
        again = speak_text(loaded.model, loaded.tokenizer, loaded.codec, loaded.cfg, text, sampling=Sampling(
            temperature=1.0, max_audio_seconds=0.3, seed=seed), decode=False).generated.codes
    assert torch.equal(again.to(torch.int16), torch.from_numpy(np.asarray(pair.chosen.codes)))
    # Negative control: a prompt's candidates differ (their seeds reach the sampler)
    assert any(len({c["frames"] for c in cands if c["id"] == i}) > 1 for i in ids)


def test_a_build_with_prompts_already_done_generates_only_the_rest_and_writes_the_same(prefs_built, tmp_path,
                                                                                       capsys):
    """An interrupted build, simulated: one prompt's record and every output deleted (the 2-rank build killed
    for real: distributed/test_prefs_build_ranks.py)."""
    ckpt, prompts, out = prefs_built
    again = tmp_path / "out"
    shutil.copytree(out / "work", again / "work")
    from higgs_ddp.tools.prefs import record_name
    for suffix in (".json", ".safetensors"):
        (again / "work" / f"{record_name('clone')}{suffix}").unlink()
    capsys.readouterr()
    assert build("--model", ckpt, "--prompts", prompts, "--out", again, *PREFS_SETTINGS) == 0
    assert "4 prompts x 3 candidates on 1 rank; 3 already built" in capsys.readouterr().out
    assert prefs_files(again) == prefs_files(out)
    # Re-pairing with other filters regenerates nothing: the recorded scores are judged again.
    assert build("--model", ckpt, "--prompts", prompts, "--out", again, *PREFS_SETTINGS,
                 "--chosen-may-hit-limit") == 0
    assert "4 already built" in capsys.readouterr().out
    header = json.loads((again / "prefs.json").read_text())
    assert header["reward"]["filters"]["must_stop"] is False
    assert header["counts"]["pairs"] >= json.loads((out / "prefs.json").read_text())["counts"]["pairs"]
    # Other generation settings would mix two sets of candidates: one line, nothing written.
    assert build("--model", ckpt, "--prompts", prompts, "--out", again, *PREFS_SETTINGS, "--candidates", "4") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds candidates built with other settings (candidates: 3 then, 4 now)" in err


def test_missing_scorer_weights_are_one_line_or_skipped_when_asked(prefs_built, tmp_path, capsys):
    ckpt, prompts, _ = prefs_built
    one = tmp_path / "one.jsonl"
    one.write_text(prompts.read_text().splitlines()[0] + "\n")
    settings = [a for a in PREFS_SETTINGS]
    settings[settings.index("--asr-model") + 1] = str(tiny_whisper(tmp_path / "whisper"))
    settings[settings.index("--speaker-model") + 1] = "nobody/no-such-wavlm"
    settings[settings.index("--candidates") + 1] = "2"
    assert build("--model", ckpt, "--prompts", one, "--out", tmp_path / "all", *settings) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("higgs-ddp: error: --speaker-model: nobody/no-such-wavlm is "
                                                   "neither a folder nor in the Hugging Face cache")
    assert "huggingface-cli download nobody/no-such-wavlm" in err and "--scorers available" in err
    assert not (tmp_path / "all").exists()  # said before anything was loaded or written
    assert build("--model", ckpt, "--prompts", one, "--out", tmp_path / "some", *settings, "--scorers", "available",
                 "--max-cer", "none") == 0
    assert "note: --speaker-model skipped (--scorers available)" in capsys.readouterr().err
    header = json.loads((tmp_path / "some" / "prefs.json").read_text())
    assert header["scorers"]["used"] == {"asr_model": str(tmp_path / "whisper")}
    assert list(header["scorers"]["skipped"]) == ["--speaker-model"]
    cands = lines(tmp_path / "some" / "candidates.jsonl")
    assert len(cands) == 2 and all("cer" in c and "transcript" in c and "speaker_sim" not in c for c in cands)
    # Speaker similarity where the prompt has a voice to compare with (its speaker_audio), none where it has not.
    two = tmp_path / "two.jsonl"
    two.write_text("".join(prompts.read_text().splitlines(keepends=True)[2:4]).replace('"voice.wav"', json.dumps(
        str(prompts.parent / "voice.wav"))))
    settings[settings.index("--asr-model") + 1] = "none"
    settings[settings.index("--speaker-model") + 1] = str(tiny_wavlm(tmp_path / "wavlm"))
    assert build("--model", ckpt, "--prompts", two, "--out", tmp_path / "sim", *settings) == 0
    cands = lines(tmp_path / "sim" / "candidates.jsonl")
    assert [c["id"] for c in cands] == ["1", "1", "four", "four"]
    assert all(-1 <= c["speaker_sim"] <= 1 for c in cands[:2] if c["speaker_sim"] is not None)
    assert all("speaker_sim" in c for c in cands[:2]) and not any("speaker_sim" in c for c in cands[2:])


@pytest.mark.parametrize("text, says", [
    ('{"text": "fine"}\n{"txt": "typo"}\n', ':2: a prompt is a JSON object with a non-empty "text"'),
    ('{"text": "x", "ref_audio": "voice.wav"}\n', ":1: a reference needs both its audio (ref_audio) and its "
                                                  "transcript (ref_text)"),
    ('{"id": "a", "text": "x"}\n\n{"id": "a", "text": "y"}\n', ":3: id 'a' is also the id of line 1"),
    ('{"text": "x", "speaking_rate": 0}\n', ':1: "speaking_rate" is the speaker\'s characters per second'),
    ('{"text": "x", "ref_audio": "nowhere.wav", "ref_text": "t"}\n', ":1: ref_audio: "),
    ('{"text": "x", "emotion": "glad"}\n', ":1: unknown key(s) ['emotion']"),
])
def test_bad_prompts_are_one_line_naming_the_file_and_line(prefs_built, tmp_path, capsys, text, says):
    ckpt, _, _ = prefs_built
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    assert build("--model", ckpt, "--prompts", bad, "--out", tmp_path / "out", *PREFS_SETTINGS) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"higgs-ddp: error: {bad}{says}"), err
