"""Model FLOPs per token and device peaks, for MFU.

Convention (stated in BENCHMARKS.md): a weight costs 2 FLOPs per token per multiply-add forward; in
backward the input gradient costs as much again and, only for a trained weight, the weight gradient
once more. So a frozen weight costs 4 FLOPs per token (LoRA's base model: 4·N) and a trained one 6
(full fine-tuning: 6·N). A position is charged for the weights it goes through: attention, then the
text FFN at text positions or the audio FFN (DualFFN) at audio positions; the text head only at rows
with a supervised text target and the audio head at audio-out positions, because that is all the loss
needs. Attention scores and values add 12·layers·(heads·head_dim)·sequence length per token (forward
4, backward 8), without a causal discount, as PaLM and torchtitan count it. Embedding lookups and
norms are not counted.
"""

from __future__ import annotations

from collections import defaultdict

import torch

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name(); first match wins.
BF16_PEAK = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12),
]


def device_peak_flops(device: torch.device, override_tflops: float = 0.0):
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK if key in name), None)


def _group(name: str) -> str | None:
    if ".audio_mlp." in name or ".audio_attn." in name:
        return "audio_ffn"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "text_ffn"
    if "text_lm_head" in name:
        return "text_head"
    if "audio_lm_head" in name:
        return "audio_head"
    return None  # embeddings, norms, the unused audio tower


def weight_costs(model: torch.nn.Module) -> dict:
    """FLOPs per token of each group of matmul weights: 4 per frozen parameter, 6 per trained one."""
    cost = defaultdict(float)
    for name, p in model.named_parameters():
        group = _group(name)
        if group and p.ndim >= 2:
            cost[group] += (6 if p.requires_grad else 4) * p.numel()
    return dict(cost)


def step_flops(costs: dict, layers: int, attn_width: int, batches: list) -> float:
    """Model FLOPs of one optimizer step's micro-batches (this rank)."""
    total = 0.0
    for b in batches:
        audio_positions = int(b.audio_out_ids.shape[-1]) if b.audio_out_ids is not None else 0
        text_positions = b.num_positions - audio_positions
        seq = b.padded_positions / max(b.num_samples, 1)
        total += (b.num_positions * costs.get("attention", 0.0)
                  + text_positions * costs.get("text_ffn", 0.0)
                  + audio_positions * (costs.get("audio_ffn", 0.0) + costs.get("audio_head", 0.0))
                  + b.text_targets * costs.get("text_head", 0.0)
                  + b.num_positions * 12 * layers * attn_width * seq)
    return total
