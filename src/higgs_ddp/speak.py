"""python -m higgs_ddp.speak ...: the same as ``higgs-ddp speak ...`` (tools/speak.py)."""

import sys

from higgs_ddp.cli import main

if __name__ == "__main__":
    sys.exit(main(["speak", *sys.argv[1:]]))
