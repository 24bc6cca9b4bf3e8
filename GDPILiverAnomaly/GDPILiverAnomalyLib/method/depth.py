"""Depth sampling: which slices of a thin-slice CT are inpainted, and how the others are filled.

With a depth spacing ``S`` (mm), a stack of grid images (one window's slices, in depth
order) is inpainted only at a subset of its slices that have AME candidates:

1. *regular*: the first and the last slice with candidates, and between them, walking
   up, the farthest slice with candidates within ``S`` of the last one taken (the next
   one where none is that close), so no two consecutive inpainted slices are more than
   ``S`` apart unless no slice with candidates lies between them;
2. *components*: every 3-D connected component of the candidates (26-connectivity on
   the stack) with at least ``min_pixels`` pixels on one of its slices has an inpainted
   slice: the one holding most of its pixels (smaller ones cannot outlast the score's
   median filter on their own: :func:`min_component_pixels`);
3. *overlap*: a slice whose candidates (those of its in-slice regions of at least
   ``min_pixels``) lie less than :data:`MIN_OVERLAP` inside the candidates of each of
   its two inpainted neighbours is inpainted too (walking up).

Every other slice with candidates lies between two inpainted slices of the same stack
and gets their linear interpolation in depth (:func:`interpolation_sources`). Slices
without candidates are never inpainted (they need no re-painting). ``S <= 0``: every
slice with candidates is inpainted. Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Rule 3: a slice is inpainted when less than this share of its candidate pixels are
#: candidates of its inpainted neighbour below, and less than this share of the one above.
MIN_OVERLAP = 0.5


def min_component_pixels(median_size: int) -> int:
    """Pixels a candidate region needs on a slice to give a score through the
    ``median_size`` x ``median_size`` median filter when alone (more than half of the
    window); 1 without the filter."""
    return median_size * median_size // 2 + 1 if median_size > 1 else 1


def depth_samples(
    positions_mm: np.ndarray, candidates: np.ndarray, spacing_mm: float, min_pixels: int = 1
) -> tuple[np.ndarray, dict[str, int]]:
    """Slices to inpaint of one stack: ``positions_mm`` (``[m]``, ascending) and
    ``candidates`` (``[m, n, n]``, 1 = AME candidate); rule 2 for the components with
    ``min_pixels`` pixels on a slice. Returns a bool ``[m]`` and the number of slices
    each rule added (``regular``, ``components``, ``overlap``)."""
    m = len(candidates)
    has = candidates.reshape(m, -1).any(axis=1) if m else np.zeros(0, bool)
    counts = {"regular": 0, "components": 0, "overlap": 0}
    if spacing_mm <= 0 or not has.any():
        counts["regular"] = int(has.sum())
        return has.copy(), counts
    positions = np.asarray(positions_mm, np.float64)
    idx = np.flatnonzero(has)
    picked = np.zeros(m, bool)
    tolerance = 1e-6 * max(1.0, spacing_mm)  # 3 slices of 1.25 mm are 2.5 mm, not 2.5000001
    k = 0  # position in idx of the last slice taken
    picked[idx[0]] = True
    while k < len(idx) - 1:
        reach = np.flatnonzero(
            positions[idx[k + 1 :]] <= positions[idx[k]] + spacing_mm + tolerance
        )
        k = k + 1 + (int(reach[-1]) if len(reach) else 0)
        picked[idx[k]] = True
    counts["regular"] = int(picked.sum())

    labels, n = ndimage.label(candidates > 0, structure=np.ones((3, 3, 3), bool))
    if n:
        per_slice = np.zeros((n + 1, m), np.int64)  # pixels of component c on slice i
        slice_of = np.broadcast_to(np.arange(m)[:, None, None], labels.shape)
        np.add.at(per_slice, (labels.ravel(), slice_of.ravel()), 1)
        per_slice = per_slice[1:]
        missed = ~(per_slice[:, picked] > 0).any(axis=1) & (per_slice.max(axis=1) >= min_pixels)
        for c in np.flatnonzero(missed):
            best = int(np.argmax(per_slice[c]))
            if not picked[best]:
                picked[best] = True
                counts["components"] += 1

    flat = candidates.reshape(m, -1) > 0
    for j in idx:
        if picked[j]:
            continue
        below = np.flatnonzero(picked[:j])[-1]
        above = j + 1 + np.flatnonzero(picked[j + 1 :])[0]
        own = _large_regions(candidates[j] > 0, min_pixels).ravel()
        size = own.sum()
        if not size:
            continue
        share = [(own & flat[other]).sum() / size for other in (below, above)]
        if max(share) < MIN_OVERLAP:
            picked[j] = True
            counts["overlap"] += 1
    return picked, counts


def _large_regions(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """The 8-connected regions of a 2-D ``mask`` with at least ``min_pixels`` pixels."""
    if min_pixels <= 1:
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def interpolation_sources(
    positions_mm: np.ndarray, has_candidates: np.ndarray, picked: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each slice of a stack with candidates but not ``picked``: its inpainted
    neighbours ``(below, above)`` (indices into the stack) and the weight of ``below``
    (linear in depth, ``1 - weight`` for ``above``); ``-1`` and ``nan`` for the slices
    that are inpainted or have no candidates. Returns ``(sources [m, 2], weight [m])``."""
    m = len(picked)
    sources = np.full((m, 2), -1, np.intp)
    weight = np.full(m, np.nan)
    taken = np.flatnonzero(picked)
    positions = np.asarray(positions_mm, np.float64)
    for j in np.flatnonzero(has_candidates & ~picked):
        after = np.searchsorted(taken, j)
        if after == 0 or after == len(taken):  # cannot happen with depth_samples' ends
            raise ValueError(f"slice {j} has candidates but no inpainted slice on one side")
        below, above = int(taken[after - 1]), int(taken[after])
        sources[j] = below, above
        weight[j] = (positions[above] - positions[j]) / (positions[above] - positions[below])
    return sources, weight
