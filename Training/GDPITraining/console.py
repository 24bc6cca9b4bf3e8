"""The ``gdpi`` console script: installs the signal handlers, then imports the commands
(torch and the rest) and runs one."""

from __future__ import annotations


def main() -> int:
    from GDPILiverAnomalyLib.signals import install

    install()  # before the heavy imports: a signal during start-up is handled too
    from .cli import main as run

    return run()
