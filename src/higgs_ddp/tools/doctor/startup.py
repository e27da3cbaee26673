"""The run's own start-up checks, called with what the doctor knows instead of a loaded model and data.

Each check here calls the function the run calls (``config.check_machine``, ``config.check_lora_targets``,
``batching.check_step_fits``, ``checkpoint.resume_point`` / ``resume_policy.check_resumable``), so the doctor's verdict
is the run's. Where the run needs something the doctor does not load, the doctor brings the nearest
thing: the model built on the meta device (no weights), the samples the manifests list, the
checkpoint's own data fingerprint (the data itself is compared when the run has loaded it).
"""

from __future__ import annotations

import copy
import os

from higgs_ddp.config import BenchConfig, ConfigError, check_lora_targets, check_machine, uses_bf16
from higgs_ddp.tools.doctor.disk import _model_config_dict
from higgs_ddp.tools.doctor.result import FAIL, OK, WARN, Result


def is_benchmark(cfg) -> bool:
    """A config with no manifest that sets bench.* keys is for higgs-ddp bench, which brings its
    own random samples."""
    return not cfg.data.manifest and cfg.bench != BenchConfig()


def check_device(cfg) -> list:
    """train.precision and model.attn_implementation against this machine, as the trainer checks them."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_machine(cfg, device)
    except ConfigError as e:
        return [Result(FAIL, f"{e} (this machine: {device}; run the doctor where the job runs)")]
    return [Result(OK, f"train.precision={cfg.train.precision}, model.attn_implementation="
                       f"{cfg.model.attn_implementation}: this machine ({device}) runs them")]


def check_memory_plan(cfg) -> list:
    """Model state per GPU by the run's own arithmetic (training/memory_plan.py), against this machine's
    GPUs when it has some (the run refuses what cannot fit); on CPU the plan for WORLD_SIZE ranks, or 1."""
    import torch

    from higgs_ddp.model import _import_higgs
    from higgs_ddp.training import memory_plan

    raw = _model_config_dict(cfg)
    if raw is None:
        return [Result(WARN, "memory: not planned, the model's config.json is neither local nor in the HF cache")]
    HiggsAudioConfig, _ = _import_higgs()
    counts = memory_plan.count_parameters(cfg, HiggsAudioConfig(**{**copy.deepcopy(raw), "pad_token_id": None}))
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", torch.cuda.device_count() if cuda else 1))
    bf16 = uses_bf16(cfg, "cuda" if cuda else "cpu")
    plan = memory_plan.plan(counts, cfg, world, bf16)
    base = counts.total - (counts.trainable if cfg.train.mode == "lora" else 0)  # the merged model: no adapter
    gb = {d: memory_plan.inference_bytes(base, d) / memory_plan.GB for d in ("bf16", "fp32")}
    speak = Result(OK, f"memory: speak / score of the trained model hold {gb['bf16']:.1f} GB of bf16 weights on a "
                       f"GPU (--dtype auto), {gb['fp32']:.1f} GB in fp32 (the CPU's default, --dtype fp32)")
    if not cuda:
        return [Result(OK, f"memory: {plan.describe()}"), speak]
    try:
        memory_plan.check_fits(plan, torch.cuda.get_device_properties(0).total_memory, cfg, counts, bf16)
    except ConfigError as e:
        return [Result(WARN if not cfg.train.check_memory else FAIL, f"memory: {e}"), speak]
    return [Result(OK, f"memory: {plan.describe()}, within this machine's GPUs"), speak]


def _module_names(raw: dict) -> list:
    """The module names of the model a HiggsAudioConfig dict describes, built on the meta device."""
    import torch

    from higgs_ddp.model import _import_higgs

    HiggsAudioConfig, HiggsAudioModel = _import_higgs()
    # Token ids do not change the module tree; the tokenizer fills them in for the run (padding_idx must
    # fit the vocabulary, which the default pad id of the real tokenizer does not for a tiny model).
    raw = {**copy.deepcopy(raw), "pad_token_id": None}  # a copy: the config classes fill in nested dicts
    with torch.device("meta"):
        model = HiggsAudioModel(HiggsAudioConfig(**raw))
    return [name for name, _ in model.named_modules()]


def check_lora(cfg) -> list:
    """lora.target_modules against the module names of the model the run will build."""
    if cfg.train.mode != "lora":
        return []
    raw = _model_config_dict(cfg)
    if raw is None:
        return [Result(WARN, "lora.target_modules: not checked, the model's config.json is neither local nor in "
                             "the HF cache: the run checks them once it has the model")]
    try:
        check_lora_targets(cfg, _module_names(raw))
    except ConfigError as e:
        return [Result(FAIL, f"{e}: name a module suffix such as self_attn.q_proj (see the README's training "
                             f"modes)")]
    n = len(cfg.lora.target_modules)
    return [Result(OK, f"lora.target_modules: each of the {n} entr{'ies' if n > 1 else 'y'} names modules of "
                       f"the model")]


def _training_samples(cfg, entries: dict) -> int | None:
    """Samples the training manifests list with every file present (a DPO run: the pairs of data.preferences,
    ``entries`` as inputs.check_preferences fills it), less the data.val_fraction share (the run's own split,
    by sample or prompt id); None when a file could not be read (its own check says why)."""
    from higgs_ddp.data.dataset import _in_val

    files = [cfg.data.preferences] if cfg.train.objective == "dpo" else cfg.data.manifest
    if not all(path in entries for path in files):
        return None
    listed = [e for path in files for e in entries[path]]
    return sum(not _in_val(e.id, cfg.data.val_fraction) for e in listed) if cfg.data.val_fraction else len(listed)


def check_batch(cfg, entries: dict) -> list:
    """Enough samples for one optimizer step, as the run's sampler checks it: the benchmark's bench.samples,
    or the samples the manifests list. On WORLD_SIZE ranks when it is set, else on one (and the line says
    on how many it would fit). Length-aware batches (data.max_tokens_per_batch) need the samples' lengths:
    the run checks those."""
    from higgs_ddp.data.batching import BatchingError, check_step_fits

    t = cfg.train
    if cfg.data.max_tokens_per_batch:
        return []
    n = cfg.bench.samples if is_benchmark(cfg) else _training_samples(cfg, entries)
    if not n:
        return []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check_step_fits(n, t.micro_batch_size, t.grad_accum_steps, world)
    except BatchingError as e:
        return [Result(FAIL, f"batch: {e}: lower train.micro_batch_size or train.grad_accum_steps, or add samples")]
    per_rank = t.micro_batch_size * t.grad_accum_steps
    what = ("bench.samples" if is_benchmark(cfg) else "training pairs" if cfg.train.objective == "dpo"
            else "training samples")
    return [Result(OK, f"batch: {n} {what} fill an optimizer step of {per_rank} per rank on up to "
                       f"{n // per_rank} ranks")]


def check_resume(cfg) -> list:
    """Where the run would continue from (checkpoint.resume_point) and whether it would be allowed to
    (resume_policy.check_resumable, with the checkpoint's own data fingerprint and rank count: those two
    are compared once the run has loaded its data and started its ranks)."""
    from higgs_ddp.training.checkpoint import CheckpointError, read_state, resume_point
    from higgs_ddp.training.resume_policy import check_resumable

    try:
        ckpt, note = resume_point(cfg.output_dir, cfg.train.resume)
        if ckpt is None:
            return []
        state = read_state(ckpt)
        check_resumable(ckpt, cfg.to_dict(), state["data"], state["world_size"], cfg.train.resume_accept)
    except (ConfigError, CheckpointError) as e:
        return [Result(FAIL, f"output_dir {cfg.output_dir}: {e}")]
    return [Result(OK, f"output_dir {cfg.output_dir}: resumes from {ckpt.name} (train.resume={cfg.train.resume}; "
                       f"the data and the rank count are compared when it starts)" + (f". {note}" if note else ""))]
