"""``model.quantize: nf4``: the frozen base's linear weights stored in 4 bits (QLoRA's NF4, torchao's ``NF4Tensor``),
for ``train.mode: lora``.

Which weights: every frozen ``nn.Linear`` inside the decoder layers (attention q/k/v/o, the text FFN, the DualFFN
audio FFN), whether LoRA wraps it or not: 4.93B of the 5.8B model's weights; and the frozen text head
(``audio_decoder_proj.text_lm_head``, 0.39B), its own tensor in this model (HiggsAudioModel ties nothing: no
``_tied_weights_keys``, no output-embedding hook; a head that did share the embedding's weight would stay as it is).
The text head is the one head worth it: 0.59 GB of bf16 saved, and in TTS the loss applies it to the handful of
supervised text positions only (the deferred head: an ``F.linear`` NF4 serves, as in the decoder layers), so its
rounding touches the small text stream and not the audio targets that carry the training signal. The audio head
(25M weights: every audio target's logits), the text embeddings and the audio codebook embeddings (table lookups, not
matmuls NF4 serves) stay in the base's dtype. The LoRA weights and their AdamW state stay fp32, as without
quantisation. Export always merges into the full-precision base, the head included.

Block sizes: 64 weights per absmax scale (an int8 each, double-quantised: QLoRA's) and up to 256 scales per
second-level scale (in the base's dtype). A weight's second-level scales must split evenly over up to ``SHARDS``
FSDP ranks (FSDP2 shards an NF4 weight by rows, and each of its inner tensors with it): the scaler block is the
largest power of two <= 256 that allows it. Every weight of the 5.8B model gets 256; the tiny test model's
smaller weights get 2-16. A weight whose element count is not a multiple of 64 * SHARDS stays unquantised.

Under FSDP2 torchao's NF4 tensor gathers its own 4-bit shards (``fsdp_pre_all_gather``/``fsdp_post_all_gather``),
as torchtune shards it. Under DDP the 4-bit weights are left out of DDP's start-up broadcast (it broadcasts plain
tensors only): every rank built and rounded the same base, deterministically.
"""

from __future__ import annotations

import sys

from torch import nn

from higgs_ddp.config import Config, ConfigError

BLOCK = 64  # weights per first-level (int8) scale
SCALER_BLOCK = 256  # first-level scales per second-level scale, at most
SHARDS = 8  # FSDP rank counts that divide this can shard every NF4 weight evenly


def scaler_block(numel: int):
    """The second-level block size for a weight of ``numel`` elements, or None: it stays unquantised."""
    if numel % BLOCK:
        return None
    blocks, size = numel // BLOCK, SCALER_BLOCK
    while size >= 1 and blocks % (size * SHARDS):
        size //= 2
    return size or None


def nf4_bytes(numel: int, dtype_bytes: int) -> int:
    """Bytes of one NF4 weight: 4 bits a weight, an int8 scale per 64 weights, a second-level scale (base dtype)
    per scaler block, and per tensor the scales' mean and the 16-entry code table (base dtype)."""
    blocks = numel // BLOCK
    return numel // 2 + blocks + (blocks // scaler_block(numel)) * dtype_bytes + 17 * dtype_bytes


def targets(raw: nn.Module) -> list:
    """(name, nn.Linear) of the weights NF4 stores: the frozen linears of the decoder layers and the frozen text
    head (or the base layer LoRA wraps it around), that can be split into blocks. Works on a model built on the
    meta device (the memory plan counts them there)."""
    found = [(f"layers.{name}", module) for name, module in raw.layers.named_modules() if _fits(module)]
    tied = raw.embed_tokens.weight
    for name, module in raw.audio_decoder_proj.named_modules():
        if name.split(".")[0] == "text_lm_head" and _fits(module) and module.weight is not tied:
            found.append((f"audio_decoder_proj.{name}", module))
    return found


def _fits(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and not module.weight.requires_grad
            and scaler_block(module.weight.numel()) is not None)


def check(cfg: Config, world_size: int = 1) -> None:
    """One line, before any weight is built, for a run model.quantize=nf4 cannot do (``config.check_machine``
    refuses it where torchao is not installed)."""
    if cfg.model.quantize != "nf4":
        return
    if cfg.train.mode != "lora":  # also Config.validate's rule; repeated for configs built in code
        raise ConfigError(f"model.quantize=nf4 quantises the frozen base of train.mode=lora; train.mode="
                          f"{cfg.train.mode} trains the base weights themselves: set model.quantize=none")
    if cfg.train.parallel == "fsdp" and world_size > 1 and SHARDS % world_size:
        raise ConfigError(f"model.quantize=nf4 under train.parallel=fsdp shards each 4-bit weight evenly over "
                          f"1, 2, 4 or {SHARDS} ranks, not {world_size}: use train.parallel=ddp")


def quantize_base(raw: nn.Module, device=None) -> int:
    """Replaces each target's weight by its NF4 form (rounded on ``device`` when given: a GPU rounds the 5.8B
    model in seconds, and only one layer's weight is ever there in full precision); returns how many."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    found = targets(raw)
    for _, module in found:
        w = module.weight.detach()
        w = (w if device is None else w.to(device)).contiguous()
        module.weight = nn.Parameter(to_nf4(w, BLOCK, scaler_block(w.numel())), requires_grad=False)
    return len(found)


def is_nf4(tensor) -> bool:
    module = sys.modules.get("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    return module is not None and isinstance(tensor, module.NF4Tensor)


def storage_parts(tensor) -> list:
    """The plain tensors holding ``tensor``'s bytes: an NF4 weight's codes, scales and table, else itself."""
    if not is_nf4(tensor):
        return [tensor]
    return [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
