"""The ``gdpi`` console script: installs the signal handlers, then imports the commands
(torch and the rest) and runs one."""

from __future__ import annotations


def main() -> int:
    from GDPILiverAnomalyLib.running.signals import install
    from GDPILiverAnomalyLib.running.stdio import ensure_std_streams

    ensure_std_streams()  # a closed stderr (2>&-): before any file takes descriptor 2
    install()  # before the heavy imports: a signal during start-up is handled too
    from .cli import main as run

    return run()
