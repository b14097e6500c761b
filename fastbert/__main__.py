"""``python -m fastbert``: the command line, for launchers that start modules (torchrun -m, deepspeed --module)."""

import sys

from fastbert.cli import main

sys.exit(main())
