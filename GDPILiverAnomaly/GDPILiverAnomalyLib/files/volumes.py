"""Reading and validating CT volumes and liver masks, and the processing orientation.

Conventions
- CT intensities are Hounsfield units (HU), read as float32.
- Masks are uint8 arrays on the CT grid, 1 = liver, 0 = background.
- Arrays follow SimpleITK: ``array[k, j, i]`` for voxel index ``(i, j, k)``.
- Processing happens in LPS orientation (:class:`OrientedCase`): axis 0 runs inferior to
  superior, so ``array[k]`` is an axial slice shown the radiological way (rows anterior
  to posterior, columns patient right to left). Outputs are mapped back exactly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from . import dicom
from .checks import check_complete, check_geometry, check_liver_extent, itk_path

#: File endings read as single files; a folder is read as a DICOM series.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Liver median (HU) outside this range means the CT is very likely not in HU.
PLAUSIBLE_LIVER_HU = (-300.0, 400.0)

#: Values a CT may hold (HU): every value 16-bit DICOM storage gives with the usual
#: rescale (int16 or uint16 with intercept -1024: -33792..+64511), which covers padding
#: outside the scan circle (-2000, -3024 HU) and metal in extended-range scans (up to
#: about +30000 HU). A voxel beyond it is not a measurement: the CT is refused.
CT_VALUE_RANGE_HU = (-34000.0, 65535.0)

#: A CT in HU holds something at or below this (air -1000 HU, lung, fat -100 HU); an MR or
#: an 8-bit export (0..255) holds nothing below 0.
HU_LOWEST_AT_MOST = -100.0

#: Smallest liver mask (mL) processed: a whole liver is 1200-1800 mL, the 3 thin slices of
#: ../shared/data/dcmqi_3slice hold 70 mL; below this the mask is a speck or another organ.
MIN_LIVER_ML = 50.0

#: More different values than any label map holds (TotalSegmentator: 118 classes).
MAX_LABELS = 1000

#: Relative tolerance when deciding that two grids are the same.
GRID_RTOL = 1e-4


def image_stem(path: str | Path) -> str:
    """File name without an image suffix (``volume-3.nii.gz`` -> ``volume-3``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3-D scalar image from NIfTI, NRRD, MHA/MHD or a DICOM series folder."""
    return _read_image(path, what)[0]


def _read_image(
    path: str | Path, what: str, ct_only: bool = False
) -> tuple[sitk.Image, dicom.DicomSeries | None]:
    """:func:`read_image`, with the DICOM series read from a folder (else None);
    ``ct_only`` refuses a DICOM series whose Modality is not CT."""
    p = Path(path)
    series = None
    itk_path(p, what)  # before SimpleITK sees it: a non-UTF-8 name aborts the process
    try:
        p.stat()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {p}") from None
    except OSError as exc:  # a symbolic link loop, a name too long, no permission
        raise InputError(f"{what} {p}: {exc.strerror or exc}") from None
    if not (p.is_dir() or p.is_file()):
        raise InputError(
            f"{what} {p} is neither a file nor a folder (a named pipe, device or socket?)"
        )
    if p.is_dir():
        with _quiet_stderr():
            image, series = dicom.read_series(p, what, ct_only)
    else:
        try:
            check_complete(p, what)
        except OSError as exc:
            raise InputError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
        with _quiet_stderr():
            dicom.refuse_seg_file(p, what)
        try:
            image = _read_quietly(p)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()
            reason = detail[-1] if detail else "unknown reason"
            raise InputError(f"cannot read {what} {p}: {reason}") from None
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{what} {p} has complex voxels; a real-valued image is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} {p} has {image.GetNumberOfComponentsPerPixel()} components "
            "per voxel; a scalar image is required"
        )
    if image.GetDimension() != 3:
        raise InputError(f"{what} {p} is {image.GetDimension()}-D; a 3-D volume is required")
    check_geometry(image.GetSpacing(), image.GetDirection(), p, what, image.GetOrigin())
    return image, series


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence what C libraries print on file descriptor 2 (ITK warnings, NIfTI and VNL
    messages about broken headers): problems reach the user as one error line instead."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters)
        saved = None
    try:
        if saved is not None:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 2)
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_quietly(path: Path) -> sitk.Image:
    """``sitk.ReadImage`` without C-level noise on stderr (errors still raise)."""
    with _quiet_stderr():
        return sitk.ReadImage(str(path))


def dicom_series_ids(folder: str | Path) -> tuple[str, ...]:
    """DICOM series in a folder, without ITK's warnings on stderr for non-DICOM files."""
    with _quiet_stderr():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def read_ct(path: str | Path, allow_non_ct: bool = False) -> sitk.Image:
    """Read a CT as float32 HU; every value must be finite and within
    :data:`CT_VALUE_RANGE_HU` (refused otherwise, wherever the voxel is).

    A DICOM folder is read by :func:`.dicom.read_series` (geometry checked; Modality
    must be CT unless ``allow_non_ct``); the returned image then carries what was read
    as metadata (:func:`dicom_series_record`)."""
    image, series = _read_image(path, "CT", ct_only=not allow_non_ct)
    image = sitk.Cast(image, sitk.sitkFloat32)
    if series is not None:
        image.SetMetaData(dicom.RECORD_KEY, json.dumps(series.record()))
    values = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise InputError(f"CT {path} contains {bad} NaN or infinite voxels")
    lo, hi = CT_VALUE_RANGE_HU
    lowest, highest = float(values.min()), float(values.max())
    if lowest < lo or highest > hi:
        bad = int(np.count_nonzero((values < lo) | (values > hi)))
        raise InputError(
            f"CT {path} has {bad} voxel(s) outside {lo:.0f}..{hi:.0f} HU (lowest "
            f"{lowest:.4g}, highest {highest:.4g}): not CT values; repair the file "
            "(e.g. set them to -1024 HU, air)"
        )
    return image


def dicom_series_record(image: sitk.Image) -> dict | None:
    """The DICOM series :func:`read_ct` read ``image`` from (run.json's
    ``inputs.ct_dicom_series``), or None for a CT read from a file."""
    if not image.HasMetaDataKey(dicom.RECORD_KEY):
        return None
    return json.loads(image.GetMetaData(dicom.RECORD_KEY))


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when both images have the same size, spacing, origin and direction."""
    if a.GetSize() != b.GetSize():
        return False
    scale = max(max(a.GetSpacing()), 1.0)
    return (
        np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=GRID_RTOL, atol=0)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=GRID_RTOL * scale * 10)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=GRID_RTOL)
    )


def read_liver_mask(path: str | Path, ct: sitk.Image, label: int | None = None) -> np.ndarray:
    """Read a liver mask and return it on the CT grid as uint8 (1 = liver).

    ``label=None`` accepts a binary mask (0/1 or 0/255) or a LiTS-style map (1 liver,
    2 tumour: both count as liver); any other label map needs an explicit ``label``
    (TotalSegmentator: 5). ``label=0`` (the background) and masks with fractional values
    (probability maps) are refused. A mask on another grid is resampled onto the CT grid
    by nearest neighbour.
    """
    if label == 0:
        raise InputError(
            "liver label 0 is the background; leave the liver label out for a binary "
            "(0/1, 0/255) or LiTS (1 liver, 2 tumour) mask"
        )
    image = read_image(path, "liver mask")
    values = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(values)):
        raise InputError(f"liver mask {path} contains NaN or infinite values")
    if values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
        lo, hi = float(values.min()), float(values.max())
        if 0 <= lo and hi <= 1:
            raise InputError(
                f"liver mask {path} holds values between 0 and 1 (a probability map?); "
                "threshold it at 0.5 into a 0/1 mask first"
            )
        raise InputError(
            f"liver mask {path} holds fractional values ({lo:.4g}..{hi:.4g}); a mask or "
            "label map holds whole numbers"
        )
    labels = np.unique(values)
    if labels[0] < 0 or len(labels) > MAX_LABELS:
        raise InputError(
            f"liver mask {path} looks like an image, not a mask or label map "
            f"({len(labels)} different values from {labels[0]:.6g} to {labels[-1]:.6g}): "
            "was the CT given as the mask?"
        )
    if label is None:
        binary_255 = np.all(np.isin(labels, (0, 255)))  # a 0/255 mask: binary too
        if not binary_255 and not np.all(np.isin(labels, (0, 1, 2))):
            shown = ", ".join(str(v) for v in labels[:12])
            raise InputError(
                f"liver mask {path} is a label map (labels {shown}{' ...' if len(labels) > 12 else ''}); "
                "choose the liver label (TotalSegmentator: 5)"
            )
        selected = values > 0
    else:
        if label not in labels:
            shown = ", ".join(str(v) for v in labels[:12])
            raise InputError(
                f"liver mask {path} has no voxel with label {label} (labels present: {shown})"
            )
        selected = values == label
    if not selected.any():
        raise InputError(f"liver mask {path} contains no liver voxels")
    array = mask_on_ct_grid(selected, image, ct)
    if not array.any():
        raise InputError(f"liver mask {path} does not overlap the CT")
    check_liver_extent(array, ct.GetSpacing(), path)
    return array


def mask_on_ct_grid(selected: np.ndarray, image: sitk.Image, ct: sitk.Image) -> np.ndarray:
    """A boolean array on ``image``'s grid as uint8 on the CT grid (nearest neighbour)."""
    mask = array_on_grid(selected.astype(np.uint8), image)
    if not same_grid(mask, ct):
        mask = sitk.Resample(
            mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
        )
    return sitk.GetArrayFromImage(mask).astype(np.uint8)


def check_liver_volume(liver: np.ndarray, spacing, path: str | Path) -> None:
    """Refuse a liver mask (uint8 on the CT grid, ``spacing`` in mm) smaller than
    :data:`MIN_LIVER_ML`."""
    voxels = int(np.count_nonzero(liver))
    ml = voxels * float(np.prod(spacing)) / 1000
    if ml < MIN_LIVER_ML:
        raise InputError(
            f"liver mask {path} holds {ml:.3g} mL ({voxels} voxel(s)), less than the "
            f"{MIN_LIVER_ML:g} mL GDPI needs (a whole liver is 1200-1800 mL): not a liver "
            "mask, or the wrong label"
        )


def check_hu(ct_array: np.ndarray, liver: np.ndarray, source: str = "CT") -> None:
    """Refuse a CT whose values do not look like HU: raw 0..4095 without rescale, an
    8-bit export (0..255), an MR (nothing at or below :data:`HU_LOWEST_AT_MOST`), or a
    liver median outside :data:`PLAUSIBLE_LIVER_HU`."""
    lowest, highest = float(ct_array.min()), float(ct_array.max())
    span = highest - lowest
    if span < 200:
        raise InputError(
            f"{source} values span only {span:.3g}; a CT in HU spans hundreds of HU "
            "(use --allow-non-hu to process it anyway)"
        )
    if lowest > HU_LOWEST_AT_MOST:
        if highest <= 255 and np.all(np.mod(ct_array, 1) == 0):
            what = f"it holds only whole values {lowest:.0f}..{highest:.0f}, an 8-bit export?"
        else:
            what = f"its lowest value is {lowest:.4g}, an MR or a display export?"
        raise InputError(
            f"{source} does not look like HU: {what} A CT in HU holds air (-1000 HU) or "
            f"fat (-100 HU) somewhere, values at or below {HU_LOWEST_AT_MOST:.0f}; use "
            "--allow-non-hu to process it anyway"
        )
    median = float(np.median(ct_array[liver > 0]))
    lo, hi = PLAUSIBLE_LIVER_HU
    if not lo <= median <= hi:
        raise InputError(
            f"{source} median inside the liver is {median:.0f}, outside the plausible "
            f"{lo:.0f}..{hi:.0f} HU: the CT does not look like HU (missing rescale "
            "slope/intercept?); use --allow-non-hu to process it anyway"
        )


def array_on_grid(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """An image holding ``array`` with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def lps_axes(image: sitk.Image) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How the array of ``image`` (``[k, j, i]``) becomes LPS-ordered: for each LPS array
    axis (superior, posterior, left: ``[S, P, L]``), the source array axis and whether it
    runs backwards. The same permutation and flips as ``sitk.DICOMOrient(image, "LPS")``
    (each index axis goes to the patient axis its direction is closest to)."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    axes, flips = [0, 0, 0], [False, False, False]
    for index_axis in range(3):  # SimpleITK index axis i, j, k = array axis 2, 1, 0
        patient = int(np.argmax(np.abs(direction[:, index_axis])))  # 0 = L, 1 = P, 2 = S
        axes[2 - patient] = 2 - index_axis
        flips[2 - patient] = bool(direction[patient, index_axis] < 0)
    if sorted(axes) != [0, 1, 2]:
        raise InputError("CT direction cosines do not map its axes to distinct patient axes")
    return tuple(axes), tuple(flips)


def _view(array: np.ndarray, axes: tuple, flips: tuple) -> np.ndarray:
    view = np.transpose(array, axes)
    return view[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


@dataclass
class OrientedCase:
    """A CT and its liver mask seen in LPS processing orientation, with the way back.

    ``ct`` and ``liver`` are numpy *views* of the given arrays (transposed and flipped,
    no copy): read-only, and cheap to slice into the liver's slab.
    """

    original: sitk.Image
    ct: np.ndarray  # float32 HU, [S, A->P, R->L], a read-only view
    liver: np.ndarray  # uint8, same shape, a view
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def from_arrays(cls, ct: sitk.Image, liver: np.ndarray) -> OrientedCase:
        axes, flips = lps_axes(ct)
        values = sitk.GetArrayViewFromImage(ct)
        if values.dtype != np.float32:
            values = values.astype(np.float32)
        if liver.shape != values.shape:
            raise InputError(f"liver mask shape {liver.shape} differs from the CT's {values.shape}")
        liver = np.asarray(liver, dtype=np.uint8)
        return cls(ct, _view(values, axes, flips), _view(liver, axes, flips), axes, flips)

    def lps(self, array: np.ndarray) -> np.ndarray:
        """A view of an array in the original CT's index order, in LPS order: writing
        into the view writes the original array."""
        return _view(array, self.axes, self.flips)

    def new_original(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """A zero volume in the original CT's index order and its LPS view."""
        array = np.zeros(sitk.GetArrayViewFromImage(self.original).shape, dtype)
        return array, self.lps(array)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing (slices, rows, columns) of the LPS arrays, in mm."""
        spacing_kji = self.original.GetSpacing()[::-1]
        return tuple(float(spacing_kji[a]) for a in self.axes)

    @property
    def spacing_yx(self) -> tuple[float, float]:
        """In-plane spacing (row, column) of the LPS arrays, in mm."""
        return self.spacing_zyx[1:]

    def to_original(self, array_lps: np.ndarray) -> np.ndarray:
        """An LPS-ordered array back in the original CT's index order (a new array)."""
        out, view = self.new_original(array_lps.dtype)
        view[...] = array_lps
        return out
