"""WebDataset shards named directly as data.manifest load the samples that import-then-prepare loads, with the same problems.

`data.manifest: shards/emilia-{000000..000002}.tar` (no `manifest import` step): the shards become a manifest of
in-place members under the code cache (data/sources.py), one part per shard dealt by rank (shard i on rank i %
world), and the load yields the same samples, in the same order, as `manifest import --no-extract` then
prepare; a bad member is reported by shard and member (skip mode counts it, error mode refuses it); a warm start
reads no shard and maps the index; a shard rewritten is imported again, alone, and the index rebuilt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import tar_shard as shard
from helpers import tiny_config

from higgs_ddp.data import sources
from higgs_ddp.data.corpus_index import IndexedRecords
from higgs_ddp.data.dataset import DataError, check_manifests, load_data
from higgs_ddp.data.records import fingerprint
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools import manifest_cmd
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
        members += [(f"{key}.wav", audio(f"shard {s} clip {i}")),
                    (f"{key}.json", json.dumps({"text": f"shard {s} clip {i}", "speaker": f"p{i}"}).encode())]
    if s == 1:
        members.append(("s1_bad.wav", audio("no transcript")))
    shard(root / f"emilia-{s:06d}.tar", members)


def write_shards(root: Path) -> None:
    for s in range(3):
        write_shard(root, s)


def test_a_shard_pattern_loads_what_import_then_prepare_loads(tmp_path, tokenizer, capsys):
    src = tmp_path / "shards"
    write_shards(src)
    out = tmp_path / "imported" / "train.jsonl"
    assert manifest_cmd.main(["import", "--no-extract", "--on-error", "skip", str(src), "--out", str(out)]) == 0
    pattern = str(src / "emilia-{000000..000002}.tar")
    common = ["data.on_error=skip", "data.val_fraction=0.3"]

    def load(manifest, *more):
        cfg = tiny_config(tmp_path, f"data.manifest={manifest}", *common, *more)
        capsys.readouterr()
        data = load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=False)
        return cfg, data, capsys.readouterr().out

    _, imported, _ = load(out)
    cfg, direct, printed = load(pattern)
    assert "3 shard(s) read into" in printed and "6 sample(s), 1 left out" in printed
    assert len(direct.train) + len(direct.val) == 6 and len(direct.val) > 0
    assert fingerprint(direct.train) == fingerprint(imported.train)
    assert fingerprint(direct.val) == fingerprint(imported.val)
    # the problem, named by shard and member, counted as the importer counts it
    assert direct.report["skipped_by_reason"] == {"no_json": 1}
    problem = direct.report["problems"][0]
    assert (problem["where"], problem["reason"]) == ("emilia-000001.tar:s1_bad.wav", "no_json")
    assert not list(src.glob("*/"))  # nothing extracted beside the shards

    # warm: no shard read, the index mapped
    cfg, again, printed = load(pattern)
    assert "read into" not in printed and isinstance(again.train, IndexedRecords), printed
    assert fingerprint(again.train) == fingerprint(direct.train)
    assert again.report["skipped_by_reason"] == {"no_json": 1}

    # a shard rewritten (one more sample): that shard alone imported again, the index rebuilt
    folder = sources.folder_of(cfg.data.cache_dir, pattern, "webdataset")
    kept = {p.name: os.stat(p).st_mtime_ns for p in (folder / "parts").iterdir()}
    write_shard(src, 2, samples=3)
    cfg, third, printed = load(pattern)
    assert "7 sample(s)" in printed and len(third.train) + len(third.val) == 7
    assert "changed since the index was built" in printed, printed
    now = {p.name: os.stat(p).st_mtime_ns for p in (folder / "parts").iterdir()}
    assert [name for name in sorted(now) if now[name] != kept[name]] == ["000002.json"]

    # error mode: the shard's problem refuses the data, in one line naming shard and member
    with pytest.raises(DataError, match=r"emilia-000001.tar:s1_bad.wav: no .*json"):
        load(pattern, "data.on_error=error")


def test_shards_are_dealt_to_ranks_by_shard_and_parts_survive(tmp_path):
    """Rank 1 of 2 imports shard 1 only; rank 0 then imports shards 0 and 2, keeps rank 1's part, and writes the
    manifest in the source's order (what two ranks under torchrun do, one after the other here)."""
    src = tmp_path / "shards"
    write_shards(src)
    pattern = str(src / "emilia-{000000..000002}.tar")
    folder = sources.folder_of(str(tmp_path / "c"), pattern, "webdataset")
    sources.materialise(pattern, "webdataset", str(tmp_path / "c"), DistEnv(rank=1, world_size=2), True)
    assert sorted(p.name for p in (folder / "parts").iterdir()) == ["000001.json"]
    assert not (folder / "manifest.jsonl").exists()
    before = os.stat(folder / "parts" / "000001.json").st_mtime_ns
    path, problems = sources.materialise(pattern, "webdataset", str(tmp_path / "c"), DistEnv(rank=0, world_size=2),
                                         True)
    assert os.stat(folder / "parts" / "000001.json").st_mtime_ns == before  # kept, not read again
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"emilia-{s:06d}/s{s}_u{i}" for s in range(3) for i in range(2)]
    assert all("#" in r["audio"] for r in rows) and [p.reason for p in problems] == ["no_json"]


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
