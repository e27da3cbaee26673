"""Validation: loss and per-codebook top-1 accuracy over the validation set, split over the ranks and
reduced by token counts, so that 2 ranks report exactly what 1 rank does (a mean of per-rank means
would weigh a rank's tokens by how many samples it happened to get)."""

from __future__ import annotations

import torch

from higgs_ddp.runtime.distributed import all_reduce_max, all_reduce_sum


def validation_chunks(size: int, rank: int, world: int, micro_batch_size: int, max_batches: int = 0) -> list:
    """This rank's share, in a fixed order: samples rank, rank + world, ..., in micro-batches of indices."""
    mine = list(range(rank, size, world))
    chunks = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return chunks[:max_batches or None]


def lockstep(chunks: list, collective: bool, device) -> list:
    """[(indices, counted)]. When a forward is a collective (FSDP gathers weights in it) every rank must run
    as many as the busiest one: the others repeat a micro-batch whose result is not counted."""
    runs = [(c, True) for c in chunks]
    if collective:
        most = int(all_reduce_max(torch.tensor([len(chunks)], device=device)).item())
        runs += [(chunks[0] if chunks else [0], False)] * (most - len(chunks))
    return runs


@torch.no_grad()
def evaluate(trainer) -> dict:
    """One validation pass with the model as it is now; every rank returns the same global result."""
    env, cfg = trainer.env, trainer.cfg
    C = trainer.raw.config.audio_num_codebooks
    module = trainer.strategy.eval_module(trainer.wrapped)  # no gradients: no DDP bookkeeping
    # text sum, text targets, audio sum, audio targets, samples, then per codebook: sums, targets, hits
    sums = torch.zeros(5 + 3 * C, dtype=torch.float64, device=env.device)
    was_training = trainer.model.training
    trainer.model.eval()  # no dropout
    try:
        chunks = validation_chunks(len(trainer.val_dataset), env.rank, env.world_size, cfg.train.micro_batch_size,
                                   cfg.eval.max_batches)
        for chunk, counted in lockstep(chunks, trainer.strategy.collective_forward, env.device):
            b = trainer.collator([trainer.val_dataset[i] for i in chunk]).to(env.device, non_blocking=True)
            with trainer.autocast:
                dl = trainer.loss(module(**b.model_inputs()), b, check=False, accuracy=True)
            if not counted:
                continue
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
