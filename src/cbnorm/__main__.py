"""``python -m cbnorm`` (and ``torchrun -m cbnorm``): the ``cbnorm`` command line."""

import sys

from cbnorm.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
