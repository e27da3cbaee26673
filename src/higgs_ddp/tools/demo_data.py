"""A small synthetic TTS corpus for the demo and the tests: texts, and audio (or code arrays) that
depend on the text in a learnable way, so the loss visibly falls.

    higgs-ddp demo-data OUT_DIR [--samples N]      # an LJSpeech-style folder: metadata.csv + wavs/
    higgs-ddp demo-data OUT_DIR --codes            # a JSONL manifest naming .npy code arrays
    higgs-ddp demo-data OUT_DIR --compare SPOKEN   # spoken seconds per character against the corpus's

By default it writes what a user brings: an LJSpeech-style folder of WAV files (one tone per character,
8 kHz), which `higgs-ddp manifest import --format ljspeech` turns into the manifest, as `make demo` does.
With ``--codes`` it writes a manifest naming .npy code arrays directly (no codec needed).

A clip lasts as long as its text (0.04 s, one frame of the tiny codec, per character), so a model that
learned the corpus speaks a longer text for longer. ``--compare`` says so in one line, from the files:
the seconds of each WAV that ``higgs-ddp speak`` wrote (SPOKEN: a WAV or a folder of them, the text from
each one's JSON sidecar) against the seconds per character of OUT_DIR/manifest.jsonl; ``make demo`` ends
with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from higgs_ddp.errors import HiggsError

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
    """Distinct texts: one text is one recording (the same tones, byte for byte), and a recording in both the
    training and the validation split is refused as a leak (make demo validates on a fifth of the clips)."""
    texts: dict = {}
    while len(texts) < samples:
        texts.setdefault(" ".join(rng.choice(WORDS, size=int(rng.integers(2, 5)))), None)
    return list(texts)


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


class CompareError(HiggsError, ValueError):
    """What --compare cannot read (one line)."""


def spoken_clips(path) -> list[tuple[str, float]]:
    """-> [(text, seconds)] for a WAV written by ``higgs-ddp speak`` or each WAV in a folder of them: the
    seconds from the WAV's header, the text from its JSON sidecar."""
    import soundfile as sf

    path = Path(path)
    wavs = sorted(path.glob("*.wav")) if path.is_dir() else [path]
    if not path.exists() or not wavs:
        raise CompareError(f"{path}: no WAV files (give what higgs-ddp speak --out wrote)")
    clips = []
    for wav in wavs:
        sidecar = wav.with_suffix(".json")
        try:
            text = json.loads(sidecar.read_text(encoding="utf-8"))["text"]
            info = sf.info(str(wav))
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # sf: RuntimeError; json: ValueError
            raise CompareError(f"{wav}: cannot read it or the text in {sidecar.name} "
                               f"({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(text, str) or not text:
            raise CompareError(f"{sidecar}: no text")
        clips.append((text, info.frames / info.samplerate))
    return clips


def corpus_seconds_per_char(manifest) -> tuple[float, int]:
    """-> (seconds of audio per character of text over the whole corpus, clips): from the clips' headers, as
    ``higgs-ddp manifest stats`` counts them."""
    from higgs_ddp.data.manifest_stats import manifest_stats

    if not Path(manifest).is_file():
        raise CompareError(f"{manifest}: manifest not found (higgs-ddp manifest import writes it)")
    st = manifest_stats(str(manifest))
    if st.problems or st.codes_only or not sum(st.text_chars):
        raise CompareError(f"{manifest}: not a corpus of WAV clips with text ({len(st.problems)} problem(s), "
                           f"{st.codes_only} code arrays, {sum(st.text_chars)} characters)")
    return st.seconds / sum(st.text_chars), st.samples


def comparison_line(spoken: list[tuple[str, float]], corpus_rate: float, corpus_clips: int) -> str:
    """'spoke 0.44 s for 11 characters (0.040 s/char) and ...; the corpus has 0.040 s/char (160 clips)'."""
    said = [f"{seconds:.2f} s for {len(text)} characters ({seconds / len(text):.3f} s/char)"
            for text, seconds in spoken]
    listed = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
    return f"spoke {listed}; the corpus has {corpus_rate:.3f} s/char ({corpus_clips} clips)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="higgs-ddp demo-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the corpus folder to write (made if missing; make demo uses runs/tiny/data); "
                                   "with --compare: the corpus to read, its manifest.jsonl")
    p.add_argument("--samples", type=int, default=48, help="clips to write (default %(default)s)")
    p.add_argument("--codes", action="store_true", help="a JSONL manifest of .npy codes instead of the WAV folder")
    p.add_argument("--codebooks", type=int, default=4,
                   help="with --codes: codebooks per frame, the model's audio_num_codebooks (default %(default)s)")
    p.add_argument("--codebook-size", type=int, default=64,
                   help="with --codes: codes per codebook, the model's audio_codebook_size (default %(default)s)")
    p.add_argument("--compare", metavar="SPOKEN", type=Path,
                   help="write nothing; compare the seconds per character of what higgs-ddp speak wrote here "
                        "(a WAV or a folder) with the corpus's")
    a = p.parse_args(argv)
    if a.compare is not None:
        try:
            print(comparison_line(spoken_clips(a.compare), *corpus_seconds_per_char(Path(a.out_dir) / "manifest.jsonl")))
        except CompareError as e:
            print(f"higgs-ddp: error: {e}", file=sys.stderr, flush=True)
            return 2
        return 0
    from higgs_ddp.runtime.shared_fs import unwritable

    why = unwritable(a.out_dir)
    if why:
        print(f"higgs-ddp: error: {a.out_dir} cannot be written ({why})", file=sys.stderr, flush=True)
        return 2
    if a.codes:
        print(write_demo_corpus(a.out_dir, a.samples, a.codebooks, a.codebook_size))
    else:
        out = write_ljspeech_demo(a.out_dir, a.samples)
        print(f"{out} (next: higgs-ddp manifest import --format ljspeech {out} --out {out / 'manifest.jsonl'})")
    return 0
