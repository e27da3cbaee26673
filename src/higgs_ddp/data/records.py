"""What load_data gives: the records of usable samples (held in memory, or built one at a time from a prepared
corpus index, corpus_index.py), and the fingerprint a checkpoint keeps of them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from higgs_ddp.data.prompt import Sample


@dataclass
class Record:
    """One usable sample, tokenized once, stored compactly (int32 ids, int16 codes)."""

    where: str
    id: str
    input_ids: np.ndarray
    label_ids: np.ndarray
    codes: list
    positions: int  # sequence positions the model sees (text + expanded audio): the batching cost
    seconds: float  # audio duration, 0 for .npy codes of unknown rate
    speaker: Optional[str] = None

    def sample(self) -> Sample:
        return Sample(torch.from_numpy(self.input_ids.astype(np.int64)),
                      torch.from_numpy(self.label_ids.astype(np.int64)),
                      [torch.from_numpy(c.astype(np.int64)) for c in self.codes], self.id)


def fingerprint(records: list) -> dict:
    """What a checkpoint remembers of its training data: the order of samples and every token and code
    matters to the result, the file paths do not. A prepared index keeps the one computed when it was built."""
    kept = records.fingerprint() if hasattr(records, "fingerprint") else None
    if kept is not None:
        return kept
    ids, content = hashlib.sha256(), hashlib.sha256()
    for sample_id in sorted(r.id for r in records):  # the set of samples, whatever their order
        ids.update(sample_id.encode() + b"\0")
    for r in records:
        content.update(r.id.encode() + b"\0")
        for arr in (r.input_ids, r.label_ids, *r.codes):
            content.update(np.ascontiguousarray(arr).tobytes())
            content.update(str(arr.shape).encode())
    return {"samples": len(records), "ids": ids.hexdigest()[:16], "content": content.hexdigest()[:16]}


@dataclass
class Data:
    train: list
    val: list
    report: dict
