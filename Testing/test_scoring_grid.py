import numpy as np
import pytest
import SimpleITK as sitk
from GDPILiverAnomalyLib.method.grid import InputGrid, PlaneMapping
from GDPILiverAnomalyLib.method.scoring import (
    anomaly_mask,
    find_lesions,
    lesion_labels,
    median_filter_slices,
)


def test_lesion_list_from_a_constructed_mask():
    ref = sitk.Image(20, 30, 10, sitk.sitkFloat32)  # i, j, k sizes
    ref.SetSpacing((0.5, 0.5, 2.0))
    ref.SetOrigin((-10.0, 20.0, 100.0))
    score = np.zeros((10, 30, 20), np.float32)
    score[2:5, 10:14, 4:8] = 30.0  # lesion A: 3 x 4 x 4 = 48 voxels
    score[3, 11, 5] = 55.0
    score[7, 25, 15] = 25.0  # lesion B: one voxel
    score[7, 26, 16] = 10.0  # below threshold
    lesions = find_lesions(anomaly_mask(score, 20.0), score, ref)
    assert [les.voxels for les in lesions] == [48, 1]
    a, b = lesions
    assert a.id == 1 and b.id == 2
    assert (a.lesion_score, b.lesion_score) == (55.0, 25.0)  # the maximum score
    assert a.volume_ml == pytest.approx(48 * 0.5 * 0.5 * 2 / 1000)
    assert a.max_score_hu == 55.0
    assert a.mean_score_hu == pytest.approx((47 * 30 + 55) / 48, abs=1e-3)
    # centroid index (i, j, k) = (5.5, 11.5, 3) -> mm
    assert (a.centroid_x_mm, a.centroid_y_mm, a.centroid_z_mm) == pytest.approx(
        (-7.25, 25.75, 106.0)
    )
    assert (a.slice_first, a.slice_last) == (2, 4)
    assert (b.slice_first, b.slice_last) == (7, 7)


def test_lesions_are_ranked_by_lesion_score_not_size():
    ref = sitk.Image(12, 12, 4, sitk.sitkFloat32)
    score = np.zeros((4, 12, 12), np.float32)
    score[0:3, 1:6, 1:6] = 22.0  # large and faint: 75 voxels, maximum 22
    score[1, 9, 9] = 40.0  # small and bright: one voxel
    score[3, 9, 1:3] = 40.0  # as bright, two voxels: ties go to the larger
    lesions = find_lesions(anomaly_mask(score, 20.0), score, ref)
    assert [(x.id, x.voxels, x.lesion_score) for x in lesions] == [
        (1, 2, 40.0), (2, 1, 40.0), (3, 75, 22.0)
    ]  # fmt: skip
    labels, n = lesion_labels(anomaly_mask(score, 20.0), score)
    assert n == 3 and labels[1, 9, 9] == 2 and labels[0, 2, 2] == 3  # ids = table rows


def test_diagonal_neighbours_join_one_lesion():
    ref = sitk.Image(5, 5, 5, sitk.sitkFloat32)
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # 26-connected
    assert len(find_lesions(mask, mask.astype(np.float32), ref)) == 1
    assert find_lesions(np.zeros_like(mask), mask.astype(np.float32), ref) == []


def test_median_filter_removes_speckle_but_keeps_blobs():
    values = np.zeros((2, 20, 20), np.float32)
    values[0, 3, 3] = 100.0  # speckle
    values[1, 5:12, 5:12] = 40.0  # blob
    out = median_filter_slices(values, 5)
    assert out[0].max() == 0.0
    assert out[1, 8, 8] == 40.0
    assert median_filter_slices(values, 1) is values


def test_grid_mapping_round_trip_and_masks():
    h, w = 101, 122
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = (100 + 30 * np.sin(yy / 15.0) + 20 * np.cos(xx / 20.0)).astype(np.float32)[None]
    liver = np.zeros((1, h, w), np.uint8)
    liver[0, 30:70, 20:90] = 1
    mapping = PlaneMapping.for_volume(InputGrid(64, 5.0), (h, w), (3.0, 3.0), liver)
    assert mapping.centre == (49.5, 54.5)
    assert mapping.step == pytest.approx((5 / 3, 5 / 3))
    grid = mapping.to_grid(smooth, "image")
    back = mapping.to_slices(grid, (h, w))
    inner = (slice(None), slice(35, 65), slice(25, 85))
    assert np.abs(back[inner] - smooth[inner]).max() < 3.0
    # a single candidate pixel survives downsampling
    one = np.zeros((1, h, w), np.uint8)
    one[0, 50, 50] = 1
    assert 1 <= mapping.to_grid(one, "mask").sum() <= 4
    # outside the CT the grid reads air
    far = PlaneMapping(64, (0.0, 0.0), (1.0, 1.0))
    assert far.to_grid(smooth, "image")[0, 10, 10] == pytest.approx(-1024.0)


def test_whole_slice_grid_fits_the_slice():
    mapping = PlaneMapping.for_volume(InputGrid(64, None), (512, 256), (0.5, 1.0))
    # 512 rows x 0.5 mm = 256 mm = 256 columns x 1 mm; 4 mm per grid pixel
    assert mapping.step == pytest.approx((8.0, 4.0))
