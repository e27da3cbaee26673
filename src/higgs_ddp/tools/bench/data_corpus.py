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
                 seed: int = 0, short: bool = False) -> dict:
    """Write the corpus under ``root`` (manifest.jsonl, wavs/, .higgs_codes/) unless it is there already.
    ``short``: codes of SHORT_FRAMES frames (a cold start at 1M clips: the disk is the index's and the
    tokens', not the codes'); the transcripts are as long as 2-15 s of speech all the same."""
    done = root / "corpus.json"
    want = {"clips": n, "codec": codec, "num_codebooks": num_codebooks, "codebook_size": codebook_size, "seed": seed}
    if short:
        want["short"] = True
    if done.is_file() and json.loads(done.read_text()).get("spec") == want:
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    frames = rng.integers(int(MIN_SECONDS * FRAME_RATE), int(MAX_SECONDS * FRAME_RATE) + 1, n)
    texts = _sentences(rng, frames / FRAME_RATE)
    if short:
        frames = rng.integers(*SHORT_FRAMES, n)
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
    """What a start-up derives and keeps (file hashes, tokenized prompts, the corpus index) goes; the codes stay:
    a cold start."""
    cache = root / ".higgs_codes"
    (cache / "hashes.json").unlink(missing_ok=True)
    shutil.rmtree(cache / "tokens", ignore_errors=True)
    shutil.rmtree(cache / "index", ignore_errors=True)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- corpora past what the full path can build: written directly in the prepared format (issue 31) ----

PREPARED_ABOVE = 100_000  # --data-scale N above this: the corpus is written as a corpus index
PROMPTS = 64  # distinct transcripts (tokenized for real); clip i speaks prompt i % PROMPTS
SHORT_FRAMES = (4, 13)  # codes per clip, frames: short (the index is what scales, not the codes)
CHUNK = 1_000_000


def _ascii(strings) -> np.ndarray:
    return np.frombuffer("".join(strings).encode(), np.uint8)


def _string_column(n: int, make) -> tuple:
    """(bytes, offsets) of n strings made a chunk at a time (``make(range)`` -> list of str)."""
    parts, lengths = [], []
    for a in range(0, n, CHUNK):
        chunk = make(range(a, min(a + CHUNK, n)))
        parts.append(_ascii(chunk))
        lengths.append(np.fromiter(map(len, chunk), np.int64, len(chunk)))
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return np.concatenate(parts), offsets


def build_prepared_corpus(root: Path, n: int, cfg, mc, tokenizer, val_fraction: float, seed: int = 0) -> dict:
    """A corpus of ``n`` clips as a start finds it after preparing: a real manifest (texts repeat every PROMPTS
    clips), its audio folders (empty: the files are never read on a warm start, and 10M inodes are not made
    here), short random codes in plain int16 files, and the corpus index pointing into them, under the key a
    start with ``cfg`` computes. The prompts' tokens are the tokenizer's own; positions follow from them."""
    from higgs_ddp.data import corpus_index as ci
    from higgs_ddp.data.dataset import _in_val, cache_dir, count_positions
    from higgs_ddp.data.prompt import build_chatml, chatml_ids
    from higgs_ddp.data.token_cache import tokenizer_key

    done = root / "corpus.json"
    want = {"clips": n, "prepared": True, "num_codebooks": mc.audio_num_codebooks, "seed": seed,
            "val_fraction": val_fraction}
    if done.is_file() and json.loads(done.read_text()).get("spec") == want:
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    C, K = mc.audio_num_codebooks, mc.audio_codebook_size
    texts = _sentences(rng, rng.uniform(MIN_SECONDS, MAX_SECONDS, PROMPTS))
    prompt = [chatml_ids(tokenizer, build_chatml(t)) for t in texts]
    assert all(a == 1 for _, _, a in prompt)
    ids = tokenizer.convert_tokens_to_ids
    base = np.array([count_positions(np.asarray(i), [0], ids("<|AUDIO|>"), ids("<|AUDIO_OUT|>"), C,
                                     mc.use_delay_pattern, mc.encode_audio_in_tokens) for i, _, _ in prompt])
    frames = rng.integers(*SHORT_FRAMES, n).astype(np.int64)
    which = np.arange(n) % PROMPTS
    manifest = root / "manifest.jsonl"
    with open(manifest, "w") as f:  # simple lines, as data_corpus writes them for the full path
        for a in range(0, n, CHUNK):
            f.write("".join(f'{{"text": "{texts[i % PROMPTS]}", "audio": "wavs/{i // 1000:05d}/{i:08d}.wav", '
                            f'"speaker": "speaker{i % 40:02d}", "id": "clip{i:08d}"}}\n' for i in range(a, min(a + CHUNK, n))))
    folders = [root / "wavs" / f"{k:05d}" for k in range((n + 999) // 1000)]
    for d in folders:
        d.mkdir(parents=True)
    # Rows in load_data's order: the training clips, then those data.val_fraction moves to validation.
    in_val = np.fromiter((_in_val(f"clip{i:08d}", val_fraction) for i in range(n)), bool, n) if val_fraction \
        else np.zeros(n, bool)
    rows = np.concatenate([np.flatnonzero(~in_val), np.flatnonzero(in_val)])
    code_dir = root / ".higgs_codes" / "bench-codes"
    code_dir.mkdir(parents=True)
    code_files, file_of, offset_of = [], np.zeros(n, np.int32), np.zeros(n, np.int64)
    for a in range(0, n, CHUNK):  # clip i's codes: C x frames[i], row after row, clips end to end
        idx = rows[a:a + CHUNK]
        sizes = C * frames[idx]
        path = code_dir / f"codes-{a // CHUNK:04d}.bin"
        rng.integers(0, K, int(sizes.sum()), dtype=np.int16).tofile(path)
        code_files.append(str(path))
        file_of[a:a + len(idx)] = len(code_files) - 1
        offset_of[a:a + len(idx)] = 2 * (np.cumsum(sizes) - sizes)
    tok_len = np.array([len(i) for i, _, _ in prompt], np.int64)
    cols = {
        "positions": base[which[rows]] + frames[rows], "seconds": frames[rows] / FRAME_RATE,
        "speaker": (rows % 40).astype(np.int32), "tok_start": (np.cumsum(tok_len) - tok_len)[which[rows]],
        "tok_len": tok_len[which[rows]], "input_ids": np.concatenate([np.asarray(i, np.int32) for i, _, _ in prompt]),
        "label_ids": np.concatenate([np.asarray(lab, np.int32) for _, lab, _ in prompt]),
        "audio_offsets": np.arange(n + 1, dtype=np.int64), "code_file": file_of, "code_offset": offset_of,
        "code_stride": frames[rows].astype(np.int32), "code_frames": frames[rows].astype(np.int32),
    }
    cols["id_bytes"], cols["id_offsets"] = _string_column(n, lambda r: [f"clip{rows[j]:08d}" for j in r])
    cols["where_bytes"], cols["where_offsets"] = _string_column(n, lambda r: [f"{manifest}:{rows[j] + 1}" for j in r])
    n_train = int((~in_val).sum())
    hours = float(cols["seconds"][:n_train].sum() / 3600)
    report = {"policy": cfg.data.on_error, "manifests": [str(manifest)], "val_manifests": [], "entries": n,
              "train_samples": n_train, "val_samples": n - n_train, "skipped": 0, "skipped_by_reason": {},
              "train_audio_hours": hours, "references": {"mode": cfg.data.reference}, "problems": []}
    meta = {"samples": n, "train_samples": n_train, "code_files": code_files, "speakers": [f"speaker{s:02d}" for s in range(40)],
            "num_codebooks": C, "manifests": ci.manifest_signature([str(manifest)]),
            "folders": ci.folder_signature(folders), "fingerprint": None, "summary": report}
    cache = cache_dir(cfg)
    ci.write_index(Path(cache) / "index" / ci.index_key(cfg, mc, tokenizer_key(tokenizer), cache), cols, meta, report)
    info = {"spec": want, "audio_hours": hours * n / max(n_train, 1), "code_bytes": int(2 * C * frames.sum()),
            "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(info))
    return info
