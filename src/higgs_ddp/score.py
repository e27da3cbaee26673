"""python -m higgs_ddp.score ...: the same as ``higgs-ddp score ...`` (tools/score.py)."""

import sys

from higgs_ddp.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
