"""train.objective=dpo: what one optimizer step and one validation pass compute on preference pairs.

A micro-batch of P pairs is one batch of 2P sequences (data/pair_data.py: chosen rows first). Each sequence's
log-probability is ``dual_loss.sequence_logps`` (the targets the supervised loss trains on, both streams).
The reference is the starting model (train.init_from's weights merged into the base, or the base), without
gradients: for train.mode=lora the same model with the new adapter switched off (peft's ``disable_adapter``, no
second copy, ``AdapterOff``); for audio_ffn and full a frozen copy of the starting weights taken before the first
update (``FrozenCopy``), on the device under DDP (sharing the weights the policy does not train), sharded like
the policy under FSDP. Neither is checkpointed: a resumed run builds the same starting model again.
The loss (``dpo_loss``) is divided by the global number of pairs over all ranks and micro-steps, known before
the first backward, so 1 rank x accumulation 2 == 2 ranks == a micro-batch of 2 pairs.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from higgs_ddp.dpo_loss import dpo_loss
from higgs_ddp.dual_loss import sequence_logps
from higgs_ddp.errors import HiggsError
from higgs_ddp.evaluation.validation import lockstep, validation_chunks
from higgs_ddp.runtime.distributed import all_reduce_sum

# What every step and validation sums over its pairs (then all-reduced): loss, rewards, margin, accuracy, and
# the supervised term's sum (over the chosen candidates' targets).
SUMS = ("loss", "chosen", "rejected", "margin", "accuracy", "sft")


class DPOError(HiggsError, RuntimeError):
    pass


@dataclass
class PreferenceStep:
    """One optimizer step on pairs; ``row()`` is what metrics.jsonl and TensorBoard get (TRL's metric names)."""
    loss: float  # the DPO loss (+ dpo.sft_weight x sft_loss), mean over the step's pairs
    dpo_loss: float
    sft_loss: float  # the chosen candidates' supervised loss per target (reported whatever its weight)
    rewards_chosen: float  # mean beta (log pi - log ref) of the chosen candidates
    rewards_rejected: float
    margin: float  # mean rewards_chosen - rewards_rejected
    accuracy: float  # share of pairs whose chosen reward exceeds the rejected one's
    pairs: int
    grad_norm: float
    tokens: int
    samples: int
    padding_fraction: float
    skipped: bool

    def row(self) -> dict:
        return {"loss": self.loss, "dpo_loss": self.dpo_loss, "sft_loss": self.sft_loss,
                "rewards/chosen": self.rewards_chosen, "rewards/rejected": self.rewards_rejected,
                "rewards/margins": self.margin, "rewards/accuracies": self.accuracy, "pairs": self.pairs,
                "grad_norm": self.grad_norm, "tokens": self.tokens, "samples": self.samples,
                "padding_fraction": self.padding_fraction, "skipped": self.skipped}

    def progress(self) -> dict:
        return {"margin": f"{self.margin:.3f}", "acc": f"{self.accuracy:.2f}"}


class AdapterOff:
    """train.mode=lora: the reference's forward is the policy's with its (new) LoRA adapter switched off."""

    describe = "adapter off"

    def __init__(self, trainer):
        self.t = trainer

    @contextlib.contextmanager
    def active(self):
        """-> (the module to call, the deferred text head), while the adapter is off."""
        t = self.t
        with t.model.disable_adapter():
            yield t.strategy.eval_module(t.wrapped), t.text_head


def starting_copy(raw, share_frozen: bool):
    """The reference's own HiggsAudioModel: a copy of ``raw`` as built, before its first update. With
    ``share_frozen`` (the policy is not sharded) the weights the policy never trains are the policy's own tensors,
    not copies: for audio_ffn that leaves only the audio FFN copied. Under FSDP each model's weights are sharded
    by its own fully_shard, so nothing is shared."""
    memo = {id(p): p for p in raw.parameters() if not p.requires_grad} if share_frozen else {}
    return copy.deepcopy(raw, memo)


class FrozenCopy:
    """train.mode=audio_ffn / full: the starting model's own copy, never trained, in eval mode, in the policy's
    dtypes (its trained weights fp32, under the same autocast), so that before the first update it computes what
    the policy computes, bit for bit. ``start``: the raw HiggsAudioModel as the policy was built (before
    activation checkpointing and compile wrap its layers)."""

    def __init__(self, start, strategy, defer_text_head: bool, compile: bool = False):
        from higgs_ddp.model import HiggsForward, text_head
        from higgs_ddp.training.perf import compile_decoder_layers

        start.requires_grad_(False)
        start.eval()
        if compile:
            compile_decoder_layers(start)
        self.strategy = strategy
        self.head = text_head(start) if defer_text_head else None
        self.module = strategy.wrap_frozen(HiggsForward(start, defer_text_head=defer_text_head))
        self.describe = "a frozen copy" + (", sharded like the policy" if strategy.collective_forward else "")

    @contextlib.contextmanager
    def active(self):
        try:
            yield self.module, self.head
        finally:
            self.strategy.reshard_frozen(self.module)


class PreferenceObjective:
    """The DPO step of a Trainer (which owns the model, the wrapper, the optimizer and the counters)."""

    def __init__(self, trainer):
        self.t = trainer
        d = trainer.cfg.dpo
        self.beta, self.sft_weight, self.length_normalized = d.beta, d.sft_weight, d.length_normalized

    def logps(self, module, b, check: bool, head=None):
        """Per-sequence log-probabilities of the batch under ``module`` (the run's autocast); ``head``: the
        deferred text head of ``module``'s model, when it is not the policy's (the reference copy's: it has one
        exactly when the policy has)."""
        t = self.t
        head = head if head is not None else t.text_head
        c = t.cfg.train
        with t.autocast:
            out = module(**b.model_inputs())
            return sequence_logps(
                out.get("logits"), out["expanded_labels"], out["audio_logits"], b.label_audio_ids,
                audio_out_ids_start=b.audio_out_ids_start, audio_out_ids_start_group_loc=b.audio_out_ids_start_group_loc,
                expanded_input_ids=out["expanded_input_ids"] if check else None,
                audio_out_ids=b.audio_out_ids if check else None, alignment=t.alignment, validate=check,
                text_hidden=out.get("text_hidden"), text_head=head, chunk_rows=c.text_logits_chunk)

    @torch.no_grad()
    def reference_logps(self, b, check: bool = False):
        with self.t.reference.active() as (module, head):
            return self.logps(module, b, check, head=head)

    def loss(self, policy, reference: torch.Tensor, P: int):
        lp = policy
        return dpo_loss(lp.logps[:P], lp.logps[P:], reference[:P], reference[P:], beta=self.beta,
                        chosen_tokens=lp.tokens[:P], rejected_tokens=lp.tokens[P:],
                        length_normalized=self.length_normalized, sft_weight=self.sft_weight)

    @staticmethod
    def sums(dl, policy, P: int) -> torch.Tensor:
        """SUMS of one micro-batch; "sft": the chosen candidates' summed -log pi, whatever dpo.sft_weight."""
        return torch.stack([dl.losses.sum(), dl.chosen_rewards.sum(), dl.rejected_rewards.sum(), dl.margins.sum(),
                            dl.accuracies.sum(), -policy.logps[:P].detach().sum()]).double()

    def accumulate(self, micro: list) -> tuple[float, dict]:
        """Every micro-batch's forwards and backward -> (the step's loss, the rest of its PreferenceStep)."""
        t = self.t
        env = t.env
        counts = torch.tensor([[b.pairs, int(b.sample_targets[:b.pairs].sum()), b.num_positions, b.padded_positions,
                                b.num_samples] for b in micro], dtype=torch.float64).sum(0)
        g_pairs, g_chosen_targets, g_tokens, g_padded, g_samples = all_reduce_sum(counts.to(env.device)).tolist()
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=env.device)
        for i, b in enumerate(micro):
            # The label convention decided (and the target counts verified) on the first step, by the first
            # forward: the reference's. The aligned path is verified on every step, as the supervised step does.
            check = not t.verified or t.alignment == "aligned"
            reference = self.reference_logps(b, check)
            if check:
                if not torch.equal(reference.tokens.cpu(), b.sample_targets.cpu()):
                    raise DPOError(f"the loss counted {reference.tokens.tolist()} targets per sequence, the "
                                          f"collator {b.sample_targets.tolist()}: normalisation would be wrong")
                t.alignment = reference.path
            t.strategy.set_sync(t.wrapped, last=i == len(micro) - 1)
            policy = self.logps(t.wrapped, b, check=False)
            dl = self.loss(policy, reference.logps, b.pairs)
            dl.normalized(g_pairs, g_chosen_targets, scale=t.strategy.grad_scale).backward()
            sums += self.sums(dl, policy, b.pairs)
        t.verified = True
        s = dict(zip(SUMS, all_reduce_sum(sums).tolist()))
        n = max(g_pairs, 1)
        sft = s["sft"] / max(g_chosen_targets, 1)
        dpo = s["loss"] / n
        loss = dpo + self.sft_weight * sft
        return loss, {"dpo_loss": dpo, "sft_loss": sft, "rewards_chosen": s["chosen"] / n,
                      "rewards_rejected": s["rejected"] / n, "margin": s["margin"] / n, "accuracy": s["accuracy"] / n,
                      "pairs": int(g_pairs), "tokens": int(g_tokens), "samples": int(g_samples),
                      "padding_fraction": 1.0 - g_tokens / max(g_padded, 1)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The DPO loss, rewards and accuracy on the held-out pairs, shared out over the ranks and reduced by
        pair counts (every rank returns the same row)."""
        t = self.t
        env, c = t.env, t.cfg
        module = t.strategy.eval_module(t.wrapped)
        sums = torch.zeros(len(SUMS) + 2, dtype=torch.float64, device=env.device)
        was_training = t.model.training
        t.model.eval()
        try:
            chunks = validation_chunks(len(t.val_dataset), env.rank, env.world_size, c.train.micro_batch_size,
                                       c.eval.max_batches)
            for chunk, counted in lockstep(chunks, t.strategy.collective_forward, env.device):
                b = t.collator([t.val_dataset[i] for i in chunk]).to(env.device)
                reference = self.reference_logps(b).logps
                policy = self.logps(module, b, check=False)
                dl = self.loss(policy, reference, b.pairs)
                if counted:
                    extra = torch.tensor([b.pairs, int(b.sample_targets[:b.pairs].sum())], dtype=torch.float64,
                                         device=env.device)
                    sums += torch.cat([self.sums(dl, policy, b.pairs), extra])
        finally:
            t.model.train(was_training)
        s = dict(zip(SUMS + ("pairs", "chosen_targets"), all_reduce_sum(sums).tolist()))
        n = max(s["pairs"], 1)
        dpo = s["loss"] / n
        sft = s["sft"] / max(s["chosen_targets"], 1)
        return {"split": "val", "loss": dpo + self.sft_weight * sft, "dpo_loss": dpo,
                "rewards/chosen": s["chosen"] / n, "rewards/rejected": s["rejected"] / n,
                "rewards/margins": s["margin"] / n, "rewards/accuracies": s["accuracy"] / n, "pairs": int(s["pairs"])}


def describe_validation(row: dict) -> str:
    return (f"validation DPO loss {row['loss']:.4f} on {row['pairs']} pairs (margin {row['rewards/margins']:.4f}, "
            f"accuracy {row['rewards/accuracies']:.2f}; rewards chosen {row['rewards/chosen']:.4f}, "
            f"rejected {row['rewards/rejected']:.4f})")
