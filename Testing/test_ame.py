import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.method.ame import adaptive_mask


def test_darker_than_median_by_more_than_offset():
    ct = np.full((6, 6), 100.0)
    liver = np.zeros((6, 6), np.uint8)
    liver[1:5, 1:5] = 1  # 16 liver pixels, median 100 HU
    ct[1, 1] = 79.0  # 21 HU darker: candidate
    ct[1, 2] = 80.0  # exactly 20 HU darker: not "more than" the offset
    ct[2, 2] = 130.0  # brighter: one-sided ignores it
    ct[0, 0] = -500.0  # outside the liver: never a candidate
    cand = adaptive_mask(ct, liver, offset_hu=20)
    assert cand.dtype == np.uint8
    assert {tuple(p) for p in np.argwhere(cand)} == {(1, 1)}
    two = adaptive_mask(ct, liver, offset_hu=20, two_sided=True)
    assert {tuple(p) for p in np.argwhere(two)} == {(1, 1), (2, 2)}


def test_threshold_is_per_slice_median():
    ct = np.zeros((2, 4, 4))
    ct[0] = 50.0
    ct[1] = 150.0
    ct[0, 0, 0] = 20.0  # 30 below slice 0 median
    ct[1, 0, 0] = 120.0  # 30 below slice 1 median, but above slice 0's
    cand = adaptive_mask(ct, np.ones_like(ct, np.uint8), offset_hu=20)
    assert cand[0, 0, 0] == 1 and cand[1, 0, 0] == 1
    assert cand.sum() == 2


def test_min_component_size_removes_small_regions():
    ct = np.full((1, 10, 10), 100.0)
    ct[0, 1, 1] = 0.0  # isolated pixel
    ct[0, 5:8, 5:8] = 0.0  # 9-pixel blob
    liver = np.ones_like(ct, np.uint8)
    assert adaptive_mask(ct, liver).sum() == 10
    kept = adaptive_mask(ct, liver, min_area_px=4)
    assert kept.sum() == 9 and kept[0, 1, 1] == 0


def test_no_liver_gives_empty_mask_and_bad_parameters_raise():
    ct = np.zeros((2, 5, 5))
    assert adaptive_mask(ct, np.zeros_like(ct, np.uint8)).sum() == 0
    with pytest.raises(ParameterError):
        adaptive_mask(ct, np.ones_like(ct, np.uint8), offset_hu=-1)
    with pytest.raises(ParameterError):
        adaptive_mask(ct, np.ones((2, 5, 4), np.uint8))


def test_real_case_flags_hypodense_tumour():
    """hcc_0697: a hypodense HCC; AME must catch most of it and little healthy liver."""
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("hcc_0697", "ct.nii.gz"))))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("hcc_0697", "seg.nii.gz"))))
    cand = adaptive_mask(ct.astype(np.float32), seg > 0)
    assert cand[seg == 2].mean() > 0.7
    assert cand[seg == 1].mean() < 0.2
    assert not cand[seg == 0].any()


def test_real_arterial_case_needs_two_sided():
    """hcc_1211 (arterial phase): the tumours are brighter; only two-sided AME finds them."""
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("hcc_1211", "ct.nii.gz")))).astype(
        np.float32
    )
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("hcc_1211", "seg.nii.gz"))))
    one = adaptive_mask(ct, seg > 0)[seg == 2].mean()
    two = adaptive_mask(ct, seg > 0, two_sided=True)[seg == 2].mean()
    assert one < 0.1 and two > 0.5
