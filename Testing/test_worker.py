"""How the worker process is started and stopped on each platform (the arguments built;
the real start, events and process-tree cancel are exercised in test_slicer_logic.py)."""

import subprocess

from GDPILiverAnomalyLib.running.worker import (
    CREATE_NEW_PROCESS_GROUP,
    CREATE_NO_WINDOW,
    kill_tree_command,
    process_options,
)


def test_posix_worker_gets_its_own_session():
    assert process_options("posix") == {"start_new_session": True}


def test_windows_worker_has_no_console_window_and_its_own_group():
    options = process_options("nt")
    assert options["creationflags"] & CREATE_NO_WINDOW == 0x08000000
    assert options["creationflags"] & CREATE_NEW_PROCESS_GROUP == 0x00000200
    assert "start_new_session" not in options
    if hasattr(subprocess, "STARTUPINFO"):  # on Windows: the window is hidden too
        assert options["startupinfo"].wShowWindow == 0
    else:
        assert "startupinfo" not in options


def test_windows_cancel_kills_the_whole_tree():
    assert kill_tree_command(4321) == ["taskkill", "/F", "/T", "/PID", "4321"]
