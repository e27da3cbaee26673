"""Trainable tensors as rows of their full tensors, whichever way a run held them.

Under DDP every rank holds each trainable tensor whole; under FSDP2 rank r of N holds rows
``[r * c, (r + 1) * c)`` of it (``c = ceil(rows / N)``, dim-0 chunks, the last ones possibly short or
empty). A checkpoint stores what each rank holds, so no rank ever gathers the full model:

- replicated (DDP, one process): rank 0 writes ``trainable.safetensors`` or the PEFT ``adapter/``, and
  ``optimizer.safetensors`` (keys ``name::exp_avg`` ...);
- sharded (FSDP): each rank writes ``shards/rank_00003.safetensors`` with its rows of every weight and
  optimizer tensor under the same keys, and ``state.json`` records each tensor's full shape.

``SavedTensors`` reads any row range of any tensor from either layout (safetensors slices: only those
rows are read), so a checkpoint loads into any strategy and any number of ranks. Nothing is unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from higgs_ddp.runtime.layout import ADAPTER_DIR, ADAPTER_WEIGHTS, CONFIG, OPTIMIZER, TRAINABLE, holds_adapter

SHARD_DIR = "shards"


def shard_file(rank: int) -> str:
    return f"{SHARD_DIR}/rank_{rank:05d}.safetensors"


def chunk_bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows of a full tensor that FSDP2's dim-0 shard on ``rank`` of ``world`` holds (torch.chunk's split)."""
    size = -(-rows // world) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor (all of it unless sharded)."""
    return t.to_local() if is_sharded(t) else t


def rows_held(t: torch.Tensor) -> tuple[int, int]:
    """(start, end) rows of the full tensor this rank holds."""
    if not is_sharded(t) or t.dim() == 0:
        return 0, (t.shape[0] if t.dim() else 0)
    mesh = t.device_mesh
    start, end = chunk_bounds(t.shape[0], mesh.size(), mesh.get_local_rank())
    if local_part(t).shape[0] != end - start:  # FSDP2's split changed: refuse rather than misplace rows
        raise RuntimeError(f"a shard holds {local_part(t).shape[0]} rows, expected {end - start}")
    return start, end


def like(t: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's rows) as a tensor shaped and placed like ``t``."""
    if not is_sharded(t) or local.dim() == 0:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride(),
                              run_check=False)


def gather_full(named_params: list, keep: bool, device=None) -> dict:
    """{name: the whole tensor on the CPU} where ``keep`` (rank 0), {} elsewhere. Collective for sharded
    tensors: every rank must call it, in the same order (one tensor in flight at a time). ``device``: where
    the gather runs (the process group's device: shards offloaded to the CPU go there first, as NCCL
    gathers only GPU tensors)."""
    out = {}
    for name, p in named_params:
        whole = (p.to(device) if device is not None else p).full_tensor() if is_sharded(p) else p
        if keep:
            out[name] = whole.detach().cpu().contiguous()
    return out


def adapter_key(param_name: str) -> str:
    """A LoRA parameter's key in peft's adapter_model.safetensors (peft drops the adapter's name)."""
    return re.sub(r"\.default(\.weight|\.bias)$", r"\1", param_name)


class SavedTensors:
    """Rows of the trainable tensors in one checkpoint folder: ``read(key, start, end)``. Keys are
    parameter names, and ``name::field`` for optimizer state (unless ``optimizer=False``: the weights alone,
    for export and speak, which read no optimizer file)."""

    def __init__(self, path: Path, state: dict, optimizer: bool = True):
        from safetensors import safe_open

        self.path = Path(path)
        self.sharding = state.get("sharding")  # {"world_size": N, "shapes": {key: full shape}} when sharded
        self._open = lambda f: safe_open(str(self.path / f), framework="pt", device="cpu")
        if self.sharding:
            n = self.sharding["world_size"]
            self.files = [self._open(shard_file(r)) for r in range(n)]
        else:
            weights = ("adapter/adapter_model.safetensors" if holds_adapter(self.path)
                       else "trainable.safetensors")
            self.weights = self._open(weights)
            self.optimizer = self._open(OPTIMIZER) if optimizer else None
            self.adapter = holds_adapter(self.path)

    def keys(self) -> set:
        if self.sharding:
            return set(self.sharding["shapes"])
        opt = set(self.optimizer.keys()) if self.optimizer is not None else set()
        return opt | {k for k in self.weights.keys()}

    def shape(self, key: str) -> list:
        if self.sharding:
            return self.sharding["shapes"][key]
        f, k = self._where(key)
        return f.get_slice(k).get_shape()

    def file_of(self, key: str) -> Path:
        """The file holding tensor ``key`` (sharded: the folder of the rank files, which all hold rows of it)."""
        if self.sharding:
            return self.path / SHARD_DIR
        weights = f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}" if self.adapter else TRAINABLE
        return self.path / (OPTIMIZER if "::" in key else weights)

    def _where(self, key: str):
        if "::" in key:
            return self.optimizer, key
        return self.weights, adapter_key(key) if self.adapter else key

    def read(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of tensor ``key`` (a 0-dim tensor whole)."""
        if not self.sharding:
            f, k = self._where(key)
            if not self.shape(key):
                return f.get_tensor(k)
            return f.get_slice(k)[start:end]
        shape, n = self.sharding["shapes"][key], self.sharding["world_size"]
        if not shape:
            return self.files[0].get_tensor(key)  # scalars (AdamW's step) are the same on every rank
        parts = []
        for r in range(n):
            lo, hi = chunk_bounds(shape[0], n, r)
            a, b = max(lo, start), min(hi, end)
            if a < b:
                parts.append(self.files[r].get_slice(key)[a - lo:b - lo])
        if not parts:
            return self.files[0].get_slice(key)[0:0]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def consolidate(ckpt: Path, state: dict, dest: Path) -> None:
    """Write a sharded checkpoint's trainable weights whole into ``dest`` in the replicated layout (PEFT
    ``adapter/`` when the run trained LoRA, else ``trainable.safetensors``), with its config.yaml: what
    export reads. One tensor is assembled at a time; the file is written once all are."""
    import shutil

    from safetensors.torch import save_file

    saved = SavedTensors(ckpt, state)
    weights = sorted(k for k in saved.keys() if "::" not in k)
    adapter = holds_adapter(ckpt)  # rank 0 writes the PEFT adapter_config.json there
    tensors = {(adapter_key(k) if adapter else k): saved.read(k, 0, (saved.shape(k) or [0])[0]).contiguous()
               for k in weights}
    dest.mkdir(parents=True, exist_ok=True)
    if adapter:
        shutil.copytree(Path(ckpt) / ADAPTER_DIR, dest / ADAPTER_DIR)
        save_file(tensors, str(dest / ADAPTER_DIR / ADAPTER_WEIGHTS))
    else:
        save_file(tensors, str(dest / TRAINABLE))
    shutil.copy2(Path(ckpt) / CONFIG, dest / CONFIG)
