"""``python -m qcompiler ...`` (and ``torchrun ... -m qcompiler quantize ...``): the command line."""

import sys

from qcompiler.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
