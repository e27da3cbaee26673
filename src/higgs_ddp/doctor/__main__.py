"""python -m higgs_ddp.doctor"""

import sys

from . import main

sys.exit(main())
