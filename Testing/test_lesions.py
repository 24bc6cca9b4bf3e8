"""Lesion-level FROC and bootstrap intervals, on volumes whose components are counted by hand."""

import numpy as np
import pytest
from GDPILiverAnomalyLib.method.lesions import (
    FROC_RATES,
    ScanVolume,
    at_threshold,
    bootstrap_pixel_metrics,
    bootstrap_weights,
    lesion_figures,
    sweep,
    volumes_from_slices,
)
from sklearn.metrics import average_precision_score, roc_auc_score


def _two_scans() -> list[ScanVolume]:
    """Scan a (3 x 10 x 10, 0.2 mL voxels): lesions L1 (4 voxels, 0.8 mL), L2 (6, 1.2 mL)
    and L3 (60, 12 mL); one component (30) over L1 and L2; L3 split into two components
    (12) of one row each; two one-voxel false positives (40, 15). Scan b: no lesion, one
    false positive (20, 2 x 2 voxels)."""
    truth = np.zeros((3, 10, 10), np.uint8)
    truth[0, 1:3, 1:3] = 1  # L1
    truth[0, 1:3, 5:8] = 1  # L2 (two columns clear of L1)
    truth[1:3, 5:10, 4:10] = 1  # L3
    score = np.zeros((3, 10, 10))
    score[0, 1:3, 1:8] = 30.0  # one component over L1 and L2
    score[2, 5, 4:10] = 12.0  # L3, first piece
    score[2, 9, 4:10] = 12.0  # L3, second piece (rows 6-8 in between: not connected)
    score[2, 0, 9] = 40.0  # false positive, one voxel
    score[1, 5, 0] = 15.0  # false positive, one voxel
    liver = np.ones_like(truth)
    b_score = np.zeros((2, 10, 10))
    b_score[0, 4:6, 4:6] = 20.0
    healthy = np.zeros((2, 10, 10), np.uint8)
    return [
        ScanVolume("a", score, liver, truth, 0.2),
        ScanVolume("b", b_score, np.ones_like(healthy), healthy, 0.2),
    ]


def test_sweep_counts_components_lesions_and_false_positives_as_by_hand():
    result = sweep(_two_scans(), thresholds=[50, 35, 25, 17, 13, 5])
    assert result.thresholds.tolist() == [50, 35, 25, 17, 13, 5]  # descending
    assert len(result.lesion_scan) == 3  # L3 split over two components is one lesion
    np.testing.assert_allclose(result.lesion_ml, [0.8, 1.2, 12.0])
    # false positives of scan a and of scan b at each threshold (score > t)
    assert result.fp.tolist() == [[0, 0], [1, 0], [1, 0], [1, 1], [2, 1], [2, 1]]
    # one component over L1 and L2 finds both; L3's two pieces find it and are no FP
    assert result.found.astype(int).tolist() == [
        [0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]
    ]  # fmt: skip
    assert result.components.tolist() == [0, 1, 2, 3, 4, 6]
    fp_rate, sens = result.curve()
    assert fp_rate.tolist() == [0, 0.5, 0.5, 1.0, 1.5, 1.5]
    np.testing.assert_allclose(sens, [0, 0, 2 / 3, 2 / 3, 2 / 3, 1])
    # a minimum size drops the two one-voxel false positives (and nothing else)
    sized = sweep(_two_scans(), thresholds=[50, 35, 25, 17, 13, 5], min_voxels=2)
    assert sized.fp.tolist() == [[0, 0], [0, 0], [0, 0], [0, 1], [0, 1], [0, 1]]
    np.testing.assert_array_equal(sized.found, result.found)


def test_figures_at_one_threshold_match_the_hand_count():
    """At 17 HU (as by hand above): L1 and L2 found, L3 not; scan a one false positive
    (40), scan b one (20): sensitivity 2/3, 1 FP per scan; by size L1 < 1 mL found,
    L2 1-10 mL found, L3 > 10 mL missed. At 5 HU everything is found."""
    at = at_threshold(_two_scans(), 17.0, resamples=200)
    assert (at["lesions"], at["found"], at["scans"], at["components"]) == (3, 2, 2, 3)
    assert at["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert at["fp_per_scan"]["value"] == pytest.approx(1.0)
    assert at["sensitivity"]["low"] <= 2 / 3 <= at["sensitivity"]["high"]
    found = {name: (c["found"], c["lesions"]) for name, c in at["by_size"].items()}
    assert found == {"<1 mL": (1, 1), "1-10 mL": (1, 1), ">10 mL": (0, 1)}
    low = at_threshold(_two_scans(), 5.0, resamples=0)
    assert low["sensitivity"]["value"] == 1.0 and low["fp_per_scan"]["value"] == 1.5
    assert low["sensitivity"]["low"] is None  # no resamples: no interval


def test_thresholds_that_flag_much_of_the_liver_are_not_swept():
    # at t = -1 every voxel is detected: scan a is one component over all three lesions
    # (sensitivity 1, no false positive); a detector that flags the liver is no detector
    loose = sweep(_two_scans(), thresholds=[25, -1], max_liver_fraction=None)
    assert loose.curve()[1].tolist() == [2 / 3, 1.0] and loose.fp[1].tolist() == [0, 1]
    capped = sweep(_two_scans(), thresholds=[25, -1])  # default: at most 10 % of the liver
    assert capped.thresholds.tolist() == [25]
    figures = lesion_figures(_two_scans(), resamples=10, max_liver_fraction=0.05)
    assert figures["curve"]["threshold"][-1] >= 12  # 6.4 % of the liver scores > 0


def test_froc_points_mean_and_size_classes_match_the_hand_count():
    figures = lesion_figures(_two_scans(), resamples=200)
    assert figures["scans"] == 2 and figures["lesions"] == 3
    expected = {0.125: 0, 0.25: 0, 0.5: 2 / 3, 1.0: 2 / 3, 2.0: 1, 4.0: 1, 8.0: 1}
    for rate in FROC_RATES:
        assert figures["froc"][str(rate)]["value"] == pytest.approx(expected[rate])
    assert figures["froc"]["mean"]["value"] == pytest.approx(13 / 21)
    # the operating point of 0.5 FP/scan: the highest threshold that finds L1 and L2
    at = figures["at"]["0.5"]
    assert at["found"] == 2 and at["fp_per_scan"] == 0.5 and 20 <= at["threshold"] < 30
    assert figures["at"]["2.0"]["found"] == 3 and figures["at"]["2.0"]["threshold"] < 12
    # at 1 FP/scan L3 (> 10 mL) is still missed
    assert figures["by_size"] == {
        "<1 mL": {"lesions": 1, "found": 1, "sensitivity": 1.0},
        "1-10 mL": {"lesions": 1, "found": 1, "sensitivity": 1.0},
        ">10 mL": {"lesions": 1, "found": 0, "sensitivity": 0.0},
    }
    curve = figures["curve"]
    assert len(curve["threshold"]) == len(curve["fp_per_scan"]) == len(curve["sensitivity"])
    for key, ci in figures["froc"].items():
        assert ci["low"] <= ci["value"] <= ci["high"], key


def test_volumes_from_slices_splits_cases_and_gaps_and_keeps_spacing():
    truth = np.zeros((4, 6, 6), np.uint8)
    truth[0:2, 1:3, 1:3] = 1  # case a slices 5, 6: one lesion
    truth[2, 1:3, 1:3] = 1  # case a slice 9: a gap, another volume, another lesion
    score = truth * 10.0
    groups = [("a", 5), ("a", 6), ("a", 9), ("b", 1)]
    volumes = volumes_from_slices(score, np.ones_like(truth), truth, groups, {"a": 0.5, "b": 1})
    assert [(v.scan, len(v.score), v.voxel_ml) for v in volumes] == [
        ("a", 2, 0.5), ("a", 1, 0.5), ("b", 1, 1)
    ]  # fmt: skip
    result = sweep(volumes, thresholds=[5])
    assert result.scans == ["a", "b"] and result.found.tolist() == [[True, True]]
    np.testing.assert_allclose(result.lesion_ml, [4.0, 2.0])


def test_no_lesions_and_no_liver_are_answered_without_figures():
    scans = _two_scans()[1:]
    figures = lesion_figures(scans, resamples=10)
    assert figures["lesions"] == 0 and figures["froc"] is None
    empty = ScanVolume("e", np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), np.ones((2, 4, 4)))
    result = sweep([empty])
    assert result.found.shape[1] == 1 and not result.found.any()


def test_single_scan_gives_no_interval():
    figures = lesion_figures(_two_scans()[:1], resamples=50)
    mean = figures["froc"]["mean"]
    assert mean["value"] is not None and mean["low"] is None and mean["high"] is None


def test_bootstrap_weights_are_seeded_resamples_with_replacement():
    w = bootstrap_weights(4, 300, seed=3)
    assert w.shape == (300, 4) and (w.sum(axis=1) == 4).all()
    np.testing.assert_array_equal(w, bootstrap_weights(4, 300, seed=3))
    assert not np.array_equal(w, bootstrap_weights(4, 300, seed=4))


def test_pixel_bootstrap_matches_sklearn_and_holds_the_estimate():
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=(6, 12, 12)) < 0.15
    score = rng.normal(size=truth.shape) + 1.0 * truth
    score[2] = np.round(score[2])  # ties
    region = np.ones(truth.shape, bool)
    region[:, :2] = False
    scans = ["p1", "p1", "p2", "p3", "p3", "p4"]
    out = bootstrap_pixel_metrics(score, truth, scans, region, resamples=300)
    s, t = score[region], truth[region]
    assert out["auroc"]["value"] == pytest.approx(roc_auc_score(t, s), abs=1e-12)
    assert out["ap"]["value"] == pytest.approx(average_precision_score(t, s), abs=1e-12)
    for name in ("auroc", "ap"):
        ci = out[name]
        assert ci["low"] <= ci["value"] <= ci["high"] and ci["high"] - ci["low"] > 0
    assert out["scans"] == 4
    # a resample of healthy scans only has no AUROC: left out, not a crash
    truth_one = np.zeros_like(truth)
    truth_one[0, 5, 5] = True
    few = bootstrap_pixel_metrics(score, truth_one, scans, resamples=100)
    assert few["auroc"]["resamples"] < 100
    single = bootstrap_pixel_metrics(score[:2], truth[:2], scans[:2], resamples=100)
    assert single["auroc"]["low"] is None and single["auroc"]["value"] is not None


def test_pixel_bootstrap_uses_every_resample_when_every_scan_has_tumour():
    rng = np.random.default_rng(2)
    truth = np.zeros((3, 16, 16), bool)
    truth[:, 4:8, 4:8] = True
    score = rng.normal(size=truth.shape) + 2.0 * truth
    out = bootstrap_pixel_metrics(score, truth, ["a", "b", "c"], resamples=200)
    assert out["auroc"]["resamples"] == out["ap"]["resamples"] == 200
