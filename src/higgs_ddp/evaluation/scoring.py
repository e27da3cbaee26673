"""Model-based scores of a listening sample: what Whisper hears (WER/CER against the prompt text) and how
close the voice is to the one it should have (speaker similarity). See asr.py and speaker.py.

The weights come from a local folder or the Hugging Face cache, never from the network during a run: a
model that is not there is one line naming it and how to get it, found at start on every rank
(``check_models``), not hours later at the first sample.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import numpy as np

from higgs_ddp.config import Config


def locate(name: str, key: str) -> str:
    """The folder holding ``name``'s weights: ``name`` itself, or its snapshot in the Hugging Face cache.
    Never downloads. A ValueError (one line) names what is missing and how to get it."""
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path
    elif name.startswith((".", "/", "~")) or path.suffix or name.count("/") > 1:
        raise ValueError(f"{key}: {name} is not a folder")
    else:
        from huggingface_hub import constants, snapshot_download
        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or a malformed id): either way, not here
            raise ValueError(
                f"{key}: {name} is neither a folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                f"a run never downloads weights: get them first with `huggingface-cli download {name}` (or copy "
                f"that cache from a machine with network), or set {key} to a folder holding them") from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"{key}: {folder} holds no config.json (a transformers model folder is needed)")
    return str(folder)


def check_resemblyzer() -> None:
    import importlib.util

    if importlib.util.find_spec("resemblyzer") is None:
        raise ValueError("eval.speaker_model=resemblyzer needs the resemblyzer package (its encoder weights come "
                         "with it): pip install 'higgs-ddp[voice]' (or pip install resemblyzer)")


def check_models(cfg: Config) -> list[str]:
    """One line per evaluation model that cannot be found and per ``speaker_audio`` that cannot be read;
    [] when all is well."""
    from higgs_ddp.evaluation.speaker import RESEMBLYZER

    problems = []
    for key in ("asr_model", "speaker_model"):
        name = getattr(cfg.eval, key)
        try:
            if name == RESEMBLYZER and key == "speaker_model":
                check_resemblyzer()
            elif name:
                locate(name, f"eval.{key}")
        except ValueError as e:
            problems.append(str(e))
    for i, prompt in enumerate(cfg.eval.prompts):  # the held-out voice clips speaker similarity compares with
        if prompt.get("speaker_audio"):
            from higgs_ddp.data.audio import AudioProblem, read_audio
            try:
                read_audio(Path(prompt["speaker_audio"]), str(prompt["speaker_audio"]), 0.0)
            except AudioProblem as e:
                problems.append(f"eval.prompts[{i}].speaker_audio: {e}")
    return problems


def prompt_language(cfg: Config, prompt: dict) -> str:
    return prompt.get("language") or cfg.eval.language


def speaker_reference(prompt: dict) -> Optional[str]:
    """The recording whose voice a sample should have: a held-out clip of the target speaker, or else the
    voice-clone reference."""
    return prompt.get("speaker_audio") or prompt.get("reference_audio")


class Scorer:
    """The configured models, loaded at first use on the ranks that score a sample."""

    def __init__(self, cfg: Config, device="cpu"):
        self.cfg, self.device = cfg, device
        self.asr = locate(cfg.eval.asr_model, "eval.asr_model") if cfg.eval.asr_model else None
        from higgs_ddp.evaluation.speaker import RESEMBLYZER
        speaker = cfg.eval.speaker_model
        if speaker == RESEMBLYZER:
            check_resemblyzer()
        self.speaker = locate(speaker, "eval.speaker_model") if speaker and speaker != RESEMBLYZER else speaker
        self._references = {}

    @property
    def enabled(self) -> bool:
        return bool(self.asr or self.speaker)

    @functools.cached_property
    def transcriber(self):
        from higgs_ddp.evaluation.asr import Transcriber
        return Transcriber(self.asr, self.device)

    @functools.cached_property
    def encoder(self):
        from higgs_ddp.evaluation.speaker import RESEMBLYZER, ResemblyzerEncoder, SpeakerEncoder
        if self.speaker == RESEMBLYZER:
            return ResemblyzerEncoder(self.device)
        return SpeakerEncoder(self.speaker, self.device)

    def _reference(self, path: str):
        if path not in self._references:
            from higgs_ddp.data.audio import AudioProblem, read_audio
            try:
                wave, sr = read_audio(Path(path), path, 0.0, 0.0)
            except AudioProblem as e:
                raise ValueError(f"speaker reference {path}: {e}") from None
            self._references[path] = self.encoder.embed(wave, sr)
        return self._references[path]

    def score(self, wave: np.ndarray, sample_rate: int, prompt: dict) -> dict:
        """{transcript, wer, cer, speaker_sim} for one clip (keys only for the configured models; a value is
        None where it cannot be measured: no reference voice, a clip too short to embed)."""
        from higgs_ddp.evaluation.asr import character_error_rate, error_rate
        from higgs_ddp.evaluation.speaker import cosine

        out = {}
        if self.asr:
            language = prompt_language(self.cfg, prompt)
            text = self.transcriber.transcribe(wave, sample_rate, language)
            out["transcript"] = text
            out["wer"] = error_rate(prompt["text"], text, language).rate
            out["cer"] = character_error_rate(prompt["text"], text, language)
        if self.speaker:
            ref = speaker_reference(prompt)
            sim = None
            if ref:
                a, b = self.encoder.embed(wave, sample_rate), self._reference(ref)
                sim = None if a is None or b is None else cosine(a, b)
            out["speaker_sim"] = sim
        return out


def mean_scores(scores: list[dict]) -> dict:
    """The step's wer, cer and speaker_sim: means over the samples that have them (None where none does)."""
    out = {}
    for key in ("wer", "cer", "speaker_sim"):
        values = [s[key] for s in scores if s.get(key) is not None and math.isfinite(s[key])]
        if any(key in s for s in scores):
            out[key] = sum(values) / len(values) if values else None
    return out
