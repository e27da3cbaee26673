"""How the trained model is spread over the ranks: one object per strategy, chosen by ``train.parallel``.

- ``ddp`` (the default): every rank holds the whole model; DDP all-reduces the gradients once per optimizer
  step (accumulation skips the sync on earlier micro-steps). The fast path for LoRA, whose frozen base is
  needed in full on every rank anyway.
- ``fsdp``: PyTorch's FSDP2 (``fully_shard``). Every rank holds 1/N of each trainable weight, its gradient
  and its AdamW moments, so full fine-tuning of the 5.8B model needs ~92/N GB of model state per GPU
  instead of ~92 GB. Each forward gathers a layer's weights just in time and frees them after; the
  gradients are reduce-scattered on every micro-step, so they stay sharded under accumulation too.

The trainer sees only this interface, so it has no branch per strategy:

- ``wrap(forward)``: the module the trainer calls (its forward is the wrapper's own: gradients synchronise).
- ``wrap_frozen(forward)``: a model that is never trained (DPO's frozen reference): on the device as it is, or
  under FSDP sharded with the policy's plan, so each rank holds 1/N of it; ``reshard_frozen`` frees what its
  no-grad forward left gathered.
- ``set_sync(wrapped, last)``: gradient synchronisation on the last micro-step only, where that saves work.
- ``eval_module(wrapped)``: what a forward without gradients calls. ``collective_forward`` says whether such
  a forward is a collective (FSDP gathers weights in it), so every rank must run the same number of them.
- ``clip_grad_norm_(params, max_norm)``: the global norm over all shards, as a float on every rank.
- ``grad_scale``: both wrappers average gradients over the ranks; the loss, normalised by the *global*
  token count already, is multiplied by this to undo that average.

Sharding units (FSDP2), in the order torchtitan and torchtune choose them: each decoder layer, the text
embeddings, then the final norm with the two heads as one unit kept gathered after the forward (the loss
uses them right away, and the deferred text head runs after the forward), and the root last (it keeps the
audio codebook embeddings and whatever else is left). peft is applied before sharding, so parameter names
and adapter files are the same as under DDP.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from higgs_ddp.config import Config
from higgs_ddp.runtime.distributed import DistEnv


class Strategy:
    """One process, or the base of the wrappers: the model as it is."""

    name = "one process"
    collective_forward = False  # a no-grad forward involves the other ranks

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.grad_scale = float(env.world_size)

    def wrap(self, forward: nn.Module) -> nn.Module:
        return forward

    def wrap_frozen(self, forward: nn.Module) -> nn.Module:
        return forward.to(self.env.device)  # no gradients: nothing to synchronise, nothing for DDP to do

    def reshard_frozen(self, wrapped: nn.Module) -> None:
        pass

    def set_sync(self, wrapped: nn.Module, last: bool) -> None:
        pass

    def eval_module(self, wrapped: nn.Module) -> nn.Module:
        return wrapped

    def clip_grad_norm_(self, params: list, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))

    def lockstep_generation(self, wrapped: nn.Module):
        """None: each rank may generate on its own (listening samples are shared out over the ranks). A
        context manager: generation is a collective, every rank must generate the same thing inside it."""
        return None

    def describe(self) -> str:
        return self.name


class Replicated(Strategy):
    """DistributedDataParallel: a full replica per rank, gradients all-reduced."""

    name = "ddp"

    def wrap(self, forward: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from higgs_ddp.quantize import is_nf4

        # DDP broadcasts rank 0's weights at the start, plain tensors only: the NF4 weights stay out of it (every
        # rank rounded the same base the same way; quantize.py).
        nf4 = [n for n, p in forward.named_parameters() if is_nf4(p)]
        if nf4:
            DDP._set_params_and_buffers_to_ignore_for_model(forward, nf4)
        ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
        return DDP(forward, device_ids=ids, find_unused_parameters=self.cfg.train.find_unused_parameters)

    def set_sync(self, wrapped: nn.Module, last: bool) -> None:
        wrapped.require_backward_grad_sync = last  # nanoGPT-style: skip the all-reduce until the last micro-step

    def eval_module(self, wrapped: nn.Module) -> nn.Module:
        return wrapped.module  # no gradients, so no DDP bookkeeping


class Sharded(Strategy):
    """FSDP2: parameters, gradients and optimizer state sharded over the ranks."""

    name = "fsdp"
    collective_forward = True

    def wrap_frozen(self, forward: nn.Module) -> nn.Module:
        # The policy's plan and numerics (mixed precision, offload), so the reference computes what the policy
        # computed before its first update. Its weights move to the device one unit at a time as they are sharded.
        return self.wrap(forward)

    def reshard_frozen(self, wrapped: nn.Module) -> None:
        # The head unit and the root keep their weights gathered after a forward (reshard_after_forward=False) until
        # the backward frees them; the frozen model has no backward.
        from torch.distributed.fsdp import FSDPModule

        for m in wrapped.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def wrap(self, forward: nn.Module) -> nn.Module:
        import torch.distributed.tensor  # noqa: F401  (peft and FSDP2 need DTensor registered)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        from higgs_ddp.model import unwrap

        settings = self.cfg.train.fsdp
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        kwargs = {"mesh": mesh}
        if settings.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if settings.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        raw = unwrap(forward)
        for layer in raw.layers:
            fully_shard(layer, **kwargs)
        fully_shard(raw.embed_tokens, **kwargs)
        fully_shard([raw.norm, raw.audio_decoder_proj], reshard_after_forward=False, **kwargs)
        fully_shard(forward, reshard_after_forward=False, **kwargs)
        return forward

    def clip_grad_norm_(self, params: list, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @contextlib.contextmanager
    def _root_gathered(self, wrapped: nn.Module):
        # generate() calls the raw model, not the root's forward, so the root's own weights (the audio
        # codebook embeddings among them) are gathered here; each layer still gathers its own in its forward.
        wrapped.unshard()
        try:
            yield
        finally:
            wrapped.reshard()

    def lockstep_generation(self, wrapped: nn.Module):
        return self._root_gathered(wrapped)

    def describe(self) -> str:
        s = self.cfg.train.fsdp
        extra = [f"{s.mixed_precision} numerics"] + (["CPU offload"] if s.cpu_offload else [])
        return f"fsdp ({', '.join(extra)})"


def build_strategy(cfg: Config, env: DistEnv) -> Strategy:
    if cfg.train.parallel == "fsdp":
        if env.world_size > 1 or cfg.train.fsdp.cpu_offload:
            return Sharded(cfg, env)
        return Strategy(cfg, env)  # one rank: nothing to shard
    if env.world_size > 1:
        return Replicated(cfg, env)
    return Strategy(cfg, env)

