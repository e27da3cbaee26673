"""The run's numerics on its device, made in one place: bf16 autocast (on a GPU or a CPU) or plain fp32.

``config.uses_bf16`` decides from train.precision and the device type; the autocast's device type is the
device's own, so the same run computes the same way on ``cuda`` and ``cpu``. Under bf16 the frozen base
is stored in bf16 and what trains stays fp32 (``model.build_for_training``), as do AdamW's moments.
The trainer's step, validation, the benchmark and the listening samples all use this.
"""

from __future__ import annotations

import torch

from higgs_ddp.config import Config, uses_bf16


def weight_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype the model is built in (its frozen weights keep it; trainable ones are made fp32)."""
    return torch.bfloat16 if uses_bf16(cfg, device.type) else torch.float32


def autocast(cfg: Config, device: torch.device) -> torch.autocast:
    """A fresh autocast context for ``device``: bf16 when the run computes in bf16, disabled otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device.type))


def describe(cfg: Config, device: torch.device) -> str:
    """'bf16' or 'fp32', as the run card and the benchmark report it."""
    return "bf16" if uses_bf16(cfg, device.type) else "fp32"
