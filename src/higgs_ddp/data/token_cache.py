"""Tokenized prompts, kept beside the code cache, so that a warm start tokenizes nothing.

    {cache_dir}/tokens/{tokenizer key}/part-*.safetensors
        input_ids, label_ids   int32: every entry's tokens, end to end
        offsets                int64 (entries + 1): entry i is input_ids[offsets[i]:offsets[i + 1]]
        audio                  int32 (entries): its number of audio contents
        keys                   uint8 (entries, 16): what it was tokenized from (``entry_key``)

The folder's key hashes the tokenizer as a whole (its serialized vocabulary, merges, normalizer,
pre-tokenizer and post-processor, its added and special tokens), the version of boson_multimodal that
builds the prompt, and FORMAT. An entry's key hashes its ChatML conversation: roles, texts, the system
prompt and scene, where the audio sits. A changed tokenizer, system prompt or transcript is therefore
tokenized again, never served stale. Tokenizing is most of a cold start (measured: 10k clips, 18.8 of
25.8 s in one process; less since prompts are tokenized in batches, prompt_batch.py), so on a cold start each rank tokenizes a share and writes it as a shard (whole, then renamed),
and every rank then reads all of them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from higgs_ddp.data.prompt_batch import chatml_ids_batch
from higgs_ddp.runtime.files import atomic_file

FORMAT = 1
KEY_BYTES = 16
BATCH = 4096  # conversations tokenized in one call of the tokenizer (prompt_batch.py)


def tokenizer_key(tokenizer) -> Optional[str]:
    """A hash of everything the tokens depend on besides the text; None for a slow (Python) tokenizer,
    which has no serialized form to hash: it is not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps([type(tokenizer).__name__, list(tokenizer.all_special_tokens),
                         sorted(tokenizer.get_added_vocab().items()), version("boson_multimodal"), FORMAT]).encode())
    return h.hexdigest()[:16]


def entry_key(chatml) -> bytes:
    # The dataclasses' repr names every field of every message: whatever the prompt holds is in the key.
    return hashlib.sha256(repr(chatml).encode()).digest()[:KEY_BYTES]


class TokenCache:
    def __init__(self, cache_dir, tokenizer):
        key = tokenizer_key(tokenizer)
        self.tokenizer = tokenizer
        self.dir = Path(cache_dir) / "tokens" / key if key else None
        self.index: dict = {}  # entry key -> (shard, row)
        self.shards: list = []  # dicts of arrays
        self.damaged: list = []
        self.pending: list = []  # shards tokenized, not yet written (``write_pending``)
        self.refresh()

    def refresh(self) -> None:
        self.index, self.shards, self.damaged = {}, [], []
        for path in sorted(self.dir.glob("part-*.safetensors")) if self.dir and self.dir.is_dir() else []:
            try:
                with safe_open(str(path), framework="np") as f:
                    shard = {k: f.get_tensor(k) for k in ("input_ids", "label_ids", "offsets", "audio", "keys")}
            except (SafetensorError, OSError, KeyError):  # cut short or foreign: tokenized again
                self.damaged.append(path)
                continue
            s = len(self.shards)
            self.shards.append(shard)
            keys = np.ascontiguousarray(shard["keys"]).view(f"S{KEY_BYTES}").ravel().tolist()
            self.index.update(zip(keys, ((s, i) for i in range(len(keys)))))

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def get(self, key: bytes) -> tuple:
        """-> (input ids, label ids, audio contents): int32 views into the shard."""
        s, i = self.index[key]
        shard = self.shards[s]
        a, b = shard["offsets"][i], shard["offsets"][i + 1]
        return shard["input_ids"][a:b], shard["label_ids"][a:b], int(shard["audio"][i])

    def tokenize(self, todo: list, write: bool = True) -> dict:
        """``todo``: (key, chatml, sample id). Tokenizes them, keeps them (in a new shard on disk, where this
        tokenizer is cached; ``write=False``: in memory until ``write_pending``) and -> {key: message} for the
        conversations that cannot be tokenized (reported every time, not kept)."""
        keys, ids, labels, audio, failed = [], [], [], [], {}
        for a in range(0, len(todo), BATCH):  # (a batch's tokens as Python ints meanwhile: bounded)
            part = todo[a:a + BATCH]
            for (key, _, _), got in zip(part, chatml_ids_batch(self.tokenizer, [(c, i) for _, c, i in part])):
                if isinstance(got, ValueError):
                    failed[key] = str(got)
                    continue
                keys.append(key)
                ids += got[0]
                labels += got[1]
                audio.append((len(got[0]), got[2]))
        if not keys:
            return failed
        offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        lengths, n_audio = np.array(audio, dtype=np.int64).reshape(-1, 2).T
        np.cumsum(lengths, out=offsets[1:])
        shard = {"input_ids": np.array(ids, dtype=np.int32), "label_ids": np.array(labels, dtype=np.int32),
                 "offsets": offsets, "audio": n_audio.astype(np.int32),
                 "keys": np.frombuffer(b"".join(keys), np.uint8).reshape(-1, KEY_BYTES)}
        if not write:
            self.pending.append(shard)
        else:
            self._write(shard)
        s = len(self.shards)
        self.shards.append(shard)
        self.index.update((k, (s, i)) for i, k in enumerate(keys))
        return failed

    def write_pending(self) -> None:
        """What ``tokenize(..., write=False)`` kept in memory, as one shard (a rank preparing piece after piece
        writes one, not one per piece)."""
        if self.pending:
            ids, labels, offsets, shift = [], [], [np.zeros(1, np.int64)], 0
            for shard in self.pending:
                ids.append(shard["input_ids"])
                labels.append(shard["label_ids"])
                offsets.append(shard["offsets"][1:] + shift)
                shift += int(shard["offsets"][-1])
            self._write({"input_ids": np.concatenate(ids), "label_ids": np.concatenate(labels),
                         "offsets": np.concatenate(offsets),
                         "audio": np.concatenate([shard["audio"] for shard in self.pending]),
                         "keys": np.concatenate([shard["keys"] for shard in self.pending])})
        self.pending = []

    def _write(self, shard: dict) -> None:
        if self.dir is not None:
            name = f"part-{uuid.uuid4().hex}.safetensors"
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                with atomic_file(self.dir / name) as tmp:  # a shard exists whole or not at all
                    save_file(shard, str(tmp))
            except OSError:  # a read-only data folder: kept in memory only (the other ranks tokenize it too)
                pass

    def remove_damaged(self) -> None:
        """One process only: the shards that could not be read (their entries are in newer ones now)."""
        for path in self.damaged:
            path.unlink(missing_ok=True)
        self.damaged = []
