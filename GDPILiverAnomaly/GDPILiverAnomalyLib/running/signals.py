"""How ``gdpi`` reacts to SIGINT/SIGTERM: stop cleanly, writing nothing, and promptly.

No heavy imports: :func:`install` runs before torch is imported, so a signal that
arrives during start-up is already handled. The rules, once :func:`install` was called
(the command line does; a library user's process is left alone):

- In the network loop and while outputs are written (:func:`cooperative`), the first
  signal sets a flag; the run stops at the next network evaluation or before the
  results are moved into place, exits 130 and writes nothing.
- Anywhere else (reading, resampling, scoring: long C calls that cannot look at a
  flag), and for a second signal at any time, the signal ends the process at once
  (the default action): nothing has been written in those phases.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"installed": False, "cancelled": False, "depth": 0, "ignored": ()}


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handled() -> list:
    """The signals this module manages (those ignored at start stay ignored)."""
    return [s for s in SIGNALS if s not in _state["ignored"]]


def _on_signal(signum, frame) -> None:
    _state["cancelled"] = True
    for s in _handled():  # a second signal ends the process at once
        signal.signal(s, signal.SIG_DFL)


def install() -> None:
    """Take over SIGINT/SIGTERM for a ``gdpi`` process (before the heavy imports):
    cooperative until the command decides otherwise."""
    if not _main_thread():
        return
    _state["installed"] = True
    # kept ignored when the parent ignored them (nohup, background jobs of a script)
    _state["ignored"] = tuple(s for s in SIGNALS if signal.getsignal(s) is signal.SIG_IGN)
    for s in _handled():
        signal.signal(s, _on_signal)


def uninstall() -> None:
    """Back to Python's default handlers (commands that keep them, e.g. training)."""
    if _state["installed"] and _main_thread():
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for s in _handled():
            signal.signal(s, defaults[s])
    _state["installed"] = False


def cancelled() -> bool:
    """True once a signal asked this process to stop."""
    return _state["cancelled"]


def _set(handler) -> None:
    if _state["installed"] and _main_thread():
        for s in _handled():
            signal.signal(s, handler)


def immediate() -> None:
    """From now on a signal ends the process at once (the phases that write nothing)."""
    if not _state["cancelled"]:
        _set(signal.SIG_DFL)


@contextmanager
def cooperative() -> Iterator[None]:
    """Within the block a first signal only sets :func:`cancelled` (checked by the
    code inside); afterwards signals end the process at once again."""
    if not _state["cancelled"]:
        _set(_on_signal)
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:  # nested blocks: the outermost one ends cooperation
            immediate()
