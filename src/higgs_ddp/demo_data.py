"""A small synthetic TTS corpus for the demo and the tests: texts, and code arrays that depend on the text
in a learnable way (so the loss visibly falls), written as a JSONL manifest of .npy files.

    python -m higgs_ddp.demo_data OUT_DIR [--samples N] [--codebooks C] [--codebook-size K]
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


def write_demo_corpus(out_dir, samples: int = 48, num_codebooks: int = 4, codebook_size: int = 64,
                      seed: int = 0, with_reference_every: int = 4) -> Path:
    out = Path(out_dir)
    (out / "codes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(samples):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        rel = f"codes/{i:04d}.npy"
        np.save(out / rel, text_to_codes(text, num_codebooks, codebook_size))
        rec = {"id": f"demo{i:04d}", "text": text, "audio_codes": rel}
        if with_reference_every and i % with_reference_every == 0:
            ref_text = " ".join(rng.choice(WORDS, size=2))
            ref_rel = f"codes/{i:04d}_ref.npy"
            np.save(out / ref_rel, text_to_codes(ref_text, num_codebooks, codebook_size))
            rec.update(ref_text=ref_text, ref_audio_codes=ref_rel)
        lines.append(json.dumps(rec))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--codebooks", type=int, default=4)
    p.add_argument("--codebook-size", type=int, default=64)
    a = p.parse_args()
    print(write_demo_corpus(a.out_dir, a.samples, a.codebooks, a.codebook_size))


if __name__ == "__main__":
    main()
