"""The prepared corpus index gives a warm start the cold start's samples, batches and resume; damage is one line.

The prepared corpus index (issue 31, data/corpus_index.py): a warm start maps columns instead of loading
the data the full way, and gives the same samples, the same batches in the same order, the same fingerprint
and the same exact resume; what changed since the index was built is noticed, a damaged or foreign index is
named in one line and rebuilt."""

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import (QUIET, RESUME_RUN, TINY, assert_same_weights, cached_corpus, cached_corpus_config,
                     cached_corpus_overrides, final_weights, index_files, rows, tiny_config)

from higgs_ddp.config import load_config
from higgs_ddp.data import corpus_index, piece_prepare
from higgs_ddp.data.batching import StepBatchSampler, TokenBudgetBatchSampler
from higgs_ddp.data.corpus_index import IndexedRecords
from higgs_ddp.data.dataset import DataError, ManifestDataset, fingerprint, load_data
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv

CLIPS = 300
BIG = 10_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """WAV files whose codes are in the code cache (4 codebooks of 64: the tiny model), 40 speakers."""
    return cached_corpus(tmp_path_factory, "index", CLIPS)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """The same at 10k clips (issue 31's size for the equivalence proof)."""
    return cached_corpus(tmp_path_factory, "index10k", BIG)


config = cached_corpus_config


def load(cfg, tokenizer, quiet=True):
    return load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=quiet)


def load_whole(cfg, tokenizer, monkeypatch, quiet=True):
    """The full way, in one process (the cold start before pieces, piece_prepare.py): the reference."""
    with monkeypatch.context() as m:
        m.setattr(piece_prepare, "applies", lambda cfg: False)
        return load(cfg, tokenizer, quiet)


def rebuilt(out: str) -> bool:
    """The start built the index (in pieces, or the full way)."""
    return "wrote the prepared index" in out or "; joined into " in out


def fresh(corpus):
    shutil.rmtree(corpus / ".higgs_codes" / "index", ignore_errors=True)


def index_folder(corpus):
    (folder,) = (corpus / ".higgs_codes" / "index").iterdir()
    return folder


def same_records(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.id, x.where, x.positions, x.seconds, x.speaker) == (y.id, y.where, y.positions, y.seconds, y.speaker)
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.label_ids, y.label_ids)
        assert len(x.codes) == len(y.codes) and all(np.array_equal(c, d) for c, d in zip(x.codes, y.codes))


def rank_batches(data, cfg, rank, world, micro_batches=None):
    """This rank's first micro-batches as the trainer builds them (its sampler over the dataset's lengths);
    None: two epochs' worth (the second reshuffled)."""
    ds = ManifestDataset(data.train)
    if cfg.data.max_tokens_per_batch:
        sampler = TokenBudgetBatchSampler(ds.lengths, cfg.data.max_tokens_per_batch, 2, rank, world, cfg.train.seed, True)
    else:
        sampler = StepBatchSampler(len(ds), 4, 2, rank, world, cfg.train.seed, True)
    count = 2 * len(sampler) if micro_batches is None else micro_batches  # len: this rank's per epoch
    return [[ds[i] for i in mb] for mb in itertools.islice(iter(sampler), count)]


def same_batches(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert [s.sample_id for s in x] == [s.sample_id for s in y]
        for s, t in zip(x, y):
            assert torch.equal(s.input_ids, t.input_ids) and torch.equal(s.label_ids, t.label_ids)
            assert len(s.audio_codes) == len(t.audio_codes)
            assert all(torch.equal(c, d) for c, d in zip(s.audio_codes, t.audio_codes))


VARIANTS = pytest.mark.parametrize("extra", [(), ("data.max_tokens_per_batch=1200",), ("data.reference=same_speaker",)],
                                   ids=["fixed", "token-budget", "same-speaker"])


def index_equals_full_load(corpus, tmp_path, tokenizer, capsys, monkeypatch, extra, micro_batches) -> None:
    """The full load (which writes the index), then a start from the index: the same samples, report and
    fingerprint, and each rank's first ``micro_batches`` (None: two epochs) the same for 1 and 2 ranks; the
    index a cold start prepares in pieces (in 3 pieces here) is the full load's, byte for byte."""
    cfg = config(corpus, tmp_path, *extra)
    fresh(corpus)
    full = load_whole(cfg, tokenizer, monkeypatch, quiet=False)
    assert isinstance(full.train, list) and "no prepared index" in capsys.readouterr().out
    if piece_prepare.applies(cfg):
        reference = index_files(index_folder(corpus))
        fresh(corpus)
        monkeypatch.setattr(piece_prepare, "PIECE_LINES", len(full.train + full.val) // 3 + 1)
        pieced = load(cfg, tokenizer, quiet=False)
        assert "3 piece(s)" in capsys.readouterr().out and isinstance(pieced.train, IndexedRecords)
        assert index_files(index_folder(corpus)) == reference
    warm = load(cfg, tokenizer, quiet=False)
    out = capsys.readouterr().out
    assert isinstance(warm.train, IndexedRecords) and "from the prepared index" in out, out
    if "same_speaker" in str(extra):
        assert "references: " in out and sum(len(r.codes) == 2 for r in full.train) > len(full.train) // 2
    same_records(full.train, warm.train)
    same_records(full.val, warm.val)
    assert len(warm.val) > 0
    assert fingerprint(warm.train) == fingerprint(full.train) == fingerprint(list(warm.train))
    assert warm.report["train_audio_hours"] == full.report["train_audio_hours"]
    assert warm.report["references"] == full.report["references"] and warm.report["problems"] == full.report["problems"]
    for world in (1, 2):
        for rank in range(world):
            same_batches(rank_batches(full, cfg, rank, world, micro_batches),
                         rank_batches(warm, cfg, rank, world, micro_batches))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["index"] == str(index_folder(corpus)) and report["train_samples"] == len(full.train)


@VARIANTS
def test_index_start_yields_the_full_loads_batches(corpus, tmp_path, tokenizer, capsys, monkeypatch, extra):
    index_equals_full_load(corpus, tmp_path, tokenizer, capsys, monkeypatch, extra, 60)


@pytest.mark.extended
@VARIANTS
def test_at_10k_clips_the_index_start_yields_the_full_loads_batches(big_corpus, tmp_path, tokenizer, capsys, monkeypatch,
                                                                   extra):
    """Issue 31's proof at its size: 10k clips, two whole epochs of batches per rank, 1 and 2 ranks."""
    index_equals_full_load(big_corpus, tmp_path, tokenizer, capsys, monkeypatch, extra, None)


def test_the_full_load_parses_each_manifest_once_and_writing_the_index_none(corpus, tmp_path, tokenizer, monkeypatch):
    """The index's folder signature comes from the load's own parse (a second one cost rank 0 alone 3.5 s at
    100k clips); the index's writing is a phase of the start-up, timed by the wall clock and the CPU."""
    from higgs_ddp.data import dataset

    cfg = config(corpus, tmp_path)
    fresh(corpus)
    parsed, real = [], dataset.read_manifest
    for module in (dataset, corpus_index):
        monkeypatch.setattr(module, "read_manifest", lambda path, *a: parsed.append(path) or real(path, *a),
                            raising=False)
    data = load_whole(cfg, tokenizer, monkeypatch)
    assert parsed == list(cfg.data.manifest) and index_folder(corpus).is_dir()
    assert "index write" in data.report["startup_seconds"]
    assert data.report["startup_seconds"].keys() == data.report["startup_cpu_seconds"].keys()


def test_index_points_into_the_code_shards(corpus, tmp_path, tokenizer):
    """The codes are not copied: the index names code-cache shards and holds no codes of its own."""
    cfg = config(corpus, tmp_path)
    fresh(corpus)
    load(cfg, tokenizer)
    header = json.loads((index_folder(corpus) / "header.json").read_text())
    assert header["code_files"] and all(".higgs_codes" in c["path"] and "part-" in c["path"]
                                        for c in header["code_files"])
    assert not (index_folder(corpus) / corpus_index.OWN_CODES).exists()


def no_manifest_parse(monkeypatch) -> list:
    """From here on a manifest parse fails the test; -> the list of rows the index builds records of."""
    from higgs_ddp.data import dataset, manifest

    def refused(*args, **kwargs):
        raise AssertionError("a warm start parsed a manifest")

    monkeypatch.setattr(manifest, "read_manifest", refused)
    monkeypatch.setattr(dataset, "read_manifest", refused)
    built = []
    monkeypatch.setattr(corpus_index.CorpusIndex, "record",
                        lambda self, i, real=corpus_index.CorpusIndex.record: built.append(i) or real(self, i))
    return built


def test_a_warm_start_parses_no_manifest_and_builds_no_record(corpus, tmp_path, tokenizer, monkeypatch):
    cfg = config(corpus, tmp_path)
    fresh(corpus)
    load(cfg, tokenizer)
    built = no_manifest_parse(monkeypatch)
    warm = load(cfg, tokenizer)
    ds = ManifestDataset(warm.train)
    TokenBudgetBatchSampler(ds.lengths, 1200, 1, 0, 2, 0, True)
    assert built == []  # the plan came from the lengths column
    ds[5]
    assert built == [5]


def test_prepare_writes_the_index_the_first_training_start_maps(corpus, tmp_path, monkeypatch, capsys):
    """`higgs-ddp prepare` leaves the index behind: the first training start after it is warm (no manifest
    parsed, no record built for the plan) and yields the batches a full load yields."""
    from higgs_ddp.cli import prepare
    from higgs_ddp.model import load_tokenizer
    from higgs_ddp.train import train

    argv = cached_corpus_overrides(corpus, tmp_path, "data.max_tokens_per_batch=1200", "train.max_steps=1")
    cfg = load_config(str(TINY), argv)
    tokenizer = load_tokenizer(cfg)  # the command's own (the session fixture's is narrower: another index key)
    fresh(corpus)
    full = load(cfg, tokenizer)
    fresh(corpus)
    assert prepare(["--config", str(TINY), *argv]) == 0
    assert rebuilt(capsys.readouterr().out)
    built = no_manifest_parse(monkeypatch)
    warm = load(cfg, tokenizer)
    assert isinstance(warm.train, IndexedRecords) and built == []
    for rank in range(2):
        same_batches(rank_batches(full, cfg, rank, 2, 40), rank_batches(warm, cfg, rank, 2, 40))
    train(cfg)
    assert "from the prepared index" in capsys.readouterr().out


def test_changes_since_the_index_was_built_are_noticed(corpus, tmp_path, tokenizer, capsys):
    cfg = config(corpus, tmp_path)
    fresh(corpus)
    load(cfg, tokenizer)
    manifest = corpus / "manifest.jsonl"
    wav, other, third = sorted((corpus / "wavs" / "0000").glob("*.wav"))[:3]  # (the codes of each are cached)

    def start(quiet=False):
        capsys.readouterr()
        data = load(cfg, tokenizer, quiet=quiet)
        return data, capsys.readouterr().out

    data, out = start()
    assert isinstance(data.train, IndexedRecords)
    # A manifest edited (its mtime moves): rebuilt, the edit is in the samples.
    lines = manifest.read_text().splitlines()
    first = json.loads(lines[0])
    manifest.write_text("\n".join([json.dumps({**first, "text": first["text"] + " Again."}), *lines[1:]]) + "\n")
    data, out = start()
    assert f"manifest {manifest} changed" in out and rebuilt(out)
    edited = next(r for r in list(data.train) + list(data.val) if r.id == first["id"])
    data, out = start()
    assert isinstance(data.train, IndexedRecords)
    assert len(next(r for r in list(data.train) + list(data.val) if r.id == first["id"]).input_ids) == len(edited.input_ids)
    # The same size and mtime, other bytes: unseen by the clock, so a manifest changed within 2 s before the
    # index was written is compared by its hash (the index is made to look written just after the manifest).
    header_path = index_folder(corpus) / "header.json"
    st = os.stat(manifest)
    header_path.write_text(json.dumps({**json.loads(header_path.read_text()), "built_ns": st.st_mtime_ns + 1}))
    data, out = start()
    assert isinstance(data.train, IndexedRecords)  # the same bytes: still valid
    manifest.write_text(manifest.read_text().replace(" Again.", " Agaim."))
    os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(manifest).st_size, os.stat(manifest).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    data, out = start()
    assert f"manifest {manifest} changed" in out
    # An audio file replaced by writing a new file and renaming it over the old one: its folder's mtime moves.
    start()
    tmp = wav.with_name("new.tmp")
    tmp.write_bytes(other.read_bytes())
    os.replace(tmp, wav)
    data, out = start()
    assert f"audio folder {wav.parent} changed" in out and rebuilt(out)
    by_id = {r.id: r for r in list(data.train) + list(data.val)}
    assert np.array_equal(by_id[f"clip{int(wav.stem):07d}"].codes[0], by_id[f"clip{int(other.stem):07d}"].codes[0])
    data, out = start()
    assert isinstance(data.train, IndexedRecords)
    # What is documented as not seen: an audio file rewritten in place (same name, folder untouched).
    folder_mtime = os.stat(wav.parent).st_mtime_ns
    wav.write_bytes(third.read_bytes())
    assert os.stat(wav.parent).st_mtime_ns == folder_mtime
    data, out = start()
    assert isinstance(data.train, IndexedRecords)


def test_damaged_or_foreign_index_is_named_and_rebuilt(corpus, tmp_path, tokenizer, capsys):
    cfg = config(corpus, tmp_path)
    fresh(corpus)
    full = load(cfg, tokenizer)
    folder = index_folder(corpus)
    column = folder / "positions.npy"

    def start():
        capsys.readouterr()
        data = load(cfg, tokenizer, quiet=False)
        return data, capsys.readouterr().out

    column.write_bytes(column.read_bytes()[:-40])  # cut short: never read as zeros
    data, out = start()
    assert f"index file {column} is damaged" in out and rebuilt(out)
    assert out.count(str(column)) == 1
    data, out = start()
    same_records(full.train, data.train)
    (folder / "header.json").write_text("{\"format\": 1, \"colu")
    data, out = start()
    assert f"index file {folder / 'header.json'} is damaged" in out and rebuilt(out)
    for other in (0, corpus_index.FORMAT + 1):  # an older version's index, a newer one's: named, and rebuilt
        header = json.loads((folder / "header.json").read_text())
        (folder / "header.json").write_text(json.dumps({**header, "format": other}))
        data, out = start()
        line = next(x for x in out.splitlines() if "format" in x)
        assert f"index {folder} was written in index format {other}, this version reads format " \
               f"{corpus_index.FORMAT}" in line and rebuilt(out)
    data, out = start()
    assert isinstance(data.train, IndexedRecords)
    same_records(full.train, data.train)
    # A code shard the index points into, cut short by a copy: named, and the data loaded the full way (whose
    # code cache then deletes the shard and would encode its clips again: these placeholders are too short).
    shard = sorted((corpus / ".higgs_codes").rglob("part-*.safetensors"))[0]
    blob = shard.read_bytes()
    try:
        shard.write_bytes(blob[:-10])
        capsys.readouterr()
        with pytest.raises(DataError, match="too short for the codec"):
            load(cfg, tokenizer, quiet=False)
        assert f"code file {shard} is missing or changed" in capsys.readouterr().out
    finally:  # put back (the full load deleted it): the module's later tests use this corpus
        shard.write_bytes(blob)


@pytest.mark.parametrize("extra", [(), ("data.max_tokens_per_batch=400",)], ids=["fixed", "token-budget"])
def test_resume_from_the_index_equals_the_straight_run(tmp_path, capsys, extra):
    """6 steps straight (the full way: it writes the index), then a run resumed at step 3 whose data comes
    from the index (.npy codes: kept in the index's own codes.bin) ends with the same losses and weights."""
    from higgs_ddp.train import train

    straight = tiny_config(tmp_path / "straight", *RESUME_RUN, *extra)
    train(straight)
    assert "no prepared index" in capsys.readouterr().out
    half = tmp_path / "straight" / "run" / "checkpoints" / "step_000003"
    resumed = load_config(str(TINY), [f"output_dir={tmp_path / 'resumed'}", f"data.manifest={straight.data.manifest[0]}",
                                      f"data.cache_dir={straight.data.cache_dir}", "data.num_workers=0", *QUIET,
                                      *RESUME_RUN, *extra, f"train.resume={half}"])
    train(resumed)
    assert "from the prepared index" in capsys.readouterr().out
    assert (tmp_path / "straight" / "cache" / "index").is_dir()
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight" / "run")[3:]
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight" / "run"))


def test_an_index_sent_to_a_spawned_worker_is_mapped_again_not_copied(corpus, tmp_path, tokenizer):
    import pickle

    cfg = config(corpus, tmp_path)
    fresh(corpus)
    load(cfg, tokenizer)
    warm = load(cfg, tokenizer)
    blob = pickle.dumps(warm.train)
    assert len(blob) < 20_000  # the header, not the columns
    same_records(warm.train, pickle.loads(blob))
