"""A DICOM series folder read with its geometry checked, or refused with one line.

GDCM on its own stacks whatever a folder holds: a missing or unreadable slice becomes a
shorter volume with a stretched spacing, irregular positions one uniform spacing, a
slice of another orientation is stacked as if aligned, and a gantry-tilted (sheared)
stack is read as an orthogonal one. Here, as Slicer's DICOM reader
(``DICOMScalarVolumePlugin``) and dcm2niix check, but refusing where they warn:

- every file's header is read; a file with the DICOM preamble that GDCM cannot read
  (cut short, damaged; GDCM alone skips it) is refused, unless its meta header names an
  object without an image (:data:`NON_IMAGE_SOP_CLASSES`); other files are ignored;
- the files are grouped by Series Instance UID; the largest series is read, a tie of
  the largest is refused (the others are recorded, :meth:`DicomSeries.record`);
- within the series: one size and pixel spacing, one orientation (direction cosines
  within :data:`ORIENTATION_TOL`), single-frame files with a position and orientation;
  a DICOM SEG object is refused with how to convert it; a Modality other than CT on
  request (``gdpi detect`` without ``--allow-non-ct``);
- slices are sorted by their position along the slice normal (row x column cosines),
  never by file name or instance number; no two at the same position, no gap, uniform
  steps (every slice within :func:`position_tolerance` of a uniform grid), and the
  positions on one line along the normal (else the stack is sheared: gantry tilt,
  refused);
- ``sitk.ImageSeriesReader`` reads the sorted files (rescale slope/intercept applied)
  and its geometry must equal the one computed from the headers.

Positions and spacings are in mm (patient LPS, as DICOM stores them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .checks import itk_path

#: Slice positions closer than this (mm) are the same position (Slicer's
#: DICOMScalarVolumePlugin ``spacingEpsilon``).
SPACING_TOL_MM = 0.01
#: How far (mm) a slice may lie from the uniform grid fitted to the positions: the larger
#: of this and :data:`POSITION_TOL_FRACTION` of the spacing. Scanners write positions as
#: decimal strings, often rounded to 0.01 mm; a missing slice is off by half a spacing.
POSITION_TOL_MM = 0.02
POSITION_TOL_FRACTION = 0.05
#: A shift across the normal beyond the position tolerance plus this fraction of the
#: distance along it (0.06 degrees) is a sheared stack (gantry tilt).
SHEAR_TOL = 1e-3
#: Largest difference of a direction cosine between the slices of one series (about
#: 0.006 degrees; DICOM stores the cosines as decimal strings).
ORIENTATION_TOL = 1e-4
#: SOP Class UIDs of DICOM's standard storage classes start with this; others are a
#: vendor's private classes.
STANDARD_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."
#: SOP Class UID of a DICOM Segmentation object.
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: SOP Class UIDs (prefixes) of DICOM objects without an image, ignored in a folder:
#: DICOMDIR, structured reports and key objects, presentation states, RT structure sets,
#: plans and records, encapsulated documents, waveforms, raw data and registrations.
NON_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.1.3.10",
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    *(f"1.2.840.10008.5.1.4.1.1.481.{n}" for n in range(3, 10)),  # not 1, 2: RT image, dose
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.9.",
    "1.2.840.10008.5.1.4.1.1.66",  # raw data; .66.1-.66.3 registrations, fiducials
)
#: Metadata key under which :func:`.volumes.read_ct` stores :meth:`DicomSeries.record`
#: (JSON) on the image it returns.
RECORD_KEY = "gdpi.dicom_series"

_TAGS = {
    "position": "0020|0032",
    "orientation": "0020|0037",
    "series_uid": "0020|000e",
    "modality": "0008|0060",
    "description": "0008|103e",
    "series_number": "0020|0011",
    "sop_class": "0008|0016",
    "frames": "0028|0008",
    "gantry_tilt": "0018|1120",
}


@dataclass(frozen=True)
class SliceHeader:
    """What one file's header says (strings stripped; numbers parsed where valid)."""

    path: Path
    series_uid: str
    modality: str
    description: str
    series_number: str
    sop_class: str
    columns: int
    rows: int
    frames: int
    pixel_spacing: tuple[float, float]  # mm, (column step, row step) as SimpleITK's x, y
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row, column cosines
    gantry_tilt: float | None  # degrees


@dataclass
class DicomSeries:
    """The series read from a folder: its files sorted along the slice normal, the
    geometry found in their headers, and the other series of the folder."""

    folder: Path
    uid: str
    description: str
    series_number: str
    modality: str
    files: list[Path]
    origin: tuple[float, float, float]  # mm
    spacing: tuple[float, float, float] | None  # mm; None with one slice
    direction: tuple[float, ...]  # row-major 3x3, columns: row, column, normal cosines
    others: list[dict] = field(default_factory=list)

    def record(self) -> dict:
        """What run.json records (``inputs.ct_dicom_series``)."""
        count = 1 + len(self.others)
        return {
            "folder": str(self.folder.absolute()),
            "series_instance_uid": self.uid,
            "series_description": self.description,
            "series_number": self.series_number,
            "modality": self.modality,
            "files": len(self.files),
            "first_file": self.files[0].name,
            "last_file": self.files[-1].name,
            "slice_spacing_mm": None if self.spacing is None else self.spacing[2],
            "chosen": "the only series in the folder"
            if count == 1
            else f"the largest of the folder's {count} series",
            "other_series": self.others,
        }


def describe_series(record: dict) -> str:
    """One line for the log from :meth:`DicomSeries.record`."""
    text = f"DICOM series {record['series_instance_uid']} ("
    if record["series_description"]:
        text += f"{record['series_description']!r}, "
    text += f"{record['modality'] or 'no modality'}, {record['files']} files) in {record['folder']}"
    others = record["other_series"]
    if others:
        shown = ", ".join(
            f"{o['series_instance_uid']} ({o['files']} files)" for o in others[:3]
        ) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        text += f", {record['chosen']}; not read: {shown}"
    return text


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` starts with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _value(reader: sitk.ImageFileReader, tag: str) -> str:
    if not reader.HasMetaDataKey(tag):
        return ""
    return reader.GetMetaData(tag).strip(" \x00")


def _numbers(text: str, count: int) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return values


def _media_sop_class(head: bytes) -> str:
    """MediaStorageSOPClassUID (0002,0002) from a Part 10 file's meta header (always
    explicit VR little endian), or ""."""
    at = head.find(b"\x02\x00\x02\x00UI", 132)
    if at < 0:
        return ""
    length = int.from_bytes(head[at + 6 : at + 8], "little")
    return head[at + 8 : at + 8 + length].decode("ascii", "replace").strip("\x00 ")


def _damaged(path: Path) -> bool:
    """A file with the DICOM preamble that GDCM could not read as an image: damaged or
    cut short when its meta header names a standard storage class that holds an image
    (or cannot be read itself); a class without an image (DICOMDIR, reports,
    presentation states, RT plans and structures, documents, waveforms) or a vendor's
    private class (Siemens CSA non-image, GE private objects) is ignored."""
    if not is_dicom_file(path):
        return False
    with open(path, "rb") as f:
        sop_class = _media_sop_class(f.read(1 << 16))
    if sop_class == SEG_SOP_CLASS or not sop_class:
        return True
    standard = sop_class.startswith(STANDARD_STORAGE_PREFIX)
    return standard and not sop_class.startswith(NON_IMAGE_SOP_CLASSES)


def read_header(path: Path, what: str) -> SliceHeader | None:
    """The header of one file, ``None`` for a file that is not a DICOM image; refuses
    a DICOM image GDCM cannot read (call inside :func:`.volumes._quiet_stderr`)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(itk_path(path, what))
    try:
        with open(path, "rb") as f:  # GDCM says no more than "cannot read"
            f.read(1)
    except OSError as exc:
        raise InputError(f"cannot read {what} DICOM file {path}: {exc.strerror or exc}") from None
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        if _damaged(path):
            raise InputError(
                f"{what} DICOM file {path} cannot be read: it is cut short or damaged"
            ) from None
        return None
    size = reader.GetSize()
    frames_text = _value(reader, _TAGS["frames"])
    try:
        frames = int(float(frames_text)) if frames_text else 1
    except ValueError:
        frames = 1
    if len(size) > 2:
        frames = max(frames, int(size[2]))
    tilt = _numbers(_value(reader, _TAGS["gantry_tilt"]), 1)
    return SliceHeader(
        path=path,
        series_uid=_value(reader, _TAGS["series_uid"]),
        modality=_value(reader, _TAGS["modality"]).upper(),
        description=_value(reader, _TAGS["description"]),
        series_number=_value(reader, _TAGS["series_number"]),
        sop_class=_value(reader, _TAGS["sop_class"]),
        columns=int(size[0]),
        rows=int(size[1]),
        frames=frames,
        pixel_spacing=(float(reader.GetSpacing()[0]), float(reader.GetSpacing()[1])),
        position=_numbers(_value(reader, _TAGS["position"]), 3),
        orientation=_numbers(_value(reader, _TAGS["orientation"]), 6),
        gantry_tilt=None if tilt is None else tilt[0],
    )


def is_seg(header: SliceHeader) -> bool:
    return header.sop_class == SEG_SOP_CLASS or header.modality == "SEG"


def seg_error(what: str, path: Path) -> InputError:
    """The refusal of a DICOM SEG object: what it is and how to convert it."""
    return InputError(
        f"{what} {path} is a DICOM SEG object (a segmentation, not an image volume); convert "
        "it to a labelmap first: dcmqi's segimage2itkimage writes NRRD, or load it in 3D "
        "Slicer and export the segment as a labelmap volume"
    )


def scan_folder(folder: Path, what: str) -> dict[str, list[SliceHeader]]:
    """Headers of the DICOM images in ``folder`` (not its subfolders), by series UID."""
    series: dict[str, list[SliceHeader]] = {}
    try:
        paths = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"cannot read {what} folder {folder}: {exc.strerror or exc}") from None
    for path in paths:
        if path.name.startswith(".") or not path.is_file():
            continue
        header = read_header(path, what)
        if header is not None:
            series.setdefault(header.series_uid, []).append(header)
    return series


def _summary(uid: str, headers: list[SliceHeader]) -> dict:
    first = headers[0]
    return {
        "series_instance_uid": uid,
        "series_description": first.description,
        "modality": first.modality,
        "files": len(headers),
    }


def choose_series(
    series: dict[str, list[SliceHeader]], folder: Path, what: str
) -> tuple[str, list[dict]]:
    """The largest series and the summaries of the others (largest first). A tie of
    the largest is refused: which one is meant cannot be known."""
    if not series:
        raise InputError(f"{what} folder {folder} holds no DICOM series")
    ranked = sorted(series, key=lambda uid: (-len(series[uid]), uid))
    if len(ranked) > 1 and len(series[ranked[0]]) == len(series[ranked[1]]):
        tied = [uid for uid in ranked if len(series[uid]) == len(series[ranked[0]])]
        shown = "; ".join(
            f"{uid} ({series[uid][0].description or 'no description'!r}, "
            f"first file {series[uid][0].path.name})"
            for uid in tied
        )
        raise InputError(
            f"{what} folder {folder} holds {len(tied)} DICOM series of "
            f"{len(series[ranked[0]])} files each: {shown}; move the one to use into a "
            "folder of its own"
        )
    return ranked[0], [_summary(uid, series[uid]) for uid in ranked[1:]]


def _names(headers: list[SliceHeader], limit: int = 3) -> str:
    names = [h.path.name for h in headers]
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def _split(headers: list[SliceHeader], key, same) -> list[list[SliceHeader]]:
    """``headers`` grouped by ``key(h)``, two keys in one group when ``same(a, b)``."""
    groups: list[list[SliceHeader]] = []
    for h in headers:
        for group in groups:
            if same(key(group[0]), key(h)):
                group.append(h)
                break
        else:
            groups.append([h])
    return sorted(groups, key=len, reverse=True)


def _check_one_kind(
    groups: list[list[SliceHeader]], uid: str, prefix: str, label: str, describe
) -> None:
    """Refuse a series whose files fall into several groups (of ``label``: size,
    orientation); ``describe(header)`` shows a group's value."""
    if len(groups) == 1:
        return
    main, odd = groups[0], groups[1]
    if len(odd) > 1:  # two populations: two series under one UID
        shown = "; ".join(f"{len(g)} files of {label} {describe(g[0])} ({_names(g, 2)})"
                          for g in groups)  # fmt: skip
        raise InputError(
            f"{prefix} two series share the Series Instance UID {uid} ({shown}); put each "
            "series in a folder of its own"
        )
    raise InputError(
        f"{prefix} file {odd[0].path.name} has the {label} {describe(odd[0])}, the other "
        f"{len(main)} files {describe(main[0])}; one series has one {label}"
    )


def check_series(headers: list[SliceHeader], folder: Path, what: str) -> DicomSeries:
    """Check one series' headers; return it sorted along the normal with its geometry."""
    prefix = f"{what} DICOM series in {folder}:"
    first = headers[0]
    uid = first.series_uid
    for h in headers:
        if is_seg(h):
            raise seg_error(what, h.path)
    multi = [h for h in headers if h.frames > 1]
    if multi:
        raise InputError(
            f"{prefix} {multi[0].path.name} is a multi-frame file ({multi[0].frames} frames) "
            "whose per-frame geometry is not checked here; convert it to NIfTI first "
            "(e.g. dcm2niix)"
        )
    for h in headers:
        if h.position is None or h.orientation is None:
            tag = "ImagePositionPatient" if h.position is None else "ImageOrientationPatient"
            raise InputError(
                f"{prefix} file {h.path.name} has no valid {tag}: its place in the volume "
                "is unknown"
            )
    _check_one_kind(
        _split(
            headers,
            lambda h: (h.columns, h.rows, h.pixel_spacing),
            lambda a, b: a[:2] == b[:2] and np.allclose(a[2], b[2], rtol=1e-4, atol=0),
        ),
        uid, prefix, "size",
        lambda h: f"{h.columns}x{h.rows} pixels of {h.pixel_spacing[0]:g}x{h.pixel_spacing[1]:g} mm",
    )  # fmt: skip
    _check_one_kind(
        _split(
            headers,
            lambda h: h.orientation,
            lambda a, b: np.allclose(a, b, rtol=0, atol=ORIENTATION_TOL),
        ),
        uid, prefix, "orientation",
        lambda h: "(" + ", ".join(f"{v:.4g}" for v in h.orientation) + ")",
    )  # fmt: skip
    cosines = np.asarray(first.orientation, dtype=np.float64)
    row, col = cosines[:3], cosines[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(float(row @ col)) > 1e-3
    ):
        raise InputError(
            f"{prefix} the ImageOrientationPatient of {first.path.name} is not two "
            "orthogonal unit vectors: its header is broken"
        )
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.array([h.position for h in headers], dtype=np.float64)
    along = (positions - positions[0]) @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    same = np.flatnonzero(steps <= SPACING_TOL_MM)
    if len(same):
        if 2 * len(same) == len(headers) and np.all(steps[::2] <= SPACING_TOL_MM):
            raise InputError(
                f"{prefix} two series share the Series Instance UID {uid}: each of its "
                f"{len(same)} slice positions holds two files ({_names(headers[0:2])}, ...); "
                "put each series in a folder of its own"
            )
        a, b = headers[same[0]], headers[same[0] + 1]
        raise InputError(
            f"{prefix} files {a.path.name} and {b.path.name} have the same slice position "
            f"({along[same[0]] + float(positions[0] @ normal):.2f} mm along the normal)"
        )
    tol = position_tolerance(float(np.median(steps)) if len(steps) else 0.0)
    across = positions - positions[0] - np.outer(along - along[0], normal)
    shift = np.linalg.norm(across, axis=1)
    sheared = np.flatnonzero(shift > tol + SHEAR_TOL * np.abs(along - along[0]))
    if len(sheared):
        k = int(np.argmax(shift))
        angle = math.degrees(math.atan2(float(shift[k]), float(abs(along[k] - along[0]))))
        tag = next((h.gantry_tilt for h in headers if h.gantry_tilt), None)
        said = f"; Gantry/Detector Tilt (0018,1120) is {tag:g} degrees" if tag else ""
        raise InputError(
            f"{prefix} the slices are not stacked along their normal ({headers[k].path.name} "
            f"is shifted {shift[k]:.2f} mm across it over {abs(along[k] - along[0]):.1f} mm: "
            f"a sheared stack, tilted by {angle:.1f} degrees{said}); gantry-tilted "
            "acquisitions are refused: reconstruct the series without tilt, or convert it "
            "with dcm2niix (which corrects the tilt) and give the NIfTI"
        )
    spacing = None
    if len(steps):
        regular = float(np.median(steps))
        index = np.arange(len(along))
        fitted = np.polyval(np.polyfit(index, along, 1), index) if len(along) > 2 else along
        drift = np.abs(along - fitted)
        odd = np.flatnonzero(np.abs(steps - regular) > 2 * tol)
        if not len(odd) and drift.max() > tol:  # each step near enough, their sum drifts
            odd = np.array([int(np.argmax(np.abs(steps - regular)))])
        if len(odd):
            k = int(odd[0])
            ratio = steps[k] / regular
            a, b = headers[k].path.name, headers[k + 1].path.name
            if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
                missing = int(round(ratio)) - 1
                raise InputError(
                    f"{prefix} {missing} slice{'s' if missing > 1 else ''} missing between "
                    f"{a} and {b} (a step of {steps[k]:.3g} mm where the others are "
                    f"{regular:.3g} mm); the series is incomplete"
                )
            raise InputError(
                f"{prefix} the slice positions are irregular: {steps[k]:.4g} mm between {a} "
                f"and {b}, {regular:.4g} mm elsewhere (each slice may lie {tol:.3g} mm off a "
                "uniform grid); a volume needs uniform slice spacing"
            )
        spacing = (*first.pixel_spacing, float((along[-1] - along[0]) / (len(along) - 1)))
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
    return DicomSeries(
        folder=folder,
        uid=uid,
        description=first.description,
        series_number=first.series_number,
        modality=first.modality,
        files=[h.path for h in headers],
        origin=tuple(float(v) for v in positions[0]),
        spacing=spacing,
        direction=direction,
    )


def check_modality(series: DicomSeries, what: str) -> None:
    """Refuse a series that is not CT (the model was trained on CT in HU)."""
    if series.modality != "CT":
        shown = f"modality {series.modality}" if series.modality else "no modality"
        raise InputError(
            f"{what} DICOM series in {series.folder} has {shown}, not CT: the model was "
            "trained on CT in Hounsfield units and would score other images "
            "meaninglessly; pass --allow-non-ct to process it anyway"
        )


def position_tolerance(spacing_mm: float) -> float:
    """How far (mm) a slice may lie from the uniform grid of a series of this spacing."""
    return max(POSITION_TOL_MM, POSITION_TOL_FRACTION * spacing_mm)


def _check_read(image: sitk.Image, series: DicomSeries, what: str) -> None:
    """The volume ITK read must have the geometry the headers state."""
    problems = []
    n = len(series.files)
    if image.GetSize()[2] != n:
        problems.append(f"{image.GetSize()[2]} slices, not {n}")
    tol = position_tolerance(series.spacing[2] if series.spacing is not None else 0.0)
    if not np.allclose(image.GetOrigin(), series.origin, rtol=0, atol=tol):
        problems.append(f"origin {image.GetOrigin()}, not {series.origin}")
    if not np.allclose(image.GetDirection(), series.direction, rtol=0, atol=ORIENTATION_TOL):
        problems.append(f"direction {image.GetDirection()}, not {series.direction}")
    if series.spacing is not None and not np.allclose(
        image.GetSpacing(), series.spacing, rtol=0, atol=tol
    ):
        problems.append(f"spacing {image.GetSpacing()}, not {series.spacing}")
    if problems:
        raise InputError(
            f"{what} DICOM series in {series.folder} was read with another geometry than "
            f"its headers state ({'; '.join(problems)})"
        )


def read_series(folder: Path, what: str, ct_only: bool = False) -> tuple[sitk.Image, DicomSeries]:
    """Read the series of ``folder`` (see the module docstring) as a 3-D image.

    ``ct_only`` refuses a series whose Modality is not CT (:func:`check_modality`).
    Call inside :func:`.volumes._quiet_stderr` (GDCM warns on stderr)."""
    groups = scan_folder(folder, what)
    uid, others = choose_series(groups, folder, what)
    series = check_series(groups[uid], folder, what)
    series.others = others
    if ct_only:
        check_modality(series, what)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([itk_path(p, what) for p in series.files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise InputError(
            f"cannot read {what} DICOM series in {folder}: {detail[-1] if detail else exc}"
        ) from None
    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])
        image.SetOrigin(series.origin)
        image.SetDirection(series.direction)
    _check_read(image, series, what)
    if series.spacing is not None:  # the spacing of all positions, not of the first two
        image.SetSpacing(series.spacing)
    return image, series


def refuse_seg_file(path: Path, what: str) -> None:
    """Refuse a single DICOM file that is a SEG object (call inside
    :func:`.volumes._quiet_stderr`)."""
    if not is_dicom_file(path):
        return
    header = read_header(path, what)
    if header is not None and is_seg(header):
        raise seg_error(what, path)
