"""torchrun's options that ``higgs-ddp train|prepare|bench`` take (cli.py starts torchrun with them), and the
words their ``--help`` says about them: those commands' own parsers never see these options.

No torch import here: the launcher reads this before torchrun starts.
"""

import textwrap

# passed through with their value (except the flags): node count, rendezvous, restarts
LAUNCH_OPTIONS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
                  "--rdzv-conf", "--max-restarts", "--master-addr", "--master-port", "--monitor-interval")
LAUNCH_FLAGS = ("--standalone",)

LAUNCH_HELP = (
    "several processes (this command starts torchrun when given any of these):\n"
    "  --nproc-per-node N    processes on this machine, one per GPU (default: 1, no torchrun)\n"
    + textwrap.fill(", ".join(LAUNCH_OPTIONS[1:] + LAUNCH_FLAGS), 100, initial_indent="  ", subsequent_indent="  ")
    + "\n"
    "                        torchrun's own, passed on to it (several nodes: docs/distributed.md)")
