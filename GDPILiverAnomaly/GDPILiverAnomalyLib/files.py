"""Small file-system helpers shared by the writers of outputs, checkpoints and stores."""

from __future__ import annotations

import os
from pathlib import Path


def give_default_permissions(path: str | Path) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)
