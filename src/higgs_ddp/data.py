"""Manifest reading and validation, the dataset, and the step-aligned distributed batch sampler.

A manifest is JSONL, one sample per line::

    {"text": "...", "audio_codes": "codes/x.npy", "ref_audio_codes": "...", "ref_text": "...",
     "scene": "...", "id": "..."}

Paths are relative to the manifest; codes are integer arrays (num_codebooks, frames). Every problem is
reported as ``file:line: what is wrong`` and all of them are listed before anything trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .prompt import Sample, tokenize_sample

REQUIRED = {"text": str, "audio_codes": str}
OPTIONAL = {"ref_audio_codes": str, "ref_text": str, "scene": str, "id": str}
MAX_LISTED = 50


class DataError(ValueError):
    """Bad input data; the message lists every problem, one line each, naming file and line."""


@dataclass
class Record:
    line: int
    text: str
    codes: np.ndarray  # (C, T)
    ref_codes: Optional[np.ndarray] = None
    ref_text: Optional[str] = None
    scene: Optional[str] = None
    id: str = ""

    @property
    def num_frames(self) -> int:
        return self.codes.shape[1] + (self.ref_codes.shape[1] if self.ref_codes is not None else 0)


def _load_codes(base: Path, rel: str, num_codebooks: int, codebook_size: int) -> np.ndarray:
    path = base / rel
    if not path.is_file():
        raise ValueError(f"codes file {rel} not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for corrupt files; report, don't crash
        raise ValueError(f"codes file {rel} is not a readable .npy array ({type(e).__name__})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes file {rel} must be a 2-D integer array (codebooks, frames), got {arr.dtype} {arr.shape}")
    if arr.shape[0] != num_codebooks:
        raise ValueError(f"codes file {rel} has {arr.shape[0]} codebooks, the model uses {num_codebooks}")
    if arr.shape[1] == 0:
        raise ValueError(f"codes file {rel} has zero frames")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= codebook_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"codes file {rel} holds code {bad}, outside the codebook range [0, {codebook_size})")
    return arr.astype(np.int16 if codebook_size <= 32767 else np.int32)


def _parse_line(base: Path, raw: str, num_codebooks: int, codebook_size: int, lineno: int) -> Record:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(REQUIRED) + sorted(OPTIONAL)}")
    for name, typ in REQUIRED.items():
        if name not in obj:
            raise ValueError(f"missing field {name!r}")
    for name, typ in {**REQUIRED, **OPTIONAL}.items():
        if name in obj and not isinstance(obj[name], typ):
            raise ValueError(f"field {name!r} must be a {typ.__name__}, got {type(obj[name]).__name__}")
    if not obj["text"].strip():
        raise ValueError("field 'text' is empty")
    if ("ref_audio_codes" in obj) != ("ref_text" in obj):
        raise ValueError("'ref_audio_codes' and 'ref_text' go together (a reference needs its transcript)")
    codes = _load_codes(base, obj["audio_codes"], num_codebooks, codebook_size)
    ref = None
    if "ref_audio_codes" in obj:
        ref = _load_codes(base, obj["ref_audio_codes"], num_codebooks, codebook_size)
    return Record(line=lineno, text=obj["text"], codes=codes, ref_codes=ref, ref_text=obj.get("ref_text"),
                  scene=obj.get("scene"), id=obj.get("id", f"line{lineno}"))


def read_manifest(path: str, num_codebooks: int, codebook_size: int) -> list[Record]:
    manifest = Path(path)
    if not manifest.is_file():
        raise DataError(f"{path}: manifest not found")
    records, errors = [], []
    with manifest.open("rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
                if not raw.strip():
                    continue
                records.append(_parse_line(manifest.parent, raw, num_codebooks, codebook_size, lineno))
            except UnicodeDecodeError as e:
                errors.append(f"{path}:{lineno}: not valid UTF-8 text (byte {e.start})")
            except ValueError as e:
                errors.append(f"{path}:{lineno}: {e}")
    if errors:
        shown = errors[:MAX_LISTED] + ([f"... and {len(errors) - MAX_LISTED} more"] if len(errors) > MAX_LISTED else [])
        raise DataError(f"{len(errors)} bad line(s) in the manifest:\n" + "\n".join(shown))
    if not records:
        raise DataError(f"{path}: manifest holds no samples")
    return records


class ManifestDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Record], tokenizer):
        self.records = records
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> Sample:
        r = self.records[idx]
        ref = torch.from_numpy(r.ref_codes.astype(np.int64)) if r.ref_codes is not None else None
        return tokenize_sample(self.tokenizer, r.text, torch.from_numpy(r.codes.astype(np.int64)),
                               scene=r.scene, ref_text=r.ref_text, ref_codes=ref, sample_id=r.id)


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches, step after step, forever.

    Every optimizer step consumes one global block of ``world * grad_accum * micro_batch`` samples of a
    seeded per-epoch permutation (the same on every rank); the block is cut into micro-steps and each
    micro-step into per-rank slices. So 1 rank x accumulation 2, 2 ranks and batch 2 see the same
    samples in each optimizer step. A trailing partial block of an epoch is dropped.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, grad_accum_steps: int, rank: int,
                 world_size: int, seed: int, shuffle: bool, start_step: int = 0):
        self.n, self.mbs, self.accum = num_samples, micro_batch_size, grad_accum_steps
        self.rank, self.world, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.block = world_size * grad_accum_steps * micro_batch_size
        if num_samples < self.block:
            raise DataError(
                f"the manifest has {num_samples} samples but one optimizer step needs {self.block} "
                f"(ranks {world_size} x grad_accum_steps {grad_accum_steps} x micro_batch_size {micro_batch_size})"
            )
        self.steps_per_epoch = num_samples // self.block
        self.start_step = start_step

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            block = self.order(epoch)[k * self.block:(k + 1) * self.block]
            for i in range(self.accum):
                micro = block[i * self.world * self.mbs:(i + 1) * self.world * self.mbs]
                yield micro[self.rank * self.mbs:(self.rank + 1) * self.mbs].tolist()
            step += 1

    def __len__(self) -> int:  # one epoch's worth; iteration itself is endless
        return self.steps_per_epoch * self.accum
