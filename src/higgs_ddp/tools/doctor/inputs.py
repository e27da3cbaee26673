"""Input checks: the manifests (every line parses, every file it names exists, every audio header passes
training's checks), a DPO run's pairs files, and the eval prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from higgs_ddp.tools.doctor.result import FAIL, OK, WARN, Result, _first_line


def _manifest_paths(cfg) -> list:
    return [("manifest", p) for p in cfg.data.manifest] + [("val manifest", p) for p in cfg.data.val_manifest]


def check_manifests(cfg, seen: Optional[dict] = None) -> list:
    """Each manifest: exists, readable, every line parses (the training parser, so the same verdict), and
    every audio / codes file it names exists. No audio is read. ``seen`` collects, per manifest, the entries
    whose files all exist."""
    from higgs_ddp.data.manifest import Problem, read_manifest
    from higgs_ddp.tools.doctor.startup import is_benchmark

    if not cfg.data.manifest:
        if is_benchmark(cfg):
            return [Result(OK, "data.manifest: none, and none needed: a benchmark config (bench.*), whose random "
                               "samples higgs-ddp bench makes")]
        return [Result(FAIL, "data.manifest is empty: set data.manifest=path/to/train.jsonl")]
    skip = cfg.data.on_error == "skip"
    out, exists = [], {}
    for what, path in _manifest_paths(cfg):
        p = Path(path)
        layout = _source_layout(path)
        if layout is not None:  # shards or a datasets folder: imported by prepare (data/sources.py)
            out.append(_check_source(what, path, layout))
            continue
        if not p.is_file():
            out.append(Result(FAIL, f"{what} {path}: not found: check data.{what.replace(' ', '_')} (a relative "
                                    f"path is taken from the working directory, then from the config file's folder)"))
            continue
        try:
            with p.open("rb") as f:
                lines = sum(1 for line in f if line.strip())
        except OSError as e:
            out.append(Result(FAIL, f"{what} {path}: not readable ({e.strerror}): fix its permissions"))
            continue
        entries, problems = read_manifest(path, cfg.data.root, cfg.data.allow_outside_root)
        usable = []
        for entry in entries:
            missing = []
            for ref in entry.audio:
                if ref.path not in exists:  # a reference clip is often shared by many lines
                    exists[ref.path] = ref.path.is_file()
                if not exists[ref.path]:
                    missing.append(Problem(entry.where, "file_missing", f"{'codes file' if ref.is_codes else 'audio'} "
                                                                        f"{ref.shown} not found"))
            problems += missing
            if not missing:
                usable.append(entry)
        problems.sort(key=lambda pr: int(pr.where.rsplit(":", 1)[1]))  # in file order
        if seen is not None:
            seen[path] = usable
        if not problems and not entries:
            out.append(Result(FAIL, f"{what} {path}: no samples in it: write one JSON object per line"))
        elif problems:
            listed = "; ".join(str(pr) for pr in problems[:3]) + ("; ..." if len(problems) > 3 else "")
            fix = ("skipped and counted at the start (data.on_error=skip)" if skip
                   else "fix these lines, or set data.on_error=skip to train on the rest")
            out.append(Result(WARN if skip else FAIL, f"{what} {path}: {len(problems)} problem"
                                                      f"{'s' * (len(problems) > 1)} in {lines} lines: {listed}: {fix}"))
        else:
            out.append(Result(OK, f"{what} {path}: {len(entries)} sample{'s' * (len(entries) > 1)}, every line "
                                  f"parses, every file it names exists"))
    return out


def _source_layout(path: str) -> Optional[str]:
    from higgs_ddp.data.sources import source_layout

    return source_layout(path)


def _check_source(what: str, path: str, layout: str) -> Result:
    """A source named as a manifest: its files are listed (none is read: prepare imports them, and reports
    every bad sample by shard and member)."""
    from higgs_ddp.data.sources import SourceError, source_files

    try:
        files = source_files(path, layout)
    except SourceError as e:
        return Result(FAIL, f"{what} {e}")
    kind = "WebDataset shard" if layout == "webdataset" else "datasets file"
    return Result(OK, f"{what} {path}: {len(files)} {kind}{'s' * (len(files) > 1)}, imported in place by prepare "
                      f"(its samples are checked then)")


def _pairs_identity(cfg) -> tuple[Optional[dict], Optional[str]]:
    """-> (what the pairs' prefs.json must match, why some of it is not compared): the run's whole identity
    where its tokenizer and model config load (no weights), else the codec's alone."""
    from higgs_ddp.data.preferences import launch_identity, run_identity
    from higgs_ddp.model import load_tokenizer, model_config

    try:
        tokenizer = load_tokenizer(cfg)
        mc = model_config(cfg, tokenizer)
        return run_identity(cfg.data.codec, cfg.data.codec_revision, tokenizer, mc.audio_num_codebooks,
                            mc.audio_codebook_size), None
    except Exception as e:  # noqa: BLE001 - the model check says why; the codec can still be compared
        why = f"{type(e).__name__}: {_first_line(e)}"
    try:
        return launch_identity(cfg.data.codec, cfg.data.codec_revision), f"tokenizer and codebooks not compared ({why})"
    except Exception as e:  # noqa: BLE001
        return None, f"nothing compared ({type(e).__name__}: {_first_line(e)})"


def check_preferences(cfg, seen: Optional[dict] = None) -> list:
    """train.objective=dpo: each pairs file read by the trainer's reader (every line, every candidate's codes)
    and its prefs.json compared with this run's codec, tokenizer and codebooks, one line each. ``seen``
    collects, per file, the pairs read."""
    from higgs_ddp.data.preferences import read_pairs
    from higgs_ddp.errors import HiggsError

    expected, not_compared = _pairs_identity(cfg)
    out = []
    for what, path in (("preferences", cfg.data.preferences), ("val preferences", cfg.data.val_preferences)):
        if not path:
            continue
        try:
            _, pairs = read_pairs(path, expected)
        except HiggsError as e:
            out.append(Result(FAIL, f"{what}: {_first_line(e)}: fix it, or build the pairs again (higgs-ddp prefs "
                                    f"build)"))
            continue
        if seen is not None:
            seen[path] = pairs
        ends = [getattr(p, role).stopped for p in pairs for role in ("chosen", "rejected")]
        out.append(Result(OK, f"{what} {path}: {len(pairs)} pair{'s' * (len(pairs) > 1)} of "
                              f"{len({p.id for p in pairs})} prompt(s), {ends.count(False)} cut candidate(s); every "
                              f"line parses, every candidate's codes read" + ("" if not_compared else
                              "; made for this run's codec, tokenizer and codebooks")))
        if None in ends:
            out.append(Result(WARN, f"{what} {path}: {ends.count(None)} candidate(s) do not say whether they stopped "
                                    f"by themselves (\"stopped\"): trained as stopped; pairs from higgs-ddp prefs "
                                    f"build get it by running the same build again"))
    if not_compared and out:
        out.append(Result(WARN, f"preferences: identity: {not_compared}; the run compares it at its start"))
    return out


def check_audio_headers(cfg, seen: dict) -> list:
    """Every audio file of the entries ``check_manifests`` saw, by its header: the checks training makes
    before decoding (format, rate, a WAV cut short), and its duration by the run's rule (audio.DurationRule:
    the codec's shortest input, data.audio.min_seconds, data.max_audio_seconds), so a 20 ms clip fails here
    as it fails at the start of training. Headers only: no audio is decoded."""
    from higgs_ddp.data.audio import AudioProblem, check_header
    from higgs_ddp.data.manifest import Problem
    from higgs_ddp.data.manifest_stats import run_duration_rule
    from higgs_ddp.data.references import without_reference

    rule, unknown = run_duration_rule(cfg.data)
    problems, verdict = [], {}
    for entries in seen.values():
        for entry in entries:
            if cfg.data.reference != "given":  # training sets a line's own reference aside: not read
                entry = without_reference(entry)
            for ref in entry.audio:
                if ref.is_codes:
                    continue
                if ref.path not in verdict:  # a reference clip is often shared by many lines
                    try:
                        check_header(ref.path, ref.shown, rule=rule)
                        verdict[ref.path] = None
                    except AudioProblem as e:
                        verdict[ref.path] = e
                if verdict[ref.path] is not None:
                    problems.append(Problem(entry.where, verdict[ref.path].reason, str(verdict[ref.path])))
    if not verdict:
        return []
    out = [Result(WARN, f"audio: {unknown}: clips too short for the codec are not found before training")] \
        if unknown else []
    if problems:
        skip = cfg.data.on_error == "skip"
        listed = "; ".join(str(pr) for pr in problems[:3]) + ("; ..." if len(problems) > 3 else "")
        fix = ("skipped and counted at the start (data.on_error=skip)" if skip
               else "fix or drop these lines, or set data.on_error=skip to train on the rest")
        return out + [Result(WARN if skip else FAIL, f"audio: {len(problems)} sample{'s' * (len(problems) > 1)} "
                                                     f"with a file training refuses: {listed}: {fix}")]
    return out + [Result(OK, f"audio: {len(verdict)} file{'s' * (len(verdict) > 1)}: every header passes "
                             f"training's checks (format, rate, duration)")]


def check_prompts(cfg) -> list:
    """eval.prompts, by the check the run makes at start-up (evaluation.listening.check_prompts): each
    reference_audio reads, is long enough for the codec and not too long."""
    from higgs_ddp.evaluation.listening import check_prompts as run_check

    problems = run_check(cfg)
    if problems:
        return [Result(FAIL, p + (": run `make demo` first" if "runs/tiny" in p else "")) for p in problems]
    if not cfg.eval.prompts:
        return []
    refs = sum(bool(p.get("reference_audio")) for p in cfg.eval.prompts)
    return [Result(OK, f"eval.prompts: {len(cfg.eval.prompts)} prompt{'s' * (len(cfg.eval.prompts) > 1)}, "
                       f"{refs} reference audio file{'s' * (refs != 1)} that read{'s' * (refs == 1)}")]


def check_eval_models(cfg) -> list:
    """eval.asr_model and eval.speaker_model, by the run's start-up check (evaluation.scoring.check_models):
    found in a folder or the Hugging Face cache (a run never downloads them), speaker_audio readable."""
    from higgs_ddp.evaluation.scoring import check_models

    problems = check_models(cfg)
    if problems:
        return [Result(FAIL, p) for p in problems]
    named = [f"eval.{k}={getattr(cfg.eval, k)}" for k in ("asr_model", "speaker_model") if getattr(cfg.eval, k)]
    return [Result(OK, f"{', '.join(named)}: found")] if named else []
