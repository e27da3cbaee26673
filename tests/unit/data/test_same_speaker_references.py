"""data.reference=same_speaker picks another clip of the speaker, deterministically, never a copy.

data.reference=same_speaker: each sample's reference is another clip of its speaker, chosen from (seed, id)
alone: never itself, never a copy or near copy (judged on codes), within data.reference_seconds (long clips
cut at a pause), deterministic (reloads, ranks, resumes), reported where it cannot be done; and training on
it equals training on the same pairs written out as a `given` manifest.

Clips are .npy codes (demo_data.text_to_codes: distinct per text) wherever the codec does not matter: the
tiny random codec maps most audio to nearly the same codes, so every pair of its clips would look like a
near copy. The cut at a pause needs audio, so that reference is a WAV."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import QUIET, TINY, read_metrics, torchrun
from safetensors.torch import load_file

from higgs_ddp.config import load_config
from higgs_ddp.data.collator import HiggsCollator
from higgs_ddp.data.dataset import ManifestDataset, fingerprint, load_data
from higgs_ddp.data.references import cut_frame, cut_transcript, near_identical
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools.demo_data import text_to_codes, text_to_wave

C, K = 4, 64  # configs/tiny.yaml's codebooks
BOUNDS = "data.reference_seconds=[0.4,1.2]"  # 10 to 30 frames at 25 frames/s


def codes_clip(base: Path, name: str, text: str = None, codes=None) -> str:
    (base / "codes").mkdir(parents=True, exist_ok=True)
    np.save(base / "codes" / f"{name}.npy", text_to_codes(text, C, K) if codes is None else codes)
    return f"codes/{name}.npy"


def line(base, sid, speaker, text, codes=None, **extra):
    out = {"id": sid, "text": text, "audio_codes": codes_clip(base, sid, text, codes), **extra}
    if speaker:
        out["speaker"] = speaker
    return out


def write(base: Path, lines, name="manifest.jsonl") -> Path:
    p = base / name
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def cfg_for(tmp_path, manifest, *overrides, out="run"):
    return load_config(str(TINY), [*QUIET, f"output_dir={tmp_path / out}", f"data.manifest={manifest}",
                                   f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
                                   "data.reference=same_speaker", BOUNDS, *overrides])


def load(tmp_path, tokenizer, manifest, *overrides):
    cfg = cfg_for(tmp_path, manifest, *overrides)
    data = load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=True)
    return data, {p["sample"]: p for p in data.report["references"]["pairs"]}


def pause_wave(seconds=1.6, gap=(0.72, 0.84), sr=8000):
    """Speech-like tones with one silent gap (frames 18-20 at 25 frames/s): the place to cut."""
    w = text_to_wave("seven small birds sing at dawn " * 3)[: int(seconds * sr)].copy()
    w[int(gap[0] * sr): int(gap[1] * sr)] = 0
    return w


def corpus(base: Path) -> Path:
    a0 = text_to_codes("quick fox", C, K)
    (base / "clips").mkdir(parents=True, exist_ok=True)
    sf.write(base / "clips" / "e1.wav", pause_wave(), 8000, subtype="FLOAT")
    return write(base, [
        line(base, "a0", "ann", "quick fox", ref_audio_codes="codes/b0.npy", ref_text="given ref"),  # replaced
        line(base, "a1", "ann", "lazy dogs sing"),
        line(base, "a2", "ann", "seven birds"),
        line(base, "a3", "ann", "quick fox again", codes=a0),  # a copy of a0's recording
        line(base, "a4", "ann", "quick fox later", codes=np.concatenate([text_to_codes("zz", C, K)[:, :2], a0], 1)),
        line(base, "b0", "bob", "at dawn"),
        line(base, "b1", "bob", "the quick brown fox jumps over"),  # 60 frames: cut at 30 (codes: no energy)
        line(base, "c0", "cid", "a lone clip"),  # the only clip of its speaker
        line(base, "d0", "dee", "ab"), line(base, "d1", "dee", "cd"),  # 4 frames each: shorter than 10
        line(base, "n0", None, "nobody said it"),
        line(base, "e0", "eve", "fox sings"),
        {"id": "e1", "speaker": "eve", "text": "seven small birds sing at dawn", "audio": "clips/e1.wav"},
    ])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The corpus and its code cache, shared: the WAV is encoded once for the tests below."""
    tmp = tmp_path_factory.mktemp("corpus")
    return tmp, corpus(tmp / "ds")


def test_pairs_never_self_never_copies_bounded_and_reported(shared, tokenizer):
    tmp_path, m = shared
    data, pairs = load(tmp_path, tokenizer, m)
    speaker = {"a": "ann", "b": "bob", "e": "eve"}
    copies = {"a0", "a3", "a4"}
    for sid, p in pairs.items():
        assert p["reference"] != sid and speaker[p["reference"][0]] == speaker[sid[0]]
        assert not (sid in copies and p["reference"] in copies), (sid, p)
    assert set(pairs) == {"a0", "a1", "a2", "a3", "a4", "b0", "b1", "e0", "e1"}
    records = {r.id: r for r in data.train}
    for sid in pairs:  # every reference within [10, 30] frames
        assert 10 <= records[sid].codes[0].shape[1] <= 30, sid
    # b0's only other clip is 60 frames of codes: cut at the limit; its transcript cut with it.
    assert pairs["b0"]["frames"] == 30 and pairs["b0"]["ref_text"] == "the quick brown"
    # e0's is a 1.6 s WAV with a pause at frames 18-20: cut there (boundary 20: frames 19 and 20 silent).
    assert pairs["e0"]["frames"] == 20
    assert np.array_equal(records["e0"].codes[0], records["e1"].codes[1][:, :20])
    rep = data.report["references"]
    assert rep["single_clip_speakers"] == ["cid"] and rep["single_clip_speaker_count"] == 1
    assert (rep["no_speaker"], rep["no_candidate"], rep["replaced"], rep["cut"]) == (1, 2, 1, 2)
    for sid in ("c0", "d0", "d1", "n0"):  # trained without a reference
        assert len(records[sid].codes) == 1

    # The reference is context in the official place, never a target.
    mc = model_config(cfg_for(tmp_path, m), tokenizer)
    batch = HiggsCollator.for_model(mc)([ManifestDataset([records["a0"]])[0]])
    assert len(batch.audio_out_ids_start) == 2  # the reference segment, then the target
    ref_cols = int(batch.audio_out_ids_start[1])
    assert (batch.label_audio_ids[:, :ref_cols] == -100).all()
    assert (batch.label_audio_ids[:, ref_cols:] != -100).any()
    ref_turn = tokenizer.decode(records["a0"].input_ids.tolist())
    assert ref_turn.index(pairs["a0"]["ref_text"]) < ref_turn.index("quick fox")

    # Deterministic: another load with the global RNGs elsewhere (a resumed or another rank's process) picks
    # the same pairs, so the resume check's data fingerprint agrees; another seed picks others.
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    again, pairs_again = load(tmp_path, tokenizer, m)
    assert pairs_again == pairs and fingerprint(again.train) == fingerprint(data.train)
    others = [load(tmp_path, tokenizer, m, f"train.seed={s}")[1] for s in (1, 2, 3)]
    assert any({k: p["reference"] for k, p in o.items()} != {k: p["reference"] for k, p in pairs.items()}
               for o in others)
    for o in others:
        assert not any(k in copies and p["reference"] in copies for k, p in o.items())


def test_none_and_given(shared, tokenizer):
    tmp_path, m = shared
    given, _ = load(tmp_path, tokenizer, m, "data.reference=given")
    none, _ = load(tmp_path, tokenizer, m, "data.reference=none")
    assert [len(r.codes) for r in given.train if r.id == "a0"] == [2]  # the manifest's own reference
    assert all(len(r.codes) == 1 for r in none.train)
    assert none.report["references"]["replaced"] == 1


def test_near_identical_cut_frame_and_transcript_units():
    a = text_to_codes("the quick brown fox jumps", C, K)
    assert near_identical(a, a.copy())
    assert near_identical(a, np.concatenate([a[:, :5], a], 1))  # the same with 5 frames more up front
    assert not near_identical(a, text_to_codes("over a lazy dog at dawn", C, K))
    energy = np.ones(40)
    energy[[18, 19, 20]] = 0
    assert cut_frame(energy, 40, 10, 30, 25) == 20
    assert cut_frame(None, 40, 10, 30, 25) == 30
    assert cut_frame(np.ones(40), 40, 10, 30, 25) == 30  # no pause: as late as allowed
    assert cut_transcript("one two three four", 0.5) == "one two"
    assert cut_transcript("没有空格的句子", 0.5) == "没有空格"


def test_single_clip_speakers_in_the_prepare_report(shared, capsys):
    from higgs_ddp.cli import prepare

    tmp_path, m = shared
    assert prepare(["--config", str(TINY), *QUIET, f"data.manifest={m}", f"output_dir={tmp_path / 'run'}",
                    f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "data.reference=same_speaker",
                    BOUNDS]) == 0
    out = capsys.readouterr().out
    assert "references: 9 sample(s) paired with another clip of their speaker (2 cut to data.reference_seconds); " \
           "1 speaker(s) with a single clip, trained without a reference: cid; 1 sample(s) without a speaker" in out


# ------------------------------------------------------------------ training equals the pairs written out

STEPS = ("train.max_steps=4", "train.lr=5e-3", "train.warmup_steps=1", "train.seed=5", "train.micro_batch_size=2",
         "train.save_every=2", "train.keep_last=0")


def small_corpus(base: Path) -> Path:
    texts = {"ann": ["quick fox", "lazy dogs sing", "seven birds", "over a hill"],
             "bob": ["at dawn", "brown fox jumps", "small birds"], "cid": ["a lone clip"]}
    return write(base, [line(base, f"{s}{i}", s, t) for s, ts in texts.items() for i, t in enumerate(ts)])


def given_manifest(base: Path, pairs: dict, name: str) -> Path:
    """The same samples, each with its reference written out as a `given` manifest line."""
    out = []
    for x in map(json.loads, (base / "manifest.jsonl").read_text().splitlines()):
        p = pairs.get(x["id"])
        if p:
            x = {**x, "ref_audio_codes": f"codes/{p['reference']}.npy", "ref_text": p["ref_text"]}
        out.append(x)
    return write(base, out, name)


def train_run(tmp_path, name, manifest, *overrides):
    from higgs_ddp.train import train

    train(cfg_for(tmp_path, manifest, *STEPS, *overrides, out=name))
    return tmp_path / name


def weights(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    m = small_corpus(tmp / "ds")
    run = train_run(tmp, "same_speaker", m)
    pairs = {p["sample"]: p for p in json.loads((run / "data_report.json").read_text())["references"]["pairs"]}
    return tmp, run, pairs


def test_same_speaker_training_equals_the_pairs_written_out(paired_run):
    tmp, run, pairs = paired_run
    assert len(pairs) == 7 and all(p["frames"] is None for p in pairs.values())
    explicit = train_run(tmp, "given", given_manifest(tmp / "ds", pairs, "given.jsonl"), "data.reference=given")
    losses = [r["loss"] for r in read_metrics(run)]
    assert [r["loss"] for r in read_metrics(explicit)] == losses
    a, b = weights(run), weights(explicit)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Negative control: the same samples paired otherwise (the references rotated among them) train otherwise.
    ids = sorted(pairs)
    rotated = {k: {**pairs[k], "reference": pairs[ids[(i + 1) % len(ids)]]["reference"]} for i, k in enumerate(ids)}
    other = train_run(tmp, "other", given_manifest(tmp / "ds", rotated, "other.jsonl"), "data.reference=given")
    assert [r["loss"] for r in read_metrics(other)] != losses


def test_same_speaker_resumes_exactly(paired_run):
    tmp, run, _ = paired_run
    resumed = train_run(tmp, "resumed", tmp / "ds" / "manifest.jsonl",
                        f"train.resume={run / 'checkpoints' / 'step_000002'}")
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(run)][2:]
    a, b = weights(run), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_ranks_pick_the_same_pairs_as_one(paired_run):
    """2 ranks x 1 sample == 1 process x 2 samples (test_data_parallel_equivalence.py) holds only if both ranks built
    the same pairs as the single process."""
    import yaml

    tmp, run, _ = paired_run
    cfg = cfg_for(tmp, tmp / "ds" / "manifest.jsonl", *STEPS, "train.micro_batch_size=1", out="ranks2")
    path = tmp / "ranks2.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = torchrun(2, "--config", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp / "ranks2"
    assert [r["loss"] for r in read_metrics(two)] == pytest.approx([r["loss"] for r in read_metrics(run)], rel=1e-5)
    a, b = weights(run), weights(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_unpaired_samples_say_which_exclusion_left_them_alone_and_few_pairs_warn(tmp_path, tokenizer, capsys):
    """0 of 6 paired: four clips too short for data.reference_seconds[0], two copies of one recording; the
    line says which, and a warning says it loudly (issue 30, item 14)."""
    base = tmp_path / "ds"
    same = text_to_codes("the quick brown fox", C, K)
    m = write(base, [line(base, f"s{i}", "sam", t) for i, t in enumerate(("ab", "cd", "ef", "gh"))]  # 4 frames
              + [line(base, "q0", "quinn", "one take", codes=same), line(base, "q1", "quinn", "its copy", codes=same)])
    cfg = cfg_for(tmp_path, m)
    data = load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer))
    rep = data.report["references"]
    assert (rep["paired"], rep["no_candidate"], rep["excluded_by"]) == (
        0, 6, {"too_short": 4, "near_identical": 2, "validation": 0})
    out, err = capsys.readouterr()
    why = ("6 sample(s) whose speaker has no other usable clip, trained without a reference (other clips shorter "
           "than data.reference_seconds[0]=0.4 s for 4, the same recording or near-identical to it for 2)")
    assert f"references: 0 sample(s) paired with another clip of their speaker (0 cut to data.reference_seconds); " \
           f"{why}\n" in out
    assert f"higgs-ddp: warning: data.reference=same_speaker paired only 0 of 6 sample(s) with a reference, so the " \
           f"run will hardly learn to clone a voice: {why}\n" in err
    # most samples paired: no warning
    m = write(base, [line(base, f"p{i}", "pat", t) for i, t in enumerate(("seven birds sing", "lazy dogs sleep"))],
              "ok.jsonl")
    cfg = cfg_for(tmp_path, m)
    load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer))
    assert "warning" not in capsys.readouterr().err


def test_the_columnar_pick_is_the_per_speaker_lists_pick_at_10k_clips():
    """pick_same_speaker (one sort by speaker, offsets) picks, for 10k clips of speakers of 1 to 40 clips, with
    validation clips, too-short and too-long clips, files learned twice, clips without a speaker and near
    copies, exactly what the rule applied to a Python list per speaker (the former implementation) picks."""
    from higgs_ddp.data.references import NO_CANDIDATE, PAIRED, pick_same_speaker, rank

    rng = np.random.default_rng(5)
    n, lo, hi, seed = 10_000, 10, 30, 11
    speaker = np.repeat(np.arange(n), rng.integers(1, 41, n))[:n]
    speaker = rng.permutation(np.where(rng.random(n) < 0.03, -1, speaker))  # speakers' clips spread out
    ids = [f"clip-{i}" for i in range(n)]
    target = np.where(rng.random(n) < 0.02, rng.integers(0, 50, n), np.arange(100, n + 100))  # files named twice
    frames = rng.integers(5, 40, n)
    pool, pairable = rng.random(n) < 0.9, rng.random(n) < 0.95
    copies = {frozenset(map(int, rng.integers(0, n, 2))) for _ in range(3000)}

    def same(i, j):
        return frozenset((i, j)) in copies or (i + j) % 97 == 0

    groups: dict = {}
    for i in range(n):
        if pairable[i] and speaker[i] >= 0:
            groups.setdefault(speaker[i], []).append(i)
    expected = np.full(n, -1)
    for i in range(n):
        if not pairable[i] or speaker[i] < 0 or len(groups[speaker[i]]) == 1:
            continue
        candidates = sorted((j for j in groups[speaker[i]] if pool[j] and ids[j] != ids[i] and target[j] != target[i]
                             and frames[j] >= lo), key=lambda j: (frames[j] > hi, rank(seed, ids[i], ids[j])))
        expected[i] = next((j for j in candidates if not same(i, j)), -1)
    ref, outcome = pick_same_speaker(speaker, ids, target, frames, pool, pairable, seed, lo, hi, same)
    assert np.array_equal(ref, expected)
    assert (outcome == PAIRED).sum() > 8000 and (outcome == NO_CANDIDATE).sum() > 5  # both exercised
