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
from higgs_ddp.errors import InputError


def locate(name: str, key: str) -> str:
    """The folder holding ``name``'s weights: ``name`` itself, or its snapshot in the Hugging Face cache.
    Never downloads. A ValueError (one line) names what is missing and how to get it."""
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path
    elif name.startswith((".", "/", "~")) or path.suffix or name.count("/") > 1:
        raise InputError(f"{key}: {name} is not a folder")
    else:
        from huggingface_hub import constants, snapshot_download
        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or a malformed id): either way, not here
            raise InputError(
                f"{key}: {name} is neither a folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                f"a run never downloads weights: get them first with `huggingface-cli download {name}` (or copy "
                f"that cache from a machine with network), or set {key} to a folder holding them") from None
    if not (folder / "config.json").is_file():
        raise InputError(f"{key}: {folder} holds no config.json (a transformers model folder is needed)")
    return str(folder)


def check_resemblyzer(key: str = "eval.speaker_model") -> None:
    import importlib.util

    if importlib.util.find_spec("resemblyzer") is None:
        raise InputError(f"{key}=resemblyzer needs the resemblyzer package (its encoder weights come "
                         "with it): pip install 'higgs-ddp[voice]' (or pip install resemblyzer)")


# How the user named each setting: a run's config keys. ``higgs-ddp score`` passes its own (its flags and
# its prompts file's lines), so that an error names what was typed.
RUN_NAMES = {"asr_model": "eval.asr_model", "speaker_model": "eval.speaker_model",
             "prompt": lambda i: f"eval.prompts[{i}]."}


def check_models(cfg: Config, names: dict = RUN_NAMES) -> list[str]:
    """One line per evaluation model that cannot be found and per ``speaker_audio`` that cannot be read;
    [] when all is well. ``names``: RUN_NAMES' keys, each as the user wrote it."""
    from higgs_ddp.evaluation.speaker import RESEMBLYZER

    problems = []
    for key in ("asr_model", "speaker_model"):
        name = getattr(cfg.eval, key)
        try:
            if name == RESEMBLYZER and key == "speaker_model":
                check_resemblyzer(names[key])
            elif name:
                locate(name, names[key])
        except ValueError as e:
            problems.append(str(e))
    for i, prompt in enumerate(cfg.eval.prompts):  # the held-out voice clips speaker similarity compares with
        if prompt.get("speaker_audio"):
            from higgs_ddp.data.audio import AudioProblem, read_audio
            try:
                read_audio(Path(prompt["speaker_audio"]), str(prompt["speaker_audio"]), 0.0)
            except AudioProblem as e:
                problems.append(f"{names['prompt'](i)}speaker_audio: {e}")
    return problems


def prompt_language(cfg: Config, prompt: dict) -> str:
    return prompt.get("language") or cfg.eval.language


def speaker_reference(prompt: dict) -> Optional[str]:
    """The recording whose voice a sample should have: a held-out clip of the target speaker, or else the
    voice-clone reference."""
    return prompt.get("speaker_audio") or prompt.get("reference_audio")


class Scorer:
    """The configured models, loaded at first use on the ranks that score a sample."""

    def __init__(self, cfg: Config, device="cpu", names: dict = RUN_NAMES):
        self.cfg, self.device = cfg, device
        self.asr = locate(cfg.eval.asr_model, names["asr_model"]) if cfg.eval.asr_model else None
        from higgs_ddp.evaluation.speaker import RESEMBLYZER
        speaker = cfg.eval.speaker_model
        if speaker == RESEMBLYZER:
            check_resemblyzer(names["speaker_model"])
        self.speaker = locate(speaker, names["speaker_model"]) if speaker and speaker != RESEMBLYZER else speaker
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

    def _reference(self, path: str) -> tuple:
        """-> (the reference voice's embedding, "") or (None, why not); each file embedded once."""
        if path not in self._references:
            from higgs_ddp.data.audio import AudioProblem, read_audio
            try:
                wave, sr = read_audio(Path(path), path, 0.0, 0.0)
            except AudioProblem as e:
                raise InputError(f"speaker reference {path}: {e}") from None
            self._references[path] = self.encoder.embedding(wave, sr)
        return self._references[path]

    def score(self, wave: np.ndarray, sample_rate: int, prompt: dict) -> dict:
        """{transcript, wer, cer, speaker_sim} for one clip (keys only for the configured models; a value is
        None where it cannot be measured: no reference voice, a clip too short to embed, and then
        ``speaker_sim_unmeasured`` says which)."""
        from higgs_ddp.evaluation.asr import character_error_rate, error_rate

        out = {}
        if self.asr:
            language = prompt_language(self.cfg, prompt)
            text = self.transcriber.transcribe(wave, sample_rate, language)
            out["transcript"] = text
            out["wer"] = error_rate(prompt["text"], text, language).rate
            out["cer"] = character_error_rate(prompt["text"], text, language)
        if self.speaker:
            sim, why = self._similarity(wave, sample_rate, prompt)
            out["speaker_sim"] = sim
            if sim is None:
                out[UNMEASURED] = why
        return out

    def _similarity(self, wave: np.ndarray, sample_rate: int, prompt: dict) -> tuple:
        """-> (cosine of the clip's voice and the prompt's reference voice, "") or (None, why not)."""
        from higgs_ddp.evaluation.speaker import cosine

        ref = speaker_reference(prompt)
        if not ref:
            return None, NO_REFERENCE
        a, why = self.encoder.embedding(wave, sample_rate)
        if a is None:
            return None, f"generated clip: {why}"
        b, why = self._reference(ref)
        if b is None:
            return None, f"reference voice {ref}: {why}"
        return cosine(a, b), ""


UNMEASURED = "speaker_sim_unmeasured"  # beside a speaker_sim of None (null): why it could not be measured
NO_REFERENCE = "no reference voice (the prompt has neither speaker_audio nor reference_audio)"


def unmeasured_reasons(scores: list[dict]) -> str:
    """Why the samples' speaker similarity could not be measured, each reason once with its count:
    "2 of 3 samples: generated clip: too short for the speaker encoder (under 100 ms); 1 of 3: ..."."""
    from collections import Counter

    counts = Counter(s[UNMEASURED] for s in scores if s.get(UNMEASURED))
    return "; ".join(f"{n} of {len(scores)} sample{'s' * (len(scores) > 1)}: {why}" for why, n in counts.items())


def mean_scores(scores: list[dict]) -> dict:
    """The step's wer, cer and speaker_sim: means over the samples that have them (None where none does; for
    speaker_sim, ``speaker_sim_unmeasured`` then says why)."""
    out = {}
    for key in ("wer", "cer", "speaker_sim"):
        values = [s[key] for s in scores if s.get(key) is not None and math.isfinite(s[key])]
        if any(key in s for s in scores):
            out[key] = sum(values) / len(values) if values else None
    if "speaker_sim" in out and out["speaker_sim"] is None:
        out[UNMEASURED] = unmeasured_reasons(scores)
    return out
