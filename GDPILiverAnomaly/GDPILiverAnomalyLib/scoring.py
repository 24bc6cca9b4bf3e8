"""Anomaly score, binary anomaly mask and lesion list.

score = inpainted - test in HU: positive where the scan is darker than its healthy
re-painting (with two-sided AME: the absolute difference). Zero outside the liver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def median_filter_slices(values: np.ndarray, size: int) -> np.ndarray:
    """2-D median filter of ``size`` x ``size`` pixels on each slice of ``[Z, H, W]`` (size <= 1: none)."""
    if size <= 1:
        return values
    return ndimage.median_filter(values, size=(1, size, size), mode="constant", cval=0.0)


def anomaly_mask(score: np.ndarray, threshold_hu: float) -> np.ndarray:
    """uint8 mask, 1 where ``score > threshold_hu``."""
    return (score > threshold_hu).astype(np.uint8)


@dataclass
class Lesion:
    """A 3-D connected component (26-connectivity) of the anomaly mask."""

    id: int
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


def find_lesions(anomaly: np.ndarray, score: np.ndarray, reference: sitk.Image) -> list[Lesion]:
    """Lesions of an anomaly mask ``[k, j, i]`` on ``reference``'s grid, largest first."""
    labels, n = ndimage.label(anomaly > 0, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    voxels = ndimage.sum_labels(np.ones_like(labels), labels, index)
    maxima = ndimage.maximum(score, labels, index)
    means = ndimage.mean(score, labels, index)
    centroids = ndimage.center_of_mass(np.ones_like(labels), labels, index)
    boxes = ndimage.find_objects(labels)
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    lesions = []
    for i in range(n):
        k, j, ii = centroids[i]
        x, y, z = reference.TransformContinuousIndexToPhysicalPoint((float(ii), float(j), float(k)))
        lesions.append(
            Lesion(
                0,
                int(voxels[i]),
                round(float(voxels[i]) * voxel_ml, 4),
                round(float(maxima[i]), 3),
                round(float(means[i]), 3),
                round(x, 2),
                round(y, 2),
                round(z, 2),
                int(boxes[i][0].start),
                int(boxes[i][0].stop - 1),
            )
        )
    lesions.sort(key=lambda les: (-les.voxels, -les.max_score_hu))
    for number, lesion in enumerate(lesions, start=1):
        lesion.id = number
    return lesions
