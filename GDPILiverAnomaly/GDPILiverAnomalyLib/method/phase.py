"""Contrast phase of a CT from the CT and its liver mask alone: is it arterial?

In the arterial phase contrast fills the aorta while the liver has barely enhanced, so
the aorta is far brighter than the liver (here 180 vs 55 HU); from the portal-venous
phase on both are enhanced and close (166 vs 143 HU); without contrast the aorta is
blood (~40 HU). Arterial-phase HCC is often brighter than the liver, so detection
uses the two-sided AME there (``DetectionParams.two_sided`` None = decide by this).

The aorta is found as the longest vertical run of round, homogeneous bright regions
(110..700 HU after a 3x3 median, 150..1500 mm^2, filled >= 70 % of their bounding
ellipse, aspect <= 1.5, standard deviation <= 35 HU, within 50 mm of the body's
left-right centre) on the liver's slices, linked from slice to slice when their
centres are within 10 mm. Arterial: such a run over >= 15 % of the liver's slices
(at least 3) whose median HU exceeds the liver's median by >= ``ARTERIAL_GAP_HU``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

#: Aorta minus liver median (HU) from which a scan counts as arterial phase.
ARTERIAL_GAP_HU = 90.0


@dataclass
class PhaseEstimate:
    phase: str  # "arterial", "venous" (aorta and liver both enhanced) or "unknown"
    liver_hu: float  # median HU of the liver
    aorta_hu: float | None  # median HU of the aorta run found (None: none found)
    aorta_slices: int  # slices of that run

    @property
    def arterial(self) -> bool:
        return self.phase == "arterial"

    def describe(self) -> str:
        if self.aorta_hu is None:
            return f"no enhanced aorta found (liver {self.liver_hu:.0f} HU): not arterial"
        return (
            f"{self.phase} phase: aorta {self.aorta_hu:.0f} HU over {self.aorta_slices} "
            f"slices, liver {self.liver_hu:.0f} HU"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "arterial": self.arterial, "gap_hu": ARTERIAL_GAP_HU}

    @classmethod
    def from_dict(cls, values: dict) -> PhaseEstimate:
        """Back from :meth:`to_dict` (run.json's ``stats.phase``)."""
        return cls(*(values[f] for f in ("phase", "liver_hu", "aorta_hu", "aorta_slices")))


def _round_regions(hu: np.ndarray, spacing_yx: tuple[float, float]) -> list[dict]:
    """Round homogeneous bright regions of one axial slice (see the module docstring)."""
    sy, sx = spacing_yx
    smooth = ndimage.median_filter(hu, 3)
    body = smooth > -300
    if not body.any():
        return []
    centre_x = np.nonzero(body)[1].mean()
    labels, _ = ndimage.label(ndimage.binary_opening((smooth > 110) & (smooth < 700)))
    found = []
    for i, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        region = labels[box] == i + 1
        area = region.sum() * sy * sx
        h, w = (box[0].stop - box[0].start) * sy, (box[1].stop - box[1].start) * sx
        if not 150 <= area <= 1500 or max(h, w) > 1.5 * min(h, w):
            continue
        if area < 0.7 * np.pi / 4 * h * w:
            continue
        values = smooth[box][region]
        if values.std() > 35:
            continue
        y, x = ndimage.center_of_mass(region)
        y, x = (y + box[0].start) * sy, (x + box[1].start) * sx
        if abs(x - centre_x * sx) > 50:
            continue
        found.append({"x": x, "y": y, "hu": float(np.median(values))})
    return found


def estimate_phase(
    ct: np.ndarray, liver: np.ndarray, spacing_yx: tuple[float, float]
) -> PhaseEstimate:
    """Phase of a CT in HU ``[slices, rows, columns]`` (axial slices, any in-plane
    orientation) with its liver mask (1 = liver); ``spacing_yx`` in mm."""
    liver = liver > 0
    liver_hu = float(np.median(ct[liver])) if liver.any() else float("nan")
    slices = np.flatnonzero(liver.any(axis=(1, 2)))
    runs: list[list[tuple[int, dict]]] = []
    for z in slices:
        for region in _round_regions(ct[z], spacing_yx):
            for run in runs:
                last_z, last = run[-1]
                near = abs(region["x"] - last["x"]) < 10 and abs(region["y"] - last["y"]) < 10
                if z - last_z <= 2 and near:
                    run.append((z, region))
                    break
            else:
                runs.append([(z, region)])
    best = max(runs, key=len, default=[])
    if len(best) < max(3, 0.15 * len(slices)):
        return PhaseEstimate("unknown", liver_hu, None, 0)
    aorta = float(np.median([r["hu"] for _, r in best]))
    phase = "arterial" if aorta - liver_hu >= ARTERIAL_GAP_HU else "venous"
    return PhaseEstimate(phase, liver_hu, aorta, len(best))


def describe_ame_side(two_sided: bool, phase: dict | None) -> str:
    """One line for logs: which side AME re-painted and why (``phase``: the ``phase``
    entry of run.json's stats; None when the user chose)."""
    side = "darker and brighter tissue" if two_sided else "darker tissue"
    if phase is None:
        return f"re-painted {side} (as set)"
    return f"re-painted {side}: {PhaseEstimate.from_dict(phase).describe()}"
