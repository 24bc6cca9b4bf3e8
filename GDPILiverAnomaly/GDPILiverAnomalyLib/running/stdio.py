"""The process's standard streams, made usable before anything else opens a file.

Started with a standard stream closed (``2>&-``, some schedulers and services), Python
sets ``sys.stderr`` to ``None`` and the next file opened takes descriptor 2, so every
C-library warning would be written into it. :func:`ensure_std_streams` puts
``/dev/null`` on each closed descriptor 0-2 and gives Python a matching stream; the run
then works as usual, and its messages to a closed stream are dropped.
"""

from __future__ import annotations

import os
import sys


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def ensure_std_streams() -> list[int]:
    """Open ``os.devnull`` on each closed descriptor 0, 1, 2; returns the ones fixed."""
    fixed = []
    for fd in (0, 1, 2):
        if _is_open(fd):
            continue
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:  # the lowest free descriptor is taken: normally fd itself
            os.dup2(null, fd)
            os.close(null)
        fixed.append(fd)
    names = {0: ("stdin", "r"), 1: ("stdout", "w"), 2: ("stderr", "w")}
    for fd in (0, 1, 2):
        name, mode = names[fd]
        if fd in fixed or getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115
    return fixed
