"""Compare models on the same prompts and seeds: base vs fine-tune, checkpoint vs checkpoint.

    higgs-ddp score --model runs/my_voice/checkpoints/step_001000 --model runs/my_voice \
        --prompts prompts.jsonl --asr-model openai/whisper-large-v3 --speaker-model microsoft/wavlm-base-plus-sv

Each model (anything ``higgs-ddp speak`` takes: a run, a checkpoint, a final/, an adapter or merged export)
speaks every prompt with the same sampling seed, through the listening samples' generation path; each clip
is checked by the detectors (evaluation/detectors.py) and scored by the ASR and speaker models
(evaluation/scoring.py), exactly as during training. A table, one row per model, goes to stdout; the WAVs
and every number to --out (``scores.json``, and ``MODEL_N/prompt_NN.wav``).

--prompts is JSONL, one prompt per line, the keys of ``eval.prompts``: ``text`` and optionally
``reference_audio`` + ``reference_text`` (a voice to clone), ``speaker_audio`` (a held-out clip of the voice
the sample should have; speaker similarity compares with it, else with the reference) and ``language``.
Relative paths are relative to the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from higgs_ddp.evaluation.generation import Sampling, flag_name
from higgs_ddp.data.manifest import reference_problem
from higgs_ddp.errors import HiggsError, report
from higgs_ddp.tools.inference import DTYPE_CHOICES, DTYPE_HELP, dtype_name

COLUMNS = (("samples", "samples", "{}"), ("stopped", "stopped_samples", "{}"), ("silent", "silent_samples", "{}"),
           ("seconds", "seconds", "{:.2f}"), ("chars/s", "chars_per_second", "{:.1f}"), ("WER", "wer", "{:.3f}"),
           ("CER", "cer", "{:.3f}"), ("SIM", "speaker_sim", "{:.3f}"))


class ScoreError(HiggsError, ValueError):
    pass


def read_prompts(path: Path) -> list[dict]:
    """The prompts of a JSONL file, paths made relative to it; ScoreError ``FILE:LINE: what`` otherwise."""
    from higgs_ddp.config import EvalConfig

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ScoreError(f"--prompts {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScoreError(f"--prompts {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScoreError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(prompt, dict) or not isinstance(prompt.get("text"), str) or not prompt["text"].strip():
            raise ScoreError(f"{path}:{n}: a prompt is a JSON object with a non-empty \"text\"")
        unknown = set(prompt) - set(EvalConfig.PROMPT_KEYS)
        if unknown:
            raise ScoreError(f"{path}:{n}: unknown key(s) {sorted(unknown)}; a prompt has "
                             f"{', '.join(EvalConfig.PROMPT_KEYS)}")
        problem = reference_problem(bool(prompt.get("reference_audio")), prompt.get("reference_text"),
                                    "reference_audio", "reference_text")
        if problem:  # the manifest's rule and speak's
            raise ScoreError(f"{path}:{n}: {problem[1]}")
        for key in ("reference_audio", "speaker_audio"):
            if prompt.get(key):
                prompt[key] = str(path.parent / prompt[key])
        prompt["line"] = n
        prompts.append(prompt)
    if not prompts:
        raise ScoreError(f"{path}: no prompts (every line is empty)")
    return prompts


def score_model(loaded, prompts: list[dict], sampling: Sampling, scorer, out: Optional[Path], where: str) -> dict:
    """One model speaks every prompt (seeded by ``sampling.seed``) -> {"summary", "samples"}."""
    import soundfile as sf

    from higgs_ddp.evaluation.detectors import check_clip
    from higgs_ddp.evaluation.generation import check_codec, generation_state, reference_codes, speak_text
    from higgs_ddp.evaluation.listening import SampleResult, sample_summary

    model, codec, cfg = loaded.model, loaded.codec, loaded.cfg
    check_codec(model, codec)
    results, records = [], []
    with generation_state(model, sampling.seed):
        for i, prompt in enumerate(prompts):
            what = f"{where}:{prompt['line']}"
            ref_codes = None
            if prompt.get("reference_audio"):  # conditioned as the model's run conditioned its training audio
                ref_codes = reference_codes(cfg, codec, prompt["reference_audio"], f"{what}: reference_audio")
            spoken = speak_text(model, loaded.tokenizer, codec, cfg, prompt["text"], prompt.get("reference_text"),
                                ref_codes, sampling=sampling, what=what)
            gen, wave = spoken.generated, spoken.wave
            checks = check_clip(wave, codec.sample_rate, prompt["text"], gen.hit_limit)
            scores = scorer.score(wave, codec.sample_rate, prompt) if scorer.enabled else {}
            path = None
            if out is not None:
                path = out / f"prompt_{i:02d}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), wave, codec.sample_rate, subtype="PCM_16")
            results.append(SampleResult(prompt["text"], path, len(wave) / codec.sample_rate,
                                        int(gen.codes.shape[1]), gen.hit_limit, prompt.get("reference_audio"),
                                        gen.invalid_codes, checks=checks, scores=scores))
            records.append({"text": prompt["text"], "line": prompt["line"], **({"wav": path.name} if path else {}),
                            "invalid_codes": gen.invalid_codes, **checks.as_dict(), **scores})
    return {"summary": sample_summary(results), "samples": records}


def table(rows: list[tuple[str, dict]]) -> str:
    """One line per model; a number that was not measured is '-'."""
    def cell(summary, key, fmt):
        value = summary.get(key)
        if value is None:
            return "-"
        if key in ("stopped_samples", "silent_samples"):
            return f"{value}/{summary['samples']}"
        return fmt.format(value)

    body = [[name] + [cell(s, key, fmt) for _, key, fmt in COLUMNS] for name, s in rows]
    head = ["model"] + [title for title, _, _ in COLUMNS]
    widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]
    lines = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
             for r in [head, *body]]
    why = unmeasured_notes(rows)
    return "\n".join(lines + ([""] + why if why else []))


def unmeasured_notes(rows: list[tuple[str, dict]]) -> list[str]:
    """Why a '-' is in the table, one line each: a model the column was not asked for, or a value that could
    not be measured (scores.json says so per sample too)."""
    from higgs_ddp.evaluation.scoring import UNMEASURED

    summaries = [s for _, s in rows]
    notes = []
    if not any("wer" in s for s in summaries):
        notes.append("WER, CER -: no --asr-model given")
    if not any("speaker_sim" in s for s in summaries):
        notes.append("SIM -: no --speaker-model given")
    for name, s in rows:
        if s.get(UNMEASURED):
            notes.append(f"SIM - for {name}: {s[UNMEASURED]}")
        if s.get("chars_per_second") is None and s.get("samples"):
            notes.append(f"chars/s - for {name}: every clip is empty (the model ended each stream at once)")
    return notes


def score(args) -> dict:
    from higgs_ddp.config import Config
    from higgs_ddp.evaluation.generation import describe_conditioning
    from higgs_ddp.evaluation.scoring import Scorer, check_models
    from higgs_ddp.tools.inference import default_device, load_for_inference

    sampling = Sampling(temperature=args.temperature, max_audio_seconds=args.max_audio_seconds, seed=args.seed)
    sampling.check(flag_name)
    if args.out is not None:  # before minutes of loading and speaking, not after
        from higgs_ddp.runtime.shared_fs import unwritable

        why = unwritable(args.out)
        if why:
            raise ScoreError(f"--out {args.out} cannot be written ({why})")
    prompts = read_prompts(args.prompts)
    eval_cfg = Config().eval  # the scorer's settings, checked as a run checks them
    eval_cfg.asr_model, eval_cfg.speaker_model, eval_cfg.language = args.asr_model, args.speaker_model, args.language
    eval_cfg.prompts = [{k: v for k, v in p.items() if k != "line"} for p in prompts]
    holder = Config(eval=eval_cfg)
    # the errors name what the user typed: the flags, and the prompts file's lines
    names = {"asr_model": "--asr-model", "speaker_model": "--speaker-model",
             "prompt": lambda i: f"{args.prompts}:{prompts[i]['line']}: "}
    problems = check_models(holder, names)  # before any model loads (minutes): a missing one fails at once
    for p in prompts:
        if p.get("reference_audio"):
            from higgs_ddp.evaluation.generation import read_reference
            read_reference(p["reference_audio"], f"{args.prompts}:{p['line']}: reference_audio", 0, 0)
    if problems:
        raise ScoreError("; ".join(problems))
    if not (args.asr_model or args.speaker_model):
        print("higgs-ddp score: note: no --asr-model or --speaker-model: only the detectors (no WER, no "
              "similarity)", file=sys.stderr, flush=True)
    device = args.device or default_device()
    scorer = Scorer(holder, device, names)
    rows, report, codec = [], {"prompts": str(args.prompts), "seed": sampling.seed,
                               "temperature": sampling.temperature,
                               "max_audio_seconds": sampling.max_audio_seconds, "models": []}, None
    for n, model_path in enumerate(args.model):
        loaded = load_for_inference(model_path, device, codec=codec, dtype=args.dtype)
        codec = loaded.codec  # the next model of the same run reuses it
        conditioning = describe_conditioning(loaded.cfg.data.audio) if any(
            p.get("reference_audio") for p in prompts) else ""
        print(f"model {n}: {loaded.describe()}" + (f"; reference_audio conditioned as its run's training audio "
                                                   f"was: data.audio {conditioning}" if conditioning else ""),
              file=sys.stderr, flush=True)
        got = score_model(loaded, prompts, sampling, scorer, args.out / f"model_{n}" if args.out else None,
                          str(args.prompts))
        rows.append((str(model_path), got["summary"]))
        report["models"].append({"path": str(model_path), "kind": loaded.kind, "source": str(loaded.source),
                                 "step": loaded.step, "dtype": dtype_name(loaded.dtype),
                                 "reference_conditioning": conditioning or None, **got})
        del loaded
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scores.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(table(rows), flush=True)
    return report


def parser() -> argparse.ArgumentParser:
    d = Sampling()
    p = argparse.ArgumentParser(prog="higgs-ddp score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, action="append",
                   help="a run, a checkpoint, a final/, an adapter or a merged export; repeat to compare")
    p.add_argument("--prompts", required=True, type=Path, help="JSONL: one {text, reference_audio?, ...} per line")
    p.add_argument("--asr-model", help="Whisper for WER/CER: a folder or a hub id in the Hugging Face cache")
    p.add_argument("--speaker-model",
                   help="speaker similarity: a WavLMForXVector folder or cached hub id, or 'resemblyzer'")
    p.add_argument("--language", default="en", help="of prompts without their own (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed, the same for every model "
                                                            "(default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy (default %(default)s)")
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                   help="a clip that reaches it did not stop by itself (default %(default)s)")
    p.add_argument("--out", type=Path, help="folder for the WAVs and scores.json")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when there is one)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    return p


def main(argv=None) -> int:

    args = parser().parse_args(argv)
    try:
        score(args)
    except HiggsError as e:  # and only that: a ValueError from torch is a bug, with its traceback
        return report(e)
    return 0
