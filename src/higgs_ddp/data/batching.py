"""Distributed batch samplers that yield this rank's micro-batches, step after step, forever.

Both compute the same plan on every rank from (seed, epoch) alone, and give each optimizer step one
global block of ``world * grad_accum`` micro-batches, cut into micro-steps and then per-rank slices. So
1 rank x accumulation 2 and 2 ranks see the same micro-batches in every optimizer step. What does not
fill a whole step at the end of an epoch waits for the next epoch's shuffle. A run resumed on another
layout continues at the same micro-batch of the same epoch (``resume_at``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Iterator

import numpy as np
import torch

from higgs_ddp.data.dataset import DataError


class BatchingError(DataError):
    pass


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Hash (seed, epoch): with seed + epoch, seed 1 epoch 0 would replay seed 0 epoch 1.
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def check_step_fits(num_samples: int, micro_batch_size: int, grad_accum_steps: int, world_size: int) -> None:
    """One optimizer step takes ranks x grad_accum_steps x micro_batch_size samples; fewer would never make
    one. The run checks its loaded data here, the doctor the samples its manifests list."""
    need = world_size * grad_accum_steps * micro_batch_size
    if num_samples < need:
        raise BatchingError(
            f"the data has {num_samples} samples but one optimizer step needs {need} "
            f"(ranks {world_size} x train.grad_accum_steps {grad_accum_steps} x train.micro_batch_size "
            f"{micro_batch_size})")


class Plan(Sequence):
    """An epoch's micro-batches, each a list only when it is used: micro-batch i is order[starts[i]:ends[i]].
    A plan over millions of samples is then a few arrays, not millions of Python ints in lists."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.order, self.starts, self.ends = order, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.order[self.starts[i]:self.ends[i]].tolist()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))


class _StepSampler(torch.utils.data.Sampler):
    """A position is (epoch, micro-batches of its plan used). The plan does not depend on the number of
    ranks or on accumulation, so a run resumed with another layout (accepted by train.resume_accept)
    continues at the same micro-batch: nothing is replayed or skipped."""

    def __init__(self, accum: int, rank: int, world: int, seed: int, shuffle: bool, start_step: int):
        self.accum, self.rank, self.world = accum, rank, world
        self.seed, self.shuffle, self.start_step = seed, shuffle, start_step
        self.per_step = world * accum
        self.anchor = (0, 0, 0)  # (step, epoch, micro-batches into it): where positions are counted from

    def plan(self, epoch: int) -> list:
        raise NotImplementedError

    def plan_length(self, epoch: int) -> int:
        return len(self.plan(epoch))

    def steps_in(self, epoch: int) -> int:
        return self.plan_length(epoch) // self.per_step

    def resume_at(self, step: int, epoch: int, micro: int) -> None:
        """Continue after ``step`` optimizer steps from micro-batch ``micro`` of ``epoch``: the position a
        checkpoint saved, perhaps with another number of ranks or accumulation steps."""
        self.anchor = (step, epoch, micro)
        self.start_step = step

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batches into it) after ``step`` optimizer steps. Each step takes ``per_step``
        micro-batches; what is left at the end of an epoch, too few for a step, is not used."""
        at, epoch, micro = self.anchor
        if step < at:
            raise ValueError(f"step {step} is before the step this sampler resumed at ({at})")
        step -= at
        while step >= (left := max(self.plan_length(epoch) - micro, 0) // self.per_step):
            step -= left  # plans can differ in length between epochs
            epoch, micro = epoch + 1, 0
        return epoch, micro + step * self.per_step

    def __iter__(self) -> Iterator[list]:
        epoch, micro = self.position(self.start_step)
        while True:
            plan = self.plan(epoch)
            for start in range(micro, len(plan) - self.per_step + 1, self.per_step):
                block = plan[start:start + self.per_step]
                for i in range(self.accum):
                    yield block[i * self.world + self.rank]
            epoch, micro = epoch + 1, 0

    def __len__(self) -> int:  # one epoch's worth (epoch 0); iteration itself is endless
        return self.steps_in(0) * self.accum


class StepBatchSampler(_StepSampler):
    """Fixed-size micro-batches of ``micro_batch_size`` samples from a seeded per-epoch permutation."""

    def __init__(self, num_samples: int, micro_batch_size: int, grad_accum_steps: int, rank: int,
                 world_size: int, seed: int, shuffle: bool, start_step: int = 0):
        super().__init__(grad_accum_steps, rank, world_size, seed, shuffle, start_step)
        self.n, self.mbs = num_samples, micro_batch_size
        check_step_fits(num_samples, micro_batch_size, grad_accum_steps, world_size)

    def plan(self, epoch: int) -> list:
        """Every whole micro-batch of the epoch's order, whatever the layout (steps use whole blocks)."""
        order = torch.randperm(self.n, generator=epoch_generator(self.seed, epoch)).numpy() if self.shuffle \
            else np.arange(self.n)
        starts = np.arange(self.plan_length(epoch), dtype=np.int64) * self.mbs
        return Plan(order, starts, starts + self.mbs)

    def plan_length(self, epoch: int) -> int:
        return self.n // self.mbs


class TokenBudgetBatchSampler(_StepSampler):
    """Micro-batches of similar-length samples whose padded size (longest x count) fits ``max_tokens``.

    Per epoch: shuffle, sort windows of the shuffled order by length (similar lengths, little padding,
    yet no fixed length order), pack greedily, then shuffle the micro-batches themselves.
    """

    WINDOW_BATCHES = 64  # how many micro-batches' worth of samples is sorted together

    def __init__(self, lengths: list, max_tokens: int, grad_accum_steps: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, start_step: int = 0):
        super().__init__(grad_accum_steps, rank, world_size, seed, shuffle, start_step)
        self.lengths, self.max_tokens = np.asarray(lengths, dtype=np.int64), max_tokens  # (a mapped column: no copy)
        longest = int(self.lengths.max())
        if longest > max_tokens:
            raise BatchingError(f"a sample needs {longest} positions, more than data.max_tokens_per_batch={max_tokens}")
        half = len(self.lengths) // 2
        typical = int(np.partition(self.lengths, half)[half])  # the median (the upper one of an even count)
        self.window = max(1, self.WINDOW_BATCHES * (max_tokens // typical))
        self._cache: dict = {}
        have = len(self.plan(0))
        if have < self.per_step:
            raise BatchingError(f"the data packs into {have} micro-batches of data.max_tokens_per_batch="
                                f"{max_tokens} but one optimizer step needs {self.per_step} "
                                f"(ranks {world_size} x grad_accum_steps {grad_accum_steps})")

    def plan(self, epoch: int) -> list:
        if epoch in self._cache:
            return self._cache[epoch]
        g = epoch_generator(self.seed, epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).numpy() if self.shuffle else np.arange(n)
        # Each window of the shuffled order sorted longest first, ties kept in shuffled order (stable).
        lengths = self.lengths[order]
        window = np.arange(n, dtype=np.int64) // self.window
        by_length = np.argsort(window * (int(lengths.max()) + 1) - lengths, kind="stable")
        order, lengths = order[by_length], lengths[by_length]
        # Greedy packing: in a window sorted longest first, a micro-batch's first sample is its longest, so
        # it takes max_tokens // that length samples (at least 1), or what is left of the window.
        fits = self.max_tokens // np.maximum(lengths, 1)
        starts = []
        for w in range(0, n, self.window):
            p, end = w, min(w + self.window, n)
            while p < end:
                starts.append(p)
                p = min(p + int(fits[p]), end)
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.append(starts[1:], n)
        if self.shuffle:
            shuffled = torch.randperm(len(starts), generator=g).numpy()
            starts, ends = starts[shuffled], ends[shuffled]
        batches = Plan(order, starts, ends)
        self._cache = {epoch: batches}  # only the current epoch is kept
        return batches
