"""Preference pairs on disk: what write_pairs writes read_pairs reads back, and every damage is one FILE:LINE line.

The format is shared by `higgs-ddp prefs build` (the writer) and a DPO run (the reader): codes in int16
safetensors shards named by candidate key, pairs.jsonl one pair a line, prefs.json the codec and tokenizer
identity. A bad line, a missing or damaged shard, a key not in its shard, codes of the wrong shape or range,
and pairs made for another codec or tokenizer are each refused before training, naming the file and line."""

import json

import numpy as np
import pytest

from higgs_ddp.data.preferences import (PreferenceError, read_header, read_pairs, run_identity, write_code_shard,
                                        write_pairs)
from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer

C, K = 4, 64


@pytest.fixture(scope="module")
def identity():
    return run_identity("tiny", None, build_tiny_tokenizer(), C, K)


def header(identity, **more):
    return {**identity, "model": "runs/sft/final", "reward": {"wer": 1.0}, "candidates": 2, "seed": 5, **more}


def candidate_codes(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {f"p{i}/c{j}": rng.integers(0, K, (C, 5 + i + j)) for i in range(n) for j in range(2)}


def pair_lines(n=3, **extra):
    return [{"id": f"p{i}", "text": f"say {i}", **extra,
             "chosen": {"key": f"p{i}/c1", "seed": 10 * i + 1, "reward": 0.9},
             "rejected": {"key": f"p{i}/c0", "seed": 10 * i, "reward": 0.1}} for i in range(n)]


def written(tmp_path, identity, n=3, shard_entries=2, **extra):
    codes = candidate_codes(n)
    path = write_pairs(tmp_path / "prefs", header(identity), pair_lines(n, **extra), codes, shard_entries)
    return path, codes


def test_written_pairs_read_back(tmp_path, identity):
    path, codes = written(tmp_path, identity)
    head, pairs = read_pairs(path, identity)
    assert head["format"] == 1 and head["candidates"] == 2 and head["tokenizer"] == identity["tokenizer"]
    assert [p.id for p in pairs] == ["p0", "p1", "p2"]
    assert len(list((path.parent / "codes").glob("part-*.safetensors"))) == 3  # 6 candidates, 2 a shard
    for p in pairs:
        assert p.where.endswith(f"pairs.jsonl:{int(p.id[1:]) + 1}")
        np.testing.assert_array_equal(p.chosen.codes, codes[p.chosen.key])
        np.testing.assert_array_equal(p.rejected.codes, codes[p.rejected.key])
        assert p.chosen.codes.dtype == np.int16 and (p.chosen.seed, p.chosen.reward) == (10 * int(p.id[1:]) + 1, 0.9)
        assert (p.chosen.stopped, p.rejected.stopped) == (None, None)  # not recorded: trained as stopped
    line = json.loads(path.read_text().splitlines()[0])
    assert line["chosen"]["codes"].startswith("codes/part-") and "codes" not in pair_lines(1)[0]["chosen"]


def test_a_builder_may_write_its_own_shards(tmp_path, identity):
    """prefs build writes shards as candidates come (resumable); write_pairs then only names them."""
    codes = candidate_codes(1)
    write_code_shard(tmp_path / "prefs" / "codes" / "part-00000.safetensors", codes, identity)
    lines = pair_lines(1)
    for role in ("chosen", "rejected"):
        lines[0][role]["codes"] = "codes/part-00000.safetensors"
    _, pairs = read_pairs(write_pairs(tmp_path / "prefs", header(identity), lines, {}), identity)
    np.testing.assert_array_equal(pairs[0].chosen.codes, codes["p0/c1"])
    with pytest.raises(PreferenceError, match="has no codes"):
        write_pairs(tmp_path / "other", header(identity), pair_lines(1), {})
    with pytest.raises(PreferenceError, match="outside the codebook range"):
        write_code_shard(tmp_path / "x.safetensors", {"a": np.full((C, 3), K)}, identity)


def one_line(path, match):
    with pytest.raises(PreferenceError) as e:
        read_pairs(path, run_identity("tiny", None, build_tiny_tokenizer(), C, K))
    first = str(e.value).splitlines()[0]
    assert match in first, first
    return first


@pytest.mark.parametrize("line, match", [
    ("{not json", "invalid JSON"),
    ('["a"]', "must be a JSON object"),
    ('{"id": "x", "text": "t", "rejected": {"codes": "c", "key": "k"}}', "missing field 'chosen'"),
    ('{"id": "x", "text": " ", "chosen": {}, "rejected": {}}', "'text' is empty"),
    ('{"id": "x", "txt": "t"}', "unknown field(s) ['txt']"),
    ('{"id": "x", "text": "t", "chosen": {"codes": "c"}, "rejected": {"codes": "c", "key": "k"}}', "chosen.key"),
    ('{"id": "x", "text": "t", "ref_audio": "r.wav", "chosen": {"codes": "c", "key": "a"}, '
     '"rejected": {"codes": "c", "key": "b"}}', "needs both its audio"),
    ('{"id": "x", "text": "t", "chosen": {"codes": "c", "key": "a"}, "rejected": {"codes": "c", "key": "a"}}',
     "the same candidate"),
    ('{"id": "x", "text": "t", "chosen": {"codes": "c", "key": "a"}, "rejected": {"codes": "c", "key": "b", '
     '"stopped": "no"}}', "rejected.stopped must be true or false"),
])
def test_malformed_lines_name_file_and_line(tmp_path, identity, line, match):
    path, _ = written(tmp_path, identity, n=2)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], line, lines[1]]) + "\n")
    first = one_line(path, match)
    assert first.startswith(f"{path}:2: ")


def test_damaged_codes_name_file_and_line(tmp_path, identity):
    path, _ = written(tmp_path, identity, n=3, shard_entries=2)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    shard1 = path.parent / lines[1]["chosen"]["codes"]
    assert lines[0]["chosen"]["codes"] != lines[1]["chosen"]["codes"]  # pair 1's candidates are a shard of their own

    shard1.write_bytes(shard1.read_bytes()[:40])  # cut short by a copy
    assert one_line(path, "not a readable shard").startswith(f"{path}:2: chosen codes codes/part-00001")
    shard1.unlink()
    assert one_line(path, "file not found").startswith(f"{path}:2: ")

    lines[2]["rejected"]["key"] = "p2/nope"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(PreferenceError) as e:
        read_pairs(path)
    first, *listed = str(e.value).splitlines()  # the first problem first, then all of them below
    assert first.startswith(f"{path}:2: ") and "2 more problem(s)" in first
    assert listed[-1].startswith(f"{path}:3: rejected codes") and "no tensor named 'p2/nope'" in listed[-1]


@pytest.mark.parametrize("codes, match", [
    (np.zeros((C - 1, 4), np.int16), f"3 codebooks, expected {C}"),
    (np.full((C, 4), K, np.int16), f"code {K} outside the codebook range [0, {K})"),
    (np.zeros((C, 0), np.int16), "zero frames"),
    (np.zeros((C, 4), np.float32), "not a readable shard of int16 codes"),
])
def test_codes_of_the_wrong_shape_or_range(tmp_path, identity, codes, match):
    from safetensors.numpy import save_file

    path, _ = written(tmp_path, identity, n=1)
    shard = path.parent / json.loads(path.read_text())["rejected"]["codes"]
    save_file({"p0/c1": candidate_codes(1)["p0/c1"].astype(np.int16), "p0/c0": codes}, str(shard))
    assert one_line(path, match).startswith(f"{path}:1: ")  # (a shard of floats: the chosen one fails first)


def test_pairs_of_another_codec_or_tokenizer_are_refused(tmp_path, identity):
    path, _ = written(tmp_path, identity, n=1)
    other = dict(identity, codec="hub:bosonai/higgs-audio-v2-tokenizer@abc:pipeline1")
    with pytest.raises(PreferenceError, match=r"prefs.json: codec is .*this run's is 'hub:"):
        read_pairs(path, other)
    with pytest.raises(PreferenceError, match="tokenizer is"):
        read_header(path, dict(identity, tokenizer="0123456789abcdef"))
    (path.parent / "prefs.json").write_text(json.dumps({"format": 1, "codec": identity["codec"]}))
    with pytest.raises(PreferenceError, match="missing num_codebooks, codebook_size, tokenizer"):
        read_pairs(path)
    (path.parent / "prefs.json").unlink()
    with pytest.raises(PreferenceError, match="prefs.json: not found"):
        read_pairs(path)
