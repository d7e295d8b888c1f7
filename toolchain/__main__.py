"""`python -m toolchain ...` (also what `torchrun -m toolchain` starts)."""

import sys

from toolchain.cli import main

sys.exit(main())
