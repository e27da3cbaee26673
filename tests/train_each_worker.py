"""Run under torchrun by helpers.run_two_ranks_each: several whole training runs, one after the other, in the
same worker processes (one start-up for all: most of a tiny 2-rank run's cost is starting 3 Python processes).

    python -m torch.distributed.run --nproc_per_node 2 tests/train_each_worker.py CONFIG...

Each run is ``higgs_ddp.train.train`` as train.py runs it, except that the process group stays up between runs:
tearing it down and setting it up again in the same processes hung in the third init (measured, torch 2.11,
torchrun's shared store). train() finds the group up and uses it; each run builds its own model, wrapper and data.
"""

import sys

from higgs_ddp.config import load_config
import higgs_ddp.train as train_module
from higgs_ddp.runtime.distributed import cleanup, exit_process


def main():
    train_module.cleanup = lambda: None  # train() ends by tearing the group down: once, after the last run
    for path in sys.argv[1:]:
        train_module.train(load_config(path))
    cleanup()


if __name__ == "__main__":
    main()
    exit_process(0)
