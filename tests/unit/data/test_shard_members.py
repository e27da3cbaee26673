"""WebDataset shards as a prepare source: a manifest names each clip's member in its shard, and nothing is extracted.

`manifest import --format webdataset --no-extract` writes `shards/s.tar#KEY.flac@OFFSET` lines; the manifest reader
resolves them, audio.read_audio decodes the member in one seek (or by name, without an offset or with a stale one),
the code cache keys it by the member's bytes (the same codes as the extracted file), a warm start reads no member,
a rewritten shard is hashed again; a member that cannot be read is one line naming shard and member; and prepare
under torchrun deals whole shards to ranks (3 shards on 2 ranks: rank 0 reads shards 0 and 2, rank 1 shard 1)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT, TINY, TORCHRUN_ENV, tiny_config
from helpers import tar_shard as shard
from safetensors import safe_open

from higgs_ddp.data import prepare
from higgs_ddp.data.corpus_index import IndexedRecords
from higgs_ddp.data.dataset import DataError, load_data
from higgs_ddp.data.records import fingerprint
from higgs_ddp.data.audio import AudioProblem, check_header, read_audio
from higgs_ddp.data.code_cache import FileHashes
from higgs_ddp.data.manifest import read_manifest
from higgs_ddp.data.members import member_of, shares
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools import manifest_cmd
from higgs_ddp.tools.demo_data import text_to_wave


def audio(text: str, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, text_to_wave(text), 8000, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def three_shards(root: Path, count: int = 3) -> dict:
    """Three shards (or ``count``) of two samples each (WAV and FLAC). -> member name -> its audio bytes."""
    clips = {}
    for s in range(count):
        members = []
        for i in range(2):
            key, fmt = f"s{s}_u{i}", ("WAV", "FLAC")[i]
            name = f"{key}.{fmt.lower()}"
            clips[name] = audio(f"shard {s} clip {i}", fmt)
            members += [(name, clips[name]), (f"{key}.json", json.dumps({"text": f"shard {s} clip {i}"}).encode())]
        shard(root / f"emilia-{s:06d}.tar", members)
    return clips


def header_offsets(path: Path) -> dict:
    with tarfile.open(path) as tf:
        return {m.name: m.offset for m in tf.getmembers()}


def import_in_place(tmp_path) -> tuple:
    clips = three_shards(tmp_path / "shards")
    out = tmp_path / "shards" / "train.jsonl"
    assert manifest_cmd.main(["import", "--no-extract", str(tmp_path / "shards"), "--out", str(out)]) == 0
    return clips, out


def test_no_extract_names_each_member_in_its_shard_and_reads_it_from_there(tmp_path, capsys):
    clips, out = import_in_place(tmp_path)
    assert "6 clips" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    offsets = {s: header_offsets(tmp_path / "shards" / f"emilia-{s:06d}.tar") for s in range(3)}
    assert [r["audio"] for r in rows] == [f"emilia-{s:06d}.tar#s{s}_u{i}.{('wav', 'flac')[i]}"
                                          f"@{offsets[s][f's{s}_u{i}.' + ('wav', 'flac')[i]]}"
                                          for s in range(3) for i in range(2)]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"emilia-{s:06d}.tar" for s in range(3)] + \
        ["train.jsonl"]  # nothing extracted
    entries, problems = read_manifest(str(out))
    assert not problems
    for entry in entries:  # decoded from the shard = decoded from the member's own bytes
        ref = entry.audio[0]
        wave, sr = read_audio(ref.path, ref.shown, 0.0)
        expected, _ = sf.read(io.BytesIO(clips[member_of(ref.path).name]), dtype="float32")
        assert sr == 8000 and np.array_equal(wave, expected)
    # without the offset, and with a stale one: found by name
    m = member_of(entries[3].audio[0].path)
    for path in (m.shard.parent / f"{m.shard.name}#{m.name}", m.shard.parent / f"{m.shard.name}#{m.name}@0"):
        assert check_header(path, "x").frames == sf.info(io.BytesIO(clips[m.name])).frames
    with pytest.raises(AudioProblem, match=r"^audio s.tar#nope.wav: its shard emilia-000001.tar has no member "
                       r"nope.wav$"):
        read_audio(m.shard.parent / f"{m.shard.name}#nope.wav", "s.tar#nope.wav", 0.0)


def test_members_hash_by_their_bytes_share_codes_with_the_extracted_file_and_are_not_reread(tmp_path):
    clips, out = import_in_place(tmp_path)
    entries, _ = read_manifest(str(out))
    path = entries[0].audio[0].path
    hashes = FileHashes(tmp_path / "cache")
    assert hashes.get(path) == hashlib.sha256(clips["s0_u0.wav"]).hexdigest()
    hashes.save()
    again = FileHashes(tmp_path / "cache")
    assert again.get(path) == hashlib.sha256(clips["s0_u0.wav"]).hexdigest() and not again.new  # remembered
    # the shard rewritten (another clip under the same name): hashed again
    tar = member_of(path).shard
    shard(tar, [("s0_u0.wav", audio("other words")), ("s0_u0.json", b'{"text": "x"}')])
    os.utime(tar, ns=(1, 1))
    assert FileHashes(tmp_path / "cache").get(path) == hashlib.sha256(audio("other words")).hexdigest()

    # prepare: the extracted corpus first, then the shards in place: every code found by content, none encoded
    extracted = tmp_path / "x" / "train.jsonl"
    three_shards(tmp_path / "fresh", count=1)
    assert manifest_cmd.main(["import", str(tmp_path / "fresh"), "--out", str(extracted)]) == 0
    refs = [r for e in read_manifest(str(extracted))[0] for r in e.audio]
    one = prepare.prepare_audio(refs, str(tmp_path / "c"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    assert one.stats["encoded"] == 2
    in_place = tmp_path / "fresh" / "train.jsonl"
    assert manifest_cmd.main(["import", "--no-extract", str(tmp_path / "fresh"), "--out", str(in_place)]) == 0
    members = [r for e in read_manifest(str(in_place))[0] for r in e.audio]
    two = prepare.prepare_audio(members, str(tmp_path / "c"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    assert (two.stats["cached"], two.stats["encoded"], two.stats["failed"]) == (2, 0, 0)
    by_name = {member_of(r.path).name: two.codes[r.path] for r in members}
    for r in refs:
        assert np.array_equal(one.codes[r.path], by_name[r.path.name])


def test_a_member_that_cannot_be_read_is_one_line_naming_shard_and_member(tmp_path):
    src = tmp_path / "shards"
    good = shard(src / "a-000000.tar", [("k0.wav", audio("ok")), ("k0.json", b'{"text": "fine"}'),
                                        ("k1.flac", b"not audio at all" * 8), ("k1.json", b'{"text": "bad"}')])
    out = src / "m.jsonl"
    assert manifest_cmd.main(["import", "--no-extract", str(src), "--out", str(out), "--on-error", "skip"]) == 0
    offset = header_offsets(good)["k0.wav"]
    lines = out.read_text().splitlines() + [json.dumps({"text": "gone", "audio": "a-000000.tar#k9.wav"}),
                                            json.dumps({"text": "no shard", "audio": "b-000000.tar#k0.wav"})]
    cut = shard(src / "c-000000.tar", [("k0.wav", audio("a long clip that gets cut"))])
    cut.write_bytes(cut.read_bytes()[:900])
    lines.append(json.dumps({"text": "cut", "audio": "c-000000.tar#k0.wav@0"}))
    out.write_text("\n".join(lines) + "\n")
    refs = [r for e in read_manifest(str(out))[0] for r in e.audio]
    prep = prepare.prepare_audio(refs, str(tmp_path / "cache"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    assert sorted(prep.problems.values()) == [
        ("audio_corrupt", "audio c-000000.tar#k0.wav@0: its shard is cut short inside member k0.wav (388 of its "
                          f"{len(audio('a long clip that gets cut'))} bytes)"),
        ("audio_missing", "audio a-000000.tar#k9.wav: its shard a-000000.tar has no member k9.wav"),
        ("audio_missing", "audio b-000000.tar#k0.wav: its shard b-000000.tar is not found")]
    assert [r.shown for r in refs[:1]] == [f"a-000000.tar#k0.wav@{offset}"] and len(prep.codes) == 1


def test_a_run_trains_from_the_shards_and_its_index_notices_a_shard_rewritten(tmp_path, tokenizer, capsys):
    """A run's data load (prepare, the prepared index) on member lines; a warm start maps the index; a shard
    rewritten in place (its folder untouched) is noticed, and the new bytes are encoded. Then the same shards
    named directly as data.manifest (no import step) load the same samples."""
    _, out = import_in_place(tmp_path)
    cfg = tiny_config(tmp_path, f"data.manifest={out}")

    def start():
        capsys.readouterr()
        data = load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=False)
        return data, capsys.readouterr().out

    data, printed = start()  # cold: prepare encodes the members, the index is written
    assert "6 encoded, 0 with problems" in printed and len(data.train) == 6
    data, printed = start()
    assert isinstance(data.train, IndexedRecords), printed
    tar = tmp_path / "shards" / "emilia-000001.tar"
    folder_mtime = os.stat(tar.parent).st_mtime_ns
    with tar.open("r+b") as f:  # the same members at the same offsets, other sound in one of them
        with tarfile.open(tar) as tf:
            info = tf.getmember("s1_u0.wav")
        f.seek(info.offset_data)
        f.write(audio("other words")[: info.size].ljust(info.size, b"\0"))
    assert os.stat(tar.parent).st_mtime_ns == folder_mtime
    data, printed = start()
    assert f"shard {tar} changed since the index was built (rewritten)" in printed
    assert "1 encoded" in printed

    # The shards named directly (data.manifest: a brace pattern, data/sources.py), one more shard holding a sample
    # without its JSON: the samples of the imported manifest (every code cached), the problem by shard and member
    shard(tmp_path / "shards" / "emilia-000003.tar", [("s3_bad.wav", audio("no words"))])
    pattern = str(tmp_path / "shards" / "emilia-{000000..000003}.tar")
    cfg = tiny_config(tmp_path, f"data.manifest={pattern}", "data.on_error=skip")
    direct, printed = start()
    assert "4 shard(s) read into" in printed and "6 sample(s), 1 left out" in printed and " 0 encoded" in printed
    assert fingerprint(direct.train) == fingerprint(data.train)
    assert direct.report["skipped_by_reason"] == {"no_json": 1}
    assert direct.report["problems"][0]["where"] == "emilia-000003.tar:s3_bad.wav"
    assert sorted(p.name for p in (tmp_path / "shards").iterdir())[-1] == "train.jsonl"  # nothing extracted
    again, printed = start()  # warm: no shard read, the index mapped, the problem still counted
    assert "read into" not in printed and isinstance(again.train, IndexedRecords), printed
    assert again.report["skipped_by_reason"] == {"no_json": 1}
    shard(tmp_path / "shards" / "emilia-000003.tar", [("s3_bad.flac", audio("no words"))])  # rewritten
    again, printed = start()
    assert "4 shard(s) read into" in printed and "changed since the index was built" in printed, printed
    assert again.report["problems"][0]["where"] == "emilia-000003.tar:s3_bad.flac"
    cfg = tiny_config(tmp_path, f"data.manifest={pattern}", "data.on_error=error")
    with pytest.raises(DataError, match=r"^1 problem\(s\) in the data, the first: emilia-000003.tar:s3_bad.flac: "):
        start()


def test_shards_are_dealt_whole_to_ranks_round_robin():
    paths = [Path(f"/d/s-{s}.tar#k{i}.wav@{512 * i}") for s in range(3) for i in range(4)]
    ranks = shares(paths, 2)
    assert ranks == [paths[0:4] + paths[8:12], paths[4:8]]  # shards 0 and 2, shard 1: each once
    files = [Path(f"/d/{i}.wav") for i in range(5)]
    assert shares(files, 2) == [files[0::2], files[1::2]]  # a file is its own shard: as before
    assert shares(paths, 4)[3] == []


@pytest.mark.extended  # two torchrun ranks load the codec: over a minute on 2 loaded cores
def test_prepare_on_two_ranks_reads_each_shard_on_one_rank_and_agrees_with_one(tmp_path):
    """higgs-ddp prepare --nproc-per-node 2 on 3 shards named in place: every member encoded once, each shard's
    members all by one rank (rank 0: shards 0 and 2), the codes those of one process."""
    _, out = import_in_place(tmp_path)
    args = [sys.executable, "-m", "higgs_ddp", "prepare", "--nproc-per-node", "2", "--config", str(TINY),
            f"data.manifest={out}", f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'two'}",
            "data.num_workers=0"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=TORCHRUN_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 audio references to 6 files (6 distinct recordings): 0 cached, 6 encoded, 0 with problems" in proc.stdout
    refs = [r for e in read_manifest(str(out))[0] for r in e.audio]
    one = prepare.prepare_audio(refs, str(tmp_path / "one"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    key_shard = {one.content[r.path]: member_of(r.path).shard.name for r in refs}
    parts = [set(safe_open(str(p), framework="np").keys()) for p in (tmp_path / "two").glob("*/part-*.safetensors")]
    assert sorted(sorted({key_shard[k] for k in keys}) for keys in parts) == [
        ["emilia-000000.tar", "emilia-000002.tar"], ["emilia-000001.tar"]]
    two = prepare.prepare_audio(refs, str(tmp_path / "two"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    assert two.stats["encoded"] == 0
    for r in refs:
        assert np.array_equal(two.codes[r.path], one.codes[r.path])
