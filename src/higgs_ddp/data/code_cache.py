"""The code cache: audio encoded once, kept in safetensors shards, found again by content.

    {cache_dir}/hashes.json                      path -> (size, mtime, sha256): files aren't re-read
    {cache_dir}/{codec key}/codec.json           the codec identity this folder belongs to
    {cache_dir}/{codec key}/index.json           content hash -> [shard, seconds, frames]
    {cache_dir}/{codec key}/part-*.safetensors   tensors named by content hash, int16 (codebooks, frames)

An entry's key is the sha256 of the audio file's bytes inside a folder keyed by the codec identity, so
a renamed file is still cached, an edited one is encoded again, and another codec never sees these
codes. Shards are written whole (temporary name, then rename) every few hundred entries; the index is
rebuilt from any shard it does not list. So an interrupted prepare loses at most one unwritten shard
and the next run picks up where it stopped. A shard that cannot be read (cut short by a copy, a damaged
disk) is left out: its clips are encoded again, and the shard is deleted with a note.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from higgs_ddp.data.audio import member_bytes
from higgs_ddp.data.members import container
from higgs_ddp.runtime.files import atomic_file, write_json_atomic

SHARD_ENTRIES = 256
SHARD_SECONDS = 60.0  # also flush this often, so a slow GPU loses little on interruption


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileHashes:
    """Content hashes remembered by (path, size, mtime): a second run reads no audio to find its codes. A member
    of a tar shard (``members.py``) is hashed by its own bytes and remembered by its shard's size and mtime: a
    shard rewritten is hashed again, member by member."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / "hashes.json"
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.new: dict = {}

    def get(self, path: Path, shown: Optional[str] = None) -> str:
        """``path``: resolved (as the manifest reader resolves every path); ``shown``: as the manifest wrote it,
        for a member that cannot be read (an AudioProblem)."""
        st = container(path).stat()
        key = str(path)
        hit = self.known.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        data = member_bytes(path, shown or key)
        digest = sha256_file(path) if data is None else hashlib.sha256(data).hexdigest()
        self.new[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def save(self) -> None:
        if self.new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {**self.known, **self.new})


class CodeCache:
    def __init__(self, cache_dir, identity: str):
        self.root = Path(cache_dir)
        self.identity = identity
        self.dir = self.root / hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.entries: dict[str, list] = {}  # key -> [shard, seconds, frames]
        self.refresh()

    def refresh(self) -> None:
        """Read the index, then add whatever complete shards it does not list yet.

        A shard that cannot be read (a copy cut short, a damaged disk) contributes nothing, so its clips
        are encoded again; ``write_index`` deletes it."""
        entries: dict = {}
        try:
            data = json.loads((self.dir / "index.json").read_text())
            if data.get("codec") == self.identity:
                entries = data["entries"]
        except (OSError, ValueError, KeyError):
            pass
        listed = {v[0] for v in entries.values()}
        readable, unlisted, self.damaged = set(), {}, {}
        for path in sorted(self.dir.glob("part-*.safetensors")) if self.dir.is_dir() else []:
            try:
                with safe_open(str(path), framework="pt") as f:  # reads and checks the header only
                    if path.name not in listed:
                        unlisted.update(self._entries_of(path.name, f))
            except (SafetensorError, OSError) as e:  # OSError: also a shard another rank just deleted
                self.damaged[path.name] = str(e)
                continue
            readable.add(path.name)
        entries = {k: v for k, v in entries.items() if v[0] in readable}
        for key, entry in unlisted.items():
            entries.setdefault(key, entry)
        self.entries = entries

    def _entries_of(self, name: str, shard) -> dict:
        meta = shard.metadata() or {}
        if meta.get("codec") != self.identity:
            return {}
        seconds = json.loads(meta.get("seconds", "{}"))
        return {key: [name, seconds.get(key, 0.0), shard.get_slice(key).get_shape()[1]] for key in shard.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def seconds(self, key: str) -> float:
        return float(self.entries[key][1])

    def write_index(self) -> None:
        """One process only (rank 0), after every rank's shards are written."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, problem in sorted(self.damaged.items()):
            (self.dir / name).unlink(missing_ok=True)
            print(f"code cache: {self.dir / name} is damaged ({problem}); deleted it, its clips are encoded "
                  f"again where used", file=sys.stderr, flush=True)
        self.damaged = {}
        write_json_atomic(self.dir / "codec.json", {"identity": self.identity})
        write_json_atomic(self.dir / "index.json", {"codec": self.identity, "entries": self.entries})

    def load(self, keys) -> dict[str, np.ndarray]:
        """key -> (codebooks, frames) int16 codes: views into their shards, mapped into memory (privately:
        nothing here writes to them, and a write would stay in this process, never reach the file).

        A shard never changes once written (written whole under a temporary name, then renamed), so the
        ranks of a node, and their DataLoader workers, share one copy of the codes in the page cache
        instead of each reading its own (8 ranks of a node: 1/8 of the memory for codes)."""
        by_shard: dict[str, list] = {}
        for k in set(keys):
            by_shard.setdefault(self.entries[k][0], []).append(k)
        out = {}
        for name, ks in sorted(by_shard.items()):
            tensors = map_shard(self.dir / name)
            for k in ks:
                out[k] = tensors[k]
        return out

    def writer(self) -> "ShardWriter":
        self.dir.mkdir(parents=True, exist_ok=True)
        return ShardWriter(self)


# id(a mapped shard's bytes) -> (weak reference to them, the shard's path): where a view's codes live on disk,
# for the corpus index (corpus_index.py), which points at the shards instead of copying the codes.
_MAPPED: dict = {}


def _remember(raw: np.ndarray, path: Path) -> None:
    key = id(raw)
    _MAPPED[key] = (weakref.ref(raw, lambda _: _MAPPED.pop(key, None)), path)


def code_source(arr: np.ndarray) -> Optional[tuple]:
    """(shard path, byte offset of ``arr``'s first element in it) for codes ``map_shard`` mapped (or any view
    of them); None for codes held in memory (a .npy codes file)."""
    base = arr.base
    hit = _MAPPED.get(id(base)) if base is not None else None
    if hit is None or hit[0]() is not base:
        return None
    return hit[1], arr.ctypes.data - base.ctypes.data


def map_shard(path: Path) -> dict[str, np.ndarray]:
    """A safetensors shard of int16 tensors, mapped (no file descriptor kept open, unlike Python's mmap:
    thousands of shards stay within the open-file limit) and cut into numpy views by its header.

    Safetensors' layout: an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte offsets into the data that follows. Only the header is parsed here; a tensor
    that is not 2-D int16 or lies outside the file is a damaged shard (``refresh`` has checked it once)."""
    size = path.stat().st_size
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8).numpy()  # private, read-only use
    try:
        n = int.from_bytes(raw[:8].tobytes(), "little")
        header = json.loads(raw[8:8 + n].tobytes())
    except (RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise SafetensorError(f"{path}: unreadable header ({e})") from None
    start, out = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        (a, b), shape = info.get("data_offsets", (0, -1)), info.get("shape", [])
        if (info.get("dtype") != "I16" or len(shape) != 2 or b - a != 2 * shape[0] * shape[1]
                or start + b > size or (start + a) % 2):
            raise SafetensorError(f"{path}: tensor {key} is not where its header says ({info})")
        out[key] = raw[start + a:start + b].view(np.int16).reshape(shape[0], shape[1])
    _remember(raw, path)
    return out


class ShardWriter:
    def __init__(self, cache: CodeCache):
        self.cache = cache
        self.buffer: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}
        self.t_flush = time.monotonic()
        self.written = 0

    def add(self, key: str, codes: torch.Tensor, seconds: float) -> None:
        self.buffer[key] = codes.to(torch.int16).contiguous()
        self.seconds[key] = seconds
        if len(self.buffer) >= SHARD_ENTRIES or time.monotonic() - self.t_flush > SHARD_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.t_flush = time.monotonic()
        if not self.buffer:
            return
        name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.safetensors"
        with atomic_file(self.cache.dir / name) as tmp:  # a shard exists whole or not at all
            save_file(self.buffer, str(tmp), metadata={"codec": self.cache.identity,
                                                       "seconds": json.dumps(self.seconds)})
        for k, t in self.buffer.items():
            self.cache.entries[k] = [name, self.seconds[k], t.shape[1]]
        self.written += len(self.buffer)
        self.buffer, self.seconds = {}, {}
