"""python -m higgs_ddp.manifest import|stats ...: the same as ``higgs-ddp manifest ...`` (the issue's spelling)."""

import sys

from higgs_ddp.cli import main
from higgs_ddp.runtime.distributed import exit_process

if __name__ == "__main__":
    exit_process(main(["manifest", *sys.argv[1:]]))
