"""Contrast phase of a CT from the CT and its liver mask alone: is it arterial?

In the arterial phase contrast fills the aorta while the liver has barely enhanced, so
the aorta is far brighter than the liver (here 180 vs 55 HU); from the portal-venous
phase on both are enhanced and close (162 vs 143 HU; later, 98 vs 92 HU); without
contrast both are ~35-60 HU. Arterial-phase HCC is often brighter than the liver, so
detection uses the two-sided AME there (``DetectionParams.two_sided`` None = decide by
this). Only ``arterial`` changes detection, so the decision is conservative: when in
doubt, ``unknown``.

The aorta is looked for on the liver's slices, in-plane within 70 mm of the midline (the
centre of the spine, the largest bone region > 250 HU behind the body's front third,
else the body's centre) and 75 mm of the spine's centre, after a 3x3 median on a grid of
about 1.5 mm. Each slice is cut into overlapping HU bands (``_BANDS``, 10..1000 HU), so
that an aorta of any brightness is one region of some band while bone, liver and bowel of
other HU fall apart from it; regions are opened by a 2 mm disc, and one too large or not
round (up to 4000 mm^2) is also split by a 5 mm erosion (an aorta touching the
vertebral body). A region
is a vessel when it passes every rule, in this order (the names are the reason's):

- ``size``: 150..1000 mm^2 (14..36 mm across; a vertebral body is larger);
- ``shape``: bounding box aspect <= 1.5; ``fill``: >= 70 % of its bounding ellipse;
- ``inhomogeneous``: standard deviation <= 35 HU;
- ``brighter than blood``: median <= 650 HU (cortical bone is brighter);
- ``off the midline``: centre within 50 mm of the midline (left-right);
- ``far from the spine``: centre within 75 mm of the spine's centre;
- ``not set off``: the median of a 3 mm ring around it >= 40 HU darker (fat, tissue);
- ``walled in by bone``: at most half the pixels just outside it >= 50 HU brighter
  (marrow inside its cortex).

Vessels are linked from slice to slice (centres within 10 mm, HU within 30 HU, at most
one slice skipped); the aorta is the longest run (ties: the brighter), and it must span
>= 15 % of the liver's slices and at least 3. Its median HU against the liver's median
decides:

- ``arterial``: aorta - liver >= ``ARTERIAL_GAP_HU`` (90 HU), the aorta >= 150 HU, its
  run over >= 50 % of the liver's slices (the aorta passes all of them; bowel with oral
  contrast does not) and >= 60 % of its 3 mm rim >= 60 HU darker than it (else
  ``unknown``, saying which failed);
- ``non-contrast``: aorta and liver both <= ``NONCONTRAST_MAX_HU`` (70 HU) and within
  25 HU of each other;
- ``venous``: aorta >= ``VENOUS_MIN_AORTA_HU`` (80 HU) and the gap -30..90 HU (aorta
  and liver both enhanced: portal-venous and later);
- ``unknown``: no run long enough, or none of the above (the run is not the aorta).

:attr:`PhaseEstimate.reason` says in plain words what decided (docs/method.md,
"Contrast phase").
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

#: Aorta minus liver median (HU) from which a scan counts as arterial phase.
ARTERIAL_GAP_HU = 90.0
#: Lowest aorta median (HU) that can count as arterial (blood with contrast).
ARTERIAL_MIN_AORTA_HU = 150.0
#: Aorta and liver medians (HU) at or below which, within 25 HU of each other, a scan
#: counts as non-contrast.
NONCONTRAST_MAX_HU = 70.0
#: Lowest aorta median (HU) of the venous phase (enhanced blood).
VENOUS_MIN_AORTA_HU = 80.0
#: HU bands (after a 3x3 median) in which round regions are looked for.
_BANDS = (
    (10, 100),
    (60, 180),
    (100, 260),
    (150, 330),
    (220, 420),
    (300, 520),
    (400, 650),
    (500, 800),
    (600, 1000),
)
_BLOOD_MAX_HU = 650.0  # brightest median HU of blood with contrast; above: bone
_AREA_MM2 = (150.0, 1000.0)  # aorta cross-section: 14..36 mm across (vertebral bodies ~1000-2000)
_SPLIT_MM2 = 4000.0  # largest region (mm^2) split by erosion (an aorta on a vertebra)
_GRID_MM = 1.5  # in-plane sampling of the search (mm), at most
_SEARCH_MM = 70.0  # half-width of the searched band around the midline (mm)
_MIDLINE_MM = 50.0  # largest distance of the aorta's centre from the midline (mm)
_SPINE_MM = 75.0  # largest distance of the aorta's centre from the spine's centre (mm)
_LINK_MM = 10.0  # largest in-plane step of the aorta between linked slices (mm)
_LINK_HU = 30.0  # largest HU change of the aorta between linked slices (HU)
_ARTERIAL_COVER = 0.5  # share of the liver's slices an arterial aorta run covers, at least
_ARTERIAL_DARK = 0.6  # share of an arterial aorta's 3 mm rim >= 60 HU darker than it
_RULES = (
    "size",
    "shape",
    "fill",
    "inhomogeneous",
    "brighter than blood",
    "off the midline",
    "far from the spine",
    "not set off",
    "walled in by bone",
)


@dataclass
class PhaseEstimate:
    """What :func:`estimate_phase` found (HU: medians; run.json ``stats.phase``)."""

    phase: str  # "arterial", "venous", "non-contrast" or "unknown"
    liver_hu: float  # median HU of the liver
    aorta_hu: float | None  # median HU of the aorta run found (None: none found)
    aorta_slices: int  # slices of that run
    reason: str = ""  # plain words: what decided the phase ("" from older run.json)

    @property
    def arterial(self) -> bool:
        return self.phase == "arterial"

    def describe(self) -> str:
        if self.reason:
            return f"{self.phase} phase: {self.reason}"
        if self.aorta_hu is None:  # a run.json written before the reason was kept
            return f"no enhanced aorta found (liver {self.liver_hu:.0f} HU): not arterial"
        return (
            f"{self.phase} phase: aorta {self.aorta_hu:.0f} HU over {self.aorta_slices} "
            f"slices, liver {self.liver_hu:.0f} HU"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "arterial": self.arterial, "gap_hu": ARTERIAL_GAP_HU}

    @classmethod
    def from_dict(cls, values: dict) -> PhaseEstimate:
        """Back from :meth:`to_dict` (run.json's ``stats.phase``; ``reason`` may be absent)."""
        fields = (values[f] for f in ("phase", "liver_hu", "aorta_hu", "aorta_slices"))
        return cls(*fields, reason=values.get("reason", ""))


def _disc(radius_px: float) -> np.ndarray:
    """A disc structuring element of ``radius_px`` pixels (at least 3x3)."""
    r = max(1, int(round(radius_px)))
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= radius_px * radius_px + 0.5


def _spine_px(hu: np.ndarray, body: np.ndarray) -> tuple[float, float] | None:
    """Row and column (px) of the spine's centre on one slice: the largest bone region
    (> 250 HU) in the posterior two thirds of the body (``body``: > -300 HU) and its
    central half; None when there is none."""
    rows, cols = np.nonzero(body)
    if not len(rows):
        return None
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
    window = np.zeros_like(body)
    window[y0 + (y1 - y0) // 3 : y1 + 1, x0 + (x1 - x0) // 4 : x1 - (x1 - x0) // 4 + 1] = True
    labels, n = ndimage.label((hu > 250) & window)
    if not n:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = np.nonzero(labels == np.argmax(sizes) + 1)
    return float(rows.mean()), float(cols.mean())


def _pieces(region: np.ndarray, erode_px: float) -> list[np.ndarray]:
    """``region`` split where it narrows below ``2 * erode_px``: each core of its erosion
    grown back inside it (an aorta touching bone of the same HU)."""
    disc = _disc(erode_px)
    cores, n = ndimage.label(ndimage.binary_erosion(region, disc))
    if n < 1:
        return []
    grown = [ndimage.binary_dilation(cores == i + 1, disc) & region for i in range(n)]
    return grown


def _test(
    region: np.ndarray,
    smooth: np.ndarray,
    box: tuple[slice, slice],
    spacing: tuple[float, float],
    midline_mm: float,
    spine_y_mm: float | None,
    whole: np.ndarray | None = None,
) -> tuple[str | None, dict]:
    """The first rule of the module docstring that ``region`` (a mask on ``smooth[box]``,
    a piece of ``whole`` if given) breaks (None: a vessel), and its centre (mm), median
    HU (once past ``fill``), area (mm^2) and the share of its 3 mm rim >= 60 HU darker
    (``dark``)."""
    sy, sx = spacing
    offset = (box[0].start, box[1].start)
    area = region.sum() * sy * sx
    rows, cols = np.nonzero(region)
    h, w = (rows.max() - rows.min() + 1) * sy, (cols.max() - cols.min() + 1) * sx
    y, x = (rows.mean() + offset[0]) * sy, (cols.mean() + offset[1]) * sx
    found = {"x": x, "y": y, "area": area}
    if not _AREA_MM2[0] <= area <= _AREA_MM2[1]:
        return "size", found
    if max(h, w) > 1.5 * min(h, w):
        return "shape", found
    if area < 0.7 * np.pi / 4 * h * w:
        return "fill", found
    values = smooth[box][region]
    found["hu"] = float(np.median(values))
    if values.std() > 35:
        return "inhomogeneous", found
    if found["hu"] > _BLOOD_MAX_HU:
        return "brighter than blood", found
    if abs(x - midline_mm) > _MIDLINE_MM:
        return "off the midline", found
    if spine_y_mm is not None and math.hypot(x - midline_mm, y - spine_y_mm) > _SPINE_MM:
        return "far from the spine", found
    # A vessel stands out from what surrounds it (fat, soft tissue): the median of a
    # 3 mm ring around it is >= 40 HU darker. Marrow is walled in by cortical bone: most
    # pixels just outside it are >= 50 HU brighter. (Outside: outside ``whole``, the
    # band's region that ``region`` was split from, if it was.)
    whole = region if whole is None else whole
    r = int(round(3.0 / min(sy, sx)))
    y0, x0 = max(0, offset[0] - r), max(0, offset[1] - r)
    y1 = min(smooth.shape[0], offset[0] + region.shape[0] + r)
    x1 = min(smooth.shape[1], offset[1] + region.shape[1] + r)
    inner = (slice(offset[0] - y0, offset[0] - y0 + region.shape[0]),
             slice(offset[1] - x0, offset[1] - x0 + region.shape[1]))  # fmt: skip
    local, outside = np.zeros((2, y1 - y0, x1 - x0), bool)
    local[inner], outside[inner] = region, whole
    outside = ~outside
    around = smooth[y0:y1, x0:x1]
    ring = around[ndimage.binary_dilation(local, _disc(r)) & outside]
    edge = around[ndimage.binary_dilation(local, np.ones((3, 3), bool)) & outside]
    if not len(edge):
        return "not set off", found
    found["dark"] = float((ring < found["hu"] - 60).mean())
    if np.median(ring) > found["hu"] - 40:
        return "not set off", found
    if (edge > found["hu"] + 50).mean() > 0.5:
        return "walled in by bone", found
    return None, found


def _round_regions(
    hu: np.ndarray,
    spacing_yx: tuple[float, float],
    midline_mm: float,
    spine_y_mm: float | None,
    rejected: Counter,
) -> list[dict]:
    """Round homogeneous regions of one axial slice (already cropped and resampled; see
    the module docstring), one per place (the largest); counts rejections in ``rejected``."""
    sy, sx = spacing_yx
    smooth = hu
    open_disc = _disc(1.0 / min(sy, sx))
    found: list[dict] = []
    for lo, hi in _BANDS:
        band = ndimage.binary_opening((smooth >= lo) & (smooth < hi), open_disc)
        labels, _ = ndimage.label(band)
        for i, box in enumerate(ndimage.find_objects(labels)):
            if box is None:
                continue
            region = labels[box] == i + 1
            if region.sum() * sy * sx < 100:  # specks: not worth a rule
                continue
            rule, region_found = _test(region, smooth, box, spacing_yx, midline_mm, spine_y_mm)
            if rule in ("size", "shape", "fill") and 150 < region_found["area"] <= _SPLIT_MM2:
                for piece in _pieces(region, 5.0 / min(sy, sx)):
                    piece_rule, piece_found = _test(
                        piece, smooth, box, spacing_yx, midline_mm, spine_y_mm, region
                    )
                    if piece_rule is None:
                        rule, region_found = None, piece_found
                        break
            if rule is not None:
                rejected[rule] += 1
                continue
            for other in found:
                if (
                    math.hypot(other["x"] - region_found["x"], other["y"] - region_found["y"])
                    < _LINK_MM
                ):
                    if region_found["area"] > other["area"]:
                        other.update(region_found)
                    break
            else:
                found.append(region_found)
    return found


def _search_box(ct: np.ndarray, slices: np.ndarray, spacing_yx) -> tuple:
    """In-plane crop (slices) around the midline, the sampling step (px) and the midline
    (mm from the crop's left edge after sampling)."""
    sy, sx = spacing_yx
    centres, spines = [], []
    for z in slices[:: max(1, len(slices) // 12)]:
        body = ct[z] > -300
        if not body.any():
            continue
        centres.append(np.nonzero(body)[1].mean())
        spine = _spine_px(ct[z], body)
        if spine is not None:
            spines.append(spine)
    if not centres:
        return None
    on_spine = len(spines) >= max(1, len(centres) // 2)
    mid = float(np.median([x for _, x in spines] if on_spine else centres))
    spine_y = float(np.median([y for y, _ in spines])) * sy if on_spine else None
    half = int(round(_SEARCH_MM / sx))
    x0, x1 = max(0, int(mid) - half), min(ct.shape[2], int(mid) + half + 1)
    step = max(1, int(round(_GRID_MM / min(sy, sx))))
    rows = slice(None)
    if spine_y is not None:  # the aorta lies within _SPINE_MM of the spine's centre
        reach = int(math.ceil(_SPINE_MM / sy)) + 2
        rows = slice(max(0, int(spine_y / sy) - reach), int(spine_y / sy) + reach + 1)
        spine_y -= rows.start * sy
    return (rows, slice(x0, x1)), step, (mid - x0) * sx, spine_y


def _no_region_reason(n_slices: int, rejected: Counter) -> str:
    counts = ", ".join(f"{rejected[r]} {r}" for r in _RULES if rejected[r])
    return (
        f"no round homogeneous region (aorta) within {_MIDLINE_MM:.0f} mm of the midline on "
        f"{n_slices} liver slice{'s' if n_slices != 1 else ''}"
        + (f" (regions rejected: {counts})" if counts else "")
    )


def estimate_phase(
    ct: np.ndarray, liver: np.ndarray, spacing_yx: tuple[float, float]
) -> PhaseEstimate:
    """Phase of a CT in HU ``[slices, rows, columns]`` (axial slices; rows from anterior
    to posterior as :class:`~GDPILiverAnomalyLib.files.volumes.OrientedCase` gives them,
    else the spine is not found and the body's centre is the midline) with its liver
    mask (1 = liver); ``spacing_yx`` in mm. Conservative: ``arterial`` only on a clear
    aorta-liver gap (see the module docstring)."""
    liver = liver > 0
    if not liver.any():
        return PhaseEstimate("unknown", float("nan"), None, 0, "no liver voxels")
    liver_hu = float(np.median(ct[liver]))
    slices = np.flatnonzero(liver.any(axis=(1, 2)))
    box = _search_box(ct, slices, spacing_yx)
    if box is None:
        return PhaseEstimate(
            "unknown", liver_hu, None, 0, "no body (> -300 HU) on the liver's slices"
        )
    crop, step, midline_mm, spine_y_mm = box
    spacing = (spacing_yx[0] * step, spacing_yx[1] * step)
    rejected: Counter = Counter()
    runs: list[list[tuple[int, dict]]] = []
    for z in slices:
        native = np.asarray(ct[z][crop], dtype=np.float32)
        hu = ndimage.median_filter(native, 3)[::step, ::step]  # 3x3 median, then sampled
        for region in _round_regions(hu, spacing, midline_mm, spine_y_mm, rejected):
            for run in runs:
                last_z, last = run[-1]
                near = math.hypot(region["x"] - last["x"], region["y"] - last["y"]) < _LINK_MM
                similar = abs(region["hu"] - last["hu"]) <= _LINK_HU
                if 0 < z - last_z <= 2 and near and similar:
                    run.append((z, region))
                    break
            else:
                runs.append([(z, region)])
    need = max(3, math.ceil(0.15 * len(slices)))
    if not runs:
        return PhaseEstimate("unknown", liver_hu, None, 0, _no_region_reason(len(slices), rejected))

    def median_hu(run):
        return float(np.median([r["hu"] for _, r in run]))

    best = max(runs, key=lambda run: (len(run), median_hu(run)))
    aorta = median_hu(best)
    if len(best) < need:
        return PhaseEstimate(
            "unknown",
            liver_hu,
            None,
            0,
            f"aorta run only {len(best)} slice{'s' if len(best) != 1 else ''} (< {need}) "
            f"of {len(slices)} liver slices (its median {aorta:.0f} HU, liver {liver_hu:.0f} HU)",
        )
    gap = aorta - liver_hu
    said = f"aorta {aorta:.0f} HU vs liver {liver_hu:.0f} HU: gap {gap:.0f}"
    dark = float(np.median([r["dark"] for _, r in best]))
    if gap >= ARTERIAL_GAP_HU and aorta >= ARTERIAL_MIN_AORTA_HU:
        doubt = None
        if len(best) < _ARTERIAL_COVER * len(slices):  # the aorta passes every liver slice
            doubt = (
                f"it covers only {len(best)} of {len(slices)} liver slices "
                f"(< {100 * _ARTERIAL_COVER:.0f} %): perhaps bowel with oral contrast or bone"
            )
        elif dark < _ARTERIAL_DARK:
            doubt = (
                f"only {100 * dark:.0f} % of its rim is fat or tissue "
                f"(< {100 * _ARTERIAL_DARK:.0f} %): perhaps bone, not the aorta"
            )
        if doubt:
            return PhaseEstimate(
                "unknown",
                liver_hu,
                aorta,
                len(best),
                f"{said} >= {ARTERIAL_GAP_HU:.0f} HU over {len(best)} slices, but {doubt}",
            )
    if gap >= ARTERIAL_GAP_HU and aorta >= ARTERIAL_MIN_AORTA_HU:
        phase, why = "arterial", f"{said} >= {ARTERIAL_GAP_HU:.0f} HU"
    elif max(aorta, liver_hu) <= NONCONTRAST_MAX_HU and abs(gap) <= 25:
        phase, why = "non-contrast", f"{said}, both <= {NONCONTRAST_MAX_HU:.0f} HU"
    elif aorta >= VENOUS_MIN_AORTA_HU and gap >= -30:
        phase, why = "venous", f"{said} < {ARTERIAL_GAP_HU:.0f} HU"
    else:  # blood darker than the liver by more than 30 HU, or unenhanced blood in an
        # enhanced liver: what was found is not the aorta
        return PhaseEstimate(
            "unknown",
            liver_hu,
            aorta,
            len(best),
            f"{said} over {len(best)} slices: neither arterial, venous (aorta >= "
            f"{VENOUS_MIN_AORTA_HU:.0f} HU, at most 30 HU darker than the liver) nor "
            "non-contrast: perhaps not the aorta",
        )
    return PhaseEstimate(phase, liver_hu, aorta, len(best), f"{why} over {len(best)} slices")


def describe_ame_side(two_sided: bool, phase: dict | None) -> str:
    """One line for logs: which side AME re-painted and why (``phase``: the ``phase``
    entry of run.json's stats; None when the user chose)."""
    side = "darker and brighter tissue" if two_sided else "darker tissue"
    if phase is None:
        return f"re-painted {side} (as set)"
    return f"re-painted {side}: {PhaseEstimate.from_dict(phase).describe()}"
