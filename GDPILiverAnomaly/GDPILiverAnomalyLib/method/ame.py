"""Adaptive mask extraction (AME, GDPI paper Sec. II-B).

Per axial slice, the median HU inside the liver is the adaptive threshold; liver
voxels darker than that median by more than ``offset_hu`` form the candidate mask.
Returned masks use the inpainting convention: 1 = candidate = region to re-paint.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import ParameterError


def adaptive_mask(
    ct_hu: np.ndarray,
    liver: np.ndarray,
    offset_hu: float = 20.0,
    two_sided: bool = False,
    min_area_px: int = 0,
) -> np.ndarray:
    """Candidate mask (uint8, 1 = inpaint) for a slice ``[H, W]`` or a stack ``[Z, H, W]``.

    Args:
        ct_hu: CT in HU; axis 0 of a stack is the axial slice index.
        liver: liver mask of the same shape (nonzero = liver).
        offset_hu: a voxel is a candidate when ``HU < median - offset_hu``.
        two_sided: also flag voxels with ``HU > median + offset_hu`` (arterial-phase
            tumours are brighter than the liver); not in the paper.
        min_area_px: drop in-slice 8-connected candidate components with fewer pixels.
    """
    if ct_hu.shape != liver.shape:
        raise ParameterError(f"CT shape {ct_hu.shape} and liver shape {liver.shape} differ")
    if offset_hu < 0:
        raise ParameterError(f"offset must be >= 0 HU, got {offset_hu}")
    if ct_hu.ndim == 2:
        return adaptive_mask(ct_hu[None], liver[None], offset_hu, two_sided, min_area_px)[0]
    out = np.zeros(ct_hu.shape, dtype=np.uint8)
    inside = liver > 0
    for k in np.flatnonzero(inside.any(axis=(1, 2))):
        threshold = np.median(ct_hu[k][inside[k]])
        cand = inside[k] & (ct_hu[k] < threshold - offset_hu)
        if two_sided:
            cand |= inside[k] & (ct_hu[k] > threshold + offset_hu)
        if min_area_px > 1 and cand.any():
            labels, _ = ndimage.label(cand, structure=np.ones((3, 3), bool))
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_area_px
            keep[0] = False
            cand = keep[labels]
        out[k] = cand
    return out


def denoise_for_ame(
    ct_hu: np.ndarray, spacing_yx: tuple[float, float], sigma_mm: float
) -> np.ndarray:
    """The CT ``[Z, H, W]`` smoothed in-plane by a Gaussian of ``sigma_mm`` (0: as is).

    On thin-pixel CT (0.7 mm, noise ~15 HU) almost every 3.5 mm grid pixel covers some
    CT pixel more than 20 HU below the liver median, so AME on raw pixels marks most of
    the liver; a 1-2 mm Gaussian lowers the noise to a few HU and AME then marks
    tissue that is really darker (or brighter)."""
    if sigma_mm <= 0:
        return ct_hu
    sigma = (0.0, sigma_mm / spacing_yx[0], sigma_mm / spacing_yx[1])
    return ndimage.gaussian_filter(ct_hu.astype(np.float32), sigma, mode="nearest")


def ame_margins(ct_hu: np.ndarray, liver: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel AME margins of a stack ``[Z, H, W]``: ``(median - HU, HU - median)`` in HU,
    the median being the slice's liver median; -10000 outside the liver.

    ``adaptive_mask(ct, liver, offset)`` equals ``dark > offset`` (two-sided: ``dark >
    offset or bright > offset``): slice stores keep these margins on the model grid so
    ``gdpi evaluate`` applies AME as ``gdpi detect`` does, on the CT's own pixels.
    """
    inside = liver > 0
    dark = np.full(ct_hu.shape, -10000.0, np.float32)
    bright = np.full(ct_hu.shape, -10000.0, np.float32)
    for k in np.flatnonzero(inside.any(axis=(1, 2))):
        median = np.median(ct_hu[k][inside[k]])
        dark[k][inside[k]] = median - ct_hu[k][inside[k]]
        bright[k][inside[k]] = ct_hu[k][inside[k]] - median
    return dark, bright
