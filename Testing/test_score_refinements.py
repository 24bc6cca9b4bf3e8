"""Bias calibration, 3-D consistency and K-sample averaging, on arrays with known answers."""

import numpy as np
import pytest
from conftest import assert_same_hu
from GDPILiverAnomalyLib.method.calibration import (
    REFERENCE_MARGIN_PX,
    reference_patches,
    remove_bias,
)
from GDPILiverAnomalyLib.method.scoring import finish_score, smooth_across_slices
from scipy import ndimage


def _liver_and_candidates():
    liver = np.zeros((3, 40, 40), np.uint8)
    liver[:, 5:35, 5:35] = 1
    cand = np.zeros_like(liver)
    cand[0, 10:16, 10:16] = 1
    cand[1, 20:30, 20:30] = 1  # slice 2: no candidates
    return liver, cand


def test_reference_patches_lie_in_free_liver_and_are_seeded_per_slice():
    liver, cand = _liver_and_candidates()
    refs = reference_patches(liver, cand, [11, 12, 13])
    assert refs[0].any() and refs[1].any() and not refs[2].any()  # none without candidates
    assert not (refs & (1 - liver)).any()  # inside the liver
    in_plane = ndimage.generate_binary_structure(2, 1)[None]
    near = ndimage.binary_dilation(cand > 0, in_plane, iterations=REFERENCE_MARGIN_PX)
    assert not (refs.astype(bool) & near).any()  # away from candidates
    again = reference_patches(liver[::-1], cand[::-1], [13, 12, 11])[::-1]
    assert np.array_equal(refs, again)  # a slice's patches depend on its seed, not order


def test_remove_bias_subtracts_the_scans_reference_median_on_candidates_only():
    liver, cand = _liver_and_candidates()
    refs = reference_patches(liver, cand, [1, 2, 3])
    diff = np.zeros(liver.shape, np.float32)
    diff[cand > 0] = 25.0
    painted = (cand > 0) | (refs > 0)
    diff[painted] -= 4.0  # the prior paints this scan 4 HU too dark
    corrected, found = remove_bias(diff, cand, refs)
    assert np.allclose(found, -4.0)
    assert np.allclose(corrected[cand > 0], 25.0)  # the tumour's true difference
    assert np.all(corrected[refs > 0] == 0) and np.all(corrected[(cand == 0) & (refs == 0)] == 0)
    # two scans in one stack (an evaluation): each gets its own bias
    diff[0][painted[0]] -= 6.0
    _, found = remove_bias(diff, cand, refs, groups=["a", "b", "b"])
    assert np.allclose(found, [-10.0, -4.0, -4.0])


def test_smoothing_across_slices_has_known_weights_and_respects_groups():
    score = np.zeros((4, 2, 2), np.float32)
    score[1] = 10.0
    positions = np.array([0.0, 5.0, 10.0, 15.0])
    out = smooth_across_slices(score, positions, 5.0, groups=["a", "a", "a", "b"])
    w = np.exp(-0.5)  # neighbour at one sigma
    assert np.allclose(out[1], 10.0 / (1 + 2 * w))
    # end of the volume: normalised over the slices there (0, 5 and 10 mm away)
    assert np.allclose(out[0], 10.0 * w / (1 + w + np.exp(-2.0)))
    assert np.allclose(out[3], 0.0)  # another case never mixes in
    flat = np.full((5, 3, 3), 7.0, np.float32)
    assert np.allclose(smooth_across_slices(flat, np.arange(5) * 2.5, 3.0), 7.0)
    assert smooth_across_slices(score, positions, 0.0) is score  # 0 = off


def test_two_sided_scoring_per_slice():
    diff = np.stack([np.full((4, 4), -10.0), np.full((4, 4), -10.0)]).astype(np.float32)
    out = finish_score(diff, np.array([True, False]), 0)
    assert np.all(out[0] == 10.0) and np.all(out[1] == -10.0)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_k_samples_average_independent_inpaintings(tiny_checkpoint, quick_params, batch_size):
    import torch
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.method.repaint import slice_seeds
    from GDPILiverAnomalyLib.running.pipeline import inpaint_grid

    ckpt = load_checkpoint(tiny_checkpoint)
    rng = np.random.default_rng(0)
    images = rng.normal(60, 20, (3, 64, 64)).astype(np.float32)
    mask = np.zeros(images.shape, np.uint8)
    mask[:, 20:40, 20:40] = 1
    ids = [4, 9, 17]
    batches = [list(range(3))[i : i + batch_size] for i in range(0, 3, batch_size)]
    run = lambda seeds: inpaint_grid(  # noqa: E731
        images, mask, ckpt, quick_params, torch.device("cpu"), batches, seeds
    )
    first, second = (run([slice_seeds(0, ids, k)]) for k in (0, 1))
    both = run([slice_seeds(0, ids, 0), slice_seeds(0, ids, 1)])
    assert not np.allclose(first, second)
    assert_same_hu(both, (first + second) / 2)
