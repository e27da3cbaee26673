"""The optimizer (``train.optimizer``) and a linear-warmup + cosine learning-rate schedule.

- ``adamw``: torch's AdamW, fused (one kernel for all parameters); its two moments are fp32, 8 bytes per
  trained parameter.
- ``adamw8bit``: torchao's AdamW8bit: both moments block-wise quantised to 8 bits (a uint8 code per value
  and one fp32 scale per block of 256 values: ~2.03 bytes per trained parameter instead of 8); tensors
  under 4096 values (norms, biases, small LoRA factors) keep fp32 moments, as bitsandbytes does. The
  update itself is computed in fp32. torchao compiles each parameter's update on first use; on a CPU
  that compile costs 17-33 s and buys nothing measurable, so there the same update runs eagerly.

A checkpoint stores the 8-bit moments as plain tensors (``name::exp_avg.codes``, ``.scale``, ``.qmap``;
``checkpoint.OptimizerState``) and rebuilds them on load: nothing is pickled, and a resume is exact.
"""

from __future__ import annotations

import importlib.util
import math

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
TORCHAO = "torchao==0.18.0"  # the version setup.py pins; its AdamW8bit and OptimState8bit are used here


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def build_optimizer(params: list, lr: float, betas, weight_decay: float, device: torch.device,
                    kind: str = "adamw"):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases are not decayed
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if kind == "adamw8bit":
        return _adamw8bit_class()(groups, lr=lr, betas=tuple(betas), eager=device.type == "cpu")
    # Fused on CPU too: ~5x faster than foreach for LoRA's many small tensors (measured, torch 2.11).
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type in ("cuda", "cpu"))


def _adamw8bit_class():
    from torchao.optim import AdamW8bit

    class AdamW8bitState(AdamW8bit):
        """torchao's AdamW8bit; ``eager``: its per-parameter update runs without torch.compile (the CPU).
        torchao keeps ``lr`` as a 0-dim tensor in each param group (the schedule fills it in place)."""

        def __init__(self, groups, *, eager: bool, **kwargs):
            super().__init__(groups, **kwargs)
            self.eager = eager

        def step(self, closure=None):
            if not self.eager:
                return super().step(closure)
            # Dynamo disabled for this call only: torchao's torch.compile(fn)(...) then calls fn itself. On one
            # intra-op thread: its many small element-wise ops (no reductions but a max, so the same result)
            # ran 10x slower on two threads of a busy 2-core machine (0.17 s against 2 s a step, tiny model).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch._dynamo.config.patch(disable=True):
                    return super().step(closure)
            finally:
                torch.set_num_threads(threads)

    return AdamW8bitState


def is_quantized_state(value) -> bool:
    """An 8-bit moment (torchao's OptimState8bit): codes, scale and qmap behind a tensor's face."""
    return all(hasattr(value, a) for a in ("codes", "scale", "qmap", "signed"))


def quantized_parts(value) -> dict:
    """An 8-bit moment as plain tensors: uint8 ``codes`` (the weight's shape), fp32 ``scale`` (one per block)
    and the fp32 ``qmap`` (code -> value, 256 entries; signed for exp_avg, unsigned for exp_avg_sq)."""
    return {"codes": value.codes, "scale": value.scale, "qmap": value.qmap}


def rebuild_quantized(parts: dict, like: torch.Tensor):
    """The 8-bit moment ``quantized_parts`` took apart, on ``like``'s device and with its dtype."""
    from torchao.optim.subclass_8bit import OptimState8bit

    qmap = parts["qmap"].to(like.device, torch.float32)
    return OptimState8bit(parts["codes"].to(like.device, torch.uint8), parts["scale"].to(like.device, torch.float32),
                          qmap, bool(qmap.min() < 0), dtype=like.dtype)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, max_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, min_ratio))


def plain_scalars(value):
    """``value`` with every 0-dim tensor as a Python float (exact for fp32): JSON for state.json."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(plain_scalars(v) for v in value)
    if isinstance(value, dict):
        return {k: plain_scalars(v) for k, v in value.items()}
    return value


def tensor_scalars(saved, live):
    """``saved`` (from ``plain_scalars``) with a 0-dim tensor wherever ``live`` (the state now) holds one, of
    its dtype: torchao's optimizer keeps lr as a tensor, and so does the schedule's copy of it."""
    if isinstance(live, torch.Tensor) and live.dim() == 0 and isinstance(saved, (int, float)):
        return torch.tensor(saved, dtype=live.dtype)
    if isinstance(saved, (list, tuple)) and isinstance(live, (list, tuple)) and len(saved) == len(live):
        return type(saved)(tensor_scalars(s, v) for s, v in zip(saved, live))
    if isinstance(saved, dict) and isinstance(live, dict):
        return {k: tensor_scalars(v, live.get(k)) for k, v in saved.items()}
    return saved


class SchedulerState:
    """The schedule as a registered state (state.py): its state_dict as JSON, with tensor learning rates
    (torchao's) as numbers and back."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return plain_scalars(self.scheduler.state_dict())

    def load_state_dict(self, saved) -> None:
        self.scheduler.load_state_dict(tensor_scalars(saved, self.scheduler.state_dict()))
