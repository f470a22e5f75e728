"""``python -m cbnorm.kernels build|info``."""

import sys

from cbnorm.kernels import main

if __name__ == "__main__":
    sys.exit(main())
