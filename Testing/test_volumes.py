import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared
from GDPILiverAnomalyLib.errors import InputError
from GDPILiverAnomalyLib.files.volumes import (
    OrientedCase,
    check_hu,
    image_stem,
    read_ct,
    read_liver_mask,
    same_grid,
)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_reads_every_file_format_with_identical_geometry(tmp_path, suffix):
    src = sitk.ReadImage(str(shared("ts_small", "ct.nii.gz")))
    seg = sitk.ReadImage(str(shared("ts_small", "totalseg.nii.gz")))
    sitk.WriteImage(src, str(tmp_path / f"ct{suffix}"))
    sitk.WriteImage(seg, str(tmp_path / f"seg{suffix}"))
    ct = read_ct(tmp_path / f"ct{suffix}")
    assert ct.GetPixelID() == sitk.sitkFloat32
    assert same_grid(ct, src) and ct.GetDirection() == src.GetDirection()
    liver = read_liver_mask(tmp_path / f"seg{suffix}", ct, label=5)
    assert np.array_equal(liver, (sitk.GetArrayFromImage(seg) == 5).astype(np.uint8))


def test_totalsegmentator_map_needs_the_liver_label():
    ct = read_ct(shared("ts_small", "ct.nii.gz"))
    with pytest.raises(InputError, match="label map.*TotalSegmentator: 5"):
        read_liver_mask(shared("ts_small", "totalseg.nii.gz"), ct)
    liver = read_liver_mask(shared("ts_small", "totalseg.nii.gz"), ct, label=5)
    assert liver.sum() > 1000


def test_lits_convention_counts_tumour_as_liver():
    ct = read_ct(shared("hcc_0697", "ct.nii.gz"))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("hcc_0697", "seg.nii.gz"))))
    liver = read_liver_mask(shared("hcc_0697", "seg.nii.gz"), ct)
    assert np.array_equal(liver > 0, seg > 0) and (seg == 2).any()
    with pytest.raises(InputError, match="no voxel with label 5"):
        read_liver_mask(shared("hcc_0697", "seg.nii.gz"), ct, label=5)


def test_dicom_series_with_nrrd_mask():
    folder = shared("dcmqi_3slice", "dicom")
    ct = read_ct(folder)
    assert ct.GetSize() == (512, 512, 3)
    assert ct.GetSpacing()[0] == pytest.approx(0.810547, abs=1e-5)
    values = sitk.GetArrayViewFromImage(ct)
    assert values.min() < -1000 < values.max()  # rescale slope/intercept applied: HU
    liver = read_liver_mask(shared("dcmqi_3slice", "liver_seg.nrrd"), ct)
    nrrd = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("dcmqi_3slice", "liver_seg.nrrd"))))
    assert np.array_equal(liver, nrrd)
    check_hu(values, liver)


def test_mask_on_another_grid_is_resampled_onto_the_ct(tmp_path):
    ct = read_ct(shared("ts_small", "ct.nii.gz"))
    seg = sitk.ReadImage(str(shared("ts_small", "totalseg.nii.gz")))
    # the same mask on a 2 mm grid shifted by half a voxel
    ref = sitk.Image([int(s * 1.5) for s in seg.GetSize()], sitk.sitkUInt8)
    ref.SetSpacing([2.0, 2.0, 2.0])
    ref.SetDirection(seg.GetDirection())
    ref.SetOrigin([o + 1.0 for o in seg.GetOrigin()])
    fine = sitk.Resample(seg, ref, sitk.Transform(), sitk.sitkNearestNeighbor)
    sitk.WriteImage(fine, str(tmp_path / "mask.nrrd"))
    liver = read_liver_mask(tmp_path / "mask.nrrd", ct, label=5)
    assert liver.shape == sitk.GetArrayViewFromImage(ct).shape
    assert _dice(liver > 0, sitk.GetArrayFromImage(seg) == 5) > 0.85


def test_mask_not_overlapping_the_ct_is_refused(tmp_path):
    ct = read_ct(shared("ts_small", "ct.nii.gz"))
    seg = sitk.ReadImage(str(shared("ts_small", "totalseg.nii.gz")))
    seg.SetOrigin([o + 5000 for o in seg.GetOrigin()])
    sitk.WriteImage(seg, str(tmp_path / "far.nrrd"))
    with pytest.raises(InputError, match="does not overlap"):
        read_liver_mask(tmp_path / "far.nrrd", ct, label=5)


@pytest.mark.parametrize(
    "case,mask,label",
    [
        ("ts_small", "totalseg.nii.gz", 5),
        ("hcc_1720", "seg.nii.gz", None),
        ("dcmqi_3slice", "liver_seg.nrrd", None),
    ],
)
def test_orientation_round_trip_is_exact(case, mask, label):
    ct_path = shared(case, "dicom") if case == "dcmqi_3slice" else shared(case, "ct.nii.gz")
    ct = read_ct(ct_path)
    liver = read_liver_mask(shared(case, mask), ct, label)
    oriented = OrientedCase.from_arrays(ct, liver)
    # LPS: the same arrays as SimpleITK's DICOMOrient, axis 0 inferior -> superior
    lps = sitk.DICOMOrient(ct, "LPS")
    assert np.array_equal(oriented.ct, sitk.GetArrayFromImage(lps))
    assert np.allclose(oriented.spacing_zyx, lps.GetSpacing()[::-1])
    assert np.array_equal(oriented.to_original(oriented.ct), sitk.GetArrayFromImage(ct))
    assert np.array_equal(oriented.to_original(oriented.liver), liver)


@pytest.mark.parametrize("oblique_rad", [0.0, 0.2])
def test_every_axis_order_and_flip_matches_dicom_orient(oblique_rad):
    """The LPS views (no copy) equal sitk.DICOMOrient for all 48 axis permutations and
    flips, also for slightly oblique scans; writing through a view writes the original."""
    values = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    c, s = math.cos(oblique_rad), math.sin(oblique_rad)
    tilt = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            direction = np.zeros((3, 3))
            for column in range(3):
                direction[perm[column], column] = signs[column]
            image = sitk.GetImageFromArray(values)
            image.SetDirection((tilt @ direction).ravel().tolist())
            image.SetSpacing((0.7, 0.8, 2.5))
            reference = sitk.DICOMOrient(image, "LPS")
            oriented = OrientedCase.from_arrays(image, np.ones(values.shape, np.uint8))
            assert np.array_equal(oriented.ct, sitk.GetArrayFromImage(reference))
            assert np.allclose(oriented.spacing_zyx, reference.GetSpacing()[::-1])
            assert np.array_equal(oriented.to_original(oriented.ct), values)
            out, view = oriented.new_original(np.float32)
            view[...] = oriented.ct
            assert np.array_equal(out, values)


def test_ras_volume_is_flipped_to_lps():
    ct = read_ct(shared("ts_small", "ct.nii.gz"))  # stored with direction diag(-1, -1, 1)
    oriented = OrientedCase.from_arrays(ct, np.ones(sitk.GetArrayViewFromImage(ct).shape, np.uint8))
    assert np.array_equal(oriented.ct, sitk.GetArrayFromImage(ct)[:, ::-1, ::-1])


def test_hu_checks():
    liver = np.ones((2, 4, 4), np.uint8)
    ok = np.full((2, 4, 4), 60.0)
    ok[0, 0, 0] = -1000
    check_hu(ok, liver)
    with pytest.raises(InputError, match="does not look like HU"):
        check_hu(ok + 1024, liver)  # raw unsigned values without rescale
    with pytest.raises(InputError, match="span only"):
        check_hu(np.linspace(0, 1, 32).reshape(2, 4, 4), liver)


def test_image_stem():
    assert image_stem("/a/volume-3.nii.gz") == "volume-3"
    assert image_stem("ct.nrrd") == "ct"
