"""The RePaint jump schedule and its NFE count (torch-free)."""

import subprocess
import sys

from GDPILiverAnomalyLib.method.schedule import get_schedule_jump, schedule_counts, transitions


def test_schedule_small_case_by_hand():
    # jumps at levels 0 and 2 (range(0, 5 - 2, 2)), each taken once (2 samples - 1)
    assert get_schedule_jump(5, 2, 2) == [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert schedule_counts(5, 2, 2) == (9, 4)
    assert get_schedule_jump(3, 1, 1) == [2, 1, 0, -1]
    assert get_schedule_jump(4, 2, 3) == [3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, -1]


def test_paper_schedule_counts():
    walk = get_schedule_jump(250, 10, 10)
    assert walk[0] == 249 and walk[-1] == -1
    assert all(abs(a - b) == 1 for a, b in transitions(walk))
    assert schedule_counts(250, 10, 10) == (2410, 2160)


def test_transitions_are_consecutive_pairs():
    assert transitions([3, 2, 3, -1]) == [(3, 2), (2, 3), (3, -1)]
    assert transitions([-1]) == []


def test_schedule_and_parameters_import_without_torch():
    """The Slicer panel counts NFE before torch is installed."""
    code = (
        "import sys, GDPILiverAnomalyLib.method.schedule, GDPILiverAnomalyLib.method.parameters\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
