"""Pooled pixel metrics, lesion detection and slice AUROC on maps with known answers."""

import numpy as np
import pytest
from GDPILiverAnomalyLib.method.metrics import lesion_detection, pixel_metrics, slice_auroc


def _brute_force_best_f1(score, truth):
    best = (-1.0, None)
    for thr in np.unique(score):
        pred = score >= thr
        tp = np.sum(pred & truth)
        f1 = 2 * tp / (pred.sum() + truth.sum())
        if f1 > best[0]:
            best = (f1, thr)
    return best


def test_perfect_and_inverted_maps_give_the_extreme_answers():
    rng = np.random.default_rng(0)
    truth = np.zeros((4, 16, 16), bool)
    truth[1, 4:9, 5:10] = truth[3, 10:14, 2:6] = True
    perfect = np.where(truth, 30.0, 0.0) + rng.uniform(0, 1, truth.shape)
    m = pixel_metrics(perfect, truth)
    assert m["auroc"] == 1.0 and m["ap"] == pytest.approx(1.0) and m["best_dice"] == 1.0
    assert perfect[~truth].max() < m["threshold"] <= perfect[truth].min()
    assert pixel_metrics(-perfect, truth)["auroc"] == 0.0


def test_f1_optimal_threshold_is_exact():
    rng = np.random.default_rng(1)
    for _ in range(5):
        truth = rng.uniform(size=500) < 0.2
        score = rng.normal(size=500) + 1.2 * truth
        m = pixel_metrics(score, truth)
        f1, thr = _brute_force_best_f1(score, truth)
        assert m["best_dice"] == pytest.approx(f1, abs=1e-12)
        assert m["threshold"] == thr


def test_region_restricts_the_pooled_pixels():
    truth = np.zeros((8, 8), bool)
    truth[2:4, 2:4] = True
    score = truth * 10.0
    score[6:, 6:] = 20.0  # a false alarm outside the region
    region = np.zeros_like(truth)
    region[:5, :5] = True
    assert pixel_metrics(score, truth, region)["best_dice"] == 1.0
    assert pixel_metrics(score, truth)["best_dice"] < 1.0
    assert pixel_metrics(score, truth, region)["pixels"] == 25


def test_lesion_detection_counts_3d_lesions_within_consecutive_slices():
    truth = np.zeros((4, 10, 10), bool)
    truth[0, 1:3, 1:3] = truth[1, 1:3, 1:3] = True  # one lesion on slices 5 and 6 of case a
    truth[1, 7:9, 7:9] = True  # a second lesion of case a
    truth[2, 1:3, 1:3] = True  # case a slice 9: not adjacent to 6, a third lesion
    truth[3, 4:6, 4:6] = True  # case b
    score = np.zeros(truth.shape)
    score[1, 2, 2] = 5.0  # touches the first lesion (on its second slice)
    score[3, 5, 5] = 5.0
    groups = [("a", 5), ("a", 6), ("a", 9), ("b", 1)]
    result = lesion_detection(score, truth, groups, threshold=5.0)
    assert result["lesions"] == 4 and result["found"] == 2 and result["rate"] == 0.5
    assert sorted(result["lesion_pixels"]) == [4, 4, 4, 8]
    assert lesion_detection(score, truth, groups, threshold=5.1)["found"] == 0


def test_slice_auroc():
    assert slice_auroc(np.array([3, 4, 1, 2]), np.array([1, 1, 0, 0])) == 1.0
    assert slice_auroc(np.array([1, 2, 3, 4]), np.array([1, 1, 0, 0])) == 0.0
    assert slice_auroc(np.array([1, 2]), np.array([1, 1])) is None


# --- repaint from a prompt (memory bank) ----------------------------------------------
