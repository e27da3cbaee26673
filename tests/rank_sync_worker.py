"""Run under torchrun by test_ddp_sync.py: one optimizer step of the real Trainer on 2 gloo ranks that see
different data, then report a checksum of every rank's trainable parameters.

    python -m torch.distributed.run --nproc_per_node 2 tests/rank_sync_worker.py CONFIG OUT.json [bypass] [checkpoint]
    python -m torch.distributed.run --nproc_per_node 2 tests/rank_sync_worker.py --each OUT.json NAME=CONFIG[+FLAG]...

``checkpoint`` then tries to save a checkpoint and reports the error it raised, if any. ``--each`` runs several
such steps one after the other in the same processes (one start-up for all: most of a tiny run's cost) and
writes {NAME: result}.
"""

import json
import sys

import torch
import torch.distributed as dist

from higgs_ddp.config import load_config
from higgs_ddp.runtime.distributed import barrier, cleanup, exit_process, setup_distributed
from higgs_ddp.training.shards import local_part
from higgs_ddp.training.trainer import Trainer


def main():
    env = setup_distributed()
    if sys.argv[1] == "--each":
        out, jobs = sys.argv[2], sys.argv[3:]
        results = {}
        for job in jobs:
            name, spec = job.split("=", 1)
            config, *flags = spec.split("+")
            results[name] = step(config, flags, env)
    else:
        config, out, *flags = sys.argv[1:]
        results = step(config, flags, env)
    if env.is_main:
        json.dump(results, open(out, "w"))
    barrier()
    cleanup()


def step(config: str, flags: list, env) -> dict:
    """One optimizer step of the Trainer built from CONFIG; the result as rank 0 reports it (others: {})."""
    cfg = load_config(config)
    trainer = Trainer(cfg, env)
    if "bypass" in flags:
        # What public Higgs trainers did: call the wrapped module directly, skipping DDP's forward.
        trainer.wrapped = trainer.wrapped.module
    micro = [next(iter(trainer.loader)) for _ in range(cfg.train.grad_accum_steps)]
    seen = [s for b in micro for s in b.input_ids.flatten().tolist()]
    extra = {}
    if "unscaled" in flags:
        # The same step twice at lr 0 (the weights stay put): once with the wrapper's mean over ranks
        # left in place, once as the trainer does it.
        trainer.scheduler.base_lrs = [0.0 for _ in trainer.scheduler.base_lrs]
        for group in trainer.optimizer.param_groups:
            group["lr"] = 0.0
        scale, trainer.strategy.grad_scale = trainer.strategy.grad_scale, 1.0
        extra["grad_norm"] = trainer.train_step(micro).grad_norm
        trainer.strategy.grad_scale = scale
        extra["grad_norm_correct"] = trainer.train_step(micro).grad_norm
    else:
        trainer.train_step(micro)
    vec = torch.cat([local_part(p).detach().flatten() for p in trainer.params]).double()
    gathered = [torch.zeros_like(vec) for _ in range(env.world_size)]
    dist.all_gather(gathered, vec)
    data = [None] * env.world_size
    dist.all_gather_object(data, seen)
    error = ""
    if "checkpoint" in flags:
        from higgs_ddp.training.checkpoint import CheckpointError
        try:
            trainer.save_checkpoint()  # after its one step
        except CheckpointError as e:
            error = str(e)
    diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
    return {"max_param_diff": diff, "same_data": data[0] == data[1], "checkpoint_error": error, **extra}


if __name__ == "__main__":
    main()
    exit_process(0)
