"""AdamW (fused: one kernel for all parameters) and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(params: list, lr: float, betas, weight_decay: float, device: torch.device):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases are not decayed
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # Fused on CPU too: ~5x faster than foreach for LoRA's many small tensors (measured, torch 2.11).
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type in ("cuda", "cpu"))


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, max_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, min_ratio))
