"""Checks that an image file is complete before it is read, and that its geometry is
plausible for a CT. Torch-free.

SimpleITK reads a truncated ``.nii.gz`` without complaint (the missing voxels become
0); here the gzip stream must reach its end marker and hold at least the bytes the
header announces. NIfTI-1/2, NRRD (raw or gzip, attached or detached data) and
MetaImage (raw or zlib, ``.mha``/``.mhd``) are checked; other encodings are left to
the reader.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError

#: Voxel spacing a CT can have (mm); outside it the file's geometry is broken.
PLAUSIBLE_SPACING_MM = (0.05, 50.0)
#: Largest extent of a liver (mm) along any axis.
PLAUSIBLE_LIVER_EXTENT_MM = 600.0
_CHUNK = 1 << 20

_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8",
                     "uint8_t", "char"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16",
                     "int16_t", "ushort", "unsigned short", "unsigned short int", "uint16",
                     "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int",
                     "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long",
                     "signed long long int", "int64", "int64_t", "ulonglong",
                     "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}  # fmt: skip
_MET_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_FLOAT": 4, "MET_DOUBLE": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
}  # fmt: skip


def _truncated(path: Path, what: str, detail: str) -> InputError:
    return InputError(f"{what} {path} is incomplete ({detail}): the file was cut short")


def _stream_size(path: Path, offset: int, what: str, wbits: int) -> int:
    """Decompressed size of the stream(s) from ``offset``; the last must be complete."""
    total = 0
    with open(path, "rb") as f:
        f.seek(offset)
        decoder = zlib.decompressobj(wbits)
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            while chunk:
                try:
                    total += len(decoder.decompress(chunk))
                except zlib.error as exc:
                    raise InputError(f"cannot read {what} {path}: {exc}") from None
                if decoder.eof:
                    chunk = decoder.unused_data
                    if chunk and wbits > 16 and chunk[:2] == b"\x1f\x8b":  # next gzip member
                        decoder = zlib.decompressobj(wbits)
                        continue
                    break
                chunk = b""
        if not decoder.eof:
            raise _truncated(path, what, "the compressed stream has no end")
    return total


def _gz_head(path: Path, size: int, what: str) -> bytes:
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = b""
    with open(path, "rb") as f:
        while len(out) < size:
            chunk = f.read(65536)
            if not chunk:
                break
            try:
                out += decoder.decompress(chunk, size - len(out))
            except zlib.error as exc:
                raise InputError(f"cannot read {what} {path}: {exc}") from None
    return out


#: NIfTI datatype codes of floating-point voxels.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_layout(header: bytes) -> tuple[int, int, str | None] | None:
    """``(data offset, data bytes, numpy float dtype or None)`` announced by a NIfTI-1 or
    NIfTI-2 header (None: not NIfTI)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = struct.unpack(order + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        # ITK reads a file with NIfTI's magic whatever its header size field says, and
        # then none of these checks would run (NaN spacing silently became 1 mm)
        if header[344:348] in (b"n+1\0", b"ni1\0") or header[4:8] in (b"n+2\0", b"ni2\0"):
            size = struct.unpack("<i", header[:4])[0] if len(header) >= 4 else None
            raise ValueError(f"header size field {size}, not 348 (NIfTI-1) or 540 (NIfTI-2)")
        return None
    n = dims[0]
    if not 1 <= n <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1 : n + 1]):
        # ITK reads on with such sizes (a dimension of -119: seconds, gigabytes)
        raise ValueError(
            f"dimensions {list(dims[: n + 1] if 1 <= n <= 7 else dims[:1])}, {bitpix} bits"
        )
    if len(header) < 540 or struct.unpack(order + "i", header[:4])[0] == 348:
        # NIfTI-1 geometry: pixdim, quaternion, offsets, sform rows (NaN upsets ITK)
        geometry = struct.unpack(order + "8f", header[76:108]) + struct.unpack(
            order + "18f", header[256:328]
        )
        if not all(np.isfinite(geometry)):
            raise ValueError("NaN or infinite spacing, orientation or origin")
    if not np.isfinite(offset) or offset < 0:
        raise ValueError(f"data offset {offset}")
    kind = _NIFTI_FLOATS.get(datatype)
    if kind and bitpix != 8 * int(kind[1]):
        raise ValueError(f"datatype {datatype} with {bitpix} bits per voxel")
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : n + 1]], dtype=object))
    return int(offset), voxels * bitpix // 8, (order + kind) if kind else None


def _nifti_non_finite(path: Path, offset: int, nbytes: int, dtype: str, what: str) -> None:
    """ITK's NIfTI reader turns NaN and infinity into 0 without a word: count them here."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(nbytes), dtype=dtype)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise InputError(
            f"{what} {path} contains {bad} NaN or infinite voxels (a NIfTI reader would "
            "silently make them 0)"
        )


def _text_header(path: Path, limit: int = 1 << 16) -> tuple[list[str], int]:
    """Lines of a text header ending at a blank line (NRRD) and the data offset."""
    with open(path, "rb") as f:
        raw = f.read(limit)
    end = raw.find(b"\n\n")
    if end < 0:
        return raw.decode("latin-1").splitlines(), len(raw)
    return raw[:end].decode("latin-1").splitlines(), end + 2


def _inconsistent(path: Path, what: str, fields: str) -> InputError:
    return InputError(f"cannot read {what} {path}: its header is inconsistent ({fields})")


def _check_nrrd(path: Path, what: str) -> None:
    lines, offset = _text_header(path)
    fields = {}
    for line in lines[1:]:
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
    try:
        dimension = int(fields.get("dimension", ""))
        sizes = [int(v) for v in fields.get("sizes", "").split()]
    except ValueError:
        raise _inconsistent(path, what, "dimension and sizes") from None
    if not 1 <= dimension <= 4 or len(sizes) != dimension or min(sizes, default=0) < 1:
        raise _inconsistent(path, what, "dimension and sizes")
    size = _NRRD_TYPES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "raw").lower()
    if not sizes or size is None or encoding not in ("raw", "gzip", "gz"):
        return
    if fields.get("byte skip", "0") != "0" or fields.get("line skip", "0") != "0":
        return
    expected = int(np.prod(sizes, dtype=object)) * size
    data, start = path, offset
    detached = fields.get("data file") or fields.get("datafile")
    if detached:
        if " " in detached or detached.upper().startswith("LIST"):
            return
        data, start = path.parent / detached, 0
        if not data.is_file():
            raise InputError(f"{what} {path}: its data file {data} is missing")
    if encoding == "raw":
        found = data.stat().st_size - start
    else:
        found = _stream_size(data, start, what, 16 + zlib.MAX_WBITS)
    if found < expected:
        raise _truncated(path, what, f"{found} of {expected} data bytes")


def _check_metaimage(path: Path, what: str) -> None:
    with open(path, "rb") as f:
        raw = f.read(1 << 16)
    fields, offset = {}, None
    position = 0
    for line in raw.split(b"\n"):
        position += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            offset = position
            break
    if offset is None:  # ITK reads it all the same, unchecked (an NDims of 1e158: crash)
        raise _inconsistent(path, what, "no ElementDataFile line ending the header")
    # ITK's MetaImage reader trusts these fields (an NDims of 371 corrupts its heap)
    try:
        ndims = int(fields.get("NDims", ""))
        if not 1 <= ndims <= 4:
            raise ValueError
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        spacing = [float(v) for v in fields.get("ElementSpacing", "1 " * ndims).split()]
        matrix = (
            fields.get("TransformMatrix") or fields.get("Rotation") or fields.get("Orientation")
        )
        matrix_values = [float(v) for v in matrix.split()] if matrix else [0.0] * ndims**2
    except ValueError:
        raise _inconsistent(path, what, "NDims, DimSize, ElementSpacing") from None
    if not 1 <= ndims <= 4 or len(dims) != ndims or min(dims, default=0) < 1:
        raise _inconsistent(path, what, "NDims and DimSize")
    if len(spacing) != ndims or len(matrix_values) != ndims**2 or not 1 <= channels <= 16:
        raise _inconsistent(path, what, "ElementSpacing, TransformMatrix or channels")
    size = _MET_TYPES.get(fields.get("ElementType", ""))
    if not dims or size is None or fields.get("HeaderSize", "0") not in ("0", ""):
        return
    expected = int(np.prod(dims, dtype=object)) * size * channels
    target = fields["ElementDataFile"]
    data, start = path, offset
    if target != "LOCAL":
        if " " in target or target.upper().startswith("LIST") or "%" in target:
            return
        data, start = path.parent / target, 0
        if not data.is_file():
            raise InputError(f"{what} {path}: its data file {data} is missing")
    if fields.get("CompressedData", "False").lower() == "true":
        found = _stream_size(data, start, what, zlib.MAX_WBITS)
    else:
        found = data.stat().st_size - start
    if found < expected:
        raise _truncated(path, what, f"{found} of {expected} data bytes")


def check_complete(path: str | Path, what: str = "image") -> None:
    """Raise :class:`InputError` when an image file is cut short, its compressed stream
    is broken or its header is inconsistent (NIfTI, NRRD, MetaImage); other files pass
    unchecked."""
    try:
        _check_complete(Path(path), what)
    except (ValueError, OverflowError, struct.error, MemoryError) as exc:
        raise _inconsistent(Path(path), what, str(exc) or type(exc).__name__) from None


def _check_complete(path: Path, what: str) -> None:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        layout = _nifti_layout(_gz_head(path, 540, what))
        found = _stream_size(path, 0, what, 16 + zlib.MAX_WBITS)
    elif name.endswith(".nii"):
        with open(path, "rb") as f:
            layout = _nifti_layout(f.read(540))
        found = path.stat().st_size
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path, what)
        return
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path, what)
        return
    else:
        return
    if layout is None:
        return
    offset, nbytes, dtype = layout
    if found < offset + nbytes:
        raise _truncated(path, what, f"{found} of {offset + nbytes} bytes")
    if dtype is not None:
        _nifti_non_finite(path, offset, nbytes, dtype, what)


def check_geometry(
    spacing, direction, path: str | Path, what: str = "image", origin=(0.0, 0.0, 0.0)
) -> None:
    """Refuse implausible spacing (outside :data:`PLAUSIBLE_SPACING_MM`) and direction
    cosines that are not orthonormal (a sheared or scaled grid)."""
    low, high = PLAUSIBLE_SPACING_MM
    values = [float(s) for s in spacing]
    if not all(np.isfinite(values)) or not all(low <= s <= high for s in values):
        shown = " x ".join(f"{s:g}" for s in values)
        raise InputError(
            f"{what} {path} has voxel spacing {shown} mm, outside the plausible "
            f"{low:g}..{high:g} mm: its header geometry is broken"
        )
    if not all(np.isfinite([float(v) for v in origin])):
        raise InputError(f"{what} {path} has a NaN or infinite origin: its header is broken")
    matrix = np.asarray(direction, dtype=float).reshape(len(values), len(values))
    if not np.all(np.isfinite(matrix)) or not np.allclose(
        matrix.T @ matrix, np.eye(len(values)), atol=1e-3
    ):
        raise InputError(
            f"{what} {path} has a direction matrix that is not orthonormal (sheared or "
            "scaled axes); resample it onto an orthogonal grid first"
        )


def check_liver_extent(liver: np.ndarray, spacing, path: str | Path) -> None:
    """Refuse a liver mask spanning more than :data:`PLAUSIBLE_LIVER_EXTENT_MM` along an
    axis (``liver`` in ``[k, j, i]`` order, ``spacing`` in SimpleITK's ``(i, j, k)``)."""
    where = [np.flatnonzero(liver.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))]
    if any(len(w) == 0 for w in where):
        return
    steps = (float(spacing[2]), float(spacing[1]), float(spacing[0]))
    extent = max((w[-1] - w[0] + 1) * s for w, s in zip(where, steps))
    if extent > PLAUSIBLE_LIVER_EXTENT_MM:
        raise InputError(
            f"liver mask {path} spans {extent:.0f} mm, more than any liver "
            f"({PLAUSIBLE_LIVER_EXTENT_MM:g} mm): check the image spacing"
        )


def itk_path(path: str | Path, what: str = "file") -> str:
    """``path`` as the ``str`` SimpleITK/ITK take, refused when it cannot be one.

    A name with bytes that are not UTF-8 (Python holds them as surrogate escapes)
    aborts the process inside SimpleITK's C++ layer instead of raising, so such a path
    is refused before it gets there."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise InputError(
            f"{what} path {shown} has bytes that are not UTF-8 in its name; "
            "rename it (or a folder above it) with UTF-8 characters only"
        ) from None
    return text
