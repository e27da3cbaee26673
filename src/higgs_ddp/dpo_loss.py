"""Direct Preference Optimisation: the sigmoid DPO loss as TRL's ``DPOTrainer`` defines it, on sequence
log-probabilities (``dual_loss.sequence_logps``), with an optional supervised term on the chosen candidates.

Standalone: depends only on torch, so it can be dropped into any trainer.

For pairs i with policy log-probabilities π_c, π_r and reference log-probabilities ref_c, ref_r of the
chosen and rejected candidates:

    loss_i = -logsigmoid(β · ((π_c - ref_c) - (π_r - ref_r)))
    chosen_reward_i = β · (π_c - ref_c),  rejected_reward_i = β · (π_r - ref_r)   (detached)
    margin_i = chosen_reward_i - rejected_reward_i,  accuracy_i = [chosen_reward_i > rejected_reward_i]

Everything is returned as a SUM over the pairs (and the supervised term as a sum over the chosen
candidates' targets, with its target count), like ``DualLoss``'s sums: a trainer divides by the global
number of pairs (and chosen targets) over all ranks and micro-steps, so the update does not depend on
how the global batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class DPOLoss:
    loss_sum: torch.Tensor  # sum over pairs of the sigmoid DPO loss (differentiable)
    sft_sum: torch.Tensor  # sum over the chosen candidates' targets of -log π (differentiable); 0 without it
    sft_tokens: torch.Tensor  # 0-dim int64: the targets in sft_sum
    losses: torch.Tensor  # (P,) per pair, detached
    chosen_rewards: torch.Tensor  # (P,) β (π_c - ref_c), detached
    rejected_rewards: torch.Tensor  # (P,) β (π_r - ref_r), detached
    sft_weight: float = 0.0

    @property
    def pairs(self) -> int:
        return self.losses.numel()

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        """(P,) 1.0 where the policy prefers the chosen candidate more than the reference does."""
        return (self.chosen_rewards > self.rejected_rewards).float()

    def normalized(self, pairs, sft_tokens=None, scale: float = 1.0) -> torch.Tensor:
        """The loss normalised by externally supplied counts, e.g. the global number of pairs (and of the
        chosen candidates' targets) over all ranks and micro-steps; ``scale`` undoes DDP's averaging."""
        loss = self.loss_sum / torch.clamp(torch.as_tensor(pairs), min=1)
        if self.sft_weight:
            if sft_tokens is None:
                raise ValueError("sft_weight is set: normalized() needs the chosen candidates' target count")
            loss = loss + self.sft_weight * self.sft_sum / torch.clamp(torch.as_tensor(sft_tokens), min=1)
        return loss * scale

    @property
    def loss(self) -> torch.Tensor:
        """This batch's own mean (its pairs, its chosen targets)."""
        return self.normalized(self.pairs, self.sft_tokens)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, *, beta: float, chosen_tokens: Optional[torch.Tensor] = None,
             rejected_tokens: Optional[torch.Tensor] = None, length_normalized: bool = False,
             sft_weight: float = 0.0) -> DPOLoss:
    """Sigmoid DPO over P pairs; every argument is a (P,) tensor of sequence log-probabilities (sums over
    each candidate's supervised targets) or target counts.

    ``length_normalized``: each candidate's log-probabilities (policy and reference alike) are divided by
    its target count before the difference, so a long candidate does not win or lose by its length alone;
    the rewards are then per target. ``sft_weight`` > 0 adds a supervised term on the chosen candidates
    (TRL's ``rpo_alpha``): sft_weight · (their summed -log π) / (their target count), normalised globally
    by ``normalized``. The reference log-probabilities are constants (detached here whatever the caller did).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    shape = policy_chosen.shape
    for name, t in (("policy_rejected", policy_rejected), ("reference_chosen", reference_chosen),
                    ("reference_rejected", reference_rejected)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, policy_chosen {tuple(shape)}: one value per pair")
    if len(shape) != 1:
        raise ValueError(f"expected (pairs,) log-probabilities, got shape {tuple(shape)}")
    if (length_normalized or sft_weight) and chosen_tokens is None:
        raise ValueError("length_normalized and sft_weight need chosen_tokens (targets per chosen candidate)")
    if length_normalized and rejected_tokens is None:
        raise ValueError("length_normalized needs rejected_tokens (targets per rejected candidate)")

    reference_chosen, reference_rejected = reference_chosen.detach(), reference_rejected.detach()
    pc, pr, rc, rr = policy_chosen, policy_rejected, reference_chosen, reference_rejected
    if length_normalized:
        pc, rc = _per_target(pc, chosen_tokens, "chosen"), _per_target(rc, chosen_tokens, "chosen")
        pr, rr = _per_target(pr, rejected_tokens, "rejected"), _per_target(rr, rejected_tokens, "rejected")
    chosen_logratio, rejected_logratio = pc - rc, pr - rr
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    if sft_weight:
        sft_sum, sft_tokens = -policy_chosen.sum(), chosen_tokens.sum()
    else:
        sft_sum, sft_tokens = policy_chosen.sum() * 0.0, torch.zeros((), dtype=torch.long, device=pc.device)
    return DPOLoss(
        loss_sum=losses.sum(), sft_sum=sft_sum, sft_tokens=sft_tokens, losses=losses.detach(),
        chosen_rewards=beta * chosen_logratio.detach(), rejected_rewards=beta * rejected_logratio.detach(),
        sft_weight=sft_weight)


def _per_target(logps: torch.Tensor, tokens: torch.Tensor, which: str) -> torch.Tensor:
    """Sequence log-probabilities divided by the target counts; a candidate without targets is refused
    (its log-probability would be 0 whatever the model does)."""
    if tokens.shape != logps.shape:
        raise ValueError(f"{which}_tokens has shape {tuple(tokens.shape)}, the log-probabilities {tuple(logps.shape)}")
    if bool((tokens <= 0).any()):
        raise ValueError(f"a {which} candidate has no supervised targets: nothing to compare")
    return logps / tokens.to(logps.dtype)
