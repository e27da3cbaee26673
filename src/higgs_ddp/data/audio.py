"""Reading one audio file for the codec: checks first, then decode (libsndfile), mono down-mix.

Every way a file can be unusable raises ``AudioProblem`` with a stable ``reason`` (counted in the data
report) and a message that names the file; nothing here prints a traceback for bad data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

MIN_SAMPLE_RATE = 4_000  # below this nothing intelligible survives
MAX_SAMPLE_RATE = 384_000  # the highest rate real recorders write


class AudioProblem(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_path(path: Path, shown: str) -> None:
    if not path.exists():
        raise AudioProblem("audio_missing", f"audio {shown} not found")
    if path.is_dir():
        raise AudioProblem("audio_is_directory", f"audio {shown} is a directory, not a file")


def check_header(path: Path, shown: str, max_seconds: float = 0.0, min_seconds: float = 0.0):
    """Every check that needs no decoding (existence, format, rate, length, a WAV cut short) -> soundfile's
    info. The importer and ``manifest stats`` stop here; ``read_audio`` goes on to decode."""
    check_path(path, shown)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise AudioProblem("audio_unreadable", f"audio {shown} cannot be read ({e.strerror or type(e).__name__})")
    try:
        info = sf.info(str(path))
    except (RuntimeError, ValueError, OSError) as e:  # libsndfile does not recognise the bytes as audio
        raise AudioProblem("audio_unreadable",
                           f"audio {shown} is not a readable audio file ({_first_line(e)})") from None
    sr = int(info.samplerate)
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioProblem("audio_bad_sample_rate", f"audio {shown} claims a sample rate of {sr} Hz "
                           f"(accepted: {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
    if info.frames == 0:
        raise AudioProblem("audio_empty", f"audio {shown} has no samples")
    if info.frames / sr < min_seconds:  # resampled, it would still be too short for the codec's encoder
        raise AudioProblem("audio_too_short", f"audio {shown} is too short for the codec: "
                           f"{info.frames / sr * 1000:.1f} ms, its encoder needs {min_seconds * 1000:.1f} ms")
    if max_seconds and info.frames / sr > max_seconds:
        raise AudioProblem("audio_too_long", f"audio {shown} lasts {info.frames / sr:.1f} s, more than "
                           f"data.max_audio_seconds={max_seconds:g}")
    short = _wav_shortfall(path)
    if short:
        raise AudioProblem("audio_corrupt", f"audio {shown} is truncated: its header declares {short[0]} bytes "
                           f"of audio, the file holds {short[1]}")
    return info


def read_audio(path: Path, shown: str, max_seconds: float, min_seconds: float = 0.0) -> tuple[np.ndarray, int]:
    """-> (mono float32 samples, sample rate). ``shown`` is the path as the manifest wrote it; ``min_seconds``
    is the codec's shortest input (``Codec.min_seconds``, ``codec.min_input_seconds``)."""
    info = check_header(path, shown, max_seconds, min_seconds)
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, OSError) as e:  # a valid header over garbled data
        raise AudioProblem("audio_corrupt", f"audio {shown} is corrupt ({_first_line(e)})") from None
    if wave.shape[0] == 0:
        raise AudioProblem("audio_empty", f"audio {shown} has no samples")
    if wave.shape[0] < info.frames:
        raise AudioProblem("audio_corrupt", f"audio {shown} is truncated: header says {info.frames} "
                           f"samples, {wave.shape[0]} could be decoded")
    if not np.isfinite(wave).all():
        bad = int((~np.isfinite(wave)).sum())
        raise AudioProblem("audio_non_finite", f"audio {shown} holds {bad} non-finite (NaN/inf) samples")
    return wave.mean(axis=1, dtype=np.float32), sr  # mono down-mix, as librosa.load(mono=True) does


def _wav_shortfall(path: Path):
    """(declared, present) data bytes of a WAV cut short; None otherwise. libsndfile quietly reads what
    is there, so a half-copied file would train as a shorter clip that no longer matches its text."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = os.fstat(f.fileno()).st_size
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            n = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                present = size - pos - 8
                return (n, present) if n != 0xFFFFFFFF and n > present else None
            pos += 8 + n + (n & 1)
    return None


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    if orig_sr == new_sr:
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, orig_sr, new_sr)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
