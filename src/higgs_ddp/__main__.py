"""python -m higgs_ddp <command>: the same as the higgs-ddp console script."""

from higgs_ddp.cli import console

console()
