"""RePaint's time walk and its cost in network evaluations (NFE), without torch.

The Slicer panel and the parameter checks count NFE with these functions before torch
is even installed; :mod:`.repaint` walks the same schedule.
"""

from __future__ import annotations

from ..errors import ParameterError


def get_schedule_jump(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's time walk (``get_schedule_jump`` with ``n_sample = 1``).

    Starts at ``num_steps - 1`` and ends at ``-1``; consecutive entries differ by one.
    A decrease ``t -> t - 1`` is a denoising step (one network evaluation) at level
    ``t``; an increase ``t -> t + 1`` is an undo step (one forward noising step). At
    every multiple of ``jump_length`` below ``num_steps - jump_length`` the walk jumps
    back up ``jump_length`` levels, ``jump_n_sample - 1`` times.
    """
    if num_steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ParameterError("steps, jump length and resamplings must all be >= 1")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t = num_steps
    walk = []
    while t >= 1:
        t -= 1
        walk.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                walk.append(t)
    walk.append(-1)
    return walk


def transitions(walk: list[int]) -> list[tuple[int, int]]:
    """Consecutive ``(t_last, t_cur)`` pairs of a walk (``itertools.pairwise``, Python 3.9)."""
    return [(walk[i], walk[i + 1]) for i in range(len(walk) - 1)]


def schedule_counts(num_steps: int, jump_length: int, jump_n_sample: int) -> tuple[int, int]:
    """(network evaluations, undo steps) of one RePaint run of a batch."""
    walk = get_schedule_jump(num_steps, jump_length, jump_n_sample)
    down = sum(1 for a, b in transitions(walk) if b < a)
    return down, len(walk) - 1 - down
