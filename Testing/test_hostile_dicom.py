"""Hostile DICOM series: what GDCM alone would stack silently into a wrong volume (a
missing or truncated slice, irregular or duplicate positions, a slice of another
orientation, two series under one UID, a gantry-tilted stack) is refused with exit 2 and
one ``gdpi: error:`` line naming the file(s); nothing is written and the inputs stay
byte-identical. A folder of several series reads the largest and records it in run.json;
a tie is refused; a series that is not CT needs ``--allow-non-ct``; a DICOM SEG object as
the liver mask is refused with what to do. The series are generated here, in tmp_path.

Only SimpleITK, numpy and the ``gdpi`` command are imported at module level, so the
refusals can be replayed against an older checkout of the package.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared, tree_snapshot
from GDPITraining.cli import main

SPACING = (6.0, 6.0)  # mm, in-plane
STEP = 5.0  # mm between slices
SIZE = (40, 40)  # columns, rows
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ORIGIN = (-120.0, -110.0, -40.0)  # mm, the first slice's ImagePositionPatient
STUDY = "1.2.826.0.1.3680043.2.1125.77"


def _liver_slice(size=SIZE) -> np.ndarray:
    """A liver ellipse on the patient's right (image left), ``[row, column]``."""
    yy, xx = np.mgrid[: size[1], : size[0]] / np.array(size[::-1], float)[:, None, None]
    return ((yy - 0.45) / 0.22) ** 2 + ((xx - 0.35) / 0.25) ** 2 < 1


def _volume(n: int, size=SIZE) -> np.ndarray:
    """An abdomen-like int16 HU volume ``[k, row, column]``: air, body 40 HU, the liver
    of :func:`_liver_slice` around 70 HU with a dark 15 HU lesion in its middle slices."""
    rows, cols = size[1], size[0]
    yy, xx = np.mgrid[:rows, :cols]
    rng = np.random.default_rng(n)
    out = np.full((n, rows, cols), -1000, np.int16)
    body = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (0.45 * rows) ** 2
    liver = _liver_slice(size)
    for k in range(n):
        out[k][body] = 40 + rng.integers(-10, 10, body.sum())
        out[k][liver] = 70 + rng.integers(-8, 8, liver.sum()) + k
    lesion = (yy - rows * 0.45) ** 2 + (xx - cols * 0.35) ** 2 < (0.08 * rows) ** 2
    out[n // 2 - 1 : n // 2 + 1, lesion] = 15
    return out


def _liver(n: int, size=SIZE) -> np.ndarray:
    return np.repeat(_liver_slice(size)[None].astype(np.uint8), n, axis=0)


def write_series(
    folder: Path,
    n: int = 6,
    uid: str = "1.2.826.0.1.3680043.2.1125.77.1",
    modality: str = "CT",
    description: str = "ABDOMEN 5mm",
    size=SIZE,
    positions: list | None = None,
    orientations: list | None = None,
    names: list | None = None,
    tags: dict | None = None,
) -> np.ndarray:
    """One slice per file into ``folder`` (created); returns the volume written, in the
    order of increasing position. ``positions`` and ``orientations`` per slice override
    the axial stack at :data:`STEP` mm; ``tags`` are added to every file."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = _volume(n, size)
    for k in range(n):
        position = positions[k] if positions else (*ORIGIN[:2], ORIGIN[2] + STEP * k)
        orientation = orientations[k] if orientations else AXIAL
        image = sitk.GetImageFromArray(volume[k])
        image.SetSpacing(SPACING)
        for tag, value in {
            "0008|0060": modality,
            "0008|103e": description,
            "0010|0010": "HOSTILE^DICOM",
            "0010|0020": "hostile",
            "0020|000d": STUDY,
            "0020|000e": uid,
            "0020|0011": "3",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
            "0018|0050": f"{STEP:g}",
            **(tags or {}),
        }.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / (names[k] if names else f"{k:03d}.dcm")))
        writer.Execute(image)
    return volume


def write_liver(path: Path, n: int = 6, size=SIZE) -> Path:
    """A liver mask NRRD on the grid of :func:`write_series`' default axial stack."""
    image = sitk.GetImageFromArray(_liver(n, size))
    image.SetSpacing((*SPACING, STEP))
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(path))
    return path


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (short form; values padded to even)."""
    value += b"\x00" if len(value) % 2 else b""
    tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
    return tag + vr + len(value).to_bytes(2, "little") + value


def _structured_report() -> bytes:
    """A DICOM Part 10 file without an image (Comprehensive SR), as PACS exports hold."""
    meta = b"".join([
        _element(2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.88.33"),
        _element(2, 3, b"UI", b"1.2.826.0.1.3680043.2.1125.77.9"),
        _element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1"),
    ])  # fmt: skip
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + len(meta).to_bytes(4, "little")
    data = _element(8, 0x16, b"UI", b"1.2.840.10008.5.1.4.1.1.88.33") + _element(
        8, 0x60, b"CS", b"SR"
    )
    return b"\x00" * 128 + b"DICM" + group_length + meta + data


def _detect(ct: Path, liver: Path, out: Path, checkpoint, *extra: str) -> list[str]:
    return ["detect", "--ct", str(ct), "--liver", str(liver), "--checkpoint", str(checkpoint),
            "--out", str(out), "--device", "cpu", "--steps", "2", "--jump-length", "1",
            "--jump-n-sample", "1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint, written by ``gdpi init-model``."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    assert main(["init-model", "--out", str(path), "--size", "tiny"]) == 0
    return path


def _refused(tmp_path: Path, capsys, ct: Path, liver: Path, checkpoint, *extra: str) -> str:
    """Run ``gdpi detect`` expecting a refusal; return its one error line."""
    capsys.readouterr()
    before = tree_snapshot(tmp_path)
    out = tmp_path / "out"
    code = main(_detect(ct, liver, out, checkpoint, "--progress", "none", *extra))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("gdpi: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()
    assert tree_snapshot(tmp_path) == before  # nothing written, the inputs byte-identical
    return lines[0]


# ---- one series, broken geometry ------------------------------------------------------


def test_missing_middle_slice_is_a_gap(tmp_path, capsys, checkpoint):
    write_series(tmp_path / "ct", n=7)
    (tmp_path / "ct" / "003.dcm").unlink()
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "1 slice missing between 002.dcm and 004.dcm" in line
    assert "10 mm where the others are 5 mm" in line


def test_irregular_slice_positions(tmp_path, capsys, checkpoint):
    z = [0.0, 5.0, 10.0, 16.0, 21.0, 26.0]
    write_series(tmp_path / "ct", positions=[(*ORIGIN[:2], ORIGIN[2] + v) for v in z])
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "slice positions are irregular: 6 mm between 002.dcm and 003.dcm" in line


def test_a_slice_of_another_orientation(tmp_path, capsys, checkpoint):
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    write_series(tmp_path / "ct", orientations=[AXIAL, AXIAL, AXIAL, coronal, AXIAL, AXIAL])
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "file 003.dcm has the orientation (1, 0, 0, 0, 0, -1)" in line
    assert "the other 5 files (1, 0, 0, 0, 1, 0)" in line


def test_duplicate_slice_positions(tmp_path, capsys, checkpoint):
    z = [0.0, 5.0, 10.0, 10.0, 15.0, 20.0]
    write_series(tmp_path / "ct", positions=[(*ORIGIN[:2], ORIGIN[2] + v) for v in z])
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "files 002.dcm and 003.dcm have the same slice position" in line


@pytest.mark.parametrize("keep", [0.4, 0.7, 0.98])  # in the header, in the pixels, the end
def test_a_file_cut_short(tmp_path, capsys, checkpoint, keep):
    write_series(tmp_path / "ct")
    cut = tmp_path / "ct" / "002.dcm"
    data = cut.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert f"DICOM file {cut} cannot be read: it is cut short or damaged" in line


def test_first_or_last_file_cut_short_is_not_dropped(tmp_path, capsys, checkpoint):
    """GDCM skips a file it cannot parse: a cut first or last slice would leave a shorter
    volume with nothing irregular to see."""
    write_series(tmp_path / "ct")
    cut = tmp_path / "ct" / "005.dcm"
    cut.write_bytes(cut.read_bytes()[:-40])
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "005.dcm cannot be read: it is cut short" in line


def test_two_series_sharing_one_uid_differ_in_size(tmp_path, capsys, checkpoint):
    write_series(tmp_path / "ct", n=6)
    write_series(tmp_path / "ct", n=4, size=(32, 32), names=[f"b{k}.dcm" for k in range(4)])
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "two series share the Series Instance UID 1.2.826.0.1.3680043.2.1125.77.1" in line
    assert "6 files of size 40x40 pixels" in line and "4 files of size 32x32 pixels" in line
    assert "000.dcm" in line and "b0.dcm" in line


def test_two_series_sharing_one_uid_at_the_same_positions(tmp_path, capsys, checkpoint):
    """E.g. two reconstructions (soft tissue, bone kernel) stored under one UID."""
    write_series(tmp_path / "ct", n=6)
    write_series(tmp_path / "ct", n=6, names=[f"b{k}.dcm" for k in range(6)])
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "two series share the Series Instance UID" in line
    assert "each of its 6 slice positions holds two files" in line


def test_gantry_tilt_is_refused(tmp_path, capsys, checkpoint):
    """A tilted gantry: the slice plane is tilted by 15 degrees, the table moves along z,
    so the positions do not follow the slice normal (a sheared stack)."""
    tilt = math.radians(15)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), math.sin(tilt))
    write_series(
        tmp_path / "ct",
        orientations=[orientation] * 6,
        tags={"0018|1120": "15"},
    )
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "the slices are not stacked along their normal (005.dcm" in line
    assert "tilted by 15.0 degrees; Gantry/Detector Tilt (0018,1120) is 15 degrees" in line
    assert "gantry-tilted acquisitions are refused" in line and "dcm2niix" in line


# ---- several series, modality, DICOM SEG ----------------------------------------------


def test_two_series_of_the_same_size_are_refused(tmp_path, capsys, checkpoint):
    write_series(tmp_path / "ct", uid="1.2.3.10", description="ABD ARTERIAL")
    write_series(tmp_path / "ct", uid="1.2.3.20", description="ABD PORTAL",
                 names=[f"p{k}.dcm" for k in range(6)])  # fmt: skip
    line = _refused(tmp_path, capsys, tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert "holds 2 DICOM series of 6 files each" in line
    assert "1.2.3.10 ('ABD ARTERIAL', first file 000.dcm)" in line
    assert "1.2.3.20 ('ABD PORTAL', first file p0.dcm)" in line


def test_mr_series_is_refused_without_allow_non_ct(tmp_path, capsys, checkpoint):
    write_series(tmp_path / "mr", modality="MR")
    line = _refused(tmp_path, capsys, tmp_path / "mr", write_liver(tmp_path / "l.nrrd"), checkpoint)
    assert f"CT DICOM series in {tmp_path / 'mr'} has modality MR, not CT" in line
    assert "trained on CT in Hounsfield units" in line and "--allow-non-ct" in line


def test_dicom_seg_as_liver_mask_says_what_to_do(tmp_path, capsys, checkpoint):
    seg = shared("dcmqi_3slice", "liver_seg_dicomseg.dcm")
    ct = shared("dcmqi_3slice", "dicom")
    line = _refused(tmp_path, capsys, ct, seg, checkpoint)
    assert f"liver mask {seg} is a DICOM SEG object" in line
    assert "segimage2itkimage" in line and "3D Slicer" in line
    (tmp_path / "segfolder").mkdir()
    shutil.copy(seg, tmp_path / "segfolder" / "seg.dcm")
    line = _refused(tmp_path, capsys, ct, tmp_path / "segfolder", checkpoint)
    assert f"liver mask {tmp_path / 'segfolder' / 'seg.dcm'} is a DICOM SEG object" in line


# ---- what is read ---------------------------------------------------------------------


def test_shuffled_file_names_are_sorted_by_position(tmp_path):
    from GDPILiverAnomalyLib.files.volumes import read_ct

    names = ["z.dcm", "a.dcm", "m.dcm", "b.dcm", "y.dcm", "c.dcm"]  # slice k -> names[k]
    volume = write_series(tmp_path / "ct", names=names, tags={"0020|0013": "1"})
    ct = read_ct(tmp_path / "ct")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), volume.astype(np.float32))
    assert ct.GetOrigin() == pytest.approx(ORIGIN)
    assert ct.GetSpacing() == pytest.approx((*SPACING, STEP))
    assert ct.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_shared_dicom_series_reads_as_plain_itk_does():
    """The good path: the dcmqi series (rescale intercept -1024, positions decreasing with
    the file names) has the geometry and values ITK's own series reading gives."""
    from GDPILiverAnomalyLib.files.volumes import dicom_series_record, read_ct

    folder = shared("dcmqi_3slice", "dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    plain = reader.Execute()
    ct = read_ct(folder)
    assert ct.GetSize() == plain.GetSize() == (512, 512, 3)
    assert ct.GetOrigin() == pytest.approx(plain.GetOrigin(), abs=1e-6)
    assert ct.GetSpacing() == pytest.approx(plain.GetSpacing(), abs=1e-6)
    assert ct.GetDirection() == pytest.approx(plain.GetDirection(), abs=1e-9)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(plain).astype(np.float32)
    )
    assert sitk.GetArrayViewFromImage(ct).min() < -900  # rescaled to HU
    record = dicom_series_record(ct)
    assert record["modality"] == "CT" and record["files"] == 3
    assert (record["first_file"], record["last_file"]) == ("03.dcm", "01.dcm")
    assert record["other_series"] == []


def test_largest_series_is_read_and_recorded(tmp_path, capsys, checkpoint):
    """A full ``gdpi detect`` on a folder of two series (and a text file and a
    structured report, both ignored): the larger is read, run.json records it and the
    other, the log says so."""
    volume = write_series(tmp_path / "ct", n=6, uid="1.2.3.100", description="PORTAL 5mm")
    write_series(tmp_path / "ct", n=3, uid="1.2.3.200", description="SCOUT",
                 names=[f"s{k}.dcm" for k in range(3)])  # fmt: skip
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    (tmp_path / "ct" / "report.dcm").write_bytes(_structured_report())
    liver = write_liver(tmp_path / "liver.nrrd")
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(_detect(tmp_path / "ct", liver, out, checkpoint, "--progress", "text"))
    err = capsys.readouterr().err
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    series = run["inputs"]["ct_dicom_series"]
    assert series["series_instance_uid"] == "1.2.3.100"
    assert series["series_description"] == "PORTAL 5mm" and series["files"] == 6
    assert series["modality"] == "CT" and series["slice_spacing_mm"] == pytest.approx(STEP)
    assert series["chosen"] == "the largest of the folder's 2 series"
    assert series["other_series"] == [
        {"series_instance_uid": "1.2.3.200", "series_description": "SCOUT", "modality": "CT",
         "files": 3}
    ]  # fmt: skip
    assert run["nfe"] > 0  # the lesion was re-painted: the whole pipeline ran
    assert run["inputs"]["geometry"]["size"] == [*SIZE, 6]
    assert run["inputs"]["geometry"]["origin_mm"] == pytest.approx(ORIGIN)
    pseudo = sitk.ReadImage(str(out / "pseudo_healthy.nrrd"))
    outside = _liver(6) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(pseudo)[outside], volume[outside])
    logged = [line for line in err.splitlines() if line.startswith("CT: DICOM series 1.2.3.100")]
    assert len(logged) == 1 and "not read: 1.2.3.200 (3 files)" in logged[0], err


def test_mr_series_is_read_with_allow_non_ct(tmp_path, capsys, checkpoint):
    write_series(tmp_path / "mr", modality="MR")
    out = tmp_path / "out"
    liver = write_liver(tmp_path / "liver.nrrd")
    code = main(_detect(tmp_path / "mr", liver, out, checkpoint, "--progress", "none",
                        "--allow-non-ct"))  # fmt: skip
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["inputs"]["allow_non_ct"] is True
    assert run["inputs"]["ct_dicom_series"]["modality"] == "MR"


def test_an_unreadable_slice_is_named_not_skipped(tmp_path, checkpoint):
    """A slice the user may not read (root's bypass dropped, as in test_hostile_inputs)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if os.environ.get("CI"):
            pytest.fail("setpriv (util-linux) is missing on CI")
        pytest.skip("setpriv not available")
    write_series(tmp_path / "ct")
    locked = tmp_path / "ct" / "002.dcm"
    locked.chmod(0)
    prefix = (
        [setpriv, "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    )
    argv = _detect(tmp_path / "ct", write_liver(tmp_path / "l.nrrd"), tmp_path / "out", checkpoint)
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "GDPILiverAnomalyLib", *argv, "--progress", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot read CT DICOM file {locked}: Permission denied" in result.stderr
    assert not (tmp_path / "out").exists()


# ---- real scanners round their positions: such series must still be read -------------


@pytest.mark.parametrize("tilt_deg", [0.0, 20.0])  # axial, and an oblique (not tilted) stack
def test_positions_rounded_to_0_01_mm_are_read_with_their_mean_spacing(tmp_path, tilt_deg):
    """0.625 mm slices whose ImagePositionPatient is written with 2 decimals: steps of
    0.62 and 0.63 mm. Refused as irregular by a 0.01 mm step tolerance (the review found
    45 % of start positions refused); read here, with the spacing of all positions."""
    from GDPILiverAnomalyLib.files.volumes import read_ct

    a = math.radians(tilt_deg)
    row, col = (1.0, 0.0, 0.0), (0.0, math.cos(a), math.sin(a))
    normal = np.cross(row, col)
    step, n = 0.625, 40
    start = np.array([-120.0, -110.0, -40.003])
    positions = [tuple(np.round(start + k * step * normal, 2)) for k in range(n)]
    write_series(tmp_path / "ct", n=n, positions=positions, orientations=[(*row, *col)] * n)
    image = read_ct(tmp_path / "ct")
    assert image.GetSize()[2] == n
    assert image.GetSpacing()[2] == pytest.approx(step, abs=2e-3)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3))[:, 2], normal, atol=1e-4)


def test_a_vendor_private_object_beside_the_series_is_ignored(tmp_path):
    """A Siemens CSA non-image object (a private SOP class GDCM cannot read as an image)
    in the series folder: before, the whole folder was refused as "cut short or
    damaged"; the series is read."""
    from GDPILiverAnomalyLib.files.volumes import read_ct

    written = write_series(tmp_path / "ct")
    private = b"1.3.12.2.1107.5.9.1"
    meta = _element(2, 2, b"UI", private) + _element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1")
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + len(meta).to_bytes(4, "little")
    data = _element(8, 0x16, b"UI", private) + _element(8, 0x60, b"CS", b"CT")
    (tmp_path / "ct" / "csa.dcm").write_bytes(b"\x00" * 128 + b"DICM" + group_length + meta + data)
    image = read_ct(tmp_path / "ct")
    assert np.array_equal(sitk.GetArrayFromImage(image), written.astype(np.float32))
