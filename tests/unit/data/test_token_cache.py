"""The token cache: a warm start gives a cold start's samples, order and fingerprint; changes retokenize.

The data path at scale (issue 15): a warm start reads tokenized prompts from the cache instead of
tokenizing, and gives the same samples, in the same order, with the same fingerprint as a cold start;
a changed tokenizer or prompt is tokenized again. And the benchmark's synthetic corpus is what the
training path reads (its codes found under the keys training computes). No timing is asserted."""

import json
import shutil
import subprocess
import sys

import numpy as np
import torch
import pytest
from helpers import QUIET, ROOT, TINY, TORCHRUN_ENV, cached_corpus, cached_corpus_config

from higgs_ddp.config import load_config
from higgs_ddp.data import token_cache
from higgs_ddp.data.dataset import fingerprint, load_data
from higgs_ddp.data.prompt import build_chatml, tokenize_chatml
from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools.bench.data_corpus import forget_derived

CLIPS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A cached corpus in the tiny model's code shape (4 codebooks of 64), encoded by nobody."""
    return cached_corpus(tmp_path_factory, "scale", CLIPS)


config = cached_corpus_config


def load(cfg, tokenizer):
    return load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=True)


def same_samples(a, b) -> None:
    for part in ("train", "val"):
        ra, rb = getattr(a, part), getattr(b, part)
        assert [r.id for r in ra] == [r.id for r in rb]
        for x, y in zip(ra, rb):
            assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.label_ids, y.label_ids)
            assert x.positions == y.positions and len(x.codes) == len(y.codes)
            assert all(np.array_equal(c, d) for c, d in zip(x.codes, y.codes))


def test_warm_start_reads_the_tokens_cold_start_made(corpus, tmp_path, tokenizer, monkeypatch):
    cfg = config(corpus, tmp_path)
    forget_derived(corpus)
    cold = load(cfg, tokenizer)
    shards = list((corpus / ".higgs_codes" / "tokens").rglob("part-*.safetensors"))
    assert len(shards) == 1
    assert len(cold.train) + len(cold.val) == CLIPS and cold.val
    # The tokens are the prompt as boson_multimodal builds it, tokenized directly.
    lines = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines()]
    by_id = {x["id"]: x for x in lines}
    for r in cold.train[:5]:
        direct = tokenize_chatml(tokenizer, build_chatml(by_id[r.id]["text"]), r.codes, r.id)
        assert np.array_equal(r.input_ids, direct.input_ids.numpy())
        assert np.array_equal(r.label_ids, direct.label_ids.numpy())

    def no_tokenizing(*args):
        raise AssertionError("a warm start tokenized a prompt")

    monkeypatch.setattr(token_cache, "chatml_ids_batch", no_tokenizing)
    warm = load(cfg, tokenizer)
    same_samples(cold, warm)
    assert fingerprint(warm.train) == fingerprint(cold.train)
    assert list((corpus / ".higgs_codes" / "tokens").rglob("part-*.safetensors")) == shards  # nothing new


def test_changed_tokenizer_or_prompt_is_tokenized_again(corpus, tmp_path, tokenizer):
    cfg = config(corpus, tmp_path)
    forget_derived(corpus)
    base = load(cfg, tokenizer)
    # Another tokenizer (padded wider: the same ids for this text, yet another tokenizer): its own folder.
    wider = build_tiny_tokenizer(vocab_size=300)
    assert token_cache.tokenizer_key(wider) != token_cache.tokenizer_key(tokenizer)
    load(config(corpus, tmp_path, "model.config.text_config.vocab_size=300"), wider)
    assert len(list((corpus / ".higgs_codes" / "tokens").iterdir())) == 2
    # Another prompt: the scene goes into the system message, so into the key.
    assert token_cache.entry_key(build_chatml("hello")) != token_cache.entry_key(build_chatml("hello", scene="rain"))
    assert token_cache.entry_key(build_chatml("hello")) == token_cache.entry_key(build_chatml("hello"))
    edited = corpus / "edited.jsonl"  # beside the clips: its paths are relative
    lines = (corpus / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    edited.write_text("\n".join([json.dumps({**first, "text": first["text"] + " Again."}), *lines[1:]]) + "\n")
    changed = load(config(corpus, tmp_path, f"data.manifest={edited}", "data.val_fraction=0"), tokenizer)
    record = next(r for r in changed.train if r.id == first["id"])
    before = next(r for r in list(base.train) + list(base.val) if r.id == first["id"])
    assert len(record.input_ids) == len(before.input_ids) + len(" Again.")  # a byte tokenizer: 1 token per byte


def test_damaged_token_shard_is_tokenized_again(corpus, tmp_path, tokenizer):
    cfg = config(corpus, tmp_path)
    forget_derived(corpus)
    cold = load(cfg, tokenizer)
    (shard,) = (corpus / ".higgs_codes" / "tokens").rglob("part-*.safetensors")
    shard.write_bytes(shard.read_bytes()[:200])  # a copy cut short
    shutil.rmtree(corpus / ".higgs_codes" / "index")  # (the corpus index holds the tokens too: the token cache is read)
    again = load(cfg, tokenizer)
    same_samples(cold, again)
    assert not shard.exists()  # removed; the entries live in a new shard
    assert len(list(shard.parent.glob("part-*.safetensors"))) == 1


@pytest.mark.slow
@pytest.mark.extended
def test_data_scale_benchmark_two_ranks(tmp_path):
    """The command end to end: 2 ranks share the cold start's tokenizing; cold and warm load the same samples."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "higgs_ddp", "bench", "--nproc-per-node", "2", "--config",
           "configs/bench_data_scale.yaml", f"output_dir={out}", "--data-scale", "24", "data.val_fraction=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=TORCHRUN_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["data_scale"] == 24 and r["world_size"] == 2
    for start in ("cold", "warm"):
        s = r[start]
        assert s["samples"] == 24 and s["first_step_s"] > s["load_data_s"] > 0 and s["dataset_bytes"] > 0
        assert {"manifest", "file hashes", "code cache load", "tokens", "lengths", "batching plan"} <= s["phases_s"].keys()
    shards = list((out / "corpus-24" / ".higgs_codes" / "tokens").rglob("part-*.safetensors"))
    assert len(shards) == 2  # one per rank, written by the cold start; the warm start wrote none
    assert r["cache_bytes"]["tokens"] == sum(p.stat().st_size for p in shards)
    table = subprocess.run([sys.executable, "-m", "higgs_ddp", "bench", "--table", "/dev/stdin"], input=json.dumps(r),
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert table.stdout.count("\n| 24 |") + table.stdout.startswith("| 24 |") == 2, table.stdout
    shutil.rmtree(out)


def test_manifest_paths_resolve_as_path_resolve_does(tmp_path):
    """Folders are resolved once per manifest; a path still ends where Path.resolve takes it, links included."""
    from higgs_ddp.data.manifest import _Resolver

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.wav").write_bytes(b"x")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "b.wav").symlink_to(tmp_path / "real" / "a.wav")
    resolve = _Resolver(tmp_path, None)
    for rel in ("real/a.wav", "linked/a.wav", "real/b.wav", "linked/b.wav", "real/../real/a.wav", "a.wav",
                "missing/c.wav", "real/..", "./real/a.wav"):
        assert resolve.resolve(rel) == (tmp_path / rel).resolve(), rel


@pytest.mark.slow
def test_peer_data_mode_trains_on_the_samples_we_do(tmp_path, tokenizer):
    """The benchmark's peer Dataset (the codec in __getitem__) yields, clip for clip, the samples our cached
    path yields: the side-by-side times the same work."""
    from higgs_ddp.data.codec import load_codec
    from higgs_ddp.data.manifest import read_manifest
    from higgs_ddp.tools.bench.peer_data import EncodeOnFetch
    from higgs_ddp.tools.demo_data import write_demo_corpus

    manifest = write_demo_corpus(tmp_path / "wavs", samples=4, with_reference_every=2, audio=True)
    cfg = load_config(str(TINY), [*QUIET, f"output_dir={tmp_path / 'run'}", f"data.manifest={manifest}",
                                  f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"])
    data = load(cfg, tokenizer)
    entries = {e.id: e for e in read_manifest(str(manifest))[0]}
    peer = EncodeOnFetch(data.train, entries, load_codec("tiny", None), tokenizer, cfg.data.max_audio_seconds)
    assert len(peer) == len(data.train) == 4
    for i, r in enumerate(data.train):
        theirs, ours = peer[i], r.sample()
        assert torch.equal(theirs.input_ids, ours.input_ids) and torch.equal(theirs.label_ids, ours.label_ids)
        assert len(theirs.audio_codes) == len(ours.audio_codes) == (2 if i % 2 == 0 else 1)
        assert all(torch.equal(a, b) for a, b in zip(theirs.audio_codes, ours.audio_codes))
