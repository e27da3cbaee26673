"""Listening samples during training: at each ``eval.samples_every`` the model as it is now speaks each
``eval.prompts`` entry (through ``evaluation/generation.py``, as ``higgs-ddp speak`` does); the WAVs, their
checks (detectors.py) and scores (scoring.py) go to ``{output_dir}/samples/step_N/`` and a summary to the
log. Rank 0 of each prompt's share speaks it; the ranks gather the results.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from higgs_ddp.config import Config
from higgs_ddp.evaluation.detectors import ClipChecks, check_clip, summarize
from higgs_ddp.evaluation.generation import check_codec, encode_reference, generation_state, read_reference, speak_text
from higgs_ddp.data.manifest import reference_problem
from higgs_ddp.errors import InputError
from higgs_ddp.runtime.files import write_json_atomic


@dataclass
class SampleResult:
    prompt: str  # the text spoken
    path: Path  # the WAV file written
    seconds: float  # audio length
    frames: int  # codec frames decoded into it
    hit_limit: bool  # no stream EOS within eval.max_audio_seconds: the model did not stop by itself
    reference_audio: Optional[str] = None
    invalid_codes: int = 0  # generated codes outside the codebook (e.g. a stream BOS mid-stream); the
    #                         audio stops before the first frame holding one
    clipped: int = 0  # decoded samples beyond [-1, 1], clipped by the 16-bit WAV
    generate_seconds: float = 0.0  # wall time of the generation
    checks: Optional[ClipChecks] = None  # duration, silence, stopped, speaking rate, clipping (detectors.py)
    scores: Optional[dict] = None  # transcript, wer, cer, speaker_sim: the configured models' (scoring.py)


def check_prompts(cfg: Config) -> list[str]:
    """One line per problem with ``eval.prompts`` (unreadable reference audio, ...); [] when all is well."""
    from higgs_ddp.data.codec import CodecError, codec_rates, min_input_seconds

    problems = []
    min_seconds, rate = 0.0, 0
    if any(p.get("reference_audio") for p in cfg.eval.prompts):
        try:  # from the codec's config: the codec itself loads at the first sample
            min_seconds = min_input_seconds(cfg.data.codec, cfg.data.codec_revision)
            rate = codec_rates(cfg.data.codec, cfg.data.codec_revision)[0] if cfg.data.audio.changes_audio else 0
        except CodecError as e:
            problems.append(f"eval.prompts: cannot tell the shortest reference the codec takes: {e}")
    for i, prompt in enumerate(cfg.eval.prompts):
        try:
            _reference_wave(cfg, i, prompt, min_seconds, rate)
        except ValueError as e:
            problems.append(str(e))
    return problems


def _reference_wave(cfg: Config, i: int, prompt: dict, min_seconds: float, codec_rate: int):
    """-> (mono float32 wave, sample rate) of the prompt's reference audio as training would condition it,
    or None without one. ``min_seconds``: the codec's shortest input, ``codec_rate`` its sample rate (checked
    and conditioned as training data is)."""
    key = f"eval.prompts[{i}]"
    ref = prompt.get("reference_audio")
    # the manifest's rule and speak's: a reference is its audio and its words
    problem = reference_problem(bool(ref), prompt.get("reference_text"), f"{key}.reference_audio",
                                f"{key}.reference_text")
    if problem:
        raise InputError(f"{key}: {problem[1]}")
    if not ref:
        return None
    return read_reference(ref, f"{key}.reference_audio", cfg.data.max_audio_seconds, min_seconds, cfg.data.audio,
                          codec_rate)


def _encode_reference(cfg: Config, i: int, prompt: dict, codec) -> Optional[torch.Tensor]:
    got = _reference_wave(cfg, i, prompt, codec.min_seconds, codec.sample_rate)
    return None if got is None else encode_reference(codec, *got)


def write_samples(raw_model, tokenizer, codec, cfg: Config, step: int, out_dir: Path,
                  lockstep: Optional[contextlib.AbstractContextManager] = None, scorer=None) -> list[SampleResult]:
    """Speak every ``cfg.eval.prompts`` entry; rank 0 writes ``out_dir/step_{step:06d}/sample_{i:02d}.wav`` and
    ``samples.json`` there and gets the results ([] elsewhere). A reference audio that cannot be used is a
    one-line ValueError naming it.

    Called on every rank: prompt i is spoken by rank ``i % world_size`` (so 8 GPUs take an eighth of the
    time, and no rank idles at the next collective while rank 0 generates) and its audio sent to rank 0.
    Each generation is seeded by ``eval.seed`` alone, so the files are the same for any number of ranks.
    ``codec`` may be a zero-argument callable: only ranks with a prompt to speak load it.

    ``lockstep`` (sharded weights, parallel.Strategy.generation): every rank speaks every prompt together,
    inside that context; rank 0 alone decodes and writes.

    ``scorer`` (scoring.Scorer): each sample is also transcribed and its voice compared, by the rank that
    decoded it (shared like generation; in lockstep rank 0 scores every sample), outside the training RNG."""
    import soundfile as sf

    from higgs_ddp.runtime.distributed import all_gather_objects

    prompts = cfg.eval.prompts
    if not prompts:
        return []
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine, caught, codec_info = {}, None, None
    share = range(len(prompts)) if lockstep is not None else range(rank, len(prompts), world)
    if share:
        try:  # an error (CodecError included) goes to every rank through the gather below: all raise
            codec = codec() if callable(codec) else codec
            codec_info = codec.sample_rate, codec.frame_rate
            check_codec(raw_model, codec)
            with lockstep or contextlib.nullcontext(), \
                    generation_state(raw_model, cfg.eval.seed, lockstep is not None):
                # Every reference first: an unusable one stops this before any audio is generated.
                refs = {i: _encode_reference(cfg, i, prompts[i], codec) for i in share}
                for i, ref_codes in refs.items():
                    got = speak_text(raw_model, tokenizer, codec, cfg, prompts[i]["text"],
                                     prompts[i].get("reference_text"), ref_codes, lockstep=lockstep is not None,
                                     decode=lockstep is None or rank == 0, what=f"eval.prompts[{i}]")
                    mine[i] = got.wave, got.generated, got.generate_seconds
            if scorer is not None and scorer.enabled:
                scored = _score(raw_model, scorer, codec_info[0], prompts, mine)
                mine = {i: (*got, scored.get(i)) for i, got in mine.items()}
        except (ValueError, RuntimeError, OSError) as e:  # OSError: a scoring model's files that do not load
            caught = e
    sent = mine if lockstep is None or rank == 0 else {}  # in lockstep rank 0 holds every prompt already
    gathered = all_gather_objects((sent, caught and f"{type(caught).__name__}: {caught}", codec_info))
    if caught is not None:
        raise caught
    for r, (_, error, _) in enumerate(gathered):
        if error is not None:
            raise RuntimeError(f"listening samples failed on rank {r}: {error}")
    if rank != 0:
        return []
    spoken = {i: got for part, _, _ in gathered for i, got in part.items()}
    sample_rate, frame_rate = gathered[0][2]
    folder = Path(out_dir) / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for i, prompt in enumerate(prompts):
        wave, gen, elapsed, *scores = spoken[i]
        path = folder / f"sample_{i:02d}.wav"
        checks = check_clip(wave, sample_rate, prompt["text"], gen.hit_limit)  # before the WAV clips it
        sf.write(str(path), wave, sample_rate, subtype="PCM_16")  # libsndfile clips to [-1, 1]
        results.append(SampleResult(prompt["text"], path, len(wave) / sample_rate, int(gen.codes.shape[1]),
                                    gen.hit_limit, prompt.get("reference_audio"), gen.invalid_codes,
                                    int((np.abs(wave) > 1.0).sum()), elapsed, checks, scores[0] if scores else None))
    record = {
        "step": step, "sample_rate": sample_rate, "frame_rate": frame_rate,
        "max_audio_seconds": cfg.eval.max_audio_seconds, "temperature": cfg.eval.temperature, "seed": cfg.eval.seed,
        "samples": [{"text": r.prompt, "reference_audio": r.reference_audio,
                     "reference_text": cfg.eval.prompts[i].get("reference_text"),
                     "path": r.path.name, "seconds": round(r.seconds, 4), "frames": r.frames,
                     "hit_limit": r.hit_limit, "invalid_codes": r.invalid_codes, "clipped": r.clipped,
                     "generate_seconds": round(r.generate_seconds, 3), **r.checks.as_dict(), **(r.scores or {})}
                    for i, r in enumerate(results)],
        "summary": sample_summary(results),
    }
    write_json_atomic(folder / "samples.json", record, indent=2)
    return results


def _score(raw_model, scorer, sample_rate: int, prompts: list, spoken: dict) -> dict:
    """{prompt index: scores} for the decoded samples in ``spoken``; the training RNG is left as it was."""
    device = next(raw_model.parameters()).device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        return {i: scorer.score(wave, sample_rate, prompts[i]) for i, (wave, *_) in spoken.items()
                if wave is not None}


def sample_summary(results: list[SampleResult]) -> dict:
    """One step's samples in a few numbers: the detectors' summary and the mean model scores."""
    from higgs_ddp.evaluation.scoring import mean_scores

    return {**summarize([r.checks for r in results]), **mean_scores([r.scores or {} for r in results])}


def describe_summary(s: dict) -> str:
    """One listening step's summary in words, for the line rank 0 prints."""
    n = s["samples"]
    rate = f"{s['chars_per_second']:.1f} chars/s" if s.get("chars_per_second") is not None else "no audio"
    parts = [f"{s['seconds']:.1f} s on average", f"{s['stopped_samples']}/{n} stopped by themselves",
             f"{s['silent_samples']}/{n} silent", rate]
    if s["clipped_fraction"]:
        parts.append(f"{s['clipped_fraction']:.2%} of samples clipped")
    if s.get("wer") is not None:
        parts.append(f"WER {s['wer']:.3f} (CER {s['cer']:.3f})")
    if s.get("speaker_sim") is not None:
        parts.append(f"speaker similarity {s['speaker_sim']:.3f}")
    elif s.get("speaker_sim_unmeasured"):
        parts.append(f"speaker similarity not measured ({s['speaker_sim_unmeasured']})")
    return ", ".join(parts)


def progress_fields(s: dict) -> dict:
    """The last listening step on the progress bar: samples that stopped by themselves, silent ones, WER,
    speaker similarity ({} before the first)."""
    if not s:
        return {}
    out = {"stop": f"{s['stopped_samples']}/{s['samples']}"}
    if s["silent_samples"]:
        out["silent"] = f"{s['silent_samples']}/{s['samples']}"
    if s.get("wer") is not None:
        out["wer"] = f"{s['wer']:.3f}"
    if s.get("speaker_sim") is not None:
        out["sim"] = f"{s['speaker_sim']:.3f}"
    return out
