"""Every helper the tests share, in one module (test modules never import one another): the tiny config (the
same file the demo uses) on a synthetic corpus, a torchrun launcher, and the runs, configs and comparisons that
several test modules reuse. conftest.py holds only pytest's hooks and the shared fixtures."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FIXTURES = ROOT / "tests" / "fixtures"
# The demo's validation split, listening samples and TensorBoard: off unless a test asks for them. Like
# data.num_workers=0 below, not what users run: write_user_config (below) turns them all back on for
# one test of each fault kind (stop signals, a killed rank, Slurm).
QUIET = ("data.val_fraction=0", "eval.every=0", "eval.prompts=[]", "logging.tensorboard=false")


def tiny_config(tmp_path, *overrides, samples=16, audio=False):
    """configs/tiny.yaml on a fresh synthetic corpus: .npy codes, or WAV files (audio=True) for the codec."""
    from higgs_ddp.config import load_config
    from higgs_ddp.tools.demo_data import write_demo_corpus

    manifest = write_demo_corpus(tmp_path / "data", samples=samples, audio=audio)
    return load_config(str(TINY), [f"output_dir={tmp_path / 'run'}", f"data.manifest={manifest}",
                                   f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", *QUIET, *overrides])


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun_cmd(nproc, *args, launcher=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *launcher, str(ROOT / "src" / "higgs_ddp" / "train.py"), *map(str, args)]


def torchrun(nproc, *args, timeout=300):
    """Run train.py under torchrun on CPU; returns the CompletedProcess (output captured)."""
    return subprocess.run(torchrun_cmd(nproc, *args), capture_output=True, text=True, timeout=timeout,
                          env=TORCHRUN_ENV, cwd=ROOT)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# Exact resume (unit/training/test_checkpoint_resume.py; the faults, FSDP, several nodes and Slurm compare the same way).
RESUME_RUN = ("train.max_steps=6", "train.save_every=3", "train.keep_last=0", "train.lr=5e-3",
              "train.warmup_steps=1", "train.seed=11", "lora.dropout=0.1")
SAME_LOGGED = ("loss", "text_loss", "audio_loss", "per_codebook_loss", "grad_norm", "lr", "tokens", "audio_targets")


def final_weights(run: Path) -> dict:
    folder = run / "final"
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "trainable.safetensors"
    return load_file(str(folder / name))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rows(run: Path) -> list:
    return [{k: m[k] for k in ("step", *SAME_LOGGED)} for m in read_metrics(run)]


# The run of tests/fixtures/checkpoint_d70f823 (its make.py and test_checkpoint_resume.py use both).
D70F823 = ("train.max_steps=4", "train.save_every=2", "train.keep_last=0", "train.lr=5e-3", "train.warmup_steps=1",
           "train.seed=11", "lora.dropout=0.1", "lora.r=2")


def digest(folder: Path) -> str:
    """sha256 over a final/ adapter's tensors (names and bytes): equal only for bit-identical weights."""
    weights, h = load_file(str(folder / "adapter_model.safetensors")), hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].contiguous().numpy().tobytes())
    return h.hexdigest()


# Batch 2 == accumulation 2 == 2 ranks (distributed/test_data_parallel_equivalence.py, also bf16, FSDP, mixed turns).
EQUIVALENCE_RUN = ("train.max_steps=3", "train.lr=5e-3", "train.warmup_steps=1", "train.seed=7")


def weights(run, mode):
    name = "adapter_model.safetensors" if mode == "lora" else "trainable.safetensors"
    return load_file(str(run / "final" / name))


def run_two_ranks(tmp_path, name, mode, *overrides):
    cfg = tiny_config(tmp_path / name, f"train.mode={mode}", *EQUIVALENCE_RUN, *overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = torchrun(2, "--config", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / name / "run"


def run_two_ranks_each(tmp_path, runs: dict) -> dict:
    """run_two_ranks for several independent runs ({name: (mode, overrides)}) in one 2-rank torchrun start
    (tests/train_each_worker.py): {name: run folder}."""
    paths = []
    for name, (mode, overrides) in runs.items():
        cfg = tiny_config(tmp_path / name, f"train.mode={mode}", *EQUIVALENCE_RUN, *overrides)
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(cfg.to_dict()))
    train_two_ranks_each(*paths)
    return {name: tmp_path / name / "run" for name in runs}


def train_two_ranks_each(*configs):
    """Train each config file on 2 ranks, one after the other, in one torchrun start (tests/train_each_worker.py)."""
    cmd = [*torchrun_cmd(2)[:-1], str(ROOT / "tests" / "train_each_worker.py"), *map(str, configs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300 * len(configs), env=TORCHRUN_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


# One micro-batch's loss parts and gradients (unit/training/test_perf_switches.py, also bf16).
PLAIN = ("train.text_logits=all", "train.activation_checkpointing=false")


def first_step(tmp_path, name, *overrides, mode="lora"):
    """Loss parts and gradients of the first micro-batch, with LoRA dropout on (so the RNG matters)."""
    from higgs_ddp.runtime.distributed import DistEnv
    from higgs_ddp.training.trainer import Trainer

    cfg = tiny_config(tmp_path / name, f"train.mode={mode}", "lora.dropout=0.2", "train.micro_batch_size=2",
                      *overrides)
    trainer = Trainer(cfg, DistEnv())
    batch = next(iter(trainer.loader))
    calls = []
    head = trainer.raw.audio_decoder_proj.text_lm_head
    # Output shapes of the text head (while deferred inside the model it passes hidden states through).
    handle = head.register_forward_hook(lambda m, args, out: calls.append(tuple(out.shape)))
    torch.manual_seed(0)
    with trainer.autocast:  # the trainer's numerics (fp32 here; test_bf16.py passes train.precision=bf16)
        out = trainer.wrapped(**batch.model_inputs())
        dl = trainer.loss(out, batch, check=True)
    dl.loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in trainer.named_params}
    return dl, grads, calls, trainer


def assert_same(a, b, exact=True):
    (dl_a, g_a), (dl_b, g_b) = a, b
    # Not exact: a matmul over a subset of rows sums in another order than over all of them (~1e-7 relative).
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6))
    for part in ("loss", "text_loss", "audio_loss", "per_codebook_loss"):
        assert check(getattr(dl_a, part).detach(), getattr(dl_b, part).detach()), part
    assert (int(dl_a.text_tokens), int(dl_a.audio_tokens)) == (int(dl_b.text_tokens), int(dl_b.audio_tokens))
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        assert check(g_a[k], g_b[k]), k


# Validation and listening prompts (unit/evaluation/test_validation.py, also bf16).
def val_rows(run):
    return [r for r in read_metrics(run) if r.get("split") == "val"]


def listening_prompts(tmp_path) -> list:
    """Three prompts (2 ranks share them unevenly), one cloning a reference clip."""
    ref = tmp_path / "ref.wav"
    sf.write(str(ref), 0.1 * np.sin(np.arange(12_000) * 0.05).astype(np.float32), 24_000)
    return [{"text": "hello there"}, {"text": "say this", "reference_audio": str(ref), "reference_text": "a tone"},
            {"text": "and a third"}]


# Samples without audio out (unit/model/test_mixed_turns.py, also FSDP).
TEXT_ONLY = {"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": "what is the river"},
                          {"role": "assistant", "content": "a quiet river runs home"}]}


def audio_in_only(codes: str) -> dict:
    return {"messages": [{"role": "system", "content": "Transcribe the audio."},
                         {"role": "user", "content": {"type": "audio", "audio_url": codes}},
                         {"role": "assistant", "content": "seven small birds"}]}


def mix_manifest(manifest, kinds=("text", "audio_in")) -> list[str]:
    """Rewrite a demo manifest of .npy codes so that every even line is a sample without audio out (text
    only, or audio in with a text answer, in turn) and every odd line a TTS sample. With shuffle off and
    micro-batches of 1, rank 0 of 2 then gets the samples without audio out and rank 1 the TTS ones."""
    tts = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines, kinds_written = [], []
    for i, rec in enumerate(tts):
        kind = kinds[i % len(kinds)]
        other = TEXT_ONLY if kind == "text" else audio_in_only(rec["audio_codes"])
        lines += [json.dumps({"id": f"{kind}{i}", **other}), json.dumps(rec)]
        kinds_written += [kind, "tts"]
    manifest.write_text("\n".join(lines) + "\n")
    return kinds_written


def mixed_val_manifest(folder, samples: int):
    """A validation set of its own (other clips, other ids: validation may not share training's), mixed
    like the training set: 2 * samples lines."""
    from higgs_ddp.tools.demo_data import write_demo_corpus

    manifest = write_demo_corpus(folder, samples=samples, seed=1, with_reference_every=0)
    mix_manifest(manifest)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**rec, "id": f"val-{rec['id']}"}) + "\n" for rec in lines))
    return manifest


# best/ and early stopping (unit/training/test_best_and_early_stop.py, also export).
# lr 0.05: the validation loss improves at steps 1 and 2, then gets worse at step 3 (measured)
EARLY = ("train.max_steps=10", "train.save_every=1", "train.keep_last=0", "train.lr=0.05", "train.warmup_steps=1",
         "train.seed=11", "lora.dropout=0.1", "data.val_fraction=0.3", "eval.every=1", "eval.best_by=val_loss",
         "eval.early_stop_patience=1")


# Damaged files (unit/training/test_resume_after_damage.py, also export and speak).
def flip_byte(path: Path) -> None:
    """One bit flipped in the last byte of a safetensors file's data (the sign and exponent byte of its last
    fp32 value): the file still reads, only its weights' checksums can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# A checkpoint folder without training (unit/tools/test_export.py, also speak).
def make_checkpoint(tmp_path, mode="lora", *overrides):
    """A checkpoint folder as training writes it (less the optimizer and RNG states, which export does not
    read), with trained weights stood in for by seeded noise and their checksums in state.json."""
    from higgs_ddp.model import apply_training_mode, build_model, load_tokenizer
    from higgs_ddp.training.checkpoint import weight_checksums

    cfg = tiny_config(tmp_path, f"train.mode={mode}", *overrides, samples=2)
    tok = load_tokenizer(cfg)
    model = apply_training_mode(build_model(cfg, tok), cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000120"
    ckpt.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if mode == "lora" and "lora_B" in name:  # B starts at zero: the adapter would be a no-op
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif mode != "lora" and p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    if mode == "lora":
        model.save_pretrained(str(ckpt / "adapter"), safe_serialization=True)
    else:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(ckpt / "trainable.safetensors"))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = dict(zip([n for n, _ in trainable], weight_checksums(trainable).tolist()))
    (ckpt / "state.json").write_text(json.dumps({"step": 120, "weight_checksums": sums}))
    shutil.rmtree(tmp_path / "data")  # export must not need the training data
    return cfg, tok, model, ckpt


def two_samples(tok, config):
    """A collated batch of two TTS samples (one with a scene and a reference voice), random codes, seeded."""
    from higgs_ddp.data.collator import HiggsCollator
    from higgs_ddp.data.prompt import tokenize_sample

    g = torch.Generator().manual_seed(1)
    C, CB = config.audio_num_codebooks, config.audio_codebook_size
    samples = [tokenize_sample(tok, "hello there", torch.randint(0, CB, (C, 9), generator=g)),
               tokenize_sample(tok, "a b c", torch.randint(0, CB, (C, 5), generator=g), scene="a room",
                               ref_text="ref", ref_codes=torch.randint(0, CB, (C, 7), generator=g))]
    return HiggsCollator.for_model(config)(samples)


# Steering what the tiny model speaks (unit/evaluation/test_listening_samples.py, also speak).
def steer(raw, bonus):
    """A forward hook on the audio head: ``bonus(step)`` -> {stream token id: logit added} for the audio
    step ``step`` (1 = the first frame column after the stream BOS); a value is one number for every
    codebook or a list, one per codebook."""
    mc = raw.config
    calls = SimpleNamespace(n=0, prompt_rows=[])

    def hook(module, args, out):
        if out.shape[0] != 1:  # the prompt's forward (reference audio positions), not a decoding step
            calls.prompt_rows.append(out.shape[0])
            return out
        calls.n += 1
        logits = out.view(1, mc.audio_num_codebooks, mc.audio_codebook_size + 2).clone()
        for token, value in bonus(calls.n).items():
            logits[0, :, token] += torch.as_tensor(value, dtype=logits.dtype)
        return logits.view_as(out)

    handle = raw.audio_decoder_proj.audio_lm_head.register_forward_hook(hook)
    handle.calls = calls
    return handle


# Faults under torchrun and their uninterrupted references (distributed/test_preemption.py; conftest's session
# fixtures, several nodes and Slurm use the same configs).
MAX_STEPS = 160  # about 5 s at ~30 steps/s: long enough that a fault surely lands mid-run


FAULT_RUN = (f"train.max_steps={MAX_STEPS}", "train.save_every=4", "train.keep_last=2", "train.lr=5e-3",
             "train.warmup_steps=1", "train.seed=5", "lora.dropout=0.1", "train.micro_batch_size=1")


def write_config(tmp_path, name, *overrides, audio=False) -> Path:
    cfg = tiny_config(tmp_path / name, *FAULT_RUN, *overrides, samples=24, audio=audio)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def write_user_config(tmp_path, name) -> Path:
    """What a user runs, at tiny size: configs/tiny.yaml's validation, listening samples (one prompt with a
    reference voice) and TensorBoard, which QUIET (above) turns off, plus token-budget batches and WAV
    clips encoded by the codec on the way in."""
    ref = tmp_path / name / "data" / "clips" / "0000_ref.wav"  # write_demo_corpus's reference clip
    return write_config(tmp_path, name, *USER_PATH, "eval.prompts=[{text: hello there}, {text: say this, "
                        f"reference_audio: '{ref}', reference_text: the fox}}]", audio=True)


USER_PATH = ("data.num_workers=2", "data.val_fraction=0.2", "eval.every=40", "eval.samples_every=80",
             "eval.max_audio_seconds=0.2", "logging.tensorboard=true", "data.max_tokens_per_batch=400")


def children(pid: int) -> list:
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(d.name))
        except (OSError, ValueError):
            continue
    return found


def workers(launcher_pid: int) -> dict:
    """rank -> pid of torchrun's worker processes."""
    found = {}
    for pid in children(launcher_pid):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def kill_after_logged_steps(config: Path, run: Path, steps: int = 4, timeout: int = 240) -> None:
    """`higgs-ddp train --config CONFIG` SIGKILLed once its metrics.jsonl has ``steps`` rows (SIGSTOPped first,
    so that it cannot finish meanwhile): what a node lost mid-run leaves behind."""
    cmd = [sys.executable, "-m", "higgs_ddp", "train", "--config", str(config)]
    env = {**TORCHRUN_ENV, "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    with reaped(first):
        logged = run / "metrics.jsonl"
        wait_for(lambda: (logged.exists() and logged.read_text().count("\n") >= steps) or first.poll() is not None,
                 f"step {steps} logged", timeout=timeout)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None and not (run / "final").exists(), "the run ended before the kill"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """``proc`` killed and waited for on the way out, whatever the test asserted (no run left training)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def uninterrupted_run(tmp_path_factory, name: str, write) -> Path:
    """The reference: ``write(folder, "ref")``'s config run on 2 ranks without interruption."""
    tmp = tmp_path_factory.mktemp(name)
    proc = torchrun(2, "--config", write(tmp, "ref"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "ref" / "run"


def records(run: Path) -> list:
    """metrics.jsonl without its timings: train and validation rows."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in read_metrics(run)]


def assert_same_user_path_outputs(run: Path, ref: Path) -> None:
    """Validation rows, listening samples and TensorBoard scalars as if the run had never stopped."""
    assert records(run) == records(ref)
    assert {"train", "val"} <= {r["split"] for r in records(run)}  # and "samples" rows where they are scored
    steps = sorted(p.name for p in (ref / "samples").iterdir())
    assert steps and sorted(p.name for p in (run / "samples").iterdir()) == steps
    for step in steps:
        for wav in sorted((ref / "samples" / step).glob("*.wav")):
            assert (run / "samples" / step / wav.name).read_bytes() == wav.read_bytes(), f"{step}/{wav.name}"
        listed = [json.loads((r / "samples" / step / "samples.json").read_text())["samples"] for r in (run, ref)]
        for s in listed[0] + listed[1]:
            s.pop("generate_seconds"), s.pop("reference_audio")  # a timing; a path in each run's own folder
        assert listed[0] == listed[1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = []
    for r in (run, ref):
        events = EventAccumulator(str(r / "tensorboard"))
        events.Reload()
        scalars.append({tag: [(e.step, e.value) for e in events.Scalars(tag)]
                        for tag in ("train/loss", "train/grad_norm", "val/loss")})
    assert [s for s, _ in scalars[0]["train/loss"]] == list(range(1, MAX_STEPS + 1))  # none twice, none lost
    assert scalars[0] == scalars[1]


FSDP = ("train.parallel=fsdp", "data.num_workers=1")


# Several nodes (distributed/test_multinode.py, also Slurm).
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# docs/tests.md's index (unit/project/test_layout.py checks it is current; `python tests/helpers.py` rewrites it).
INDEX_START = "<!-- index: generated from each test module's docstring by `python tests/helpers.py` -->\n"
INDEX_END = "<!-- end of index -->\n"


def module_index() -> str:
    """One line per test module, in path order: a link to it and its docstring's first line (what it proves)."""
    import ast

    lines = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = path.relative_to(ROOT).as_posix()
        first = (ast.get_docstring(ast.parse(path.read_text())) or "(no docstring)").splitlines()[0]
        lines.append(f"- [`{rel.removeprefix('tests/')}`](../{rel}): {first}\n")
    return "".join(lines)


def write_tests_index(doc: Path = ROOT / "docs" / "tests.md") -> None:
    text = doc.read_text()
    head, rest = text.split(INDEX_START)
    doc.write_text(head + INDEX_START + module_index() + INDEX_END + rest.split(INDEX_END, 1)[1])


def cached_corpus(tmp_path_factory, name: str, clips: int) -> Path:
    """WAV files whose codes are already in the code cache, in the tiny model's shape (4 codebooks of 64):
    the data-at-scale bench's synthetic corpus, encoded by nobody."""
    from higgs_ddp.tools.bench.data_corpus import build_corpus

    root = tmp_path_factory.mktemp(name) / "corpus"
    build_corpus(root, clips, "tiny", num_codebooks=4, codebook_size=64)
    return root


def cached_corpus_overrides(corpus: Path, tmp_path: Path, *overrides) -> list:
    """The overrides of configs/tiny.yaml for a ``cached_corpus``, with a validation fifth (a command's argv)."""
    return [*QUIET, f"output_dir={tmp_path / 'run'}", f"data.manifest={corpus / 'manifest.jsonl'}",
            f"data.cache_dir={corpus / '.higgs_codes'}", "data.val_fraction=0.2", *overrides]


def cached_corpus_config(corpus: Path, tmp_path: Path, *overrides):
    """configs/tiny.yaml on a ``cached_corpus``, with a validation fifth."""
    from higgs_ddp.config import load_config

    return load_config(str(TINY), cached_corpus_overrides(corpus, tmp_path, *overrides))



# Preference pairs (unit/tools/test_prefs_build.py; distributed/test_prefs_build_ranks.py compares with its build).
# Temperature 1 and 0.3 s: the tiny model then stops by itself in some candidates and not in others (measured).
PREFS_SETTINGS = ("--candidates", "3", "--max-audio-seconds", "0.3", "--temperature", "1.0", "--seed", "7",
                  "--asr-model", "none", "--speaker-model", "none", "--device", "cpu")
PREFS_OUTPUTS = ("pairs.jsonl", "candidates.jsonl", "unpaired.jsonl", "prefs.json")


def prefs_inputs(tmp_path) -> tuple:
    """A tiny LoRA checkpoint (``make_checkpoint``) and 4 prompts: two with ids, one cloning a reference voice
    at a known speaking rate, one without an id comparing with a speaker clip -> (checkpoint, prompts file)."""
    _, _, _, ckpt = make_checkpoint(tmp_path)
    voice = tmp_path / "voice.wav"
    sf.write(str(voice), 0.1 * np.sin(np.arange(12_000) * 0.05).astype(np.float32), 24_000)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in [
        {"id": "hello", "text": "hello there"},
        {"id": "clone", "text": "say this", "ref_audio": "voice.wav", "ref_text": "a tone", "speaking_rate": 12},
        {"text": "and a third one", "speaker_audio": "voice.wav", "language": "en"},
        {"id": "four", "text": "the fourth"}]))
    return ckpt, prompts


def prefs_files(out: Path) -> dict:
    """What a build wrote, by name, the codes shards' tensors included (by content: safetensors writes its
    metadata in no fixed order): two builds of the same seeds write the same (prefs.json holds no time and
    no output path)."""
    files = {name: (out / name).read_text() for name in PREFS_OUTPUTS}
    for p in sorted((out / "codes").glob("*")):
        files[p.relative_to(out).as_posix()] = {k: v.numpy().tobytes() + str(v.shape).encode()
                                                for k, v in load_file(str(p)).items()}
    return files


# Preference pairs for the tiny model (unit/data/test_pair_data.py, unit/training/test_dpo.py,
# distributed/test_dpo_equivalence.py).
def write_tiny_pairs(folder: Path, prompts: int = 8, pairs_per_prompt: int = 1, seed: int = 0,
                     chosen_frames=(4, 8), rejected_frames=(10, 16), reference: bool = False,
                     cut: tuple = ()) -> Path:
    """A preferences folder (data/preferences.py) for configs/tiny.yaml: random codes, the chosen candidates
    shorter than the rejected ones; ``reference``: every prompt clones a reference given as .npy codes;
    ``cut``: the prompts (by index) whose rejected candidates were cut at the limit ("stopped": false; the
    others do not say, as files written before the field)."""
    from higgs_ddp.data.preferences import run_identity, write_pairs
    from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer

    rng = np.random.default_rng(seed)
    tokenizer = build_tiny_tokenizer(vocab_size=272)  # as load_tokenizer builds configs/tiny.yaml's
    header = {**run_identity("tiny", None, tokenizer, 4, 64), "model": "random codes", "candidates": 2,
              "seed": seed}
    codes, lines = {}, []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(prompts):
        extra = {}
        if reference:
            np.save(folder / f"ref{i}.npy", rng.integers(0, 64, (4, 6)).astype(np.int16))
            extra = {"ref_audio_codes": f"ref{i}.npy", "ref_text": "quick the"}
        for j in range(pairs_per_prompt):
            c, r = f"p{i}/c{j}", f"p{i}/r{j}"
            codes[c] = rng.integers(0, 64, (4, int(rng.integers(*chosen_frames))))
            codes[r] = rng.integers(0, 64, (4, int(rng.integers(*rejected_frames))))
            lines.append({"id": f"p{i}", "text": f"the quick fox {i} jumps", **extra,
                          "chosen": {"key": c, "seed": 2 * j, "reward": 1.0},
                          "rejected": {"key": r, "seed": 2 * j + 1, "reward": 0.0,
                                       **({"stopped": False} if i in cut else {})}})
    return write_pairs(folder, header, lines, codes)


def dpo_overrides(pairs: Path, *more) -> tuple:
    return ("train.objective=dpo", f"data.preferences={pairs}", *more)

def index_files(folder) -> dict:
    """An index's files, byte for byte, without what differs from build to build: the header's and report's
    times (the header as JSON)."""
    out = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in ("header.json", "report.json")}
    header = json.loads((folder / "header.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    for d in (header, header["summary"], report):
        for key in ("built_ns", "startup_seconds", "startup_cpu_seconds"):
            d.pop(key, None)
    return {**out, "header.json": header, "report.json": report}


def tar_shard(path: Path, members: list, cut: int = 0) -> Path:
    """A WebDataset tar of ``members`` ((name, bytes), in order), as a WebDataset writer makes it; ``cut``: keep
    only the first ``cut`` bytes (a copy cut short). (unit/data/test_import_webdataset.py, test_shard_members.py)"""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    if cut:
        path.write_bytes(path.read_bytes()[:cut])
    return path


if __name__ == "__main__":
    write_tests_index()
