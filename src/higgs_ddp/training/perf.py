"""Speed and memory switches for the raw HiggsAudioModel, applied from outside: boson_multimodal's files
are never edited, and parameter names (hence checkpoints and adapters) stay the same.

- Activation checkpointing: ``HiggsAudioModel._forward_core`` calls its decoder layers directly, never
  through ``_gradient_checkpointing_func``, so ``gradient_checkpointing_enable()`` saves nothing for the
  backbone. Here each decoder layer's ``forward`` is replaced on the instance by a non-reentrant
  checkpoint of the original: only each layer's input is kept, the rest is recomputed in backward.
  The RNG state is replayed, so LoRA dropout recomputes the same mask: loss and gradients are unchanged.
- ``torch.compile`` of each decoder layer (``nn.Module.compile``: compiles the call in place).
- Deferring the text head (``model.deferred_text_head``, part of HiggsForward): the loss applies the text
  head only to the rows it scores.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_MARK = "_higgs_ddp_checkpointed"


def decoder_layers(raw_model: nn.Module) -> nn.ModuleList:
    return raw_model.layers


def enable_activation_checkpointing(raw_model: nn.Module) -> int:
    """Checkpoint every decoder layer of a raw HiggsAudioModel; returns how many were wrapped."""
    n = 0
    for layer in decoder_layers(raw_model):
        if getattr(layer, _MARK, False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation / generation: nothing to save
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        setattr(layer, _MARK, True)
        n += 1
    return n


def compile_decoder_layers(raw_model: nn.Module) -> int:
    """torch.compile each decoder layer in place (after checkpointing, so the compiled region is the
    checkpointed layer). Sequence lengths vary between batches, hence dynamic shapes."""
    layers = decoder_layers(raw_model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def enable_tf32() -> None:
    """TF32 for the fp32 matmuls that remain on GPU (LoRA weights, fp32 heads); bf16 ones are unaffected."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
