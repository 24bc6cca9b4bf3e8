"""Anomaly score, binary anomaly mask and lesion list.

score = inpainted - test in HU: positive where the scan is darker than its healthy
re-painting (with two-sided AME: the absolute difference). Zero outside the liver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import SimpleITK as sitk


def median_filter_slices(values: np.ndarray, size: int) -> np.ndarray:
    """2-D median filter of ``size`` x ``size`` pixels on each slice of ``[Z, H, W]`` (size <= 1: none)."""
    if size <= 1:
        return values
    return ndimage.median_filter(values, size=(1, size, size), mode="constant", cval=0.0)


def finish_score(
    difference: np.ndarray, two_sided: bool | np.ndarray, median_size: int
) -> np.ndarray:
    """Score slices ``[Z, H, W]`` from ``inpainted - test`` (HU): its absolute value when
    AME was two-sided (``two_sided``: one bool, or one per slice), then the median
    filter (``median_size`` pixels, <= 1 = off)."""
    sided = np.asarray(two_sided, bool)
    sided = sided.reshape(-1, 1, 1) if sided.ndim else sided
    score = np.where(sided, np.abs(difference), difference)
    return median_filter_slices(score, median_size)


def smooth_across_slices(
    score: np.ndarray, positions_mm: np.ndarray, sigma_mm: float, groups=None
) -> np.ndarray:
    """3-D consistency: each slice of ``score`` (``[N, n, n]``, slices on one in-plane
    grid) becomes the Gaussian-weighted mean (``sigma_mm``) of the slices of its group
    (default: all) within 2.5 sigma of its position ``positions_mm``; weights are
    normalised over the slices present, so gaps and volume ends are handled."""
    if sigma_mm <= 0 or len(score) < 2:
        return score
    positions = np.asarray(positions_mm, np.float64)
    groups = np.zeros(len(score)) if groups is None else np.asarray(groups)
    out = np.empty_like(score)
    for i in range(len(score)):
        d = positions - positions[i]
        near = (np.abs(d) <= 2.5 * sigma_mm) & (groups == groups[i])
        w = np.exp(-0.5 * (d[near] / sigma_mm) ** 2)
        out[i] = np.tensordot(w / w.sum(), score[near], axes=1)
    return out


def anomaly_mask(score: np.ndarray, threshold_hu: float) -> np.ndarray:
    """uint8 mask, 1 where ``score > threshold_hu``."""
    return (score > threshold_hu).astype(np.uint8)


@dataclass
class Lesion:
    """A 3-D connected component (26-connectivity) of the anomaly mask; ``id`` = its rank
    by ``lesion_score`` (:func:`lesion_scores`), 1 = most likely a true lesion."""

    id: int
    lesion_score: float
    voxels: int
    volume_ml: float
    max_score_hu: float
    mean_score_hu: float
    centroid_x_mm: float  # patient LPS coordinates (ITK/DICOM convention)
    centroid_y_mm: float
    centroid_z_mm: float
    slice_first: int  # k index range in the CT as given
    slice_last: int

    def to_dict(self) -> dict:
        return asdict(self)


LESION_FIELDS = list(Lesion.__dataclass_fields__)


def _component_stats(labels: np.ndarray, n: int, score: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label voxel count, max/mean score, centroid and k range, from foreground voxels
    only (``ndimage.maximum`` sorts the whole volume: seconds on a CT)."""
    k, j, i = np.nonzero(labels)
    ids = labels[k, j, i]
    values = score[k, j, i].astype(np.float64)
    voxels = np.bincount(ids, minlength=n + 1)[1:]
    maxima = np.full(n + 1, -np.inf)
    np.maximum.at(maxima, ids, values)
    first = np.full(n + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, ids, k)
    last = np.full(n + 1, -1)
    np.maximum.at(last, ids, k)
    centroid = [np.bincount(ids, weights=c, minlength=n + 1)[1:] / voxels for c in (k, j, i)]
    return {
        "voxels": voxels,
        "max": maxima[1:],
        "mean": np.bincount(ids, weights=values, minlength=n + 1)[1:] / voxels,
        "centroid": np.stack(centroid, axis=1),
        "first": first[1:],
        "last": last[1:],
    }


def lesion_scores(stats: dict[str, np.ndarray]) -> np.ndarray:
    """The lesion score of each component (see :data:`LESION_SCORE`) from
    :func:`_component_stats`: its maximum score, HU. Of the candidates measured (maximum,
    mean, and volume-weighted = sum of the score times the voxel volume), the maximum
    ranked true lesions above false detections best (docs/evaluation.md, "Lesion score")."""
    return stats["max"]


#: What ``lesion_score`` is, in words (``run.json`` conventions, docs).
LESION_SCORE = "maximum score of the lesion's voxels (HU)"


def lesion_labels(anomaly: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (26-connectivity) of ``anomaly``, numbered 1..n as lesion ids:
    highest lesion score (:func:`lesion_scores`) first, ties broken by the larger volume.
    0 = background."""
    labels, n = ndimage.label(anomaly > 0, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return labels.astype(np.int32), 0
    stats = _component_stats(labels, n, score)
    order = np.lexsort((-stats["voxels"], -lesion_scores(stats)))
    relabel = np.zeros(n + 1, np.int32)
    relabel[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    return relabel[labels], n


def find_lesions(anomaly: np.ndarray, score: np.ndarray, reference: sitk.Image) -> list[Lesion]:
    """Lesions of an anomaly mask ``[k, j, i]`` on ``reference``'s grid, highest lesion
    score first (``id`` = the label of :func:`lesion_labels`)."""
    box = ndimage.find_objects((anomaly > 0).astype(np.uint8))
    if not box or box[0] is None:
        return []
    box = box[0]  # label only inside the mask's bounding box (memory)
    labels, n = lesion_labels(anomaly[box], score[box])
    stats = _component_stats(labels, n, score[box])
    stats["centroid"] = stats["centroid"] + [s.start for s in box]
    stats["first"], stats["last"] = stats["first"] + box[0].start, stats["last"] + box[0].start
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    ranking = lesion_scores(stats)
    lesions = []
    for index in range(n):
        k, j, i = stats["centroid"][index]
        x, y, z = reference.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
        voxels = int(stats["voxels"][index])
        lesions.append(
            Lesion(
                index + 1,
                round(float(ranking[index]), 3),
                voxels,
                round(voxels * voxel_ml, 4),
                round(float(stats["max"][index]), 3),
                round(float(stats["mean"][index]), 3),
                round(x, 2),
                round(y, 2),
                round(z, 2),
                int(stats["first"][index]),
                int(stats["last"][index]),
            )
        )
    return lesions
