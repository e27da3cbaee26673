"""Preparing in pieces finds the full way's duplicate ids and validation leaks, with its messages, even when every hash collides.

The checks across pieces (data/piece_join.py) compare 64-bit hashes and confirm the candidates on their
strings. A corpus with every kind of overlap (an id repeated in training, a validation id that is a
training id, ids repeated in validation, a validation line learning a training clip's file or a copy of
its bytes, a line without an id; data.val_manifest, or data.val_fraction's picks) is prepared in pieces of 4 lines and must give the
full way's records and report; then again with every id, path and content hashed to the same value. The
join reads each piece's tokens back and holds one piece's at a time. The
summary line of pieces that share a file counts it once, as the full way does.
"""

import json
import shutil
import weakref

import numpy as np
import pytest
from helpers import cached_corpus, cached_corpus_config

from higgs_ddp.data import piece_prepare
from higgs_ddp.data.dataset import DataError, load_data
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = cached_corpus(tmp_path_factory, "overlaps", 24)
    lines = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    shutil.copy(root / lines[5]["audio"], root / "copy.wav")  # the same bytes under another name
    train = lines[:14] + [
        {**lines[14], "id": lines[2]["id"]},  # an id repeated in training (three times)
        {**lines[15], "id": lines[2]["id"]},
        {k: v for k, v in lines[16].items() if k != "id"},  # no id: the file's name and line
        {**lines[17], "audio": lines[6]["audio"], "id": "again-6"},  # a clip learned twice (the split may pick one)
    ]
    val = [
        {**lines[18], "id": lines[3]["id"]},  # a training id
        {**lines[19], "audio": lines[4]["audio"], "id": "v-path"},  # a training clip's file
        {**lines[20], "audio": "copy.wav", "id": "v-copy"},  # its bytes
        {**lines[21], "audio": lines[4]["audio"], "id": "v-twice"},  # leaks: the next one with its id is kept
        {**lines[22], "id": "v-twice"},
        {**lines[23], "id": "v-twice"},  # ... and this one repeats it
        {**lines[21], "id": "v-fine"},
    ]
    for name, rows in (("train.jsonl", train), ("val.jsonl", val), ("all.jsonl", train + val)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


SPLITS = {"listed": ("train.jsonl", "val.jsonl", 0), "fraction": ("all.jsonl", None, 0.3)}


def load(corpus, tmp_path, tokenizer, split="listed", *extra):
    train, val, fraction = SPLITS[split]
    cfg = cached_corpus_config(corpus, tmp_path, f"data.manifest={corpus / train}",
                               f"data.val_manifest={[str(corpus / val)] if val else []}",
                               f"data.val_fraction={fraction}", "data.on_error=skip", *extra)
    shutil.rmtree(corpus / ".higgs_codes" / "index", ignore_errors=True)
    return load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=True)


def summary(data) -> tuple:
    def rows(records):
        return [(r.id, r.where, r.positions, r.input_ids.tolist(), [c.tolist() for c in r.codes]) for r in records]

    return rows(data.train), rows(data.val), data.report["problems"], data.report["references"]


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory, tokenizer):
    """split -> the full way's samples and report."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(piece_prepare, "applies", lambda cfg: False)
        return {split: summary(load(corpus, tmp_path_factory.mktemp("whole"), tokenizer, split, "data.reference=none"))
                for split in SPLITS}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("collide", [False, True], ids=["hashes", "every-hash-collides"])
def test_pieces_find_the_full_ways_overlaps(corpus, tmp_path, tokenizer, whole, monkeypatch, collide, split):
    monkeypatch.setattr(piece_prepare, "PIECE_LINES", 4)
    if collide:
        monkeypatch.setattr(piece_prepare, "hash64", lambda text: 7)
    held, reads = [], []  # the join's memory is bounded: it holds one piece's tokens (or codes) at a time

    def read_heavy(path, name):
        held[:] = [r for r in held if r() is not None]
        assert not held, f"{path}'s {name} read while another piece's tokens are still held"
        arr = real(path, name)
        held.append(weakref.ref(arr))
        reads.append(path.name)
        return arr

    real = piece_prepare.read_heavy
    monkeypatch.setattr(piece_prepare, "read_heavy", read_heavy)
    pieces = summary(load(corpus, tmp_path, tokenizer, split, "data.reference=none"))
    assert pieces == whole[split]
    assert len(set(reads)) >= 6  # (the pieces' HEAVY arrays were read back, not kept from building them)
    problems = whole[split][2]
    reasons = [p["reason"] for p in problems]
    assert reasons.count("duplicate_id") >= 3 and reasons.count("val_in_train") >= 3, problems
    assert any("the same recording (identical bytes) as" in p["message"] for p in problems) or split == "fraction"


def test_a_refused_corpus_is_refused_in_pieces_with_the_full_ways_message(corpus, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(piece_prepare, "PIECE_LINES", 4)
    with pytest.raises(DataError) as pieces:
        load(corpus, tmp_path, tokenizer, "listed", "data.on_error=error")
    monkeypatch.setattr(piece_prepare, "applies", lambda cfg: False)
    with pytest.raises(DataError) as whole:
        load(corpus, tmp_path, tokenizer, "listed", "data.on_error=error")
    assert str(pieces.value) == str(whole.value) and f"{corpus / 'train.jsonl'}:15: id" in str(whole.value)
    assert not list((corpus / ".higgs_codes" / "index").glob("*/header.json"))  # no index of refused data


def test_a_piece_of_another_format_is_built_again(corpus, tmp_path, tokenizer, monkeypatch):
    """A piece left by another version (its format differs) is not reused: built again, the same index."""
    monkeypatch.setattr(piece_prepare, "PIECE_LINES", 4)
    first = summary(load(corpus, tmp_path, tokenizer))
    folder = next((corpus / ".higgs_codes" / "index").glob("*/header.json")).parent
    pieces = folder.with_name(folder.name + ".pieces")
    # what an interrupted prepare of an older version left: the same plan, a piece in that version's format
    cfg = cached_corpus_config(corpus, tmp_path, f"data.manifest={corpus / 'train.jsonl'}",
                               f"data.val_manifest={corpus / 'val.jsonl'}", "data.val_fraction=0", "data.on_error=skip")
    plan = piece_prepare.plan(cfg, 4)
    pieces.mkdir()
    (pieces / "plan.json").write_text(json.dumps(plan))
    old = {"meta": np.frombuffer(json.dumps({"format": 0, "piece": plan["pieces"][0]}).encode(), np.uint8)}
    piece_prepare.write_piece(piece_prepare.piece_path(pieces, 0), old)
    assert piece_prepare.read_piece(piece_prepare.piece_path(pieces, 0), plan["pieces"][0]) is None
    shutil.rmtree(folder)
    again = summary(load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=True))
    assert again == first and not pieces.exists()


def test_the_summary_line_counts_a_file_two_pieces_name_once(corpus, tmp_path, tokenizer, monkeypatch, capsys):
    """prepare's summary line in pieces of 4 lines is the full way's on a corpus whose pieces share a file (a
    clip learned twice: lines 7 and 15, pieces 2 and 4): one file, one recording, not two."""
    rows = [json.loads(x) for x in (corpus / "train.jsonl").read_text().splitlines()]
    rows = [{**r, "audio": str(corpus / r["audio"])} for r in rows[:14] + rows[-1:]]
    (tmp_path / "twice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def line() -> str:
        cfg = cached_corpus_config(corpus, tmp_path, f"data.manifest={tmp_path / 'twice.jsonl'}",
                                   "data.val_fraction=0", "data.reference=none")
        shutil.rmtree(corpus / ".higgs_codes" / "index", ignore_errors=True)
        capsys.readouterr()
        load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=False)
        return next(x for x in capsys.readouterr().out.splitlines() if " audio references to " in x)

    monkeypatch.setattr(piece_prepare, "PIECE_LINES", 4)
    pieces = line()
    monkeypatch.setattr(piece_prepare, "applies", lambda cfg: False)
    assert pieces == line()
    assert "15 audio references to 14 files (14 distinct recordings): 14 cached" in pieces, pieces
