"""WebDataset tar shards import into a manifest that trains, and every bad member is one line.

`higgs-ddp manifest import --format webdataset`: shards in the Emilia layout (KEY.flac|wav + KEY.json), built at test time with tarfile + soundfile, read into a manifest the training data check accepts
with each sample's audio extracted byte for byte; every problem one `shard:member: what` line (or counted under
--on-error skip), a shard cut short named with the member reached; brace patterns; `--format auto`; and the
imported manifest trains."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import soundfile as sf
from helpers import tar_shard as shard
from helpers import tiny_config

from higgs_ddp.data.importers import detect, import_corpus
from higgs_ddp.data.manifest import read_manifest
from higgs_ddp.data.tar_shards import ShardError, expand_braces
from higgs_ddp.tools import manifest_cmd
from higgs_ddp.tools.demo_data import text_to_wave


def audio(text: str = "ab", fmt: str = "WAV") -> bytes:
    """A real clip (the demo's tones for ``text``, 8 kHz) as the bytes of a WAV or FLAC file."""
    buf = io.BytesIO()
    sf.write(buf, text_to_wave(text), 8000, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def meta(**fields) -> bytes:
    return json.dumps(fields).encode()


def offsets(path: Path) -> dict:
    """member name -> (header offset, data offset, size)."""
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tf.getmembers()}


def emilia(root: Path) -> dict:
    """Two shards the way Emilia ships them: KEY.{flac,wav} + KEY.json with text (or transcript), speaker,
    language, duration, id. -> member name -> its audio bytes."""
    clips = {"EN_B00000_S00000_W000000.flac": audio("hello", "FLAC"),
             "EN_B00000_S00000_W000001.wav": audio("there"),
             "EN_B00001_S00002_W000000.flac": audio("again", "FLAC")}
    shard(root / "emilia-000000.tar", [
        ("EN_B00000_S00000_W000000.json", meta(id="EN_B00000_S00000_W000000", text=" Hello world. ",
                                               speaker="EN_B00000_S00000", language="en", duration=0.2)),
        ("EN_B00000_S00000_W000000.flac", clips["EN_B00000_S00000_W000000.flac"]),
        ("EN_B00000_S00000_W000001.wav", clips["EN_B00000_S00000_W000001.wav"]),
        ("EN_B00000_S00000_W000001.json", meta(transcript="The transcript key.", speaker="EN_B00000_S00000"))])
    shard(root / "emilia-000001.tar", [
        ("EN_B00001_S00002_W000000.flac", clips["EN_B00001_S00002_W000000.flac"]),
        ("EN_B00001_S00002_W000000.json", meta(id="EN_B00001_S00002_W000000", text="Third one.", speaker=7,
                                               language="en"))])
    return clips


def test_shards_import_into_a_manifest_the_training_check_reads_with_the_audio_extracted(tmp_path, capsys):
    clips = emilia(tmp_path / "shards")
    out = tmp_path / "data" / "train.jsonl"
    assert manifest_cmd.main(["import", "--format", "webdataset", str(tmp_path / "shards"), "--out", str(out)]) == 0
    assert capsys.readouterr().out == (f"manifest import: 3 clips (0.00 h, 2 speaker(s)) from {tmp_path / 'shards'} "
                                       f"as webdataset -> {out}\n")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [  # no "language": a manifest line has no such field (the training check refuses unknown ones)
        {"id": "EN_B00000_S00000_W000000", "text": "Hello world.", "speaker": "EN_B00000_S00000",
         "audio": "emilia-000000/EN_B00000_S00000_W000000.flac"},
        {"id": "emilia-000000/EN_B00000_S00000_W000001", "text": "The transcript key.", "speaker": "EN_B00000_S00000",
         "audio": "emilia-000000/EN_B00000_S00000_W000001.wav"},
        {"id": "EN_B00001_S00002_W000000", "text": "Third one.", "speaker": "7",
         "audio": "emilia-000001/EN_B00001_S00002_W000000.flac"}]
    for row in rows:  # the member, byte for byte, where the manifest says
        assert (out.parent / row["audio"]).read_bytes() == clips[Path(row["audio"]).name]
    entries, problems = read_manifest(str(out))
    assert not problems and [e.id for e in entries] == [r["id"] for r in rows]
    assert not list(out.parent.rglob(".*.tmp"))  # extracted through a temporary name, renamed whole


def test_brace_patterns_expand_as_shard_writers_name_shards():
    assert expand_braces("s/emilia-{000000..000002}.tar") == [f"s/emilia-00000{i}.tar" for i in range(3)]
    assert expand_braces("{EN,ZH}/x-{8..10}.tar") == ["EN/x-8.tar", "EN/x-9.tar", "EN/x-10.tar",
                                                      "ZH/x-8.tar", "ZH/x-9.tar", "ZH/x-10.tar"]
    assert expand_braces("x-{2..0}.tar") == ["x-2.tar", "x-1.tar", "x-0.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad, why in (("x-{0..{1,2}}.tar", "unbalanced or nested braces"), ("x-{0..1.tar", "unbalanced"),
                     ("x-}.tar", "unbalanced"), ("x-{a}.tar", "{a} is neither a range")):
        with pytest.raises(ShardError, match=why):
            expand_braces(bad)


def test_a_brace_pattern_and_a_single_shard_import_and_auto_detect(tmp_path, capsys):
    emilia(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "emilia-{000000..000001}.tar")
    single = tmp_path / "shards" / "emilia-000001.tar"
    assert [detect(Path(p)) for p in (pattern, tmp_path / "shards", single)] == ["webdataset"] * 3
    assert manifest_cmd.main(["import", pattern, "--out", str(tmp_path / "a" / "m.jsonl")]) == 0  # --format auto
    assert "3 clips" in capsys.readouterr().out
    got = import_corpus(single, "auto", tmp_path / "b" / "m.jsonl")
    assert got.format == "webdataset" and [r["id"] for r in got.rows] == ["EN_B00001_S00002_W000000"]
    # a shard of the pattern missing: one line naming the pattern, nothing written
    missing = str(tmp_path / "shards" / "emilia-{000000..000003}.tar")
    assert manifest_cmd.main(["import", missing, "--out", str(tmp_path / "c" / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == (f"higgs-ddp: error: {missing}: 2 of its 4 shards not found (first: "
                   f"{tmp_path / 'shards' / 'emilia-000002.tar'})\n")
    assert not (tmp_path / "c").exists()


def broken_corpus(root: Path) -> None:
    """Every per-sample problem once, a key repeated in the next shard, a shard cut inside a member's data and
    one cut between members (before its end-of-archive blocks)."""
    shard(root / "a-000000.tar", [
        ("k0.wav", audio("ok")), ("k0.json", meta(text="fine")),
        ("k1.flac", audio("x", "FLAC")),                                   # no json
        ("k2.json", meta(text="no audio")),                                # no audio
        ("k3.wav", audio("x")), ("k3.json", b'{"text": "unclosed'),        # json not parseable
        ("k4.wav", audio("x")), ("k4.json", meta(text="   ")),             # empty text
        ("k5.wav", audio("x")), ("k5.json", meta(speaker="s")),            # no text
        ("k6.flac", b"not audio at all" * 8), ("k6.json", meta(text="garbled")),  # not decodable
        ("k7.wav", audio("x")), ("k7.flac", audio("x", "FLAC")), ("k7.json", meta(text="two")),
        ("../k8.wav", audio("x")), ("../k8.json", meta(text="escape"))])
    second = shard(root / "a-000001.tar", [
        ("k0.wav", audio("ok")), ("k0.json", meta(text="again")),         # k0 is a sample of a-000000 already
        ("k9.wav", audio("nine")), ("k9.json", meta(text="nine")),
        ("k10.flac", audio("ten", "FLAC")), ("k10.json", meta(text="ten"))])
    _, data, _ = offsets(second)["k10.flac"]
    second.write_bytes(second.read_bytes()[: data + 100])
    third = shard(root / "a-000002.tar", [("k11.wav", audio("eleven")), ("k11.json", meta(text="eleven")),
                                          ("k12.wav", audio("twelve")), ("k12.json", meta(text="twelve"))])
    _, data, _ = offsets(third)["k12.json"]
    third.write_bytes(third.read_bytes()[: data + tarfile.BLOCKSIZE])


def test_every_problem_is_one_line_naming_shard_and_member(tmp_path, capsys):
    src = tmp_path / "shards"
    broken_corpus(src)
    out = tmp_path / "data" / "m.jsonl"
    assert manifest_cmd.main(["import", "--format", "webdataset", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"higgs-ddp: error: 11 problem(s) in {src} (1 audio_unreadable, 1 duplicate_key, 1 empty_text, "
                      "1 invalid_json, 1 missing_field, 1 no_audio, 1 no_json, 1 several_audio, 2 shard_corrupt, "
                      "1 unsafe_name); nothing written (--on-error skip writes the rest):")
    assert err[1:6] == [
        "a-000000.tar:k1.flac: no k1.json member (the transcript)",
        "a-000000.tar:k2.json: no audio member (k2.mp3, .flac, .wav, ...)",
        "a-000000.tar:k3.json: invalid JSON (Unterminated string starting at: line 1 column 10)",
        "a-000000.tar:k4.json: the transcript is empty",
        "a-000000.tar:k5.json: no \"text\" (or \"transcript\")"]
    assert err[6].startswith("a-000000.tar:k6.flac: audio a-000000/k6.flac is not a readable audio file (")
    assert err[7:] == [
        "a-000000.tar:k7.wav: 2 audio members (k7.wav, k7.flac); a sample has one",
        "a-000000.tar:../k8.wav: key '../k8' would be extracted outside a-000000/",
        "a-000001.tar:k0.wav: key 'k0' is already a sample of a-000000.tar",
        "a-000001.tar:k10.flac: cut short or corrupt at member k10.flac (unexpected end of data): sample k10 and any "
        "after it are not read",
        "a-000002.tar:k12.json: cut short or corrupt after member k12.json (no further member header, no "
        "end-of-archive block): sample k12 and any after it are not read"]
    assert not out.exists() and not list(tmp_path.glob("k8.*")) and not list((tmp_path / "data").glob("k8.*"))


def test_skip_mode_writes_the_rest_and_counts_by_reason(tmp_path, capsys):
    src = tmp_path / "shards"
    broken_corpus(src)
    out = tmp_path / "data" / "m.jsonl"
    assert manifest_cmd.main(["import", str(src), "--out", str(out), "--on-error", "skip"]) == 0  # --format auto
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"manifest import: 3 clips (0.00 h, 0 speaker(s)) from {src} as webdataset -> {out}"
    assert printed[1] == ("manifest import: skipped 11 (1 audio_unreadable, 1 duplicate_key, 1 empty_text, "
                          "1 invalid_json, 1 missing_field, 1 no_audio, 1 no_json, 1 several_audio, 2 shard_corrupt, "
                          "1 unsafe_name):")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # k9 is whole before the cut in k10; k12 may have lost members after the cut that follows it, so it is not kept
    assert [(r["id"], r["text"], r["audio"]) for r in rows] == [("a-000000/k0", "fine", "a-000000/k0.wav"),
                                                                 ("a-000001/k9", "nine", "a-000001/k9.wav"),
                                                                 ("a-000002/k11", "eleven", "a-000002/k11.wav")]
    assert read_manifest(str(out))[1] == []


def test_the_imported_shards_train(tmp_path):
    """End to end: shards -> manifest import -> prepare (the tiny codec encodes the extracted audio) -> 2 steps."""
    from higgs_ddp.train import train

    texts = ["the quick fox", "brown dog", "over the lazy", "quick brown", "fox jumps", "lazy dog sleeps"]
    for s in range(2):
        members = []
        for i, text in enumerate(texts[3 * s: 3 * s + 3]):
            key = f"EN_B{s:05d}_S00000_W{i:06d}"
            members += [(f"{key}.flac" if i % 2 else f"{key}.wav", audio(text, "FLAC" if i % 2 else "WAV")),
                        (f"{key}.json", meta(id=key, text=text, speaker=f"EN_B{s:05d}_S00000", language="en"))]
        shard(tmp_path / "shards" / f"emilia-{s:06d}.tar", members)
    out = tmp_path / "data" / "train.jsonl"
    assert manifest_cmd.main(["import", str(tmp_path / "shards" / "emilia-{000000..000001}.tar"),
                              "--out", str(out)]) == 0
    last = train(tiny_config(tmp_path, f"data.manifest={out}", "train.max_steps=2"))
    assert math.isfinite(last["loss"])
