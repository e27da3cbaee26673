"""Cheap checks on a generated clip, no model weights: is it silent, did it stop by itself, is it spoken at
a plausible rate, is it clipped. They catch the failures users hit most (a fine-tune that speaks silence or
never stops) at the first listening samples instead of after the run.

* **silence fraction**: the share of 20 ms frames whose RMS energy is below the clip's loudest frame minus
  ``SILENCE_RELATIVE_DB`` *or* below ``SILENCE_FLOOR_DBFS`` (full scale = 0 dB). The relative threshold
  finds pauses in normal speech; the absolute floor finds a clip that is quiet throughout (a model that
  learned silence hums at -70 dBFS: relative to its own peak, nothing in it would be silent). An empty
  clip is all silence.
* **stopped**: the model ended the audio stream itself (the stream EOS) within ``eval.max_audio_seconds``.
* **characters per second**: the prompt's letters and digits (no spaces or punctuation; a CJK character
  counts once) over the clip's length. Read speech runs at about 12-16 in English and 4-7 in Mandarin;
  far more means truncated or skipped words, far less dragging or long silences.
* **clipped fraction**: the share of samples at or beyond full scale (``|x| >= CLIP_LEVEL``), counted
  before the 16-bit WAV writer clips them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

FRAME_SECONDS = 0.02
SILENCE_RELATIVE_DB = 40.0  # a frame this far below the clip's loudest frame is a pause
SILENCE_FLOOR_DBFS = -60.0  # a frame below this is silent whatever the rest of the clip does
CLIP_LEVEL = 0.999  # |sample| at or beyond this is at full scale
SILENT_CLIP = 0.9  # a clip at least this silent counts as a silent sample
MOSTLY = 0.5  # more than this share of samples silent (or never stopping): warn


@dataclass
class ClipChecks:
    seconds: float
    silence_fraction: float  # of its 20 ms frames, 1.0 for an empty clip
    stopped: bool  # the stream EOS came before eval.max_audio_seconds
    chars_per_second: Optional[float]  # None for an empty clip
    clipped_fraction: float  # of its samples

    @property
    def silent(self) -> bool:
        return self.silence_fraction >= SILENT_CLIP

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def frame_dbfs(wave: np.ndarray, sample_rate: int, frame_seconds: float = FRAME_SECONDS) -> np.ndarray:
    """RMS energy of consecutive frames in dB relative to full scale (a last partial frame included)."""
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    n = max(1, round(frame_seconds * sample_rate))
    if not len(wave):
        return np.zeros(0)
    pad = (-len(wave)) % n
    frames = np.pad(wave, (0, pad)).reshape(-1, n)
    counts = np.full(len(frames), n, dtype=np.float64)
    counts[-1] = n - pad  # the padded zeros of the last frame are not part of the clip
    rms = np.sqrt((frames ** 2).sum(axis=1) / counts)
    return 20.0 * np.log10(np.maximum(rms, 1e-10))


def silence_fraction(wave: np.ndarray, sample_rate: int, relative_db: float = SILENCE_RELATIVE_DB,
                     floor_dbfs: float = SILENCE_FLOOR_DBFS) -> float:
    db = frame_dbfs(wave, sample_rate)
    if not len(db):
        return 1.0
    threshold = max(float(db.max()) - relative_db, floor_dbfs)
    return float((db < threshold).mean())


def spoken_characters(text: str) -> int:
    """Letters and digits of ``text`` (each CJK character is one): what takes time to say."""
    return sum(ch.isalnum() for ch in text)


def clipped_fraction(wave: np.ndarray) -> float:
    wave = np.asarray(wave).reshape(-1)
    return float((np.abs(wave) >= CLIP_LEVEL).mean()) if len(wave) else 0.0


def check_clip(wave: np.ndarray, sample_rate: int, text: str, hit_limit: bool) -> ClipChecks:
    seconds = len(np.asarray(wave).reshape(-1)) / sample_rate
    return ClipChecks(seconds=seconds, silence_fraction=silence_fraction(wave, sample_rate), stopped=not hit_limit,
                      chars_per_second=spoken_characters(text) / seconds if seconds else None,
                      clipped_fraction=clipped_fraction(wave))


def summarize(checks: list[ClipChecks]) -> dict:
    """Over one step's samples: the numbers metrics.jsonl, TensorBoard and the plot show."""
    n = len(checks)
    rates = [c.chars_per_second for c in checks if c.chars_per_second is not None]
    return {
        "samples": n,
        "seconds": sum(c.seconds for c in checks) / n if n else math.nan,
        "silence_fraction": sum(c.silence_fraction for c in checks) / n if n else math.nan,
        "silent_samples": sum(c.silent for c in checks),
        "stopped_samples": sum(c.stopped for c in checks),
        "chars_per_second": float(np.median(rates)) if rates else None,
        "clipped_fraction": sum(c.clipped_fraction for c in checks) / n if n else math.nan,
    }


def warnings_for(summary: dict) -> list[str]:
    """The failures worth a line of their own: most samples silent, most never stopping."""
    n, out = summary["samples"], []
    if not n:
        return out
    if summary["silent_samples"] > MOSTLY * n:
        out.append(f"{summary['silent_samples']} of {n} listening samples are silent (at least "
                   f"{SILENT_CLIP:.0%} of the clip below {SILENCE_FLOOR_DBFS:g} dBFS or {SILENCE_RELATIVE_DB:g} dB "
                   f"under its peak): the model is not speaking; listen to them, and check the loss labels and data")
    never = n - summary["stopped_samples"]
    if never > MOSTLY * n:
        out.append(f"{never} of {n} listening samples never stopped (no stream EOS within eval.max_audio_seconds): "
                   f"the model has not learned to end its audio")
    return out
