"""Distributed batch samplers that yield this rank's micro-batches, step after step, forever.

Both compute the same plan on every rank from (seed, epoch) alone, and give each optimizer step one
global block of ``world * grad_accum`` micro-batches, cut into micro-steps and then per-rank slices. So
1 rank x accumulation 2 and 2 ranks see the same micro-batches in every optimizer step. What does not
fill a whole step at the end of an epoch waits for the next epoch's shuffle.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from .data import DataError


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


class _StepSampler(torch.utils.data.Sampler):
    def __init__(self, accum: int, rank: int, world: int, seed: int, shuffle: bool, start_step: int):
        self.accum, self.rank, self.world = accum, rank, world
        self.seed, self.shuffle, self.start_step = seed, shuffle, start_step
        self.per_step = world * accum

    def plan(self, epoch: int) -> list:
        raise NotImplementedError

    def steps_in(self, epoch: int) -> int:
        return len(self.plan(epoch)) // self.per_step

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, optimizer steps into it) after ``step`` optimizer steps."""
        epoch = 0
        while step >= self.steps_in(epoch):  # plans can differ in length between epochs
            step -= self.steps_in(epoch)
            epoch += 1
        return epoch, step

    def __iter__(self) -> Iterator[list]:
        epoch, k = self.position(self.start_step)
        while True:
            plan = self.plan(epoch)
            for step in range(k, len(plan) // self.per_step):
                block = plan[step * self.per_step:(step + 1) * self.per_step]
                for i in range(self.accum):
                    yield block[i * self.world + self.rank]
            epoch, k = epoch + 1, 0

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
        order = torch.randperm(self.n, generator=epoch_generator(self.seed, epoch)) if self.shuffle \
            else torch.arange(self.n)
        usable = self.n // (self.per_step * self.mbs) * self.per_step * self.mbs
        return [order[i:i + self.mbs].tolist() for i in range(0, usable, self.mbs)]

    def steps_in(self, epoch: int) -> int:
        return self.n // (self.per_step * self.mbs)


class TokenBudgetBatchSampler(_StepSampler):
    """Micro-batches of similar-length samples whose padded size (longest x count) fits ``max_tokens``.

    Per epoch: shuffle, sort windows of the shuffled order by length (similar lengths, little padding,
    yet no fixed length order), pack greedily, then shuffle the micro-batches themselves.
    """

    WINDOW_BATCHES = 64  # how many micro-batches' worth of samples is sorted together

    def __init__(self, lengths: list, max_tokens: int, grad_accum_steps: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, start_step: int = 0):
        super().__init__(grad_accum_steps, rank, world_size, seed, shuffle, start_step)
        self.lengths, self.max_tokens = [int(n) for n in lengths], max_tokens
        longest = max(self.lengths)
        if longest > max_tokens:
            raise BatchingError(f"a sample needs {longest} positions, more than data.max_tokens_per_batch={max_tokens}")
        typical = sorted(self.lengths)[len(self.lengths) // 2]
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
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        batches = []
        for start in range(0, n, self.window):
            chunk = sorted(order[start:start + self.window], key=lambda i: -self.lengths[i])  # stable
            current, longest = [], 0
            for i in chunk:
                if current and max(longest, self.lengths[i]) * (len(current) + 1) > self.max_tokens:
                    batches.append(current)
                    current, longest = [], 0
                current.append(i)
                longest = max(longest, self.lengths[i])
            if current:
                batches.append(current)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        self._cache = {epoch: batches}  # only the current epoch is kept
        return batches
