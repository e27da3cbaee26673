"""`make demo`'s ending: what the trained tiny model speaks lasts as long as its text, and --compare says so.

`make demo`'s ending: what the trained tiny model speaks lasts as long as its text, as the corpus's clips do,
and the last line (`higgs-ddp demo-data --compare`) says so from the files."""

import json
import re
import shlex

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import QUIET, ROOT, TINY

from higgs_ddp.tools.demo_data import main as demo_data
from higgs_ddp.tools.demo_data import text_to_wave


def write_spoken(folder, clips):
    """WAVs as `higgs-ddp speak --out FOLDER` leaves them: line_NNNN.wav with a JSON sidecar naming its text."""
    folder.mkdir(parents=True)
    for n, (text, seconds) in enumerate(clips, 1):
        sf.write(folder / f"line_{n:04d}.wav", np.zeros(round(seconds * 8000), np.float32), 8000, subtype="PCM_16")
        (folder / f"line_{n:04d}.json").write_text(json.dumps({"text": text, "seconds": seconds}))


def write_corpus(folder, texts):
    """A manifest of WAV clips, one per text, each 0.04 s per character (demo_data.text_to_wave)."""
    (folder / "wavs").mkdir(parents=True)
    rows = []
    for i, text in enumerate(texts):
        sf.write(folder / "wavs" / f"c{i}.wav", text_to_wave(text), 8000, subtype="PCM_16")
        rows.append(json.dumps({"id": f"c{i}", "text": text, "audio": f"wavs/c{i}.wav"}))
    (folder / "manifest.jsonl").write_text("\n".join(rows) + "\n")


def test_compare_line_is_the_spoken_seconds_per_character_against_the_corpus(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", ["a dog", "seven small birds", "the fox"])  # 29 characters, 1.16 s
    write_spoken(tmp_path / "spoken", [("seven birds", 0.5), ("small birds sing at dawn", 1.2)])
    assert demo_data([str(tmp_path / "corpus"), "--compare", str(tmp_path / "spoken")]) == 0
    assert capsys.readouterr().out == ("spoke 0.50 s for 11 characters (0.045 s/char) and 1.20 s for 24 characters "
                                       "(0.050 s/char); the corpus has 0.040 s/char (3 clips)\n")
    assert demo_data([str(tmp_path / "corpus"), "--compare", str(tmp_path / "spoken" / "line_0001.wav")]) == 0
    assert capsys.readouterr().out == "spoke 0.50 s for 11 characters (0.045 s/char); the corpus has 0.040 s/char " \
                                      "(3 clips)\n"


def test_compare_what_it_cannot_read_is_one_line(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", ["a dog"])
    write_spoken(tmp_path / "good", [("a dog", 0.2)])
    write_spoken(tmp_path / "spoken", [("a dog", 0.2)])
    (tmp_path / "spoken" / "line_0001.json").unlink()
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "corpus", tmp_path / "empty", f"{tmp_path / 'empty'}: no WAV files"),
             (tmp_path / "corpus", tmp_path / "spoken", f"{tmp_path / 'spoken' / 'line_0001.wav'}: cannot read it"),
             (tmp_path / "nowhere", tmp_path / "good", f"{tmp_path / 'nowhere' / 'manifest.jsonl'}: manifest not")]
    for corpus, spoken, start in cases:
        assert demo_data([str(corpus), "--compare", str(spoken)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"higgs-ddp: error: {start}") and err.count("\n") == 1, err


def makefile_demo_args() -> list:
    """The overrides `make demo` gives configs/tiny.yaml (the Makefile's DEMO_ARGS), less its step count."""
    line = re.search(r"^DEMO_ARGS \?= (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    return [a for a in shlex.split(line) if not a.startswith("train.max_steps=")]


@pytest.fixture
def one_thread():
    """Many tiny ops: one thread takes a third of the time of two on a busy 2-core machine (17 s against 56)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_demo_settings_learn_to_speak_as_long_as_the_text(tmp_path, capsys, one_thread):
    """make demo's path at a smaller size (64 clips, 400 steps, one process): the demo's LJSpeech-style WAVs,
    imported, encoded by the tiny codec, trained with the Makefile's DEMO_ARGS, spoken by `higgs-ddp speak`.
    A longer text is spoken for longer, near the corpus's 0.04 s per character (tiny.yaml alone, whose LoRA
    leaves the random heads frozen, ends every text after a few frames)."""
    from higgs_ddp.config import load_config
    from higgs_ddp.data.importers import import_corpus, write_manifest
    from higgs_ddp.tools.demo_data import write_ljspeech_demo
    from higgs_ddp.tools.speak import main as speak
    from higgs_ddp.train import train

    src = write_ljspeech_demo(tmp_path / "data", samples=64)
    manifest = write_manifest(import_corpus(src, "ljspeech", src / "manifest.jsonl", "tones").rows,
                              src / "manifest.jsonl")
    train(load_config(str(TINY), [f"output_dir={tmp_path / 'run'}", f"data.manifest={manifest}",
                                  f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", *QUIET,
                                  *makefile_demo_args(), "train.max_steps=400", "train.save_every=400"]))
    texts = ["a fox", "seven birds", "the quick brown fox"]  # 5, 11, 19 characters; none is in the corpus
    (tmp_path / "speak.txt").write_text("\n".join(texts) + "\n")
    assert speak(["--model", str(tmp_path / "run"), "--text-file", str(tmp_path / "speak.txt"),
                  "--max-audio-seconds", "2", "--out", str(tmp_path / "speak")]) == 0
    capsys.readouterr()
    assert demo_data([str(src), "--compare", str(tmp_path / "speak")]) == 0
    line = capsys.readouterr().out
    spoken = [float(s) for s in re.findall(r"([0-9.]+) s for", line)]
    assert spoken == sorted(spoken) and len(set(spoken)) == 3, line
    assert line.strip().endswith("the corpus has 0.040 s/char (64 clips)"), line
    for text, seconds in zip(texts, spoken):
        assert 0.6 < seconds / len(text) / 0.04 < 1.5, line
