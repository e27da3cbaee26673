"""Resuming after a kill, a full disk or a user: damaged checkpoints, metrics and cache shards, another world size.

Resuming from what a kill, a full disk or a user leaves behind: damaged checkpoint files, a cut-off
metrics line, a damaged code-cache shard, a moved validation manifest, another world size; and a
status.json that tells a crash from a live run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import flip_byte, read_metrics, tiny_config, torchrun
from safetensors.torch import load_file

from higgs_ddp.train import main, train
from higgs_ddp.training.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint

COMMON = ("train.max_steps=6", "train.save_every=3", "train.keep_last=0", "train.lr=5e-3",
          "train.warmup_steps=1", "train.seed=11", "lora.dropout=0.1")


SAME = ("step", "loss", "text_loss", "audio_loss", "per_codebook_loss", "grad_norm", "lr", "tokens")


def rows(run: Path) -> list:
    return [{k: m[k] for k in SAME} for m in read_metrics(run)]


def final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps straight (lora), checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("straight")
    train(tiny_config(tmp, *COMMON))
    return tmp / "run"


def copy_run(straight: Path, tmp_path: Path) -> Path:
    """The straight run as if it had been killed after saving step 6 and before its final weights."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "final")
    return run


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# --------------------------------------------------------------------------- damaged checkpoint files

@pytest.mark.parametrize("name,keep", [("optimizer.safetensors", 100), ("adapter/adapter_model.safetensors", 5),
                                       ("rng.safetensors", -10), ("adapter/adapter_model.safetensors", None)],
                         ids=["cut-optimizer", "cut-adapter", "cut-rng", "flipped-adapter"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, capsys, name, keep):
    """Files cut short, or a flipped bit that only the weights' checksums reveal (keep=None): both are damage,
    passed over the same way."""
    run = copy_run(straight, tmp_path)
    damaged = run / "checkpoints" / "step_000006" / name
    truncate(damaged, keep) if keep is not None else flip_byte(damaged)
    train(tiny_config(tmp_path, *COMMON))
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if " is damaged" in line]
    assert len(notes) == 1, out
    assert str(damaged) in notes[0] and "step_000003" in notes[0], notes[0]
    assert f"resuming from {run / 'checkpoints' / 'step_000003'} (step 3;" in out
    # It redid steps 4-6 exactly, and the damaged folder no longer counts as a checkpoint.
    assert_same_weights(final_weights(run), final_weights(straight))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in complete_checkpoints(run)] == ["step_000003", "step_000006"]
    assert (run / "checkpoints" / "step_000006.damaged" / name).is_file()


def test_no_loadable_checkpoint_is_one_line_naming_the_files(tmp_path, straight, capsys):
    run = copy_run(straight, tmp_path)
    for step in ("step_000003", "step_000006"):
        truncate(run / "checkpoints" / step / "optimizer.safetensors", 50)
    cfg = tiny_config(tmp_path, *COMMON)
    with pytest.raises(CheckpointError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "no checkpoint" in msg
    assert str(run / "checkpoints" / "step_000006" / "optimizer.safetensors") in msg
    assert str(run / "checkpoints" / "step_000003" / "optimizer.safetensors") in msg
    assert latest_checkpoint(run).name == "step_000006"  # nothing was renamed: the user decides


def test_an_explicit_resume_to_the_checkpoint_before_a_damaged_latest_is_honoured(tmp_path, straight, capsys):
    run = copy_run(straight, tmp_path)
    flip_byte(run / "checkpoints" / "step_000006" / "adapter" / "adapter_model.safetensors")
    older = run / "checkpoints" / "step_000003"
    train(tiny_config(tmp_path, *COMMON, f"train.resume={older}"))
    out = capsys.readouterr().out
    assert f"resuming from {older} (step 3;" in out and "only seeds" not in out, out
    assert_same_weights(final_weights(run), final_weights(straight))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_damaged_seed_checkpoint_is_refused_in_one_line(tmp_path, straight):
    seed = tmp_path / "seed"
    shutil.copytree(straight / "checkpoints" / "step_000003", seed)
    truncate(seed / "rng.safetensors", 20)
    with pytest.raises(CheckpointError, match=rf"{seed / 'rng.safetensors'} is damaged"):
        train(tiny_config(tmp_path / "new", *COMMON, f"train.resume={seed}"))


# --------------------------------------------------------------------------------------- metrics.jsonl

def test_cut_off_last_metrics_line_is_dropped_on_resume(tmp_path, straight):
    run = copy_run(straight, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000006")  # killed while writing step 5's row
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])
    train(tiny_config(tmp_path, *COMMON))
    assert rows(run) == rows(straight)
    assert_same_weights(final_weights(run), final_weights(straight))


def test_a_damaged_metrics_line_before_the_end_is_named(tmp_path, straight, capsys):
    run = copy_run(straight, tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]
    metrics.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tmp_path, *COMMON)
    assert main(["--config", "configs/tiny.yaml", *_overrides(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"higgs-ddp: error: {metrics}:2: ") and "Traceback" not in "".join(err)


def _overrides(cfg) -> list:
    return [f"output_dir={cfg.output_dir}", f"data.manifest={cfg.data.manifest[0]}",
            f"data.cache_dir={cfg.data.cache_dir}", "data.num_workers=0", "data.val_fraction=0", "eval.every=0",
            "eval.prompts=[]", "logging.tensorboard=false", *COMMON]


# ------------------------------------------------------------------------------------------ status.json

def test_an_error_exit_writes_failed_with_the_reason(tmp_path, straight, capsys):
    run = copy_run(straight, tmp_path)
    cfg = tiny_config(tmp_path, *COMMON)
    assert main(["--config", "configs/tiny.yaml", *_overrides(cfg), "train.lr=1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed", status
    assert err == f"higgs-ddp: error: {status['error']}"
    assert "train.lr: 0.005 -> 0.001" in status["error"]


# ------------------------------------------------------------------------------------------- validation

def test_adding_or_moving_the_validation_manifest_does_not_block_a_resume(tmp_path, straight):
    from higgs_ddp.tools.demo_data import write_demo_corpus

    more = write_demo_corpus(tmp_path / "valdata", samples=20)
    rows = [json.loads(x) for x in more.read_text().splitlines()[16:]]
    val = more.with_name("val.jsonl")
    val.write_text("".join(json.dumps({**r, "id": f"val{i}"}) + "\n" for i, r in enumerate(rows)))
    run = copy_run(straight, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000006")
    train(tiny_config(tmp_path, *COMMON, f"data.val_manifest={val}", "eval.every=3"))
    assert_same_weights(final_weights(run), final_weights(straight))
    assert [r["step"] for r in read_metrics(run) if r.get("split") == "val"] == [6]


# ------------------------------------------------------------------------------------------ code cache

@pytest.mark.parametrize("indexed", [True, False], ids=["listed-in-index", "not-yet-indexed"])
def test_damaged_code_cache_shard_is_encoded_again(tmp_path, capsys, indexed):
    from higgs_ddp.data.manifest import read_manifest
    from higgs_ddp.data.prepare import prepare_audio
    from higgs_ddp.runtime.distributed import DistEnv
    from higgs_ddp.tools.demo_data import write_demo_corpus

    entries, problems = read_manifest(str(write_demo_corpus(tmp_path / "data", samples=3, audio=True)))
    assert not problems
    refs = [r for e in entries for r in e.audio]

    def prepare():
        return prepare_audio(refs, str(tmp_path / "cache"), "tiny", None, 30, DistEnv(), 0, quiet=True)

    first = prepare()
    # The codes are views into the mapped shard (code_cache.map_shard): keep a copy before cutting the
    # file under the mapping (measured here: the cut part then reads as zeros; a kernel may SIGBUS instead).
    first_codes = {path: codes.copy() for path, codes in first.codes.items()}
    [shard] = list((tmp_path / "cache").glob("*/part-*.safetensors"))
    truncate(shard, 40)
    if not indexed:
        (shard.parent / "index.json").unlink()
    capsys.readouterr()
    again = prepare()
    n = first.stats["encoded"]
    assert n >= 3 and (again.stats["cached"], again.stats["encoded"], again.stats["failed"]) == (0, n, 0)
    assert again.codes.keys() == first_codes.keys()
    for path, codes in first_codes.items():
        assert (again.codes[path] == codes).all()
    err = capsys.readouterr().err
    assert f"{shard} is damaged" in err and len(err.strip().splitlines()) == 1, err
    assert not shard.exists()
    third = prepare()
    assert (third.stats["cached"], third.stats["encoded"]) == (n, 0)


# ------------------------------------------------------------------------------------ another world size

@pytest.mark.slow
def test_resume_on_fewer_ranks_continues_at_the_same_micro_batch(tmp_path, capsys):
    """2 ranks x 2 samples for 3 steps used micro-batches 0-5 of epoch 0 (8 per epoch); 1 rank goes on
    with 6 and 7, then epoch 1. Resuming by step instead would replay micro-batches 3-5."""
    cfg = tiny_config(tmp_path, *COMMON)
    proc = torchrun(2, "--config", "configs/tiny.yaml", *_overrides(cfg), "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(tiny_config(tmp_path, *COMMON, "train.resume_accept=[world_size,train.max_steps]"))
    out = capsys.readouterr().out
    assert "continues at the same micro-batch (epoch 0, micro-batch 6)" in out, out
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints" / "step_000006" / "state.json").read_text())
    assert (state["world_size"], state["data"]["epoch"], state["data"]["micro_batches_into_epoch"]) == (1, 1, 1)
    assert [r["samples"] for r in read_metrics(run)] == [4, 4, 4, 2, 2, 2]


@pytest.mark.slow
def test_two_ranks_fall_back_together(tmp_path):
    """Both ranks pass over the damaged checkpoint and load the same one; only rank 0 renames it."""
    cfg = tiny_config(tmp_path, *COMMON)
    args = ("--config", "configs/tiny.yaml", *_overrides(cfg))
    assert torchrun(2, *args).returncode == 0
    run = tmp_path / "run"
    straight = final_weights(run)
    shutil.rmtree(run / "final")
    truncate(run / "checkpoints" / "step_000006" / "rng.safetensors", 30)
    proc = torchrun(2, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" is damaged") == 1 and "resuming from step_000003" in proc.stdout, proc.stdout
    assert_same_weights(final_weights(run), straight)
    assert (run / "checkpoints" / "step_000006.damaged").is_dir()
