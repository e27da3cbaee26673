"""A synthetic corpus of N clips that is already in the code cache, for ``higgs-ddp bench --data-scale N``.

Everything the training start-up reads is real: a JSONL manifest of simple lines (text, audio, speaker,
id), one WAV file per clip, and the code cache written by the product's own ``ShardWriter`` under the key
the training path computes (the sha256 of the WAV's bytes, in the folder of the official codec's
identity). Only the pairing is made up: each WAV is a short placeholder (the codes are never decoded
back), while its cached codes last 2-15 s at 25 frames/s in 8 codebooks of 1,024, the official codec's
shape, and its transcript is as long as that speech would be (~2.7 words/s). Codes and words are drawn
with vectorised numpy, so 100k clips take seconds, not the hours their encoding would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch

from higgs_ddp.data.code_cache import SHARD_ENTRIES, CodeCache
from higgs_ddp.data.codec import codec_identity

FRAME_RATE = 25
MIN_SECONDS, MAX_SECONDS = 2.0, 15.0
WORDS_PER_SECOND = 2.7
PLACEHOLDER_RATE = 16000
WORDS = np.array((
    "the of and to a in that is was he for it with as his on be at by had are but from or have an they which "
    "one you were all her she there would their we him been has when who will no more if out so said what "
    "up its about into than them can only other time new some could these two may first then do any like my "
    "now over such our man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three house river morning "
    "voice music weather mountain window garden story letter evening question answer station number city "
    "quietly slowly quickly suddenly perhaps tomorrow yesterday remember listen children mother father").split())


def corpus_dir(output_dir: str, n: int) -> Path:
    return Path(output_dir) / f"corpus-{n}"


def _placeholder_wav(i: int) -> bytes:
    """A valid 16-bit mono WAV of 16 samples that encode ``i``: distinct bytes, so a distinct cache key."""
    samples = np.frombuffer(struct.pack("<QQ", i, i ^ 0x5A5A5A5A5A5A5A5A) * 2, dtype=np.int16)
    data = samples.tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, 1,
                         PLACEHOLDER_RATE, PLACEHOLDER_RATE * 2, 2, 16, b"data", len(data))
    return header + data


def _sentences(rng: np.random.Generator, seconds: np.ndarray) -> list:
    counts = np.maximum(3, np.round(seconds * WORDS_PER_SECOND * rng.uniform(0.8, 1.2, len(seconds)))).astype(int)
    words = WORDS[rng.integers(0, len(WORDS), counts.sum())]
    ends = np.cumsum(counts)
    out = []
    for start, end in zip(ends - counts, ends):
        text = " ".join(words[start:end])
        out.append(text[0].upper() + text[1:] + ".")
    return out


def build_corpus(root: Path, n: int, codec: str, num_codebooks: int = 8, codebook_size: int = 1024,
                 seed: int = 0) -> dict:
    """Write the corpus under ``root`` (manifest.jsonl, wavs/, .higgs_codes/) unless it is there already."""
    done = root / "corpus.json"
    want = {"clips": n, "codec": codec, "num_codebooks": num_codebooks, "codebook_size": codebook_size, "seed": seed}
    if done.is_file() and json.loads(done.read_text()).get("spec") == want:
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    frames = rng.integers(int(MIN_SECONDS * FRAME_RATE), int(MAX_SECONDS * FRAME_RATE) + 1, n)
    texts = _sentences(rng, frames / FRAME_RATE)
    cache = CodeCache(root / ".higgs_codes", codec_identity(codec))
    writer = cache.writer()
    lines = []
    for first in range(0, n, SHARD_ENTRIES):  # one shard's clips at a time: codes drawn in one call
        idx = range(first, min(first + SHARD_ENTRIES, n))
        block = rng.integers(0, codebook_size, (num_codebooks, int(frames[idx.start:idx.stop].sum())), dtype=np.int16)
        cuts = np.cumsum(frames[idx.start:idx.stop])[:-1]
        folder = root / "wavs" / f"{first // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, codes in zip(idx, np.split(block, cuts, axis=1)):
            rel = f"wavs/{first // 1000:04d}/{i:07d}.wav"
            wav = _placeholder_wav(i)
            (root / rel).write_bytes(wav)
            writer.add(hashlib.sha256(wav).hexdigest(), torch.from_numpy(codes), codes.shape[1] / FRAME_RATE)
            lines.append(json.dumps({"text": texts[i], "audio": rel, "speaker": f"speaker{i % 40:02d}",
                                     "id": f"clip{i:07d}"}))
    writer.flush()
    cache.write_index()
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    info = {"spec": want, "audio_hours": float(frames.sum() / FRAME_RATE / 3600),
            "code_bytes": int(frames.sum()) * num_codebooks * 2, "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(info))
    return info


def forget_derived(root: Path) -> None:
    """What a start-up derives and keeps (file hashes, tokenized prompts) goes; the codes stay: a cold start."""
    cache = root / ".higgs_codes"
    (cache / "hashes.json").unlink(missing_ok=True)
    shutil.rmtree(cache / "tokens", ignore_errors=True)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
