"""higgs-ddp doctor [--config FILE] [overrides]: what would break a run, checked before it starts.

A run that dies on a version mismatch, an uncached model on an offline node, a bad manifest line or a
full disk dies after the queue wait, the download and the model load. Each of those is checked here in
seconds, without loading a model or decoding any audio (audio headers are read). One line per check::

    OK   what was checked
    WARN what: why it may matter
    FAIL what: the fix

The exit code is 1 when any line is FAIL, else 0. Without ``--config`` (or overrides) only the
environment is checked (Python, package versions, CUDA/NCCL); with it, also the model and codec sources,
the manifests (a DPO run: its pairs files, their counts and whether they were made for this run's codec,
tokenizer and codebooks), the run's own start-up checks (startup.py: precision and attention on this machine, the
LoRA targets against the model's modules, enough samples for one step, whether the resume is allowed)
and the disk space the checkpoints will need. A check that crashes is itself a FAIL line naming the
exception, never a traceback.
"""

from __future__ import annotations

import argparse
from typing import Callable

from higgs_ddp.tools.doctor.disk import OFFICIAL_DIMS, Dims, _existing_parent, check_disk, checkpoint_need
from higgs_ddp.tools.doctor.environment import check_cuda, check_python, check_transformers, check_versions
from higgs_ddp.tools.doctor.inputs import (
    _manifest_paths,
    check_audio_headers,
    check_eval_models,
    check_manifests,
    check_preferences,
    check_prompts,
)
from higgs_ddp.tools.doctor.result import FAIL, OK, WARN, Result, _first_line
from higgs_ddp.tools.doctor.sources import check_codec, check_model, hf_cache_dir, hf_offline
from higgs_ddp.tools.doctor.startup import (
    check_batch,
    check_device,
    check_lora,
    check_memory_plan,
    check_resume,
    is_benchmark,
)

__all__ = [
    "main", "environment_checks", "config_checks", "Result", "OK", "WARN", "FAIL",
    "check_python", "check_versions", "check_transformers", "check_cuda",
    "check_model", "check_codec", "hf_cache_dir", "hf_offline", "check_manifests", "check_preferences",
    "check_audio_headers",
    "check_prompts",
    "check_eval_models",
    "Dims", "OFFICIAL_DIMS", "checkpoint_need", "check_disk", "check_resume", "check_device", "check_lora",
    "check_batch", "is_benchmark",
    "_existing_parent", "_guarded",  # used by tests/unit/tools/test_doctor.py
]


def _guarded(name: str, check: Callable, *args) -> list:
    """Run one check; whatever it raises becomes one FAIL line instead of a traceback."""
    try:
        out = check(*args)
    except Exception as e:  # noqa: BLE001 - the doctor itself must never crash
        return [Result(FAIL, f"{name}: {type(e).__name__}: {_first_line(e)}")]
    return out if isinstance(out, list) else [out]


def environment_checks() -> list:
    return [("python", check_python), ("versions", check_versions), ("transformers", check_transformers),
            ("cuda", check_cuda)]


def config_checks(cfg) -> list:
    entries: dict = {}

    dpo = cfg.train.objective == "dpo"  # its data are pairs files, not manifests

    def codec():
        if dpo:  # pairs hold codes; a reference given as audio is encoded at the start
            files = [p for p in (cfg.data.preferences, cfg.data.val_preferences) if p]
            refs = [p.ref for ps in entries.values() for p in ps if p.ref is not None]
        else:
            files = _manifest_paths(cfg)
            refs = [r for es in entries.values() for e in es for r in e.audio]
        needed = bool(cfg.eval.prompts) or len(entries) != len(files) or any(not r.is_codes for r in refs)
        return check_codec(cfg, needed)

    data = (("preferences", lambda: check_preferences(cfg, entries)) if dpo
            else ("manifests", lambda: check_manifests(cfg, entries)))
    checks = [("model", lambda: check_model(cfg)), ("device", lambda: check_device(cfg)),
              ("lora", lambda: check_lora(cfg)), ("memory", lambda: check_memory_plan(cfg)), data,
              ("batch", lambda: check_batch(cfg, entries))]
    if is_benchmark(cfg):  # it encodes no audio, speaks no prompts, neither resumes nor saves checkpoints
        return checks
    # (a DPO run's references given as audio are read when the run encodes them: no header check here yet)
    audio = [] if dpo else [("audio", lambda: check_audio_headers(cfg, entries))]
    return checks + audio + [("codec", codec),
                     ("eval prompts", lambda: check_prompts(cfg)),
                     ("eval models", lambda: check_eval_models(cfg)),
                     ("output_dir", lambda: check_resume(cfg)), ("disk", lambda: check_disk(cfg))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="higgs-ddp doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the training config to check (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as train.py takes them")
    args = p.parse_args(argv)
    results = []

    def report(rs):
        for r in rs:
            print(r.line(), flush=True)
            results.append(r)

    for name, check in environment_checks():
        report(_guarded(name, check))
    if args.config or args.overrides:
        from higgs_ddp.config import ConfigError, load_config

        cfg = None
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            report([Result(FAIL, f"config: {e}")])
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable file
            report([Result(FAIL, f"config: {type(e).__name__}: {_first_line(e)}")])
        if cfg is not None:
            report([Result(OK, f"config {args.config or '(defaults)'}: train.mode={cfg.train.mode}, "
                               f"model.init={cfg.model.init}, output_dir={cfg.output_dir}")])
            for name, check in config_checks(cfg):
                report(_guarded(name, check))
    fails = sum(r.status == FAIL for r in results)
    warns = sum(r.status == WARN for r in results)
    print(f"doctor: {fails} FAIL, {warns} WARN" + (" (fix the FAIL lines before training)" if fails else ""))
    return 1 if fails else 0
