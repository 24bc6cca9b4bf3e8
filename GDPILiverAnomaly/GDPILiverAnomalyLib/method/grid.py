"""In-plane mapping between CT slices and the model's square input grid.

The checkpoint records the grid: ``size`` pixels square and ``spacing_mm`` per pixel.
With a spacing, the grid is a fixed physical field of view centred on the liver's
in-plane bounding box (the same for every slice of a volume), so the network sees
anatomy at one scale whatever the scanner. With ``spacing_mm = None`` the whole
slice is fitted into the grid (aspect kept), as in the paper's resized slices.
Pixels of the grid outside the CT read -1024 HU.

A liver wider than the field of view is covered by overlapping windows
(:func:`sliding_windows`, sliding-window inference as in MONAI): the centred mapping
first, then windows shifted towards the edges of the liver's bounding box; each window's
results are blended back with :func:`window_weights`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage

from ..errors import ParameterError

AIR_HU = -1024.0
#: Least overlap of neighbouring windows, a fraction of the field of view (MONAI's 0.25).
WINDOW_OVERLAP = 0.25


@dataclass
class InputGrid:
    size: int = 64
    spacing_mm: float | None = 5.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputGrid:
        return cls(int(d["size"]), None if d.get("spacing_mm") is None else float(d["spacing_mm"]))


@dataclass
class PlaneMapping:
    """Affine map from grid pixel ``(u, v)`` to CT slice continuous index ``(row, col)``.

    ``row = centre[0] + (u - (n - 1) / 2) * step[0]`` and likewise for columns.
    """

    size: int
    centre: tuple[float, float]
    step: tuple[float, float]  # CT pixels per grid pixel, (rows, columns)

    @classmethod
    def for_volume(
        cls,
        grid: InputGrid,
        shape_yx: tuple[int, int],
        spacing_yx: tuple[float, float],
        liver: np.ndarray | None = None,
    ) -> PlaneMapping:
        """Mapping for slices of ``shape_yx`` pixels at ``spacing_yx`` mm (rows, columns)."""
        if grid.size < 8:
            raise ParameterError(f"grid size must be >= 8 pixels, got {grid.size}")
        h, w = shape_yx
        sy, sx = spacing_yx
        if grid.spacing_mm is None:
            mm = max(h * sy, w * sx) / grid.size
            centre = ((h - 1) / 2, (w - 1) / 2)
        else:
            mm = grid.spacing_mm
            if liver is not None and liver.any():
                footprint = liver.reshape(-1, h, w).any(axis=0)
                rows = np.flatnonzero(footprint.any(axis=1))
                cols = np.flatnonzero(footprint.any(axis=0))
                centre = ((rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2)
            else:
                centre = ((h - 1) / 2, (w - 1) / 2)
        return cls(grid.size, (float(centre[0]), float(centre[1])), (mm / sy, mm / sx))

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        half = (self.size - 1) / 2
        matrix = np.array([1.0, self.step[0], self.step[1]])
        offset = np.array(
            [0.0, self.centre[0] - half * self.step[0], self.centre[1] - half * self.step[1]]
        )
        return matrix, offset

    def to_grid(self, slices: np.ndarray, kind: str = "image") -> np.ndarray:
        """Resample ``[Z, H, W]`` CT slices onto ``[Z, n, n]`` grid slices.

        ``kind="image"``: anti-aliased linear interpolation, outside = air (HU input).
        ``kind="mask"``: a grid pixel is set when any CT pixel it covers is set (AME).
        ``kind="label"``: linear interpolation above 0.5 (reference masks).
        ``kind="max"``: the maximum over the CT pixels a grid pixel covers, sampled at
        the nearest CT pixel (AME margins; outside = -10000): ``max > t`` then equals
        ``kind="mask"`` of ``value > t``.
        """
        matrix, offset = self._affine()
        out_shape = (slices.shape[0], self.size, self.size)
        fy, fx = (max(1.0, s) for s in self.step)
        if kind == "image":
            sigma = (0.0, max(0.0, (fy - 1) / 2), max(0.0, (fx - 1) / 2))
            src = (
                ndimage.gaussian_filter(slices.astype(np.float32), sigma)
                if any(sigma)
                else slices.astype(np.float32)
            )
            return ndimage.affine_transform(
                src, matrix, offset, out_shape, order=1, mode="constant", cval=AIR_HU
            )
        if kind == "max":
            size = (1, int(np.ceil(fy)), int(np.ceil(fx)))
            src = slices.astype(np.float32)
            if max(size) > 1:
                src = ndimage.maximum_filter(src, size=size)
            return ndimage.affine_transform(
                src, matrix, offset, out_shape, order=0, mode="constant", cval=-10000.0
            )
        if kind == "mask":
            size = (1, int(np.ceil(fy)), int(np.ceil(fx)))
            src = (
                ndimage.maximum_filter(slices.astype(np.float32), size=size)
                if max(size) > 1
                else slices.astype(np.float32)
            )
            return (
                ndimage.affine_transform(
                    src, matrix, offset, out_shape, order=1, mode="constant", cval=0.0
                )
                > 0.5
            ).astype(np.uint8)
        if kind == "label":
            sampled = ndimage.affine_transform(
                slices.astype(np.float32),
                matrix,
                offset,
                out_shape,
                order=1,
                mode="constant",
                cval=0.0,
            )
            return (sampled > 0.5).astype(np.uint8)
        raise ValueError(f"unknown kind {kind!r}")

    def coverage(self, shape_yx: tuple[int, int]) -> np.ndarray:
        """Bool ``[H, W]``: the CT pixels this grid covers (its pixels mapped back reach
        at least half weight there); liver outside it is not analysed by this grid."""
        ones = np.ones((1, self.size, self.size), np.float32)
        return self.to_slices(ones, shape_yx)[0] >= 0.5

    def to_slices(self, grid_slices: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
        """Resample ``[Z, n, n]`` grid slices back onto ``[Z, H, W]`` CT slices (linear, 0 outside)."""
        matrix, offset = self._affine()
        inv = 1.0 / matrix
        out_shape = (grid_slices.shape[0], *shape_yx)
        return ndimage.affine_transform(
            grid_slices.astype(np.float32),
            inv,
            -offset * inv,
            out_shape,
            order=1,
            mode="constant",
            cval=0.0,
        )


def sliding_windows(mapping: PlaneMapping, liver: np.ndarray) -> list[PlaneMapping]:
    """Windows of ``mapping``'s size and step covering the in-plane bounding box of
    ``liver`` (``[Z, H, W]`` or ``[H, W]``, on the CT slices): ``mapping`` itself first,
    then, along each axis where the box reaches beyond it, ``k`` windows on each side
    evenly spaced up to the box's edge (the outermost grid pixel centre half a CT pixel
    beyond the outermost liver pixel), neighbours overlapping by at least :data:`WINDOW_OVERLAP` of the field
    of view; every combination of row and column shifts. ``[mapping]`` when it fits."""
    footprint = liver.reshape(-1, *liver.shape[-2:]).any(axis=0)
    if not footprint.any():
        return [mapping]
    shifts = []
    for axis, lo_hi in enumerate(
        (np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0)))
    ):
        centre, step = mapping.centre[axis], mapping.step[axis]
        reach = (mapping.size - 1) / 2 * step  # CT pixels from the centre to the last grid pixel
        beyond = max(centre - lo_hi[0], lo_hi[-1] - centre) - reach
        if beyond <= 0:
            shifts.append([0.0])
            continue
        beyond += 0.5  # CT pixels: the edge pixel well inside, whatever the rounding
        k = math.ceil(beyond / ((1 - WINDOW_OVERLAP) * mapping.size * step))
        shifts.append([j * beyond / k for j in range(-k, k + 1)])
    windows = [mapping]
    for dy in shifts[0]:
        for dx in shifts[1]:
            if dy or dx:
                centre = (float(mapping.centre[0] + dy), float(mapping.centre[1] + dx))
                windows.append(replace(mapping, centre=centre))
    return windows


def window_weights(size: int) -> np.ndarray:
    """Blending weights of a window's ``size`` x ``size`` pixels where windows overlap:
    a Gaussian of sigma ``size / 8`` around the centre (MONAI's ``"gaussian"`` mode), at
    least 1e-3 of the peak, float32; the grid's centre counts more than its edges, where
    the network saw the liver cut off."""
    centre = (size - 1) / 2
    profile = np.exp(-0.5 * ((np.arange(size) - centre) / (size / 8)) ** 2)
    return np.maximum(np.outer(profile, profile), 1e-3).astype(np.float32)
