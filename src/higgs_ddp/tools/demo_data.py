"""A small synthetic TTS corpus for the demo and the tests: texts, and audio (or code arrays) that
depend on the text in a learnable way, so the loss visibly falls.

    higgs-ddp demo-data OUT_DIR [--samples N]      # an LJSpeech-style folder: metadata.csv + wavs/
    higgs-ddp demo-data OUT_DIR --codes            # a JSONL manifest naming .npy code arrays

By default it writes what a user brings: an LJSpeech-style folder of WAV files (one tone per character,
8 kHz), which `higgs-ddp manifest import --format ljspeech` turns into the manifest, as `make demo` does.
With ``--codes`` it writes a manifest naming .npy code arrays directly (no codec needed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing at dawn".split()


def text_to_codes(text: str, num_codebooks: int, codebook_size: int) -> np.ndarray:
    """Two frames per character; each codebook a different function of the character and position."""
    chars = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    frames = np.repeat(chars, 2)
    t = np.arange(len(frames))
    rows = [(frames * (k + 3) + (t % 2) * (k + 1)) % codebook_size for k in range(num_codebooks)]
    return np.stack(rows).astype(np.int64)


def text_to_wave(text: str, sample_rate: int = 8000, seconds_per_char: float = 0.04) -> np.ndarray:
    """One short tone per character, its pitch set by the character: speech-like enough for a codec."""
    n = int(sample_rate * seconds_per_char)
    t = np.arange(n) / sample_rate
    envelope = np.hanning(n)
    tones = [0.3 * envelope * np.sin(2 * np.pi * (150 + 12 * (ord(c) % 64)) * t) for c in text]
    return np.concatenate(tones).astype(np.float32)


def _write(out: Path, rel: str, text: str, audio: bool, num_codebooks: int, codebook_size: int) -> str:
    if audio:
        import soundfile as sf

        sf.write(out / rel, text_to_wave(text), 8000, subtype="PCM_16")
    else:
        np.save(out / rel, text_to_codes(text, num_codebooks, codebook_size))
    return rel


def _texts(samples: int, rng) -> list:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 5)))) for _ in range(samples)]


def write_ljspeech_demo(out_dir, samples: int = 48, seed: int = 0) -> Path:
    """An LJSpeech-style folder: ``metadata.csv`` (``id|text|normalized text``) and ``wavs/{id}.wav``."""
    out = Path(out_dir)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(_texts(samples, np.random.default_rng(seed))):
        _write(out, f"wavs/demo{i:04d}.wav", text, True, 0, 0)
        rows.append(f"demo{i:04d}|{text}|{text}")
    (out / "metadata.csv").write_text("\n".join(rows) + "\n")
    return out


def write_demo_corpus(out_dir, samples: int = 48, num_codebooks: int = 4, codebook_size: int = 64,
                      seed: int = 0, with_reference_every: int = 4, audio: bool = False) -> Path:
    out = Path(out_dir)
    sub, ext, key = ("clips", "wav", "audio") if audio else ("codes", "npy", "audio_codes")
    (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(samples):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        rec = {"id": f"demo{i:04d}", "text": text,
               key: _write(out, f"{sub}/{i:04d}.{ext}", text, audio, num_codebooks, codebook_size)}
        if audio:
            rec["speaker"] = "tones"
        if with_reference_every and i % with_reference_every == 0:
            ref_text = " ".join(rng.choice(WORDS, size=2))
            rec.update(ref_text=ref_text, **{
                f"ref_{key}": _write(out, f"{sub}/{i:04d}_ref.{ext}", ref_text, audio, num_codebooks, codebook_size)})
        lines.append(json.dumps(rec))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the folder to write (made if missing; make demo uses runs/tiny/data)")
    p.add_argument("--samples", type=int, default=48, help="clips to write (default %(default)s)")
    p.add_argument("--codes", action="store_true", help="a JSONL manifest of .npy codes instead of the WAV folder")
    p.add_argument("--codebooks", type=int, default=4,
                   help="with --codes: codebooks per frame, the model's audio_num_codebooks (default %(default)s)")
    p.add_argument("--codebook-size", type=int, default=64,
                   help="with --codes: codes per codebook, the model's audio_codebook_size (default %(default)s)")
    a = p.parse_args(argv)
    if a.codes:
        print(write_demo_corpus(a.out_dir, a.samples, a.codebooks, a.codebook_size))
    else:
        out = write_ljspeech_demo(a.out_dir, a.samples)
        print(f"{out} (next: higgs-ddp manifest import --format ljspeech {out} --out {out / 'manifest.jsonl'})")
    return 0
