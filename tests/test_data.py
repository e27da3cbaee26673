"""Tests for higgs_ddp.data: manifest validation (every bad line reported as file:line) and the
step-aligned distributed batch sampler."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from higgs_ddp.data import DataError, Record, StepBatchSampler, read_manifest

C, K = 4, 64  # codebooks, codebook size


def _save(base: Path, rel: str, arr) -> str:
    p = base / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    np.save(p, arr)
    return rel


def _codes(frames: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, K, size=(C, frames), dtype=np.int64)


@pytest.fixture
def files(tmp_path):
    """Code files under tmp_path/codes, named by what is (or is wrong) with them."""
    good = _codes(5)
    good[0, 0], good[1, 1] = 0, K - 1  # the range edges are allowed
    out = {
        "good": _save(tmp_path, "codes/good.npy", good),
        "good2": _save(tmp_path, "codes/good2.npy", _codes(3, seed=1).astype(np.int32)),
        "ref": _save(tmp_path, "codes/ref.npy", _codes(7, seed=2).astype(np.uint16)),
        "float": _save(tmp_path, "codes/float.npy", _codes(5).astype(np.float32)),
        "onedim": _save(tmp_path, "codes/onedim.npy", np.arange(5, dtype=np.int64)),
        "codebooks": _save(tmp_path, "codes/codebooks.npy", np.zeros((C + 1, 5), dtype=np.int64)),
        "zero": _save(tmp_path, "codes/zero.npy", np.zeros((C, 0), dtype=np.int64)),
    }
    high = _codes(5)
    high[2, 3] = K
    out["high"] = _save(tmp_path, "codes/high.npy", high)
    neg = _codes(5)
    neg[0, 4] = -1
    out["neg"] = _save(tmp_path, "codes/neg.npy", neg)
    (tmp_path / "codes" / "corrupt.npy").write_bytes(b"this is not an npy file \x00\x01\x02" * 4)
    out["corrupt"] = "codes/corrupt.npy"
    return out


def _line(obj) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj)


def _write(tmp_path: Path, lines, name="manifest.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(_line(x) + "\n" for x in lines))
    return p


# (case id, bad line built from the files fixture, distinctive fragment of the reason)
BAD_CASES = [
    ("invalid_json", lambda f: '{"text": "hi", "audio_codes": ', "invalid JSON"),
    ("not_object", lambda f: "[1, 2]", "must be a JSON object"),
    ("missing_text", lambda f: {"audio_codes": f["good"]}, "missing field 'text'"),
    ("missing_codes", lambda f: {"text": "hello"}, "missing field 'audio_codes'"),
    ("text_number", lambda f: {"text": 5, "audio_codes": f["good"]}, "field 'text' must be a str"),
    ("scene_number", lambda f: {"text": "hi", "audio_codes": f["good"], "scene": 3}, "field 'scene' must be a str"),
    ("empty_text", lambda f: {"text": "   ", "audio_codes": f["good"]}, "field 'text' is empty"),
    ("unknown_field", lambda f: {"text": "hi", "audio_code": f["good"]}, "unknown field(s) ['audio_code']"),
    ("file_missing", lambda f: {"text": "hi", "audio_codes": "codes/absent.npy"}, "codes/absent.npy not found"),
    ("corrupt_npy", lambda f: {"text": "hi", "audio_codes": f["corrupt"]}, "not a readable .npy"),
    ("float_array", lambda f: {"text": "hi", "audio_codes": f["float"]}, "2-D integer"),
    ("one_dim", lambda f: {"text": "hi", "audio_codes": f["onedim"]}, "2-D integer"),
    ("codebooks", lambda f: {"text": "hi", "audio_codes": f["codebooks"]}, f"has {C + 1} codebooks, the model uses {C}"),
    ("zero_frames", lambda f: {"text": "hi", "audio_codes": f["zero"]}, "zero frames"),
    ("code_too_high", lambda f: {"text": "hi", "audio_codes": f["high"]}, f"code {K}, outside the codebook range"),
    ("code_negative", lambda f: {"text": "hi", "audio_codes": f["neg"]}, "code -1, outside the codebook range"),
    ("ref_without_text", lambda f: {"text": "hi", "audio_codes": f["good"], "ref_audio_codes": f["ref"]}, "go together"),
    ("ref_text_without_ref", lambda f: {"text": "hi", "audio_codes": f["good"], "ref_text": "x"}, "go together"),
    ("bad_ref_codes", lambda f: {"text": "hi", "audio_codes": f["good"], "ref_audio_codes": f["high"],
                                 "ref_text": "x"}, "outside the codebook range"),
]


def _good(files, text="hello there"):
    return {"text": text, "audio_codes": files["good"]}


@pytest.mark.parametrize("build, fragment", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_single_bad_line_reported_with_file_and_line(tmp_path, files, build, fragment):
    path = _write(tmp_path, [_good(files), build(files)])
    with pytest.raises(DataError) as ei:
        read_manifest(str(path), C, K)
    msg = str(ei.value)
    assert msg.startswith("1 bad line(s)")
    assert f"{path}:2:" in msg
    assert fragment in msg
    assert f"{path}:1:" not in msg  # the good line is not reported


def test_all_bad_lines_listed_in_one_error(tmp_path, files):
    lines, expected = [], []
    for _, build, fragment in BAD_CASES:
        lines.append(_good(files))
        lines.append(build(files))
        expected.append((len(lines), fragment))
    lines.insert(0, "")  # a blank line shifts the numbering but is not an error
    expected = [(n + 1, frag) for n, frag in expected]
    path = _write(tmp_path, lines)
    with pytest.raises(DataError) as ei:
        read_manifest(str(path), C, K)
    msg = str(ei.value)
    assert msg.startswith(f"{len(BAD_CASES)} bad line(s)")
    body = msg.splitlines()[1:]
    assert len(body) == len(BAD_CASES)
    for (lineno, fragment), row in zip(expected, body):
        assert row.startswith(f"{path}:{lineno}:"), row
        assert fragment in row, (fragment, row)


def test_many_bad_lines_are_capped(tmp_path):
    path = _write(tmp_path, ["nope"] * 60)
    with pytest.raises(DataError) as ei:
        read_manifest(str(path), C, K)
    msg = str(ei.value)
    assert msg.startswith("60 bad line(s)")
    assert f"{path}:50:" in msg and f"{path}:51:" not in msg
    assert "... and 10 more" in msg


def test_good_lines_parse_and_blank_lines_ignored(tmp_path, files):
    path = tmp_path / "m.jsonl"
    path.write_text(
        "\n"
        + json.dumps(_good(files, "first")) + "\n"
        + "   \n"
        + "\n"
        + json.dumps({"text": "second", "audio_codes": files["good2"], "ref_audio_codes": files["ref"],
                      "ref_text": "the reference", "scene": "a quiet room", "id": "utt-2"}) + "\n"
        + "\n"
    )
    records = read_manifest(str(path), C, K)
    assert len(records) == 2
    a, b = records
    assert all(isinstance(r, Record) for r in records)
    assert (a.text, a.line, a.codes.shape) == ("first", 2, (C, 5))
    assert a.ref_codes is None and a.ref_text is None and a.scene is None
    assert a.id == "line2"
    assert np.array_equal(a.codes, np.load(tmp_path / files["good"]))
    assert np.issubdtype(a.codes.dtype, np.integer)
    assert a.num_frames == 5
    assert (b.text, b.line, b.codes.shape) == ("second", 5, (C, 3))
    assert b.ref_codes.shape == (C, 7) and b.ref_text == "the reference"
    assert b.scene == "a quiet room" and b.id == "utt-2"
    assert b.num_frames == 3 + 7


def test_paths_relative_to_manifest_not_cwd(tmp_path, files, monkeypatch):
    path = _write(tmp_path, [_good(files)])
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert read_manifest(str(path), C, K)[0].codes.shape == (C, 5)


def test_empty_manifest(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n  \n")
    with pytest.raises(DataError) as ei:
        read_manifest(str(path), C, K)
    assert str(path) in str(ei.value)
    assert "no samples" in str(ei.value)


def test_missing_manifest(tmp_path):
    path = tmp_path / "absent" / "manifest.jsonl"
    with pytest.raises(DataError) as ei:
        read_manifest(str(path), C, K)
    assert str(path) in str(ei.value)
    assert "not found" in str(ei.value)


def test_invalid_utf8_is_a_data_error(tmp_path, files):
    path = tmp_path / "m.jsonl"
    path.write_bytes(json.dumps(_good(files)).encode() + b"\n" + b'{"text": "\xff\xfe", "audio_codes": "x"}\n')
    with pytest.raises(DataError) as ei:
        read_manifest(str(path), C, K)
    assert f"{path}:2: not valid UTF-8" in str(ei.value)


# ------------------------------------------------------------------------------------------- sampler


def _rank_batches(n, mbs, accum, rank, world, seed=0, shuffle=True, start_step=0, steps=4):
    s = StepBatchSampler(n, mbs, accum, rank, world, seed, shuffle, start_step=start_step)
    return list(itertools.islice(iter(s), accum * steps))


def _step_sets(n, mbs, accum, world, seed=0, shuffle=True, start_step=0, steps=4):
    """For each optimizer step: the sorted samples seen over all ranks and micro-steps, and the count."""
    per_rank = [_rank_batches(n, mbs, accum, r, world, seed, shuffle, start_step, steps) for r in range(world)]
    out = []
    for k in range(steps):
        seen = [i for r in range(world) for mb in per_rank[r][k * accum:(k + 1) * accum] for i in mb]
        out.append(seen)
    return out


def test_micro_batches_have_micro_batch_size():
    for mb in _rank_batches(25, 3, 2, 1, 2, steps=6):
        assert len(mb) == 3
        assert all(isinstance(i, int) for i in mb)


@pytest.mark.parametrize("shuffle", [True, False])
def test_same_samples_per_optimizer_step_across_layouts(shuffle):
    n, steps = 11, 8  # 5 steps per epoch with a block of 2: crosses an epoch boundary
    layouts = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (micro_batch_size, grad_accum_steps, world_size)
    results = [_step_sets(n, mbs, accum, world, seed=7, shuffle=shuffle, steps=steps)
               for mbs, accum, world in layouts]
    for k in range(steps):
        sets = [sorted(r[k]) for r in results]
        assert all(len(r[k]) == 2 for r in results)
        assert sets[0] == sets[1] == sets[2], (k, sets)
    # and the steps are not all the same block
    assert len({tuple(sorted(s)) for s in results[0]}) > 1


def test_bigger_layouts_agree():
    # 2 ranks x accum 2 x batch 2 == 1 rank x accum 1 x batch 8 == 4 ranks x accum 1 x batch 2
    a = _step_sets(37, 2, 2, 2, seed=3, steps=6)
    b = _step_sets(37, 8, 1, 1, seed=3, steps=6)
    c = _step_sets(37, 2, 1, 4, seed=3, steps=6)
    for k in range(6):
        assert sorted(a[k]) == sorted(b[k]) == sorted(c[k])


def test_ranks_get_disjoint_slices():
    world = 3
    per_rank = [_rank_batches(30, 2, 2, r, world, steps=5) for r in range(world)]
    for j in range(len(per_rank[0])):
        flat = [i for r in range(world) for i in per_rank[r][j]]
        assert len(flat) == len(set(flat)) == world * 2


def test_deterministic_given_seed():
    a = _rank_batches(20, 2, 2, 0, 2, seed=5, steps=10)
    b = _rank_batches(20, 2, 2, 0, 2, seed=5, steps=10)
    c = _rank_batches(20, 2, 2, 0, 2, seed=6, steps=10)
    assert a == b
    assert a != c


def test_unshuffled_is_arange_order():
    n = 10
    batches = _rank_batches(n, 2, 1, 0, 1, shuffle=False, steps=8)  # 5 steps per epoch
    flat = [i for mb in batches for i in mb]
    assert flat == list(range(n)) + list(range(6))
    # with 2 ranks each rank takes its slice of consecutive samples
    r0 = _rank_batches(n, 1, 1, 0, 2, shuffle=False, steps=3)
    r1 = _rank_batches(n, 1, 1, 1, 2, shuffle=False, steps=3)
    assert r0 == [[0], [2], [4]] and r1 == [[1], [3], [5]]
    # seed has no effect without shuffling
    assert _rank_batches(n, 2, 1, 0, 1, seed=1, shuffle=False) == _rank_batches(n, 2, 1, 0, 1, seed=2, shuffle=False)


def test_shuffled_is_not_arange_order():
    flat = [i for mb in _rank_batches(50, 5, 1, 0, 1, seed=0, steps=10) for i in mb]
    assert sorted(flat) == list(range(50))
    assert flat != list(range(50))


@pytest.mark.parametrize("n, mbs, accum, world", [(10, 2, 1, 1), (11, 1, 2, 2), (23, 2, 2, 2), (7, 3, 1, 1)])
def test_each_epoch_is_a_permutation_with_partial_block_dropped(n, mbs, accum, world):
    block = mbs * accum * world
    per_epoch = n // block
    epochs = 3
    s = StepBatchSampler(n, mbs, accum, 0, world, seed=11, shuffle=True)
    assert len(s) == per_epoch * accum
    steps = _step_sets(n, mbs, accum, world, seed=11, steps=per_epoch * epochs)
    epoch_sets = []
    for e in range(epochs):
        seen = [i for st in steps[e * per_epoch:(e + 1) * per_epoch] for i in st]
        assert len(seen) == len(set(seen)) == per_epoch * block  # nothing repeated, trailing part dropped
        assert set(seen) <= set(range(n))
        epoch_sets.append(seen)
    # epochs are reshuffled: the order differs from one epoch to the next
    assert epoch_sets[0] != epoch_sets[1]


@pytest.mark.parametrize("start", [0, 1, 3, 5, 7, 12])
def test_start_step_resumes_uninterrupted_stream(start):
    n, mbs, accum, world = 13, 2, 2, 2  # block 8, one step per epoch: resuming crosses epochs
    for rank in range(world):
        full = _rank_batches(n, mbs, accum, rank, world, seed=4, steps=start + 6)
        resumed = _rank_batches(n, mbs, accum, rank, world, seed=4, start_step=start, steps=6)
        assert resumed == full[start * accum:]


def test_start_step_resumes_mid_epoch():
    n, mbs, accum, world = 40, 2, 1, 1  # 20 steps per epoch
    full = _rank_batches(n, mbs, accum, 0, world, seed=9, steps=30)
    resumed = _rank_batches(n, mbs, accum, 0, world, seed=9, start_step=17, steps=13)
    assert resumed == full[17:]


def test_iteration_restarts_at_start_step():
    s = StepBatchSampler(10, 2, 1, 0, 1, seed=0, shuffle=True, start_step=2)
    assert list(itertools.islice(iter(s), 4)) == list(itertools.islice(iter(s), 4))


@pytest.mark.parametrize("n, mbs, accum, world, block", [(3, 2, 1, 2, 4), (7, 2, 2, 2, 8), (0, 1, 1, 1, 1)])
def test_too_few_samples_for_one_step(n, mbs, accum, world, block):
    with pytest.raises(DataError) as ei:
        StepBatchSampler(n, mbs, accum, 0, world, seed=0, shuffle=True)
    msg = str(ei.value)
    assert f"has {n} samples" in msg
    assert f"needs {block}" in msg
    assert f"ranks {world}" in msg and f"grad_accum_steps {accum}" in msg and f"micro_batch_size {mbs}" in msg


def test_exactly_one_block_is_enough():
    s = StepBatchSampler(8, 2, 2, 1, 2, seed=0, shuffle=True)
    assert len(s) == 2
    assert len(list(itertools.islice(iter(s), 6))) == 6
