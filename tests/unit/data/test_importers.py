"""Each `higgs-ddp manifest import` layout reads into a manifest training accepts; bad clips are file:line.

Importers (`higgs-ddp manifest import`): each layout other TTS tools use, built small in tmp_path with real
WAV/FLAC files, read into a manifest the training data check accepts; `--format auto` tells each apart or
says which it cannot; every bad clip is one `file:line: what` line (or counted under --on-error skip); the
output appears whole; headers only are read. And `manifest stats` with its warnings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT

from higgs_ddp.data.audio import AudioProblem, read_audio
from higgs_ddp.data.importers import LayoutError, detect, import_corpus, write_manifest
from higgs_ddp.data.manifest import read_manifest
from higgs_ddp.data.manifest_stats import manifest_stats
from higgs_ddp.tools import manifest_cmd
from higgs_ddp.tools.demo_data import text_to_wave, write_ljspeech_demo

SR = 8000


def wav(path: Path, seconds: float = 0.3, sr: int = SR, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * sr)
    sf.write(path, (0.3 * np.sin(np.arange(n) * 2 * np.pi * 220 / sr)).astype(np.float32), sr, **kw)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- one fixture per layout


def ljspeech(root: Path) -> Path:
    src = root / "LJSpeech-1.1"
    write(src / "metadata.csv", 'LJ001-0001|"Printing, in the only sense|"Printing, in the only sense\n'
          "LJ001-0002|in 1835 ships|in eighteen thirty-five ships\n")
    wav(src / "wavs" / "LJ001-0001.wav")
    wav(src / "wavs" / "LJ001-0002.wav")
    return src


def libritts(root: Path) -> Path:
    src = root / "LibriTTS_R"
    for spk, chap, utt, text in (("19", "198", "000000_000000", "Northanger Abbey."), ("84", "121", "000001_000003",
                                                                                        "It was a fine day.")):
        stem = src / "train-clean-100" / spk / chap / f"{spk}_{chap}_{utt}"
        wav(stem.with_suffix(".wav"))
        write(stem.with_name(stem.name + ".normalized.txt"), text)
        write(stem.with_name(stem.name + ".original.txt"), text.upper())
    return src


def vctk(root: Path) -> Path:
    src = root / "VCTK-Corpus-0.92"
    write(src / "txt" / "p225" / "p225_001.txt", "Please call Stella.\n")
    write(src / "txt" / "p226" / "p226_002.txt", "Ask her to bring these things.\n")
    for spk, utt in (("p225", "p225_001"), ("p226", "p226_002")):
        for mic in ("mic1", "mic2"):
            wav(src / "wav48_silence_trimmed" / spk / f"{utt}_{mic}.flac", format="FLAC")
    return src


def speaker_folders(root: Path) -> Path:
    src = root / "voices"
    for spk in ("ana", "ben"):
        wav(src / spk / "a.wav")
        write(src / spk / "a.txt", f"hello from {spk}")
    return src


def fish(root: Path) -> Path:
    src = root / "fish"
    wav(src / "SPK1" / "21.15-26.44.wav")
    write(src / "SPK1" / "21.15-26.44.lab", "the first clip")
    wav(src / "SPK2" / "0001.flac", format="FLAC")
    write(src / "SPK2" / "0001.lab", "the second clip")
    return src


def csv_f5(root: Path) -> Path:  # F5-TTS: audio_file|text
    wav(root / "f5" / "wavs" / "a.wav")
    wav(root / "f5" / "wavs" / "b.wav")
    return write(root / "f5" / "metadata.csv", "audio_file|text\nwavs/a.wav|first one\nwavs/b.wav|second one\n")


def csv_coqui(root: Path) -> Path:  # Coqui XTTS: audio_file|text|speaker_name
    wav(root / "coqui" / "wavs" / "a.wav")
    wav(root / "coqui" / "wavs" / "b.wav")
    return write(root / "coqui" / "metadata_train.csv",
                 "audio_file|text|speaker_name\nwavs/a.wav|hi there|coqui\nwavs/b.wav|hello again|other\n")


def csv_comma(root: Path) -> Path:
    wav(root / "plain" / "a.wav")
    wav(root / "plain" / "b.wav")
    return write(root / "plain" / "list.csv", 'path,transcript,speaker\na.wav,"one, two",x\nb.wav,three,y\n')


def higgs_json(root: Path) -> Path:
    src = root / "higgs_training_data"
    wav(src / "huo_000000.wav")
    write(src / "huo_000000.txt", "the target text")
    wav(src / "huo_000001.wav")
    write(src / "huo_000001.txt", "another one")
    wav(src / "ref.wav")
    samples = [
        {"id": "huo_000000", "audio_file": "huo_000000.wav", "transcript_file": "huo_000000.txt", "duration": 0.3,
         "speaker_id": "huo_speaker", "speaker_name": "Huo", "scene": "quiet_room", "emotion": "neutral",
         "ref_audio_file": "ref.wav", "ref_transcript": "my reference voice", "task_type": "zero_shot_voice_cloning"},
        {"id": "huo_000001", "audio_file": "huo_000001.wav", "transcript_file": "huo_000001.txt",
         "speaker_id": "huo_speaker", "task_type": "audio_generation"}]
    write(src / "metadata.json", json.dumps({"dataset_info": {"total_samples": 2}, "samples": samples}, indent=2))
    return src


def swift(root: Path) -> Path:
    wav(root / "swift" / "audio" / "a.wav")
    wav(root / "swift" / "audio" / "b.wav")
    lines = [{"messages": [{"role": "user", "content": "<audio>/translate"},
                           {"role": "assistant", "content": "what the clip says"}], "audios": ["audio/a.wav"]},
             {"messages": [{"role": "system", "content": "You speak."}, {"role": "user", "content": "say this"},
                           {"role": "assistant", "content": "<audio>"}], "audios": ["audio/b.wav"]}]
    return write(root / "swift" / "train.jsonl", "".join(json.dumps(x) + "\n" for x in lines))


def audiofolder(root: Path) -> Path:
    src = root / "audiofolder"
    wav(src / "train" / "a.wav")
    wav(src / "train" / "b.wav")
    write(src / "train" / "metadata.csv", "file_name,transcription,speaker_id\na.wav,first,7\nb.wav,second,8\n")
    wav(src / "test" / "c.wav")
    write(src / "test" / "metadata.jsonl", json.dumps({"file_name": "c.wav", "transcription": "third"}) + "\n")
    return src


# (builder, format, expected (id, text, speaker, audio relative to the manifest) per row, options)
LAYOUTS = {
    "ljspeech": (ljspeech, "ljspeech", [
        ("LJ001-0001", '"Printing, in the only sense', None, "LJSpeech-1.1/wavs/LJ001-0001.wav"),
        ("LJ001-0002", "in eighteen thirty-five ships", None, "LJSpeech-1.1/wavs/LJ001-0002.wav")]),
    "libritts": (libritts, "libritts", [
        ("19_198_000000_000000", "Northanger Abbey.", "19",
         "LibriTTS_R/train-clean-100/19/198/19_198_000000_000000.wav"),
        ("84_121_000001_000003", "It was a fine day.", "84",
         "LibriTTS_R/train-clean-100/84/121/84_121_000001_000003.wav")]),
    "vctk": (vctk, "vctk", [
        ("p225_001", "Please call Stella.", "p225", "VCTK-Corpus-0.92/wav48_silence_trimmed/p225/p225_001_mic1.flac"),
        ("p226_002", "Ask her to bring these things.", "p226",
         "VCTK-Corpus-0.92/wav48_silence_trimmed/p226/p226_002_mic1.flac")]),
    "speaker_folders": (speaker_folders, "vctk", [
        ("ana/a", "hello from ana", "ana", "voices/ana/a.wav"), ("ben/a", "hello from ben", "ben", "voices/ben/a.wav")]),
    "fish": (fish, "fish", [
        ("SPK1/21.15-26.44", "the first clip", "SPK1", "fish/SPK1/21.15-26.44.wav"),
        ("SPK2/0001", "the second clip", "SPK2", "fish/SPK2/0001.flac")]),
    "csv_f5": (csv_f5, "csv", [("wavs/a", "first one", None, "f5/wavs/a.wav"),
                               ("wavs/b", "second one", None, "f5/wavs/b.wav")]),
    "csv_coqui": (csv_coqui, "csv", [("wavs/a", "hi there", "coqui", "coqui/wavs/a.wav"),
                                     ("wavs/b", "hello again", "other", "coqui/wavs/b.wav")]),
    "csv_comma": (csv_comma, "csv", [("a", "one, two", "x", "plain/a.wav"), ("b", "three", "y", "plain/b.wav")]),
    "higgs_json": (higgs_json, "higgs-json", [
        ("huo_000000", "the target text", "huo_speaker", "higgs_training_data/huo_000000.wav"),
        ("huo_000001", "another one", "huo_speaker", "higgs_training_data/huo_000001.wav")]),
    "swift": (swift, "swift", [("audio/a", "what the clip says", None, "swift/audio/a.wav"),
                               ("audio/b", "say this", None, "swift/audio/b.wav")]),
    "audiofolder": (audiofolder, "audiofolder", [
        ("train/a", "first", "7", "audiofolder/train/a.wav"), ("train/b", "second", "8", "audiofolder/train/b.wav"),
        ("test/c", "third", None, "audiofolder/test/c.wav")]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_imports_into_a_manifest_the_training_check_reads(tmp_path, name):
    build, fmt, expected = LAYOUTS[name]
    src = build(tmp_path / "corpora")
    assert detect(src) == fmt  # --format auto recognises it
    out = tmp_path / "corpora" / "manifest.jsonl"
    assert manifest_cmd.main(["import", "--format", fmt, str(src), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = sorted((r["id"], r["text"], r.get("speaker"), r["audio"]) for r in rows)
    assert got == sorted(expected)
    entries, problems = read_manifest(str(out))  # the training data check's parser
    assert problems == [] and len(entries) == len(expected)
    assert all(r.path.is_file() for e in entries for r in e.audio)


def test_references_scene_and_speaker_carry_over_from_the_higgs_trainers_metadata(tmp_path):
    got = import_corpus(higgs_json(tmp_path), "auto", tmp_path / "out" / "m.jsonl")
    first = got.rows[0]
    assert first["ref_audio"] == "../higgs_training_data/ref.wav" and first["ref_text"] == "my reference voice"
    assert first["scene"] == "quiet_room" and first["speaker"] == "huo_speaker"
    write_manifest(got.rows, tmp_path / "out" / "m.jsonl")
    entries, problems = read_manifest(str(tmp_path / "out" / "m.jsonl"))
    assert not problems and [r.shown for r in entries[0].audio] == ["../higgs_training_data/ref.wav",
                                                                     "../higgs_training_data/huo_000000.wav"]
    assert entries[0].learned == (entries[0].audio[1],)  # the reference is context, never a target


def test_auto_tells_a_header_from_ljspeech_in_a_folders_metadata_csv(tmp_path):
    assert detect(csv_f5(tmp_path).parent) == "csv"  # F5-TTS: audio_file|text, with wavs/ beside
    assert detect(ljspeech(tmp_path)) == "ljspeech"  # no header
    got = import_corpus(tmp_path / "f5", "auto", tmp_path / "m.jsonl")
    assert [r["audio"] for r in got.rows] == ["f5/wavs/a.wav", "f5/wavs/b.wav"]


def test_auto_names_the_layouts_it_cannot_tell_apart_and_those_it_does_not_know(tmp_path):
    src = ljspeech(tmp_path)
    write(src / "metadata.json", json.dumps({"samples": []}))  # also a Higgs trainers' folder
    with pytest.raises(LayoutError, match="could be ljspeech or higgs-json; choose with --format"):
        detect(src)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="not a layout --format auto recognises"):
        detect(tmp_path / "empty")
    assert import_corpus(src, "ljspeech", tmp_path / "m.jsonl").format == "ljspeech"  # --format settles it


@pytest.mark.parametrize("build, fmt, looks", [
    (ljspeech, "vctk", "ljspeech"),  # VCTK's speaker folders would take wavs/ for one, a clip at a time
    (ljspeech, "fish", "ljspeech"),
    (ljspeech, "libritts", "ljspeech"),
    (vctk, "ljspeech", "vctk"),
    (lambda root: csv_f5(root).parent, "ljspeech", "csv"),  # a header line is not an LJSpeech clip
    (lambda root: audiofolder(root) / "test" / "metadata.jsonl", "swift", "audiofolder"),
])
def test_a_format_that_does_not_fit_the_source_is_one_line_before_any_clip(tmp_path, capsys, build, fmt, looks):
    src = build(tmp_path)
    out = tmp_path / "m.jsonl"
    assert manifest_cmd.main(["import", "--format", fmt, str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"higgs-ddp: error: {src}: this does not look like {fmt} (") and \
        f"it looks like {looks} (--format {looks})" in err, err
    assert not out.exists()


def test_a_layout_with_some_clips_broken_still_lists_each_clip(tmp_path):
    """The negative control: a VCTK folder whose one clip lacks its transcript looks like VCTK; the clip is
    the problem, by name."""
    src = speaker_folders(tmp_path)
    wav(src / "ben" / "b.wav")
    got = import_corpus(src, "vctk", tmp_path / "m.jsonl")
    assert [str(p) for p in got.problems] == ["ben/b.txt: transcript ben/b.txt not found"] and len(got.rows) == 2


def test_every_bad_clip_is_one_line_naming_file_and_line_and_nothing_is_written(tmp_path, capsys):
    src = ljspeech(tmp_path)
    with (src / "metadata.csv").open("ab") as f:
        f.write(b"LJ001-0003|no audio for this one|no audio for this one\n"  # line 3
                b"LJ001-0004| | \n"  # line 4: empty text
                b"just one field\n"  # line 5
                b"LJ001-0005|caf\xe9|caf\xe9\n"  # line 6: Latin-1, not UTF-8
                b"LJ001-0006|not audio|not audio\n"  # line 7
                b"LJ001-0002|again|again\n"  # line 8: the id of line 2
                b"LJ001-0007|a|pipe inside|a|pipe inside\n")  # line 9: a '|' in the text, never cut
    wav(src / "wavs" / "LJ001-0004.wav")
    write(src / "wavs" / "LJ001-0006.wav", "a transcript saved under the wrong name")
    out = tmp_path / "m.jsonl"
    write(out, "the previous manifest\n")
    assert manifest_cmd.main(["import", "--format", "ljspeech", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("higgs-ddp: error: 7 problem(s) in ") and "nothing written" in err[0]
    assert err[1:] == [
        "metadata.csv:3: audio wavs/LJ001-0003.wav not found",
        "metadata.csv:4: the transcript is empty",
        "metadata.csv:5: expected id|text|normalized text (2 or 3 fields separated by '|'), got 1 field",
        "metadata.csv:6: not valid UTF-8 text (byte 14)",
        "metadata.csv:7: audio wavs/LJ001-0006.wav is not a readable audio file (Error opening "
        f"'{src / 'wavs' / 'LJ001-0006.wav'}': Format not recognised.)",
        "metadata.csv:8: id 'LJ001-0002' is already the id of metadata.csv:2",
        "metadata.csv:9: expected id|text|normalized text (2 or 3 fields separated by '|'), got 5 fields (a '|' "
        "inside a transcript cannot be told from a separator: replace it)"]
    assert out.read_text() == "the previous manifest\n"  # untouched
    # --on-error skip: the rest is written, the skipped counted by the training check's reasons
    assert manifest_cmd.main(["import", "--format", "ljspeech", str(src), "--out", str(out), "--on-error",
                              "skip"]) == 0
    printed = capsys.readouterr().out
    assert "manifest import: 2 clips" in printed
    assert ("skipped 7 (1 audio_missing, 1 audio_unreadable, 2 bad_row, 1 bad_utf8, 1 duplicate_id, 1 empty_text)"
            in printed)
    assert len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LJSpeech-1.1", "m.jsonl"]  # no temporary file left


def test_jsonl_and_metadata_json_problems_name_their_line_or_sample(tmp_path):
    src = swift(tmp_path)
    with src.open("a") as f:
        f.write('{"messages": [\n')
        f.write(json.dumps({"messages": [], "audios": ["a.wav", "b.wav"]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "<audio>"},
                                         {"role": "assistant", "content": "hi"}], "audios": ["gone.wav"]}) + "\n")
    got = import_corpus(src, "swift", tmp_path / "m.jsonl")
    assert [str(p) for p in got.problems] == [
        "train.jsonl:3: invalid JSON (Expecting value at column 15)",
        "train.jsonl:4: 2 audios; a TTS sample has exactly one (path)",
        "train.jsonl:5: audio gone.wav not found"]
    src = higgs_json(tmp_path)
    (src / "huo_000001.txt").unlink()
    got = import_corpus(src, "higgs-json", tmp_path / "m.jsonl")
    assert [str(p) for p in got.problems] == ["metadata.json:samples[1]: transcript huo_000001.txt not found"]


def test_the_output_appears_whole_or_not_at_all(tmp_path):
    out = write(tmp_path / "m.jsonl", "old\n")
    with pytest.raises(TypeError):  # a row that cannot be written, half way through
        write_manifest([{"text": "a", "audio": "a.wav"}, {"text": object()}], out)
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_import_reads_headers_only(tmp_path):
    """A FLAC whose frames are garbled has a valid header: the importer takes it (it never decodes), while
    decoding it, as prepare does, fails (the negative control)."""
    src = tmp_path / "fish"
    good = wav(src / "s" / "clip.flac", seconds=1.0, format="FLAC")
    data = bytearray(good.read_bytes())
    data[200:2000] = bytes(1800)
    good.write_bytes(bytes(data))
    write(src / "s" / "clip.lab", "garbled inside")
    got = import_corpus(src, "fish", tmp_path / "m.jsonl")
    assert got.problems == [] and len(got.rows) == 1 and got.seconds == pytest.approx(1.0)
    with pytest.raises(AudioProblem, match="is corrupt"):
        read_audio(good, "clip.flac", 0)


def test_long_clips_are_refused_with_the_training_checks_words(tmp_path):
    src = fish(tmp_path)
    wav(src / "SPK1" / "long.wav", seconds=2.5)
    write(src / "SPK1" / "long.lab", "too long")
    got = import_corpus(src, "fish", tmp_path / "m.jsonl", max_seconds=2)
    assert [str(p) for p in got.problems] == [
        "SPK1/long.wav: audio SPK1/long.wav lasts 2.5 s, more than data.max_audio_seconds=2"]


def test_a_csv_without_an_audio_column_names_its_header(tmp_path, capsys):
    csv = write(tmp_path / "list.csv", "wav_file,words\na.wav,hello\n")
    assert manifest_cmd.main(["import", "--format", "csv", str(csv), "--out", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"higgs-ddp: error: {csv}:1: the header ['wav_file', 'words'] has no audio column (one of ")


def test_python_m_higgs_ddp_manifest_imports_the_demo_folder(tmp_path):
    """`make demo`'s first steps: the demo's LJSpeech-style folder, imported by the module entry point the issue
    names (tests/unit/commands/test_train_command.py trains on the result)."""
    src = write_ljspeech_demo(tmp_path / "data", samples=6)
    out = tmp_path / "data" / "manifest.jsonl"
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp.manifest", "import", "--format", "ljspeech", str(src),
                           "--out", str(out), "--speaker", "tones"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("manifest import: 6 clips (0.00 h, 1 speaker(s)) from ")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1] == {"id": "demo0001", "text": "quick the", "audio": "wavs/demo0001.wav", "speaker": "tones"}
    assert sf.read(src / "wavs" / "demo0001.wav")[0] == pytest.approx(text_to_wave("quick the"), abs=1e-4)


# ------------------------------------------------------------------------------------------------- stats


def test_stats_counts_hours_speakers_and_warns(tmp_path, capsys):
    base = tmp_path / "d"
    rows = [{"id": f"a{i}", "text": "x" * 10, "audio": f"a{i}.wav", "speaker": "ana"} for i in range(4)]
    for i in range(4):
        wav(base / f"a{i}.wav", seconds=2.0, sr=16000)
    wav(base / "b.wav", seconds=0.5)
    wav(base / "long.wav", seconds=3.0)
    rows += [{"id": "b", "text": "y" * 30, "audio": "b.wav", "speaker": "ben"},
             {"id": "long", "text": "z", "audio": "long.wav", "speaker": "ana"},
             {"id": "gone", "text": "z", "audio": "gone.wav", "speaker": "ana"}]
    write(base / "m.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    st = manifest_stats(str(base / "m.jsonl"), max_audio_seconds=2.5, max_tokens_per_batch=100)
    assert st.samples == 6 and st.seconds == pytest.approx(11.5)
    assert {k: (n, round(s, 2)) for k, (n, s) in st.by_speaker.items()} == {"ana": (5, 11.0), "ben": (1, 0.5)}
    assert dict(st.rates) == {16000: 4, 8000: 2} and sorted(st.text_chars) == [1, 10, 10, 10, 10, 30]
    assert [str(p) for p in st.problems] == [f"{base / 'm.jsonl'}:7: audio gone.wav not found"]
    warnings = "\n".join(st.warnings)
    assert "little audio: 0.2 min" in warnings
    assert "1 clip(s) longer than data.max_audio_seconds=2.5" in warnings and "m.jsonl:6, 3.0 s" in warnings
    assert "1 sample(s) probably longer than data.max_tokens_per_batch=100" in warnings  # 3 s: ~75 frames + text
    assert "speaker 'ana' holds 96% of the audio" in warnings
    assert "1 speaker(s) with a single clip" in warnings and "ben" in warnings
    assert manifest_cmd.main(["stats", str(base / "m.jsonl"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["clips"] == 6 and got["histogram"]["2-5 s"] == 5 and got["histogram"]["0-1 s"] == 1
    assert got["text_chars"] == {"min": 1, "median": 10, "max": 30}  # numbers, as the table's, not a string
    assert manifest_cmd.main(["stats", str(base / "m.jsonl"), "--max-audio-seconds", "2.5"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"{base / 'm.jsonl'}: 6 clip(s), 0.00 h of audio"
    assert "  rates       8000 Hz: 2, 16000 Hz: 4" in table
    assert "  text        min 1, median 10, max 30 (characters)" in table
    assert any(line.split()[:3] == ["ana", "5", "clips"] for line in table)
    # no token budget without --max-tokens; the default codec's shortest input is known only where the HF cache
    # holds its config.json (else said in a warning of its own)
    assert sum(line.startswith("warning: ") and "too short for the codec" not in line for line in table) == 5
    # a balanced corpus with enough audio warns of nothing (the negative control)
    ok = [{"id": f"{s}{i}", "text": "t", "audio": f"a{i}.wav", "speaker": s} for s in "xy" for i in range(2)]
    write(base / "ok.jsonl", "".join(json.dumps(r) + "\n" for r in ok))
    st = manifest_stats(str(base / "ok.jsonl"))
    assert [w for w in st.warnings if not w.startswith("little audio")] == []
    assert manifest_cmd.main(["stats", str(base / "absent.jsonl")]) == 2


def test_stats_applies_the_runs_duration_rule(tmp_path, capsys):
    """A 20 ms clip is a problem in `manifest stats --config` as at the start of training ("too short for the
    codec"), and so is one under data.audio.min_seconds; without the codec's config at hand, stats says that
    limit went unchecked (issue 30, item 11)."""
    base = tmp_path / "d"
    for name, seconds in (("ok", 0.6), ("blip", 0.02), ("short", 0.3)):
        wav(base / f"{name}.wav", seconds=seconds)
    m = write(base / "m.jsonl", "".join(json.dumps({"text": n, "audio": f"{n}.wav"}) + "\n"
                                         for n in ("ok", "blip", "short")))
    tiny = str(ROOT / "configs" / "tiny.yaml")
    assert manifest_cmd.main(["stats", str(m), "data.audio.min_seconds=0.5", "--json", "--config", tiny]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["clips"] == 1 and [(p["where"], p["reason"], p["message"]) for p in got["problems"]] == [
        (f"{m}:2", "audio_too_short", "audio blip.wav is too short for the codec: 20.0 ms, its encoder needs 39.0 ms"),
        (f"{m}:3", "audio_too_short", "audio short.wav lasts 0.30 s, less than data.audio.min_seconds=0.5")]
    assert manifest_cmd.main(["stats", str(m), "data.codec=/nowhere/codec", "--json", "--config", tiny]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["clips"] == 3 and got["problems"] == []
    assert any(w.startswith("clips too short for the codec are not checked: data.codec=/nowhere/codec: CodecError")
               for w in got["warnings"]), got["warnings"]
