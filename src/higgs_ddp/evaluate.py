"""Validation: loss and per-codebook top-1 accuracy over the validation set, split over the ranks and
reduced by token counts, so that 2 ranks report exactly what 1 rank does (a mean of per-rank means
would weigh a rank's tokens by how many samples it happened to get)."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .distributed import all_reduce_sum


def validation_batches(dataset, collator, rank: int, world: int, micro_batch_size: int, max_batches: int = 0):
    """This rank's share, in a fixed order: samples rank, rank + world, ..., in micro-batches."""
    mine = list(range(rank, len(dataset), world))
    chunks = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    for chunk in chunks[:max_batches or None]:
        yield collator([dataset[i] for i in chunk])


@torch.no_grad()
def evaluate(trainer) -> dict:
    """One validation pass with the model as it is now; every rank returns the same global result."""
    env, cfg = trainer.env, trainer.cfg
    C = trainer.raw.config.audio_num_codebooks
    module = trainer.ddp.module if isinstance(trainer.ddp, DDP) else trainer.ddp  # no gradients: no DDP
    # text sum, text targets, audio sum, audio targets, samples, then per codebook: sums, targets, hits
    sums = torch.zeros(5 + 3 * C, dtype=torch.float64, device=env.device)
    was_training = trainer.model.training
    trainer.model.eval()  # no dropout
    try:
        for batch in validation_batches(trainer.val_dataset, trainer.collator, env.rank, env.world_size,
                                        cfg.train.micro_batch_size, cfg.eval.max_batches):
            b = batch.to(env.device, non_blocking=True)
            with trainer.autocast:
                dl = trainer.loss(module(**b.model_inputs()), b, check=False, accuracy=True)
            sums += torch.cat([
                torch.stack([dl.text_loss_sum, dl.text_tokens.to(dl.text_loss_sum.dtype), dl.audio_loss_sum,
                             dl.audio_tokens.to(dl.audio_loss_sum.dtype),
                             torch.tensor(float(b.num_samples), device=env.device)]).double(),
                dl.per_codebook_loss_sum.double(), dl.per_codebook_tokens.double(),
                dl.per_codebook_correct.double()])
    finally:
        trainer.model.train(was_training)
    sums = all_reduce_sum(sums).tolist()
    text_sum, text_n, audio_sum, audio_n, samples = sums[:5]
    cb_sum, cb_n, cb_hit = sums[5:5 + C], sums[5 + C:5 + 2 * C], sums[5 + 2 * C:]
    t = cfg.train
    text_loss, audio_loss = text_sum / max(text_n, 1), audio_sum / max(audio_n, 1)
    return {"split": "val", "loss": t.text_weight * text_loss + t.audio_weight * audio_loss,
            "text_loss": text_loss, "audio_loss": audio_loss,
            "per_codebook_loss": [s / max(n, 1) for s, n in zip(cb_sum, cb_n)],
            "per_codebook_acc": [h / max(n, 1) for h, n in zip(cb_hit, cb_n)],
            "text_targets": int(text_n), "audio_targets": int(audio_n), "samples": int(samples)}
