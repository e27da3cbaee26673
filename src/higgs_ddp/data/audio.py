"""Reading one audio file for the codec: checks first, then decode (libsndfile), mono down-mix.

Every way a file can be unusable raises ``AudioProblem`` with a stable ``reason`` (counted in the data
report) and a message that names the file; nothing here prints a traceback for bad data.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf
import torch

from higgs_ddp.data.members import MemberError, member_of, read_member
from higgs_ddp.errors import HiggsError

MIN_SAMPLE_RATE = 4_000  # below this nothing intelligible survives
MAX_SAMPLE_RATE = 384_000  # the highest rate real recorders write


class AudioProblem(HiggsError, ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_path(path: Path, shown: str) -> None:
    """The file is there (for a member of a tar shard, ``members.py``: its shard; the member is found when read)."""
    m = member_of(path)
    if not (path if m is None else m.shard).exists():
        raise AudioProblem("audio_missing", f"audio {shown} not found" if m is None else
                           f"audio {shown}: its shard {m.shard.name} is not found")
    if (path if m is None else m.shard).is_dir():
        raise AudioProblem("audio_is_directory", f"audio {shown} is a directory, not a file")


def member_bytes(path: Path, shown: str) -> Optional[bytes]:
    """The bytes of the tar member ``path`` names (``members.py``); None for a plain file, read by name."""
    m = member_of(path)
    if m is None:
        return None
    try:
        return read_member(m)
    except MemberError as e:
        raise AudioProblem(e.reason, f"audio {shown}: {e}") from None


def _source(path: Path, data: Optional[bytes]):
    """What soundfile opens: the file by name, or a member's bytes."""
    return str(path) if data is None else io.BytesIO(data)


def check_header(path: Path, shown: str, max_seconds: float = 0.0, min_seconds: float = 0.0,
                 rule: Optional["DurationRule"] = None):
    """Every check that needs no decoding (existence, format, rate, length, a WAV cut short) -> soundfile's
    info. The importer, ``manifest stats`` and the doctor stop here; ``read_audio`` goes on to decode. The
    length is judged by ``rule``, by default the codec's shortest input ``min_seconds`` and ``max_seconds``."""
    check_path(path, shown)
    return _header(path, shown, member_bytes(path, shown), max_seconds, min_seconds, rule)


def _header(path: Path, shown: str, data: Optional[bytes], max_seconds: float, min_seconds: float,
            rule: Optional["DurationRule"]):
    if data is None:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise AudioProblem("audio_unreadable",
                               f"audio {shown} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        info = sf.info(_source(path, data))
    except (RuntimeError, ValueError, OSError) as e:  # libsndfile does not recognise the bytes as audio
        raise AudioProblem("audio_unreadable",
                           f"audio {shown} is not a readable audio file ({_first_line(e)})") from None
    sr = int(info.samplerate)
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioProblem("audio_bad_sample_rate", f"audio {shown} claims a sample rate of {sr} Hz "
                           f"(accepted: {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
    if info.frames == 0:
        raise AudioProblem("audio_empty", f"audio {shown} has no samples")
    (rule or DurationRule(min_seconds, 0.0, max_seconds)).check_file(info.frames / sr, shown)
    short = _wav_shortfall(path, data)
    if short:
        raise AudioProblem("audio_corrupt", f"audio {shown} is truncated: its header declares {short[0]} bytes "
                           f"of audio, the file holds {short[1]}")
    return info


def read_audio(path: Path, shown: str, max_seconds: float, min_seconds: float = 0.0,
               rule: Optional["DurationRule"] = None) -> tuple[np.ndarray, int]:
    """-> (mono float32 samples, sample rate). ``shown`` is the path as the manifest wrote it; ``min_seconds``
    is the codec's shortest input (``Codec.min_seconds``, ``codec.min_input_seconds``); ``rule`` replaces
    both (see check_header)."""
    check_path(path, shown)
    data = member_bytes(path, shown)  # a member is read from its shard once
    info = _header(path, shown, data, max_seconds, min_seconds, rule)
    try:
        wave, sr = sf.read(_source(path, data), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, OSError) as e:  # a valid header over garbled data
        raise AudioProblem("audio_corrupt", f"audio {shown} is corrupt ({_first_line(e)})") from None
    if wave.shape[0] == 0:
        raise AudioProblem("audio_empty", f"audio {shown} has no samples")
    if wave.shape[0] < info.frames - _header_slack(info):
        raise AudioProblem("audio_corrupt", f"audio {shown} is truncated: header says {info.frames} "
                           f"samples, {wave.shape[0]} could be decoded")
    if not np.isfinite(wave).all():
        bad = int((~np.isfinite(wave)).sum())
        raise AudioProblem("audio_non_finite", f"audio {shown} holds {bad} non-finite (NaN/inf) samples")
    return wave.mean(axis=1, dtype=np.float32), sr  # mono down-mix, as librosa.load(mono=True) does


# An MP3's length is not stored exactly: libsndfile takes it from the Xing/LAME tag, which may count the
# encoder's padding (a lame 3.100 clip declares 61,920 samples and decodes 61,632, half an MPEG-2 frame).
# Up to two MPEG frames short is what the format can promise; a file cut short misses more.
MP3_SLACK_FRAMES = 2


def _header_slack(info) -> int:
    """How many samples fewer than ``info.frames`` a whole file of this format may decode (WAV, FLAC, Ogg
    store their length exactly: none). An MPEG-1 layer III frame holds 1152 samples (32-48 kHz), an
    MPEG-2/2.5 one 576 (8-24 kHz)."""
    if info.format != "MP3":
        return 0
    return MP3_SLACK_FRAMES * (1152 if info.samplerate >= 32_000 else 576)


def check_duration(seconds: float, shown: str, max_seconds: float = 0.0, min_seconds: float = 0.0,
                   codec_min: float = 0.0, after: str = "") -> None:
    """The duration limits: the codec's shortest input (``codec_min``; resampled, a shorter clip would still
    be too short for its encoder), data.audio.min_seconds and data.max_audio_seconds (0: none). ``after``
    says what the duration was measured after (" after trimming silence")."""
    if seconds < codec_min:
        raise AudioProblem("audio_too_short", f"audio {shown} is too short for the codec{after}: "
                           f"{seconds * 1000:.1f} ms, its encoder needs {codec_min * 1000:.1f} ms")
    if min_seconds and seconds < min_seconds:
        raise AudioProblem("audio_too_short", f"audio {shown} lasts {seconds:.2f} s{after}, less than "
                           f"data.audio.min_seconds={min_seconds:g}")
    if max_seconds and seconds > max_seconds:
        raise AudioProblem("audio_too_long", f"audio {shown} lasts {seconds:.1f} s{after}, more than "
                           f"data.max_audio_seconds={max_seconds:g}")


@dataclass(frozen=True)
class DurationRule:
    """The duration limits a training clip answers to, in one place: prepare (and so training), ``manifest
    stats`` and the doctor all judge by it. ``codec_min``: the codec's shortest input; ``min_seconds``:
    data.audio.min_seconds; ``max_seconds``: data.max_audio_seconds (0: none). With data.audio.trim_silence
    on, the last two judge the trimmed clip, which only prepare sees, so a file answers to ``codec_min``."""

    codec_min: float = 0.0
    min_seconds: float = 0.0
    max_seconds: float = 0.0
    trims: bool = False

    @classmethod
    def of(cls, data, codec_min: float) -> "DurationRule":
        """From a config's ``data`` section and the codec's shortest input."""
        return cls(codec_min, data.audio.min_seconds, data.max_audio_seconds, data.audio.trim_silence)

    def check_file(self, seconds: float, shown: str) -> None:
        """A file's duration, as its header or decoder gives it."""
        if self.trims:
            check_duration(seconds, shown, codec_min=self.codec_min)
        else:
            check_duration(seconds, shown, self.max_seconds, self.min_seconds, self.codec_min)

    def check_encoded(self, seconds: float, shown: str) -> None:
        """The clip the codec encodes: trimmed, when trimming is on."""
        check_duration(seconds, shown, self.max_seconds, self.min_seconds, self.codec_min,
                       after=" after trimming silence" if self.trims else "")


# ------------------------------------------------------------------------------------------- conditioning

TRIM_FRAME_SECONDS = 0.01  # silence is judged per 10 ms: shorter than a phone, longer than a pitch period


def frame_rms(wave: np.ndarray, frame: int) -> np.ndarray:
    """RMS of consecutive ``frame``-sample frames (the last one may be shorter)."""
    n = -(-len(wave) // frame)
    padded = np.zeros(n * frame, np.float64)
    padded[:len(wave)] = wave
    counts = np.full(n, frame, np.float64)
    counts[-1] = len(wave) - (n - 1) * frame
    return np.sqrt((padded.reshape(n, frame) ** 2).sum(1) / counts)


def trim_silence(wave: np.ndarray, sr: int, below_db: float, keep_seconds: float, shown: str) -> np.ndarray:
    """Cut leading and trailing silence: frames more than ``below_db`` under the loudest frame, as librosa's
    ``effects.trim(top_db=...)`` judges them; ``keep_seconds`` of it stay on each side of the sound."""
    frame = max(1, round(sr * TRIM_FRAME_SECONDS))
    rms = frame_rms(wave, frame)
    if not rms.max() > 0:
        raise AudioProblem("audio_silent", f"audio {shown} is silent (every sample is zero)")
    loud = np.flatnonzero(rms > rms.max() * 10 ** (-below_db / 20))
    keep = round(keep_seconds * sr)
    start = max(0, loud[0] * frame - keep)
    end = min(len(wave), (loud[-1] + 1) * frame + keep)
    return wave[start:end]


_METERS: dict = {}


def loudness(wave: np.ndarray, sr: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4, gated), by pyloudnorm."""
    import pyloudnorm

    meter = _METERS.get(sr) or _METERS.setdefault(sr, pyloudnorm.Meter(sr))
    return float(meter.integrated_loudness(wave.astype(np.float64)))


def condition(wave: np.ndarray, sr: int, settings, shown: str) -> np.ndarray:
    """data.audio (config.AudioConditioning) applied to a mono clip: trim, then loudness, then the peak limit
    (last, so the limit holds whatever the loudness gain did; a clip it scales down ends quieter than the
    target rather than clipped)."""
    if settings.trim_silence:
        wave = trim_silence(wave, sr, settings.trim_db, settings.trim_keep_seconds, shown)
    if settings.loudness_lufs is not None:
        if len(wave) < 0.4 * sr:  # BS.1770 measures 400 ms blocks
            raise AudioProblem("audio_too_short", f"audio {shown} lasts {len(wave) / sr:.2f} s, too short to "
                               f"measure its loudness (data.audio.loudness_lufs needs one 400 ms block)")
        measured = loudness(wave, sr)
        if not np.isfinite(measured):  # every block under BS.1770's absolute gate
            raise AudioProblem("audio_silent", f"audio {shown} is silent (quieter than -70 LUFS, BS.1770's "
                               f"absolute gate): its loudness cannot be normalised")
        wave = wave * np.float32(10 ** ((settings.loudness_lufs - measured) / 20))
    if settings.peak_dbfs is not None:
        peak, limit = float(np.abs(wave).max()), 10 ** (settings.peak_dbfs / 20)
        if peak > limit:
            wave = wave * np.float32(limit / peak)
    return wave.astype(np.float32)


def frame_energy(wave: np.ndarray, sr: int, frame_rate: float) -> np.ndarray:
    """RMS per codec frame (``frame_rate`` frames per second of ``wave``): where a reference can be cut."""
    return frame_rms(wave, max(1, round(sr / frame_rate)))


def _wav_shortfall(path: Path, data: Optional[bytes] = None):
    """(declared, present) data bytes of a WAV cut short; None otherwise. libsndfile quietly reads what
    is there, so a half-copied file would train as a shorter clip that no longer matches its text."""
    with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = os.fstat(f.fileno()).st_size if data is None else len(data)
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
