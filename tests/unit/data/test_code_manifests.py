"""Manifests of .npy codes: every bad line reported as file:line, skips, validation splits, ChatML lines.

Manifests of codes (.npy) through higgs_ddp.data.dataset: every bad line reported as file:line, the error /
skip policy and its report, several manifests, the validation split, and ChatML lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import QUIET, TINY

from higgs_ddp.config import load_config
from higgs_ddp.data.dataset import DataError, Record, load_data
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv

C, K = 4, 64  # codebooks, codebook size (configs/tiny.yaml)


def load(tmp_path, tokenizer, manifests, *overrides):
    paths = [str(m) for m in (manifests if isinstance(manifests, list) else [manifests])]
    cfg = load_config(str(TINY), [*QUIET, f"output_dir={tmp_path / 'run'}", f"data.manifest={json.dumps(paths)}",
                                  "data.num_workers=0", *overrides])
    return load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=True)


def read_manifest(path, tokenizer, tmp_path, *overrides):
    return load(tmp_path, tokenizer, path, *overrides).train


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
    ("missing_codes", lambda f: {"text": "hello"}, "missing field 'audio' (or 'audio_codes')"),
    ("both_audio_and_codes", lambda f: {"text": "hi", "audio": "a.wav", "audio_codes": f["good"]}, "not both"),
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
    ("ref_without_text", lambda f: {"text": "hi", "audio_codes": f["good"], "ref_audio_codes": f["ref"]}, "needs both its audio"),
    ("ref_text_without_ref", lambda f: {"text": "hi", "audio_codes": f["good"], "ref_text": "x"}, "needs both its audio"),
    ("empty_ref_text", lambda f: {"text": "hi", "audio_codes": f["good"], "ref_audio_codes": f["ref"],
                                  "ref_text": " "}, "the reference transcript 'ref_text' is empty"),
    ("codes_directory", lambda f: {"text": "hi", "audio_codes": "codes"}, "codes file codes is a directory"),
    ("bad_ref_codes", lambda f: {"text": "hi", "audio_codes": f["good"], "ref_audio_codes": f["high"],
                                 "ref_text": "x"}, "outside the codebook range"),
]


def _good(files, text="hello there"):
    return {"text": text, "audio_codes": files["good"]}


@pytest.mark.parametrize("build, fragment", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_single_bad_line_reported_with_file_and_line(tmp_path, tokenizer, files, build, fragment):
    path = _write(tmp_path, [_good(files), build(files)])
    with pytest.raises(DataError) as ei:
        read_manifest(path, tokenizer, tmp_path)
    msg = str(ei.value)
    assert msg.startswith("1 problem(s) in the data")
    assert f"{path}:2:" in msg
    assert fragment in msg
    assert f"{path}:1:" not in msg  # the good line is not reported


def test_all_bad_lines_listed_in_one_error(tmp_path, tokenizer, files):
    lines, expected = [], []
    for _, build, fragment in BAD_CASES:
        lines.append(_good(files))
        lines.append(build(files))
        expected.append((len(lines), fragment))
    lines.insert(0, "")  # a blank line shifts the numbering but is not an error
    expected = [(n + 1, frag) for n, frag in expected]
    path = _write(tmp_path, lines)
    with pytest.raises(DataError) as ei:
        read_manifest(path, tokenizer, tmp_path)
    msg = str(ei.value)
    assert msg.startswith(f"{len(BAD_CASES)} problem(s) in the data")
    body = msg.splitlines()[1:]
    assert len(body) == len(BAD_CASES)
    for (lineno, fragment), row in zip(expected, body):
        assert row.startswith(f"{path}:{lineno}:"), row
        assert fragment in row, (fragment, row)


def test_many_bad_lines_are_capped(tmp_path, tokenizer):
    path = _write(tmp_path, ["nope"] * 60)
    with pytest.raises(DataError) as ei:
        read_manifest(path, tokenizer, tmp_path)
    msg = str(ei.value)
    assert msg.startswith("60 problem(s)")
    assert f"{path}:50:" in msg and f"{path}:51:" not in msg
    assert "... and 10 more" in msg


def test_good_lines_parse_and_blank_lines_ignored(tmp_path, tokenizer, files):
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
    records = read_manifest(path, tokenizer, tmp_path)
    assert len(records) == 2
    a, b = records
    assert all(isinstance(r, Record) for r in records)
    assert (a.where, a.id, len(a.codes)) == (f"{path}:2", "m:2", 1)
    assert np.array_equal(a.codes[0], np.load(tmp_path / files["good"]))
    assert a.codes[0].dtype == np.int16
    assert (b.where, b.id, [c.shape for c in b.codes]) == (f"{path}:5", "utt-2", [(C, 7), (C, 3)])
    assert "the reference" in tokenizer.decode(b.input_ids) and "a quiet room" in tokenizer.decode(b.input_ids)
    # positions = text tokens + each audio segment with stream BOS/EOS and the C-1 delay columns
    text = len(b.input_ids) - 2
    assert b.positions == text + (7 + 2 + C - 1) + (3 + 2 + C - 1)


def test_paths_relative_to_manifest_not_cwd(tmp_path, tokenizer, files, monkeypatch):
    path = _write(tmp_path, [_good(files)])
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert read_manifest(path, tokenizer, tmp_path)[0].codes[0].shape == (C, 5)


def test_empty_manifest(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n  \n")
    with pytest.raises(DataError) as ei:
        read_manifest(path, tokenizer, tmp_path)
    assert str(path) in str(ei.value)
    assert "no usable training samples" in str(ei.value)


def test_missing_manifest(tmp_path, tokenizer):
    path = tmp_path / "absent" / "manifest.jsonl"
    for policy in ("error", "skip"):  # even skip cannot skip a whole file, so the line does not offer it
        with pytest.raises(DataError) as ei:
            read_manifest(path, tokenizer, tmp_path, f"data.on_error={policy}")
        assert str(ei.value) == f"manifest not found: {path}"
    assert not (tmp_path / "run").exists()  # refused before the run's folder (and its data report) is made


def test_invalid_utf8_is_a_data_error(tmp_path, tokenizer, files):
    path = tmp_path / "m.jsonl"
    path.write_bytes(json.dumps(_good(files)).encode() + b"\n" + b'{"text": "\xff\xfe", "audio_codes": "x"}\n')
    with pytest.raises(DataError) as ei:
        read_manifest(path, tokenizer, tmp_path)
    assert f"{path}:2: not valid UTF-8" in str(ei.value)




def test_a_manifest_starting_with_a_utf8_bom_reads_its_first_line(tmp_path, tokenizer, files):
    # Windows editors (Notepad, Excel's "UTF-8" CSV export) write one; it is not part of line 1's JSON.
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_good(files, "first")) + "\n"
                                       + json.dumps(_good(files, "second")) + "\n").encode())
    records = read_manifest(path, tokenizer, tmp_path)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:2"]
    assert "first" in tokenizer.decode(records[0].input_ids)


def test_a_bom_after_line_1_is_still_bad_json(tmp_path, tokenizer, files):
    # Only the file's start may carry one; mid-file it is a stray character, reported where it is.
    path = tmp_path / "m.jsonl"
    path.write_bytes((json.dumps(_good(files)) + "\n").encode() + b"\xef\xbb\xbf" + json.dumps(_good(files)).encode())
    with pytest.raises(DataError) as ei:
        read_manifest(path, tokenizer, tmp_path)
    assert f"{path}:2: invalid JSON" in str(ei.value)


def test_an_id_used_twice_is_named_by_both_lines(tmp_path, tokenizer, files):
    path = _write(tmp_path, [{**_good(files, "one"), "id": "utt"}, {**_good(files, "two"), "id": "x"},
                             {"text": "three", "audio_codes": files["good2"], "id": "utt"}])
    with pytest.raises(DataError) as ei:
        read_manifest(path, tokenizer, tmp_path)
    assert f"{path}:3: id 'utt' is already the id of {path}:1" in str(ei.value)
    data = load(tmp_path, tokenizer, path, "data.on_error=skip")  # skip keeps the first, counts the second
    assert [r.where for r in data.train] == [f"{path}:1", f"{path}:2"]
    assert data.report["skipped_by_reason"] == {"duplicate_id": 1} and data.report["entries"] == 3


def test_two_manifests_of_one_file_name_need_ids(tmp_path, tokenizer, files):
    # Without "id" a line's id is the manifest's file name and line: a/m.jsonl:1 and b/m.jsonl:1 would share
    # one, and with it the validation split and the data fingerprint.
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    good = {"text": "hi", "audio_codes": f"../{files['good']}"}
    a, b = _write(tmp_path / "a", [good], "m.jsonl"), _write(tmp_path / "b", [good], "m.jsonl")
    with pytest.raises(DataError) as ei:
        load(tmp_path, tokenizer, [a, b])
    assert f"{b}:1: id 'm:1' is already the id of {a}:1 (a line without \"id\" gets its manifest's file name" \
        in str(ei.value)
    named = _write(tmp_path / "b", [{**good, "id": "b1"}], "m.jsonl")
    assert len(load(tmp_path, tokenizer, [a, named]).train) == 2


def test_a_validation_sample_that_is_a_training_sample_is_refused(tmp_path, tokenizer, files):
    train = _write(tmp_path, [{**_good(files), "id": "t1"},
                              {"text": "b", "audio_codes": files["good2"], "id": "t2", "ref_audio_codes": files["ref"],
                               "ref_text": "r"}], "train.jsonl")
    val = _write(tmp_path, [{"text": "same id", "audio_codes": files["ref"], "id": "t1"},
                            {"text": "same clip", "audio_codes": files["good2"], "id": "v2"},
                            # the training sample's reference as a validation target: it was never learned
                            {"text": "fine", "audio_codes": files["ref"], "id": "v3"}], "val.jsonl")
    with pytest.raises(DataError) as ei:
        load(tmp_path, tokenizer, train, f"data.val_manifest={val}")
    msg = str(ei.value)
    assert f"{val}:1: validation sample id 't1' is also the training sample at {train}:1" in msg
    assert f"{val}:2: validation sample learns {files['good2']}, which the training sample at {train}:2 learns" in msg
    assert f"{val}:3" not in msg
    data = load(tmp_path, tokenizer, train, f"data.val_manifest={val}", "data.on_error=skip")
    assert ([r.id for r in data.train], [r.id for r in data.val]) == (["t1", "t2"], ["v3"])
    assert data.report["skipped_by_reason"] == {"val_in_train": 2}
