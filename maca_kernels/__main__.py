"""``python -m maca_kernels``: the same command line as ``maca-kernels``."""

import sys

from .cli import main

sys.exit(main())
