"""Hugging Face `datasets` folders (save_to_disk Arrow, Hub Parquet) import into a manifest, and every bad row is one line.

`higgs-ddp manifest import --format hf`: a DatasetDict saved to disk and a Hub-style Parquet folder, both written at
test time with pyarrow the way `datasets` writes them (an `Audio` column: a struct of bytes and path, the feature
named in the schema's `huggingface` metadata), read into a manifest the training data check accepts with each row's
audio bytes extracted byte for byte (or its path kept); `--format auto` recognises them; every problem one
`file:row N: what` line, counted under --on-error skip; with --no-extract each line names its row
(`data/x.parquet#17`), which the audio reader, the file hashes and prepare read in place."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from higgs_ddp.data.audio import AudioProblem, read_audio
from higgs_ddp.data.code_cache import FileHashes
from higgs_ddp.data.importers import detect, import_corpus
from higgs_ddp.data.manifest import read_manifest
from higgs_ddp.tools import manifest_cmd
from higgs_ddp.tools.demo_data import text_to_wave

AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def audio(text: str = "ab", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, text_to_wave(text), 8000, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def table(rows: list) -> pa.Table:
    """``rows``: dicts of audio ({"bytes", "path"}), text, and any of speaker_id, language, id; typed as
    ``datasets`` types them, with its feature metadata."""
    fields = [("audio", AUDIO), ("text", pa.string()), ("speaker_id", pa.string()), ("language", pa.string())]
    if any("id" in r for r in rows):
        fields.append(("id", pa.string()))
    features = {"audio": {"sampling_rate": 8000, "_type": "Audio"},
                **{name: {"dtype": "string", "_type": "Value"} for name, _ in fields[1:]}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = pa.schema(fields, metadata=meta)
    return pa.Table.from_pylist([{name: r.get(name) for name, _ in fields} for r in rows], schema=schema)


def save_to_disk(folder: Path, splits: dict) -> None:
    """A DatasetDict as ``save_to_disk`` leaves it: dataset_dict.json, a folder per split with state.json,
    dataset_info.json and Arrow IPC stream files (two per split here, as a large split has)."""
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for split, rows in splits.items():
        (folder / split).mkdir()
        halves = [rows[: (len(rows) + 1) // 2], rows[(len(rows) + 1) // 2:]]
        names = [f"data-{i:05d}-of-00002.arrow" for i in range(2)]
        for name, part in zip(names, halves):
            t = table(part)
            with pa.OSFile(str(folder / split / name), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
                w.write_table(t)
        (folder / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                               "_split": split}))
        (folder / split / "dataset_info.json").write_text(json.dumps({"features": {}}))
        (folder / split / "cache-0123.arrow").write_bytes(b"not listed in state.json: not read")


def test_a_saved_dataset_dict_imports_with_its_audio_extracted(tmp_path, capsys):
    clips = {"a": audio("hello", "FLAC"), "b": audio("there"), "c": audio("again")}
    outside = tmp_path / "elsewhere" / "kept.wav"  # an Audio value with a path and no bytes: read where it is
    outside.parent.mkdir()
    outside.write_bytes(audio("by path"))
    save_to_disk(tmp_path / "ds", {
        "train": [{"audio": {"bytes": clips["a"], "path": "clip_a.flac"}, "text": " Hello. ", "speaker_id": "s1",
                   "language": "en"},
                  {"audio": {"bytes": clips["b"], "path": None}, "text": "There.", "speaker_id": "s2"},
                  {"audio": {"bytes": None, "path": str(outside)}, "text": "By path.", "speaker_id": "s1"}],
        "test": [{"audio": {"bytes": clips["c"], "path": "c.wav"}, "text": "Again."}]})
    assert detect(tmp_path / "ds") == "hf" and detect(tmp_path / "ds" / "train") == "hf"
    out = tmp_path / "data" / "train.jsonl"
    assert manifest_cmd.main(["import", str(tmp_path / "ds"), "--out", str(out)]) == 0  # --format auto
    assert capsys.readouterr().out == (f"manifest import: 4 clips (0.00 h, 2 speaker(s)) from {tmp_path / 'ds'} "
                                       f"as hf -> {out}\n")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [  # every split, in dataset_dict.json's order; no "language" (a manifest line has no field)
        {"id": "train/data-00000-of-00002/0", "text": "Hello.", "speaker": "s1",
         "audio": "train/data-00000-of-00002/00000000.flac"},
        {"id": "train/data-00000-of-00002/1", "text": "There.", "speaker": "s2",
         "audio": "train/data-00000-of-00002/00000001.wav"},  # no path: the container told by its first bytes
        {"id": "train/data-00001-of-00002/0", "text": "By path.", "speaker": "s1", "audio": "../elsewhere/kept.wav"},
        {"id": "test/data-00000-of-00002/0", "text": "Again.", "audio": "test/data-00000-of-00002/00000000.wav"}]
    assert [(out.parent / r["audio"]).read_bytes() for r in rows] == [clips["a"], clips["b"], outside.read_bytes(),
                                                                       clips["c"]]
    entries, problems = read_manifest(str(out))
    assert not problems and len(entries) == 4
    # one split's folder, or one file, is a source too
    assert [r["text"] for r in import_corpus(tmp_path / "ds" / "test", "hf", tmp_path / "t" / "m.jsonl").rows] == \
        ["Again."]


def parquet_corpus(root: Path) -> None:
    """The Hub's layout: data/train-0000N-of-00002.parquet; every per-row problem once, a file cut short."""
    (root / "data").mkdir(parents=True)
    pq.write_table(table([
        {"audio": {"bytes": audio("ok"), "path": "ok.wav"}, "text": "fine", "id": "u0"},
        {"audio": {"bytes": b"not audio at all" * 8, "path": "x.bin"}, "text": "garbled", "id": "u1"},
        {"audio": {"bytes": None, "path": None}, "text": "nothing", "id": "u2"},
        {"audio": {"bytes": audio("x"), "path": "e.wav"}, "text": "   ", "id": "u3"},
        {"audio": {"bytes": audio("x"), "path": "n.wav"}, "text": None, "id": "u4"},
        {"audio": {"bytes": audio("x"), "path": "m.wav"}, "text": "missing", "id": "u5"},
        {"audio": {"bytes": audio("dup"), "path": "d.wav"}, "text": "dup", "id": "u0"},
        {"audio": {"bytes": audio("seven", "FLAC"), "path": "7.flac"}, "text": "seven", "id": "u7"},
    ]).replace_schema_metadata(None), root / "data" / "train-00000-of-00002.parquet")  # a struct still found
    (root / "data" / "train-00001-of-00002.parquet").write_bytes(b"PAR1 cut short")


def test_every_bad_row_is_one_line_naming_file_and_row_and_skip_counts(tmp_path, capsys):
    src = tmp_path / "hub"
    parquet_corpus(src)
    out = tmp_path / "data" / "m.jsonl"
    assert manifest_cmd.main(["import", "--format", "hf", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"higgs-ddp: error: 6 problem(s) in {src} (1 audio_unreadable, 1 duplicate_id, 2 empty_text, "
                      "1 file_unreadable, 1 no_audio); nothing written (--on-error skip writes the rest):")
    assert err[1] == ("data/train-00000-of-00002.parquet:row 1: column 'audio': the bytes are not a known audio "
                      "format (WAV, FLAC, MP3, Ogg, AIFF)")
    assert err[2:6] == [
        "data/train-00000-of-00002.parquet:row 2: column 'audio' holds neither bytes nor a path",
        "data/train-00000-of-00002.parquet:row 3: the transcript is empty",
        "data/train-00000-of-00002.parquet:row 4: column 'text' is null",
        "data/train-00000-of-00002.parquet:row 6: id 'u0' is already the id of data/train-00000-of-00002.parquet:row 0"]
    assert err[6].startswith("data/train-00001-of-00002.parquet: not readable as Arrow or Parquet (")
    assert not out.exists()
    assert manifest_cmd.main(["import", str(src), "--out", str(out), "--on-error", "skip"]) == 0  # auto
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == ("manifest import: skipped 6 (1 audio_unreadable, 1 duplicate_id, 2 empty_text, "
                          "1 file_unreadable, 1 no_audio):")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["audio"]) for r in rows] == [
        ("u0", "data/train-00000-of-00002/00000000.wav"), ("u5", "data/train-00000-of-00002/00000005.wav"),
        ("u7", "data/train-00000-of-00002/00000007.flac")]
    assert read_manifest(str(out))[1] == []


def test_a_table_without_audio_or_text_is_one_line(tmp_path, capsys):
    pq.write_table(pa.table({"file": ["a.wav"], "words": ["hi"]}), tmp_path / "t.parquet")
    assert manifest_cmd.main(["import", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert capsys.readouterr().err == ("higgs-ddp: error: t.parquet: the columns ['file', 'words'] have no text "
                                       "column (one of text, transcript, transcription, normalized_text, sentence, "
                                       "raw_text; or name it with --text-column)\n")
    assert manifest_cmd.main(["import", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "m.jsonl"),
                              "--text-column", "words"]) == 2  # then the audio path is checked: not there
    assert "t.parquet:row 0: audio a.wav not found" in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("audio_file|text\na.wav|hi\n")
    assert manifest_cmd.main(["import", "--no-extract", str(tmp_path / "m.csv"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert capsys.readouterr().err == ("higgs-ddp: error: --no-extract applies to the webdataset and hf formats, "
                                       "not csv\n")


def test_no_extract_names_each_row_and_the_audio_reader_reads_it_in_place(tmp_path):
    clips = [audio(f"row {i}", ("WAV", "FLAC")[i % 2]) for i in range(5)]
    save_to_disk(tmp_path / "ds", {"train": [{"audio": {"bytes": c, "path": None}, "text": f"row {i}"}
                                             for i, c in enumerate(clips[:3])]})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(table([{"audio": {"bytes": c, "path": "x.wav"}, "text": f"row {i}"} for i, c in enumerate(clips)]),
                   tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", row_group_size=2)
    for src, files in (("ds", ["train/data-00000-of-00002.arrow"] * 2 + ["train/data-00001-of-00002.arrow"]),
                       ("hub", ["data/train-00000-of-00001.parquet"] * 5)):
        out = tmp_path / src / "m.jsonl"
        before = sorted(tmp_path.rglob("*"))
        assert manifest_cmd.main(["import", "--no-extract", str(tmp_path / src), "--out", str(out)]) == 0
        assert sorted(tmp_path.rglob("*")) == sorted([*before, out])  # nothing extracted
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        rows_in = [0, 1, 0] if src == "ds" else list(range(5))
        assert [r["audio"] for r in rows] == [f"{f}#{i}" for f, i in zip(files, rows_in)]
        entries, problems = read_manifest(str(out))
        assert not problems
        hashes = FileHashes(tmp_path / "cache")
        for entry, clip in zip(entries, clips):
            ref = entry.audio[0]
            wave, _ = read_audio(ref.path, ref.shown, 0.0)
            assert np.array_equal(wave, sf.read(io.BytesIO(clip), dtype="float32")[0])
            assert hashes.get(ref.path) == hashlib.sha256(clip).hexdigest()  # the codes of the extracted file
    data_file = tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"
    for bad, message in ((f"{data_file}#9", "train-00000-of-00001.parquet has no row 9 (it has 5)"),
                         (f"{data_file}#x", "'x' is not a row number of train-00000-of-00001.parquet")):
        with pytest.raises(AudioProblem, match=f"^audio shown: {re.escape(message)}$"):
            read_audio(Path(bad), "shown", 0.0)


def test_a_datasets_folder_named_as_data_manifest_gives_the_imports_rows_and_problems(tmp_path):
    """data/sources.py reads a datasets folder file by file (a DatasetDict's splits; the Hub's Parquet files, one
    cut short) into the rows and problems `manifest import --no-extract` gives for the whole folder: the same
    default ids (the file's path from the folder), the same `file:row N` names."""
    from higgs_ddp.data import sources
    from higgs_ddp.runtime.distributed import DistEnv

    save_to_disk(tmp_path / "ds", {"train": [{"audio": {"bytes": audio(f"r{i}"), "path": None}, "text": f"row {i}"}
                                             for i in range(3)],
                                   "test": [{"audio": {"bytes": audio("t"), "path": None}, "text": "t"}]})
    parquet_corpus(tmp_path / "hub")
    for src in (tmp_path / "ds", tmp_path / "hub"):
        assert sources.source_layout(str(src)) == "hf"
        whole = import_corpus(src, "hf", tmp_path / "m.jsonl", extract=False)
        path, problems = sources.materialise(str(src), "hf", str(tmp_path / "c"), DistEnv(), True)
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]

        def absolute(rows, base):
            return [{**r, "audio": str((base / r["audio"]).resolve())} for r in rows]

        assert absolute(rows, Path(path).parent) == absolute(whole.rows, tmp_path) and rows
        assert [(p.where, p.reason) for p in problems] == [(p.where, p.reason) for p in whole.problems]
        assert (rows[0]["id"], bool(problems)) == (("train/data-00000-of-00002/0", False) if src.name == "ds" else
                                                   ("u0", True))
