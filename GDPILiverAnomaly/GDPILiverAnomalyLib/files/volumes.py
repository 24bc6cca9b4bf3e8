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

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .checks import check_complete, check_geometry, check_liver_extent, itk_path

#: File endings read as single files; a folder is read as a DICOM series.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Liver median (HU) outside this range means the CT is very likely not in HU.
PLAUSIBLE_LIVER_HU = (-300.0, 400.0)

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
    p = Path(path)
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
        image = _read_dicom_series(p, what)
    else:
        try:
            check_complete(p, what)
        except OSError as exc:
            raise InputError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
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
    return image


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


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    series = dicom_series_ids(folder)
    if not series:
        raise InputError(f"{what} folder {folder} holds no DICOM series")
    # Several series in one folder: take the one with the most files.
    files = max(
        (sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _quiet_stderr():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"cannot read DICOM series in {folder}: {str(exc).strip().splitlines()[-1]}"
        ) from None
    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])
    return image


def read_ct(path: str | Path) -> sitk.Image:
    """Read a CT as float32 HU and check that every value is finite."""
    image = sitk.Cast(read_image(path, "CT"), sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise InputError(f"CT {path} contains {bad} NaN or infinite voxels")
    return image


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

    ``label=None`` accepts a binary mask or a LiTS-style map (1 liver, 2 tumour: both
    count as liver); any other label map needs an explicit ``label`` (TotalSegmentator:
    5). A mask on another grid is resampled onto the CT grid by nearest neighbour.
    """
    image = read_image(path, "liver mask")
    values = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(values)):
        raise InputError(f"liver mask {path} contains NaN or infinite values")
    labels = np.unique(values)
    if label is None:
        if not np.all(np.isin(labels, (0, 1, 2))):
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


def check_hu(ct_array: np.ndarray, liver: np.ndarray, source: str = "CT") -> None:
    """Refuse a CT whose values do not look like HU (e.g. raw 0..4095 without rescale)."""
    span = float(ct_array.max() - ct_array.min())
    if span < 200:
        raise InputError(
            f"{source} values span only {span:.3g}; a CT in HU spans hundreds of HU "
            "(use --allow-non-hu to process it anyway)"
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
