"""Peak tensor memory of a stretch of code on any device, counted op by op.

CUDA has allocator statistics (``torch.cuda.max_memory_allocated``); the CPU has none. Inside
``LiveTensorBytes`` every tensor an operator creates (forward, backward and optimizer alike) is counted
until its storage is freed, so ``peak`` is the most bytes that were alive at once beyond what existed
before. It slows the code down: measure memory in a separate pass, never while timing.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict = {}  # (data_ptr, nbytes) -> (weakref to the storage, nbytes)

    def _freed(self, key) -> None:
        self.live -= self._alive.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # A DTensor (FSDP) owns no storage: its local tensor's ops are counted when they run.
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not hasattr(t, "to_local"):
                storage = t.untyped_storage()
                n = storage.nbytes()
                key = (storage.data_ptr(), n)
                if n and key not in self._alive:  # views and in-place results share a storage
                    self._alive[key] = (weakref.ref(storage, lambda _, k=key: self._freed(k)), n)
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out
