"""Depth spacing (``--depth-spacing-mm``): which slices of a thin-slice CT are inpainted,
how the others are filled in, and that 0 keeps every-slice detection.

Generated CTs (numpy + SimpleITK, 1 mm slices), the real AME and scoring code; the
network is either the random tiny model (engine paths) or an oracle that re-paints the
generated CT's own healthy version (what a perfect prior would give), so the tests see
the selection and the interpolation, not a model's quality. One thread.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import assert_same_detection, detect_as_ray_tasks
from GDPILiverAnomalyLib.method.depth import (
    depth_samples,
    interpolation_sources,
    min_component_pixels,
)
from GDPILiverAnomalyLib.method.grid import InputGrid
from GDPILiverAnomalyLib.method.parameters import DetectionParams

GRID = InputGrid(64, 3.5)
SLICES, PIXEL_MM = 30, 2.0
TUMOUR = (11, 15)  # slices [11, 15): 4 mm, between the regular samples 10 and 15 at S = 5
INFO = {"device": "cpu", "bf16": False, "batches": 0, "batch_size": 8, "nfe": 0,
        "timings_s": {"prepare": 0.0, "inpaint": 0.0}}  # fmt: skip


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def thin_case(tumour: bool = True) -> tuple[sitk.Image, sitk.Image, np.ndarray, np.ndarray]:
    """A 1 mm-slice CT (HU) of an abdomen filled with 60 HU liver tissue, a dark vessel
    (20 HU, 9 mm radius) through every slice and, with ``tumour``, a 14 mm-radius tumour
    100 HU darker on slices :data:`TUMOUR` only; its tumour-free twin, the liver mask
    (uint8) and the tumour mask (bool), ``[k, j, i]``."""
    shape = (96, 96)
    liver2d = _disc(shape, 48, 48, 40)
    vessel = _disc(shape, 48, 30, 4.5)
    spot = _disc(shape, 48, 64, 7)
    healthy = np.full((SLICES, *shape), -1000.0, np.float32)
    healthy[:, _disc(shape, 48, 48, 46)] = 60.0
    healthy[:, vessel] = 20.0
    ct = healthy.copy()
    lesion = np.zeros(ct.shape, bool)
    if tumour:
        lesion[TUMOUR[0] : TUMOUR[1], spot] = True
        ct[lesion] -= 100.0
    liver = np.broadcast_to(liver2d, ct.shape).astype(np.uint8)
    images = []
    for array in (ct, healthy):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((PIXEL_MM, PIXEL_MM, 1.0))
        images.append(image)
    return images[0], images[1], liver, lesion


def _params(**overrides) -> DetectionParams:
    return DetectionParams.from_preset(
        "fast",
        steps=4,
        jump_length=2,
        jump_n_sample=1,
        device="cpu",
        two_sided=False,
        **overrides,
    )


def _oracle(ct, healthy, liver, params):
    """The plan of ``ct`` and its grid images re-painted perfectly (the healthy twin's
    values on the paint masks of the images the plan inpaints; 0 elsewhere)."""
    from GDPILiverAnomalyLib.running.pipeline import plan_slices

    plan = plan_slices(ct, liver, GRID, params)
    twin = plan_slices(healthy, liver, GRID, params)
    diff = np.zeros_like(plan.ct_grid)
    work = plan.work
    diff[work] = np.where(plan.paint_grid[work] > 0, twin.ct_grid[work] - plan.ct_grid[work], 0)
    return plan, diff, work


# ---- the rules, on hand-made candidate stacks ----------------------------------------


def test_regular_samples_are_at_most_the_spacing_apart():
    """Candidates on every slice of 1 mm: the first and last slice and every third one
    between them at 3.5 mm (3 mm apart), every fifth at 5 mm; 0 = every slice."""
    cand = np.zeros((20, 8, 8), np.uint8)
    cand[:, 2:4, 2:4] = 1
    positions = np.arange(20.0)
    picked, counts = depth_samples(positions, cand, 3.5)
    assert np.flatnonzero(picked).tolist() == [0, 3, 6, 9, 12, 15, 18, 19]
    assert counts == {"regular": 8, "components": 0, "overlap": 0}
    assert np.flatnonzero(depth_samples(positions, cand, 5.0)[0]).tolist() == [0, 5, 10, 15, 19]
    assert depth_samples(positions, cand, 0.0)[0].all()
    cand[7:9] = 0  # slices without candidates are never inpainted nor interpolated
    picked, _ = depth_samples(positions, cand, 3.5)
    assert not picked[7:9].any() and np.diff(positions[picked]).max() <= 3.5
    sources, weight = interpolation_sources(positions, cand.any(axis=(1, 2)), picked)
    assert (sources[7:9] == -1).all() and (sources[picked] == -1).all()
    assert sources[1].tolist() == [0, 3] and weight[1] == pytest.approx(2 / 3)


def test_a_candidate_component_between_samples_gets_a_slice_and_small_ones_do_not():
    """A 3-D component that no regular sample crosses gets one slice (its largest); one
    too small to outlast the 5 x 5 median filter (12 pixels) does not."""
    assert min_component_pixels(5) == 13 and min_component_pixels(0) == 1
    cand = np.zeros((20, 16, 16), np.uint8)
    cand[:, 0:4, 0:4] = 1  # on every slice
    cand[10:12, 8:12, 8:12] = 1  # 16 px on slices 10 and 11, between samples 9 and 12
    cand[11, 8:12, 12:14] = 1  # slice 11 holds more of it
    cand[4, 10:13, 0:4] = 1  # 12 px on slice 4 only: too small
    picked, counts = depth_samples(np.arange(20.0), cand, 3.5, min_pixels=13)
    assert np.flatnonzero(picked).tolist() == [0, 3, 6, 9, 11, 12, 15, 18, 19]
    assert counts == {"regular": 8, "components": 1, "overlap": 0}


def test_a_slice_whose_candidates_its_neighbours_lack_is_inpainted():
    """Candidates that move across the slices: a slice sharing less than half of its
    candidates with each inpainted neighbour is inpainted too."""
    cand = np.zeros((7, 16, 16), np.uint8)
    for k in range(7):  # one 4 x 4 square per slice, moving 2 pixels a slice: one component
        cand[k, 4:8, 2 * k : 2 * k + 4] = 1
    picked, counts = depth_samples(np.arange(7.0), cand, 3.5)
    # regular 0, 3, 6; slice 1 shares half with slice 0 (kept out); 2 shares none with 0
    # and half with 3 (kept out); 4 and 5 likewise
    assert np.flatnonzero(picked).tolist() == [0, 3, 6] and counts["overlap"] == 0
    wide = np.zeros((7, 16, 24), np.uint8)
    for k in range(7):  # moving 3 pixels a slice: a quarter shared, still one component
        wide[k, 4:8, 3 * k : 3 * k + 4] = 1
    picked, counts = depth_samples(np.arange(7.0), wide, 3.5)
    assert picked.all() and counts == {"regular": 3, "components": 0, "overlap": 4}


# ---- the pipeline ---------------------------------------------------------------------


def test_a_tumour_between_two_regular_samples_is_found():
    """1 mm slices, spacing 5 mm: the regular samples are slices 0, 5, ..., 25, 29 and the
    tumour lies on slices 11-14 only. Its own candidate component gets one inpainted
    slice (8 in all), the other three are interpolated, and with a perfect re-painting
    the score over the whole tumour is above the threshold after the 3-D smoothing."""
    from GDPILiverAnomalyLib.running.pipeline import finish_detection

    ct, healthy, liver, lesion = thin_case()
    params = _params(depth_spacing_mm=5.0)
    plan, diff, work = _oracle(ct, healthy, liver, params)
    tumour_images = set(range(*TUMOUR))
    assert plan.depth_counts == {"regular": 7, "components": 1, "overlap": 0}
    assert len(work) == 8 and len(tumour_images & set(work)) == 1
    assert set(plan.interpolated()) == set(range(SLICES)) - set(work)
    result = finish_detection(plan, diff, work, INFO, 0.0)
    assert result.stats["depth_sampling"] == {
        "spacing_mm": 5.0,
        "images_with_candidates": SLICES,
        "inpainted_by_rule": {"regular": 7, "components": 1, "overlap": 0},
        "interpolated": SLICES - 8,
    }
    core = lesion & (np.abs(np.arange(96)[None, None, :] - 64) <= 3)  # away from its edge
    core &= np.abs(np.arange(96)[None, :, None] - 48) <= 3
    assert result.score[core].min() > params.threshold_hu
    assert not result.anomaly[:, :, :40].any()  # nothing at the vessel


def test_interpolation_is_needed_for_the_tumour():
    """The same plan with the skipped slices left empty (no interpolation): the tumour
    slices that were not inpainted score nothing of their own."""
    from GDPILiverAnomalyLib.running.pipeline import finish_detection

    ct, healthy, liver, lesion = thin_case()
    params = _params(depth_spacing_mm=5.0, depth_sigma_mm=0.0)
    plan, diff, work = _oracle(ct, healthy, liver, params)
    with_fill = finish_detection(plan, diff, work, INFO, 0.0)
    empty = dataclasses.replace(plan, sources=np.full_like(plan.sources, -1))
    without = finish_detection(empty, diff, work, INFO, 0.0)
    skipped = sorted(set(range(*TUMOUR)) - set(work))
    assert len(skipped) == 3
    for k in skipped:
        assert with_fill.score[k][lesion[k]].mean() > 50
        assert without.score[k][lesion[k]].max() == 0


def test_spacing_zero_inpaints_every_slice_with_candidates_as_before():
    """``--depth-spacing-mm 0``: every grid image with candidates is inpainted (the
    selection of the code before depth spacing), nothing is interpolated, and the
    outputs do not depend on the interpolation code at all (bit for bit)."""
    from GDPILiverAnomalyLib.running.pipeline import finish_detection, slices_to_inpaint

    ct, healthy, liver, _ = thin_case()
    params = _params(depth_spacing_mm=0.0)
    plan, diff, work = _oracle(ct, healthy, liver, params)
    assert work == slices_to_inpaint(plan.cand_grid) == list(range(SLICES))
    assert not len(plan.interpolated())
    result = finish_detection(plan, diff, work, INFO, 0.0)
    other = finish_detection(plan, diff, work, INFO, 0.0, interpolate="score")
    assert np.array_equal(result.score, other.score)
    assert result.stats["depth_sampling"]["interpolated"] == 0


def test_detect_with_depth_spacing_end_to_end(tmp_path, tiny_checkpoint):
    """``gdpi detect --depth-spacing-mm 5`` with the random tiny model: fewer network
    batches than at 0, progress counts every grid image, run.json records the spacing
    and what was inpainted; the Ray engine's tasks (plain functions, packed batches of
    another size) give the same outputs voxel for voxel."""

    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.running.runner import CaseInputs, run_case

    ct, _, liver, _ = thin_case()
    paths = tmp_path / "ct.nrrd", tmp_path / "liver.nrrd"
    sitk.WriteImage(ct, str(paths[0]))
    mask = sitk.GetImageFromArray(liver)
    mask.CopyInformation(ct)
    sitk.WriteImage(mask, str(paths[1]))
    checkpoint = load_checkpoint(tiny_checkpoint)
    params = _params(depth_spacing_mm=5.0, batch_size=4)
    seen = []
    info = run_case(*paths, checkpoint, params, tmp_path / "local", progress=seen.append)
    stats = info["stats"]
    assert info["parameters"]["depth_spacing_mm"] == 5.0
    assert stats["slices_inpainted"] == 8 and stats["batches"] == 2
    assert stats["depth_sampling"]["interpolated"] == SLICES - 8
    assert seen[0].slices_done == SLICES - 8 and seen[-1].slices_done == SLICES
    assert seen[-1].nfe_total == 2 * params.nfe_per_batch()
    on_disk = json.loads((tmp_path / "local" / "run.json").read_text())
    assert on_disk["parameters"]["depth_spacing_mm"] == 5.0

    out = tmp_path / "ray"
    _, inpainted = detect_as_ray_tasks(CaseInputs(*paths), checkpoint, params, 3, out)
    assert inpainted == 8
    assert_same_detection(tmp_path / "local", out, params.threshold_hu)
