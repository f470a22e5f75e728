"""Files written whole or not at all, with the mode any new file gets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0o022)  # only os.umask reads it, by setting it
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable, backup: Optional[Path] = None) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed over it.

    The file gets the mode any new file gets (``0o666`` less the umask), not the temporary file's
    ``0o600``. With ``backup``, the file being replaced is first renamed to ``backup``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
