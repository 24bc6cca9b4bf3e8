"""Bias correction from healthy reference patches re-painted in the same run.

The prior may paint healthy liver a few HU darker or brighter than this scan's liver
(contrast phase, noise, scanner). Beside the AME candidates, a few small discs of
liver that AME left alone (so: not darker, nor brighter, than the liver by the offset)
are re-painted in the same RePaint run at no extra network cost; what the prior
changes there (the median over every reference pixel of the scan: thousands of
pixels, so the estimate is stable) is its bias on this scan, and it is subtracted
from the candidates' difference. Everything here is on the model grid: ``[N, n, n]``
arrays, HU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Reference discs per slice, their radius and their distance from candidates (px).
REFERENCE_COUNT = 4
REFERENCE_RADIUS_PX = 3
REFERENCE_MARGIN_PX = 2


def reference_patches(
    liver: np.ndarray, candidates: np.ndarray, seeds: list[int] | np.ndarray
) -> np.ndarray:
    """Reference discs (uint8, 1 = reference) for every slice that has candidates: up
    to ``REFERENCE_COUNT`` discs wholly inside the liver, at least
    ``REFERENCE_MARGIN_PX`` from candidates and from each other, at places drawn
    from the slice's own seed (so batching and order never change them)."""
    r = REFERENCE_RADIUS_PX
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = (yy**2 + xx**2) <= r * r
    refs = np.zeros(candidates.shape, np.uint8)
    for i in range(len(candidates)):
        if not candidates[i].any():
            continue
        free = ndimage.binary_erosion(liver[i] > 0, disc, border_value=0)
        grown = ndimage.binary_dilation(candidates[i] > 0, disc, iterations=1)
        free &= ~ndimage.binary_dilation(grown, iterations=REFERENCE_MARGIN_PX)
        rng = np.random.default_rng([int(seeds[i]), 7])
        for _ in range(REFERENCE_COUNT):
            spots = np.argwhere(free)
            if not len(spots):
                break
            y, x = spots[rng.integers(len(spots))]
            placed = np.zeros_like(free)
            placed[y, x] = True
            placed = ndimage.binary_dilation(placed, disc)
            refs[i][placed] = 1
            free &= ~ndimage.binary_dilation(placed, disc, iterations=1 + REFERENCE_MARGIN_PX)
    return refs


def remove_bias(
    difference: np.ndarray, candidates: np.ndarray, references: np.ndarray, groups=None
) -> tuple[np.ndarray, np.ndarray]:
    """``difference`` (inpainted - input, HU) minus its scan's bias (the median
    difference over the reference pixels of every slice of the same ``groups`` entry,
    default: all slices are one scan; 0 where there are none) on the candidates, and 0
    on the references (they are healthy by construction); also each slice's bias."""
    groups = np.zeros(len(difference)) if groups is None else np.asarray(groups)
    bias = np.zeros(len(difference), np.float32)
    out = np.where(references > 0, 0.0, difference).astype(np.float32)
    for group in np.unique(groups):
        members = groups == group
        ref = references[members] > 0
        if ref.any():
            bias[members] = float(np.median(difference[members][ref]))
    for i in range(len(difference)):
        out[i][candidates[i] > 0] -= bias[i]
    return out, bias
