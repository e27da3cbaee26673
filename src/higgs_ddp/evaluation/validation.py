"""Validation: loss and per-codebook top-1 accuracy over the validation set, split over the ranks and
reduced by token counts, so that 2 ranks report exactly what 1 rank does (a mean of per-rank means
would weigh a rank's tokens by how many samples it happened to get)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from higgs_ddp.runtime.distributed import DistEnv, all_reduce_max, all_reduce_sum


@dataclass
class Validatable:
    """What a validation pass needs of the model being trained, and nothing more (the trainer's
    ``validatable()`` makes one): how many validation samples there are, how to batch some of them, how to
    score a batch without gradients, and the module whose train/eval flag turns dropout off."""

    env: DistEnv
    samples: int
    micro_batch_size: int
    max_batches: int  # per rank, 0: all
    num_codebooks: int
    text_weight: float
    audio_weight: float
    batch: Callable  # [indices] -> Batch on the device
    score: Callable  # Batch -> DualLoss (with per-codebook hits), no gradients, under the run's autocast
    collective_forward: bool  # a forward involves the other ranks (FSDP): every rank runs as many
    model: nn.Module


def validation_chunks(size: int, rank: int, world: int, micro_batch_size: int, max_batches: int = 0) -> list:
    """This rank's share, in a fixed order: samples rank, rank + world, ..., in micro-batches of indices."""
    mine = list(range(rank, size, world))
    chunks = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return chunks[:max_batches or None]


def lockstep(chunks: list, collective: bool, device) -> list:
    """[(indices, counted)]. When a forward is a collective (FSDP gathers weights in it) every rank must run
    as many as the busiest one: the others repeat a micro-batch whose result is not counted."""
    runs = [(c, True) for c in chunks]
    if collective:
        most = int(all_reduce_max(torch.tensor([len(chunks)], device=device)).item())
        runs += [(chunks[0] if chunks else [0], False)] * (most - len(chunks))
    return runs


@torch.no_grad()
def evaluate(v: Validatable) -> dict:
    """One validation pass with the model as it is now; every rank returns the same global result."""
    env, C = v.env, v.num_codebooks
    # text sum, text targets, audio sum, audio targets, samples, then per codebook: sums, targets, hits
    sums = torch.zeros(5 + 3 * C, dtype=torch.float64, device=env.device)
    was_training = v.model.training
    v.model.eval()  # no dropout
    try:
        chunks = validation_chunks(v.samples, env.rank, env.world_size, v.micro_batch_size, v.max_batches)
        for chunk, counted in lockstep(chunks, v.collective_forward, env.device):
            b = v.batch(chunk)
            dl = v.score(b)
            if not counted:
                continue
            sums += torch.cat([
                torch.stack([dl.text_loss_sum, dl.text_tokens.to(dl.text_loss_sum.dtype), dl.audio_loss_sum,
                             dl.audio_tokens.to(dl.audio_loss_sum.dtype),
                             torch.tensor(float(b.num_samples), device=env.device)]).double(),
                dl.per_codebook_loss_sum.double(), dl.per_codebook_tokens.double(),
                dl.per_codebook_correct.double()])
    finally:
        v.model.train(was_training)
    sums = all_reduce_sum(sums).tolist()
    text_sum, text_n, audio_sum, audio_n, samples = sums[:5]
    cb_sum, cb_n, cb_hit = sums[5:5 + C], sums[5 + C:5 + 2 * C], sums[5 + 2 * C:]
    text_loss, audio_loss = text_sum / max(text_n, 1), audio_sum / max(audio_n, 1)
    return {"split": "val", "loss": v.text_weight * text_loss + v.audio_weight * audio_loss,
            "text_loss": text_loss, "audio_loss": audio_loss,
            "per_codebook_loss": [s / max(n, 1) for s, n in zip(cb_sum, cb_n)],
            "per_codebook_acc": [h / max(n, 1) for h, n in zip(cb_hit, cb_n)],
            "text_targets": int(text_n), "audio_targets": int(audio_n), "samples": int(samples)}
