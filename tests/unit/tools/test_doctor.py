"""`higgs-ddp doctor`: real checks on this machine, and each failure it must name with its fix.

The doctor runs in-process through ``main(argv)``; its output is checked line by line (every line is one
status line, a FAIL never spans lines). Hub checks run against a throwaway HF cache with HF_HUB_OFFLINE=1,
and a guard makes any attempt to reach the hub fail the test."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from higgs_ddp.config import OFFICIAL_CODEC, OFFICIAL_CODEC_REVISION, OFFICIAL_REPO, OFFICIAL_REVISION, ConfigError, load_config
from higgs_ddp.tools import doctor
from helpers import QUIET, ROOT, dpo_overrides, tiny_config, write_tiny_pairs

TINY = ROOT / "configs" / "tiny.yaml"
STATUS = re.compile(r"^(OK   |WARN |FAIL )\S")


def run(capsys, *argv) -> tuple[int, list]:
    rc = doctor.main([str(a) for a in argv])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("doctor: ")
    for line in lines[:-1]:  # each check is one line: a FAIL with a newline in it would break this
        assert STATUS.match(line), line
    fails = [line for line in lines if line.startswith("FAIL ")]
    assert rc == (1 if fails else 0), lines
    assert lines[-1].startswith(f"doctor: {len(fails)} FAIL")
    return rc, lines


def one(lines: list, prefix: str) -> str:
    hits = [line for line in lines if line.startswith(prefix)]
    assert len(hits) == 1, (prefix, lines)
    return hits[0]


def write_manifest(folder: Path, lines: list) -> Path:
    """``lines``: dicts (a sample; its codes file is created) or raw strings (written as they are)."""
    (folder / "codes").mkdir(parents=True, exist_ok=True)
    out = []
    for i, line in enumerate(lines):
        if isinstance(line, dict):
            if "audio_codes" in line and line.get("_create", True):
                np.save(folder / line["audio_codes"], np.zeros((4, 5), dtype=np.int64))
            line = json.dumps({k: v for k, v in line.items() if k != "_create"})
        out.append(line)
    path = folder / "train.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def sample(i: int, **extra) -> dict:
    return {"text": f"sample {i}", "audio_codes": f"codes/{i}.npy", **extra}


@pytest.fixture
def tiny_args(tmp_path):
    manifest = write_manifest(tmp_path / "data", [sample(i) for i in range(3)])
    # configs/tiny.yaml's listening prompts need `make demo`'s clips; test_eval_prompts covers them
    return ["--config", TINY, f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", "eval.prompts=[]"]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF cache, HF_HUB_OFFLINE=1, and a guard: any call to the hub fails the test."""
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the doctor reached for the hub while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    return cache


def cache_repo(cache: Path, repo: str, files: dict, revision: str = "0" * 40, ref: str = "main") -> None:
    """A repo in the HF cache's own layout: refs/<ref> -> snapshots/<revision>/<files>."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / ref).write_text(revision)
    snap = base / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (snap / name).write_text(content)


# --------------------------------------------------------------------------------------- this machine


def test_this_machine_with_the_tiny_config_passes(capsys, tiny_args):
    rc, lines = run(capsys, *tiny_args)
    assert rc == 0
    assert one(lines, "OK   Python 3.1")
    assert one(lines, "OK   torch 2.")
    assert one(lines, "OK   torchaudio 2.")
    assert one(lines, "OK   torchaudio imports with torch")
    assert one(lines, "OK   transformers 4.")
    assert one(lines, "OK   boson_multimodal's HiggsAudioModel imports")
    if torch.cuda.is_available():
        assert one(lines, "OK   CUDA")
        assert one(lines, "OK   NCCL")
    else:
        assert one(lines, "WARN ") == "WARN no CUDA device: training runs on CPU with gloo (fine for the demo)"
    assert "3 samples" in one(lines, "OK   manifest ")
    assert one(lines, "OK   model: random init")
    assert one(lines, "OK   codec: tiny")
    assert one(lines, "OK   lora.target_modules: each of the 10 entries names modules of the model")
    assert one(lines, "OK   train.precision=auto, model.attn_implementation=sdpa: this machine")
    assert "fill an optimizer step of 2 per rank" in one(lines, "OK   batch: ")
    disk = one(lines, "OK   disk: ")
    assert "3 checkpoints" in disk and "25,600 trainable parameters" in disk  # tiny LoRA, keep_last 2 + 1


def test_a_dpo_config_reports_its_pairs_and_their_problems(tmp_path):
    """The config's checks (main's environment lines are the other tests'): the pairs instead of manifests."""
    pairs = write_tiny_pairs(tmp_path / "prefs", prompts=3, cut=(1,))
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", "eval.prompts=[]", *dpo_overrides(pairs)])
    lines = [r.line() for name, check in doctor.config_checks(cfg) if name != "lora"  # (it builds the model)
             for r in doctor._guarded(name, check)]
    assert not any(line.startswith("FAIL") or "manifest" in line for line in lines), lines
    assert one(lines, f"OK   preferences {pairs}: ") == (
        f"OK   preferences {pairs}: 3 pairs of 3 prompt(s), 1 cut candidate(s); every line parses, every candidate's "
        f"codes read; made for this run's codec, tokenizer and codebooks")
    assert one(lines, f"WARN preferences {pairs}: 5 candidate(s) do not say whether they stopped")
    # the run's own split: configs/tiny.yaml's data.val_fraction holds one of the three prompts out
    assert "2 training pairs fill an optimizer step of 2 per rank" in one(lines, "OK   batch: ")
    header = pairs.parent / "prefs.json"
    header.write_text(header.read_text().replace('"num_codebooks": 4', '"num_codebooks": 8'))
    (pairs.parent / "codes" / "part-00000.safetensors").write_bytes(b"damaged")
    assert [r.line() for r in doctor.check_preferences(cfg)] == [
        f"FAIL preferences: {header}: num_codebooks is 8, this run's is 4: the pairs were made for another model; "
        f"build them again with this run's model and codec: fix it, or build the pairs again (higgs-ddp prefs build)"]
    header.write_text(header.read_text().replace('"num_codebooks": 8', '"num_codebooks": 4'))
    assert doctor.check_preferences(cfg)[0].line().startswith(
        f"FAIL preferences: {pairs}:1: chosen codes codes/part-00000.safetensors: not a readable shard")


def test_environment_only_without_a_config(capsys):
    rc, lines = run(capsys)
    assert rc == 0
    assert not [line for line in lines if "manifest" in line or "disk" in line]


def test_cli_exits_1_on_a_fail_without_traceback():
    r = subprocess.run([sys.executable, "-m", "higgs_ddp", "doctor", "--config", str(TINY), "train.lrr=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert one(r.stdout.splitlines(), "FAIL config: unknown config key 'train.lrr'")


# ------------------------------------------------------------------------------------------- failures


def test_bad_config_key_is_the_config_error(capsys, tiny_args):
    with pytest.raises(ConfigError) as e:
        load_config(str(TINY), ["train.lrr=1"])
    rc, lines = run(capsys, *tiny_args, "train.lrr=1")
    assert rc == 1
    assert one(lines, "FAIL config:") == f"FAIL config: {e.value}"
    assert not [line for line in lines if line.startswith(("OK   manifest", "FAIL manifest", "OK   disk"))]


def test_missing_manifest(capsys, tiny_args, tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    rc, lines = run(capsys, *tiny_args, f"data.manifest={missing}")
    assert rc == 1
    assert one(lines, f"FAIL manifest {missing}: not found")


def test_manifest_problems_name_file_and_line(capsys, tmp_path, tiny_args):
    path = write_manifest(tmp_path / "bad", [
        sample(0),
        '{"text": "cut off", ',  # line 2
        {"audio_codes": "codes/2.npy"},  # line 3: no text
        sample(3, _create=False),  # line 4: its codes file does not exist
        sample(4),
    ])
    rc, lines = run(capsys, *tiny_args, f"data.manifest={path}")
    assert rc == 1
    fail = one(lines, f"FAIL manifest {path}: 3 problems in 5 lines: ")
    assert f"{path}:2: invalid JSON" in fail
    assert f"{path}:3: missing field 'text'" in fail
    assert f"{path}:4: codes file codes/3.npy not found" in fail
    assert "data.on_error=skip" in fail

    rc, lines = run(capsys, *tiny_args, f"data.manifest={path}", "data.on_error=skip")
    assert rc == 0  # skip: the run trains on the rest, so the doctor warns instead
    assert "skipped and counted" in one(lines, f"WARN manifest {path}: 3 problems")


def test_only_first_three_problems_are_listed(capsys, tmp_path, tiny_args):
    path = write_manifest(tmp_path / "bad", ["not json"] * 5 + [sample(5)])
    _, lines = run(capsys, *tiny_args, f"data.manifest={path}")
    fail = one(lines, f"FAIL manifest {path}: 5 problems in 6 lines: ")
    assert f"{path}:3:" in fail and f"{path}:4:" not in fail and "; ..." in fail


def test_audio_headers_are_judged_by_the_runs_duration_rule(capsys, tmp_path, tiny_args):
    """A 20 ms clip fails here as it fails at the start of training ("too short for the codec"), and so
    does one under data.audio.min_seconds (issue 30, item 11)."""
    import soundfile as sf

    from higgs_ddp.tools.demo_data import text_to_wave

    folder = tmp_path / "clips"
    (folder / "wavs").mkdir(parents=True)
    for name, seconds in (("ok", 0.6), ("blip", 0.02), ("short", 0.3)):
        sf.write(folder / "wavs" / f"{name}.wav", text_to_wave("some words here")[: int(seconds * 8000)], 8000)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": n, "audio": f"wavs/{n}.wav"}) + "\n" for n in ("ok", "blip", "short")))
    rc, lines = run(capsys, *tiny_args, f"data.manifest={path}")
    assert one(lines, f"OK   manifest {path}")  # every line parses, every file exists
    assert one(lines, "FAIL audio: ") == (
        f"FAIL audio: 1 sample with a file training refuses: {path}:2: audio wavs/blip.wav is too short for the "
        f"codec: 20.0 ms, its encoder needs 39.0 ms: fix or drop these lines, or set data.on_error=skip to train "
        f"on the rest")
    _, lines = run(capsys, *tiny_args, f"data.manifest={path}", "data.audio.min_seconds=0.5", "data.on_error=skip")
    assert f"{path}:3: audio wavs/short.wav lasts 0.30 s, less than data.audio.min_seconds=0.5" in one(
        lines, "WARN audio: 2 samples with a file training refuses: ")
    _, lines = run(capsys, *tiny_args)  # .npy codes only: no audio line
    assert not [line for line in lines if line[5:].startswith("audio")]


def test_local_model_folder_checks(capsys, tmp_path, tiny_args):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    args = [*tiny_args, "model.init=pretrained", f"model.path={folder}"]
    rc, lines = run(capsys, *args)
    assert rc == 1
    fail = one(lines, f"FAIL model {folder}: ")
    assert "the folder has no config.json" in fail and "weights" not in fail.split(":")[1]

    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _, lines = run(capsys, *args)
    assert "model_type 'llama', not 'higgs_audio'" in one(lines, f"FAIL model {folder}: ")

    raw = load_config(str(TINY)).model.config
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "higgs_audio"}))
    rc, lines = run(capsys, *args)
    assert rc == 0
    assert one(lines, f"OK   model {folder}: local checkpoint folder")

    rc, lines = run(capsys, *tiny_args, "model.init=pretrained", f"model.path={tmp_path / 'absent' / 'ckpt'}")
    assert rc == 1 and "no such folder" in one(lines, "FAIL model ")


def test_too_little_disk(capsys, tiny_args):
    # 10^9 checkpoints of the full tiny model, all kept: far more than any disk
    rc, lines = run(capsys, *tiny_args, "train.mode=full", "train.max_steps=1000000000", "train.save_every=1",
                    "train.keep_last=0")
    assert rc == 1
    fail = one(lines, "FAIL disk: ")
    free, need = (float(x.replace(",", "")) for x in re.search(
        r"([\d,.]+) GB free at .*, checkpoints need about ([\d,.]+) GB", fail).groups())
    assert need > free > 0
    assert "1,000,000,000 checkpoints" in fail and "192,064 trainable parameters" in fail
    assert "lower train.keep_last" in fail


def test_disk_check_with_a_given_need(tiny_args):
    cfg = load_config(str(TINY), tiny_args[2:])
    free = shutil.disk_usage(doctor._existing_parent(Path(cfg.output_dir))).free
    assert doctor.check_disk(cfg, need_bytes=1e6).status == "OK"
    assert doctor.check_disk(cfg, need_bytes=free * 0.7).status == "WARN"
    result = doctor.check_disk(cfg, need_bytes=free * 10)
    assert result.status == "FAIL" and f"{free / 1e9:,.1f} GB free" in result.message


def test_uncached_hub_model_offline(capsys, tiny_args, offline_hub):
    rc, lines = run(capsys, *tiny_args, "model.init=pretrained", f"model.path={OFFICIAL_REPO}")
    assert rc == 1
    fail = one(lines, f"FAIL model {OFFICIAL_REPO}@{OFFICIAL_REVISION}: ")
    assert "not in the HF cache" in fail and "HF_HUB_OFFLINE is set" in fail
    assert f"`huggingface-cli download {OFFICIAL_REPO} --revision {OFFICIAL_REVISION}`" in fail
    assert "the model's config.json is neither local nor in the HF cache" in one(lines, "WARN lora.target_modules")
    # the disk estimate falls back to the official model's size
    assert "sized as the official 3B model" in one(lines, "OK   disk: ")


def test_cached_hub_model_and_codec(capsys, tmp_path, offline_hub):
    repo = "someone/higgs-finetune"
    raw = load_config(str(TINY)).model.config
    cache_repo(offline_hub, repo, {"config.json": json.dumps({**raw, "model_type": "higgs_audio"}),
                                   "tokenizer_config.json": "{}"})
    # clips as audio, not codes: the codec is needed
    (tmp_path / "data").mkdir()
    import soundfile as sf

    sf.write(tmp_path / "data" / "a.wav", np.zeros(8000, np.float32), 8000)  # headers are read: a real WAV
    manifest = tmp_path / "data" / "train.jsonl"
    manifest.write_text("".join(json.dumps({"text": f"hi {i}", "audio": "a.wav"}) + "\n" for i in range(6)))
    args = ["--config", TINY, f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", "eval.prompts=[]",
            "model.init=pretrained", f"model.path={repo}", "model.tokenizer=null", f"data.codec={OFFICIAL_CODEC}"]

    cache_repo(offline_hub, repo, {"config.json": json.dumps({"model_type": "higgs_audio_v2"})},
               revision="5" * 40, ref="v5")
    _, lines = run(capsys, *args[:-2], "model.revision=v5")  # a format boson_multimodal cannot load
    assert "model_type 'higgs_audio_v2', not 'higgs_audio'" in one(lines, f"FAIL model {repo}@v5: config.json")

    rc, lines = run(capsys, *args)  # config cached, weights not
    fail = one(lines, f"FAIL model {repo}@main: ")
    assert "the weights (model*.safetensors) not in the HF cache" in fail
    # the official codec is read at its pinned revision (its hub main no longer loads)
    assert f"`huggingface-cli download {OFFICIAL_CODEC} --revision {OFFICIAL_CODEC_REVISION}`" in \
        one(lines, f"FAIL codec {OFFICIAL_CODEC}@{OFFICIAL_CODEC_REVISION}: ")

    cache_repo(offline_hub, repo, {"model.safetensors": ""})
    cache_repo(offline_hub, OFFICIAL_CODEC, {"config.json": "{}", "model.pth": ""}, revision=OFFICIAL_CODEC_REVISION)
    rc, lines = run(capsys, *args)
    assert one(lines, f"OK   model {repo}@main: in the HF cache")
    assert one(lines, f"OK   codec {OFFICIAL_CODEC}@{OFFICIAL_CODEC_REVISION}: in the HF cache")
    # the codec builds its HuBERT teacher from the hub too
    assert "huggingface-cli download bosonai/hubert_base" in one(lines, "FAIL codec teacher bosonai/hubert_base")
    assert rc == 1

    cache_repo(offline_hub, "bosonai/hubert_base", {"config.json": "{}"})
    rc, lines = run(capsys, *args)
    assert rc == 0, lines
    # the cached config.json: the LoRA targets are checked against its modules, the disk sized by it
    assert one(lines, "OK   lora.target_modules: each of the 10 entries")
    assert "25,600 trainable parameters" in one(lines, "OK   disk: ")


def test_codec_not_needed_when_every_clip_is_codes(capsys, tiny_args, offline_hub):
    rc, lines = run(capsys, *tiny_args, f"data.codec={OFFICIAL_CODEC}")
    assert rc == 0
    assert one(lines, f"OK   codec {OFFICIAL_CODEC}: not needed")


def test_eval_prompts(capsys, tmp_path, tiny_args):
    ref = tmp_path / "ref.wav"
    prompts = f"eval.prompts=[{{text: hello}}, {{text: again, reference_audio: {ref}, reference_text: hi}}]"
    rc, lines = run(capsys, *tiny_args, prompts)
    assert rc == 1
    assert one(lines, f"FAIL eval.prompts[1].reference_audio: audio {ref} not found")
    ref.write_bytes(b"RIFF")  # there, but not audio: the run's own check refuses it, so does the doctor
    rc, lines = run(capsys, *tiny_args, prompts)
    assert rc == 1 and one(lines, f"FAIL eval.prompts[1].reference_audio: audio {ref} is not a readable audio file")
    import numpy as np
    import soundfile as sf
    sf.write(str(ref), 0.1 * np.sin(np.arange(8000) * 0.05).astype(np.float32), 8000)
    rc, lines = run(capsys, *tiny_args, prompts)
    assert rc == 0 and one(lines, "OK   eval.prompts: 2 prompts, 1 reference audio file that reads")


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> list:
    """A real run of one step that saved a checkpoint; returns the doctor's arguments for its config."""
    from higgs_ddp.train import train

    tmp = tmp_path_factory.mktemp("resume")
    same = ("train.max_steps=1", "train.save_every=1")
    cfg = tiny_config(tmp, *same)
    train(cfg)
    return ["--config", TINY, f"output_dir={cfg.output_dir}", f"data.manifest={cfg.data.manifest[0]}",
            f"data.cache_dir={cfg.data.cache_dir}", "data.num_workers=0", *QUIET, *same]


def test_resume_is_judged_by_the_runs_own_checks(capsys, tmp_path, one_step_run):
    """checkpoint.resume_point and check_resumable decide, as in the run: a resume the run would refuse
    (another train.lr) is a FAIL, not "resumes from step_N"."""
    rc, lines = run(capsys, *one_step_run)
    assert rc == 0 and "resumes from step_000001 (train.resume=auto" in one(lines, "OK   output_dir ")

    rc, lines = run(capsys, *one_step_run, "train.lr=1e-3")
    fail = one(lines, "FAIL output_dir ")
    assert rc == 1 and "cannot resume from" in fail and "train.lr: 0.003 -> 0.001" in fail
    assert "train.resume_accept=[train.lr]" in fail
    rc, lines = run(capsys, *one_step_run, "train.lr=1e-3", "train.resume_accept=[train.lr]")
    assert rc == 0 and one(lines, "OK   output_dir ")

    rc, lines = run(capsys, *one_step_run, "train.resume=never")
    assert rc == 1 and "train.resume=never but" in one(lines, "FAIL output_dir ")
    rc, lines = run(capsys, *one_step_run, f"train.resume={tmp_path / 'nowhere'}")
    assert rc == 1 and "not a complete checkpoint folder" in one(lines, "FAIL output_dir ")


def test_an_unfinished_checkpoint_folder_is_not_resumed_from(capsys, tmp_path, tiny_args):
    (tmp_path / "run" / "checkpoints" / "step_000050").mkdir(parents=True)  # no state.json: never completed
    rc, lines = run(capsys, *tiny_args, "train.resume=never")
    assert rc == 0 and not [line for line in lines if line[5:].startswith("output_dir ")]


# -------------------------------------------------------------------- the run's start-up checks


@pytest.mark.parametrize("overrides, prefix, message", [
    (["data.val_fraction=0", "eval.every=5"], "FAIL config: ", "eval.every needs a validation set"),
    (["lora.target_modules=[nope]"], "FAIL lora.target_modules ",
     "lora.target_modules entry 'nope' matches no module of the model"),
    (["train.micro_batch_size=4"], "FAIL batch: ",  # the 3 samples of tiny_args
     "one optimizer step needs 4 (ranks 1 x train.grad_accum_steps 1 x train.micro_batch_size 4)"),
    (["model.attn_implementation=flash_attention_2"], "FAIL model.attn_implementation=flash_attention_2 needs", ""),
])
def test_what_the_run_refuses_at_start_up_fails_here(capsys, tiny_args, overrides, prefix, message):
    rc, lines = run(capsys, *tiny_args, *overrides)
    assert rc == 1 and message in one(lines, prefix)


@pytest.mark.parametrize("name", ["bench_tiny.yaml", "bench_3b.yaml"])
def test_benchmark_configs_need_no_manifest(capsys, name):
    rc, lines = run(capsys, "--config", ROOT / "configs" / name)
    assert rc == 0, lines
    assert one(lines, "OK   data.manifest: none, and none needed: a benchmark config")
    assert "bench.samples fill an optimizer step" in one(lines, "OK   batch: ")
    assert one(lines, "OK   lora.target_modules: each of the 10 entries names modules of the model")
    # a training config without a manifest still fails
    rc, lines = run(capsys, "--config", TINY, "data.manifest=[]", "eval.prompts=[]")
    assert rc == 1 and one(lines, "FAIL data.manifest is empty")


def test_a_crashing_check_is_one_fail_line():
    def broken():
        raise ValueError("first line\nsecond line")

    [result] = doctor._guarded("broken", broken)
    assert result.line() == "FAIL broken: ValueError: first line"
    assert doctor.Result("FAIL", "a\nb:  c").line() == "FAIL a b: c"


# ------------------------------------------------------------------------------------ size estimate


def test_parameter_estimate_matches_the_real_tiny_model():
    from higgs_ddp.model import apply_training_mode, build_model, load_tokenizer

    for mode in ("full", "audio_ffn", "lora"):
        cfg = load_config(str(TINY), [f"train.mode={mode}"])
        model = apply_training_mode(build_model(cfg, load_tokenizer(cfg)), cfg)
        real = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert doctor.Dims.from_config(cfg.model.config).count(mode, cfg.lora.target_modules, cfg.lora.r) == real


def test_parameter_estimate_matches_the_3b_architecture():
    """bench_3b.yaml is the real model's architecture; built on the meta device (no memory)."""
    from higgs_ddp.model import _import_higgs, apply_training_mode, load_tokenizer, model_config

    _, HiggsAudioModel = _import_higgs()
    cfg = load_config(str(ROOT / "configs" / "bench_3b.yaml"))
    dims = doctor.Dims.from_config(cfg.model.config)
    assert dims == doctor.Dims.from_config(doctor.OFFICIAL_DIMS)  # the fallback is this model
    with torch.device("meta"):
        model = HiggsAudioModel(model_config(cfg, load_tokenizer(cfg)))
    assert dims.count("full") == sum(p.numel() for p in model.parameters())  # 5.77B
    model = apply_training_mode(model, load_config(str(ROOT / "configs" / "bench_3b.yaml"), ["train.mode=audio_ffn"]))
    assert dims.count("audio_ffn") == sum(p.numel() for p in model.parameters() if p.requires_grad)
