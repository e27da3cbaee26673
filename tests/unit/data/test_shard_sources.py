"""WebDataset shards named directly as data.manifest become a manifest of in-place members, imported by shard over the ranks.

`data.manifest: shards/emilia-{000000..000002}.tar` (no `manifest import` step): data/sources.py writes one part
per shard (shard i by rank i % world; a part kept while its shard is unchanged) and then the manifest, with the
importer's problems named by shard and member; what is a source and what is refused. (That such a source loads
the samples import-then-prepare loads, skip and error modes, a warm start and a rewritten shard: the run test of
unit/data/test_shard_members.py, which shares its encoding.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import tar_shard as shard
from helpers import tiny_config

from higgs_ddp.data import sources
from higgs_ddp.data.dataset import DataError, check_manifests, load_data
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools.doctor import inputs as doctor_inputs
from higgs_ddp.tools.demo_data import text_to_wave


def audio(text: str) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, text_to_wave(text), 8000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_shard(root: Path, s: int, samples: int = 2) -> None:
    """Shard ``s`` of ``samples`` samples; shard 1 also holds a sample without its JSON (a problem)."""
    members = []
    for i in range(samples):
        key = f"s{s}_u{i}"
        members += [(f"{key}.wav", audio(f"{s}{i}x")),
                    (f"{key}.json", json.dumps({"text": f"shard {s} clip {i}", "speaker": f"p{i}"}).encode())]
    if s == 1:
        members.append(("s1_bad.wav", audio("nt")))
    shard(root / f"emilia-{s:06d}.tar", members)


def write_shards(root: Path) -> None:
    for s in range(3):
        write_shard(root, s)


def test_shards_are_dealt_to_ranks_by_shard_and_parts_survive(tmp_path):
    """Rank 1 of 2 imports shard 1 only; rank 0 then imports shards 0 and 2, keeps rank 1's part, and writes the
    manifest in the source's order (what two ranks under torchrun do, one after the other here)."""
    src = tmp_path / "shards"
    write_shards(src)
    pattern = str(src / "emilia-{000000..000002}.tar")
    folder = sources.folder_of(str(tmp_path / "c"), pattern, "webdataset")
    part = [sources.part_path(folder, src / f"emilia-{s:06d}.tar") for s in range(3)]
    sources.materialise(pattern, "webdataset", str(tmp_path / "c"), DistEnv(rank=1, world_size=2), True)
    assert list((folder / "parts").iterdir()) == [part[1]]
    assert not (folder / "manifest.jsonl").exists()
    before = os.stat(part[1]).st_mtime_ns
    path, problems = sources.materialise(pattern, "webdataset", str(tmp_path / "c"), DistEnv(rank=0, world_size=2),
                                         True)
    assert os.stat(part[1]).st_mtime_ns == before  # kept, not read again
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"emilia-{s:06d}/s{s}_u{i}" for s in range(3) for i in range(2)]
    assert all("#" in r["audio"] for r in rows)
    assert [(p.where, p.reason) for p in problems] == [("emilia-000001.tar:s1_bad.wav", "no_json")]
    # shard 2 rewritten: its part alone is imported again, the manifest rewritten; a shard added: its part alone
    kept = {p: os.stat(p).st_mtime_ns for p in part}
    write_shard(src, 2, samples=1)
    path, _ = sources.materialise(pattern, "webdataset", str(tmp_path / "c"), DistEnv(), True)
    assert [p for p in part if os.stat(p).st_mtime_ns != kept[p]] == [part[2]]
    assert len(Path(path).read_text().splitlines()) == 5
    sources.materialise(str(src), "webdataset", str(tmp_path / "c"), DistEnv(), True)  # the folder as the source
    folder = sources.folder_of(str(tmp_path / "c"), str(src), "webdataset")
    kept = {p: os.stat(p).st_mtime_ns for p in (folder / "parts").iterdir()}
    write_shard(src, 3)
    path, _ = sources.materialise(str(src), "webdataset", str(tmp_path / "c"), DistEnv(), True)
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept and len(list((folder / "parts").iterdir())) == 4
    assert len(Path(path).read_text().splitlines()) == 7


def test_what_is_and_is_not_a_source(tmp_path):
    src = tmp_path / "shards"
    write_shards(src)
    (tmp_path / "m.jsonl").write_text("")
    (tmp_path / "wavs").mkdir()
    (tmp_path / "wavs" / "a.wav").write_bytes(audio("a"))
    assert sources.source_layout(str(src)) == "webdataset"
    assert sources.source_layout(str(src / "emilia-000000.tar")) == "webdataset"
    assert sources.source_layout(str(src / "emilia-{000000..000002}.tar")) == "webdataset"
    assert sources.source_layout(str(tmp_path / "m.jsonl")) is None
    assert sources.source_layout(str(tmp_path / "wavs")) is None
    cfg = tiny_config(tmp_path, f"data.manifest={tmp_path / 'wavs'}")
    with pytest.raises(DataError, match=r"a folder, but neither WebDataset .tar shards nor a Hugging Face"):
        check_manifests(cfg)
    cfg = tiny_config(tmp_path, f"data.manifest={src / 'emilia-{000000..000009}.tar'}")
    check_manifests(cfg)  # a pattern: its shards are listed (and refused) when it is read
    with pytest.raises(sources.SourceError, match=r"7 of its 10 shards not found"):
        load_data(cfg, DistEnv(), None, None, quiet=True)
    # the doctor lists a source's shards (reads none)
    assert [(r.status, "7 of its 10 shards not found" in r.message) for r in doctor_inputs.check_manifests(cfg)] == \
        [("FAIL", True)]
    cfg = tiny_config(tmp_path, f"data.manifest={src}")
    assert [r.line() for r in doctor_inputs.check_manifests(cfg)] == [
        f"OK   manifest {src}: 3 WebDataset shards, imported in place by prepare (its samples are checked then)"]


def test_prepare_pieces_keep_a_shards_lines_together(tmp_path):
    """The cold prepare's pieces (piece_prepare.plan) never split one shard's lines over two pieces (two ranks
    would each read that tar), while a manifest of plain files is cut every N lines as before."""
    from higgs_ddp.data import piece_prepare

    src = tmp_path / "shards"
    write_shards(src)
    path, _ = sources.materialise(str(src), "webdataset", str(tmp_path / "c"), DistEnv(), True)
    cfg = tiny_config(tmp_path, f"data.manifest={path}")
    firsts = {n: [p[4] for p in piece_prepare.plan(cfg, n)["pieces"]] for n in (1, 3, 4)}
    assert firsts == {1: [1, 3, 5], 3: [1, 5], 4: [1, 5]}  # shards on lines 1-2, 3-4, 5-6
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": "x", "audio": f"{i}.wav"}) + "\n" for i in range(5)))
    cfg = tiny_config(tmp_path, f"data.manifest={plain}")
    assert [p[4] for p in piece_prepare.plan(cfg, 2)["pieces"]] == [1, 3, 5]
