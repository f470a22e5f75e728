"""cbnorm's one cache folder: the native kernels it builds and the cluster ids it computes.

``$CBNORM_CACHE_DIR``, else ``$XDG_CACHE_HOME/cbnorm``, else ``~/.cache/cbnorm``. The old name
``$CBNORM_CACHE`` is still read, with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder, or the path ``parts`` inside it (e.g. ``cache_dir("kernels")``); nothing is created."""
    root = os.environ.get("CBNORM_CACHE_DIR")
    if not root and os.environ.get("CBNORM_CACHE"):
        root = os.environ["CBNORM_CACHE"]
        # A FutureWarning, not a DeprecationWarning: the person who set the variable is a user, and
        # Python hides DeprecationWarnings raised inside libraries.
        warnings.warn("cbnorm: CBNORM_CACHE is deprecated; set CBNORM_CACHE_DIR instead", FutureWarning, stacklevel=2)
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cbnorm"
    return base.joinpath(*parts)
