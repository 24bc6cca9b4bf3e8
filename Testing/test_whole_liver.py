"""The whole liver is analysed: a liver wider than the model grid's field of view
(64 px x 3.5 mm = 224 mm) is covered by overlapping sliding windows, blended where they
overlap; a liver that fits keeps its single window and today's outputs voxel for voxel.

Generated CTs (numpy + SimpleITK), a random tiny model on the demo model's grid and a
short schedule, one thread.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, assert_same_detection, detect_as_ray_tasks, shared
from GDPILiverAnomalyLib.method.grid import InputGrid, PlaneMapping
from GDPILiverAnomalyLib.method.parameters import DetectionParams

GRID = InputGrid(64, 3.5)  # the demo model's: 224 mm field of view
PIXEL_MM, SLICE_MM, SIZE = 2.0, 5.0, 210  # 420 mm in-plane
TUMOUR_X_MM = 135.0  # right of the liver's centre: beyond today's +-110 mm
VOLUMES = ("score.nrrd", "pseudo_healthy.nrrd", "candidates.nrrd", "anomaly.nrrd")
#: The commit before sliding windows: the reference for "unchanged voxel for voxel".
BEFORE = "6b23596f429802bb5916c7bd24a4ec559769b59c"


def wide_case(
    width_mm: float, height_mm: float = 140.0, slices: int = 5, tumour: bool = True, seed: int = 0
) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """A CT (HU) with an elliptic liver ``width_mm`` x ``height_mm`` (105 HU, textured)
    in an abdomen, its liver mask and a 30 mm tumour 60 HU darker than the liver centred
    :data:`TUMOUR_X_MM` right of the liver's centre (uint8 masks, ``[k, j, i]``)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    y, x = (yy - (SIZE - 1) / 2) * PIXEL_MM, (xx - (SIZE - 1) / 2) * PIXEL_MM
    ct = np.full((slices, SIZE, SIZE), -1000.0, np.float32)
    for (ry, rx), hu in (((135, 205), -100.0), ((120, 190), 45.0), ((110, 180), -85.0)):
        ct[:, (x / rx) ** 2 + (y / ry) ** 2 <= 1] = hu  # fat, wall muscle, visceral fat
    liver = np.zeros(ct.shape, np.uint8)
    liver[1:-1, (x / (width_mm / 2)) ** 2 + (y / (height_mm / 2)) ** 2 <= 1] = 1
    ct[liver > 0] = 105.0 + rng.normal(0, 6, int(liver.sum()))
    lesion = np.zeros(ct.shape, np.uint8)
    if tumour:
        lesion[1:-1, (x - TUMOUR_X_MM) ** 2 + y**2 <= 15**2] = 1
        ct[lesion > 0] -= 60.0
    ct += rng.normal(0, 10, ct.shape).astype(np.float32)
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((PIXEL_MM, PIXEL_MM, SLICE_MM))
    return image, liver, lesion


def _params(**overrides) -> DetectionParams:
    """The fast preset with a 4-step schedule (4 NFE per batch), on the CPU."""
    settings = dict(steps=4, jump_length=1, jump_n_sample=1, device="cpu")
    return DetectionParams.from_preset("fast", **{**settings, **overrides})


def _save(folder: Path, ct: sitk.Image, liver: np.ndarray) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mask = sitk.GetImageFromArray(liver)
    mask.CopyInformation(ct)
    sitk.WriteImage(ct, str(folder / "ct.nrrd"))
    sitk.WriteImage(mask, str(folder / "liver.nrrd"))
    return folder / "ct.nrrd", folder / "liver.nrrd"


@pytest.fixture(scope="module")
def grid_checkpoint(tmp_path_factory) -> Path:
    """A random tiny model on the demo model's grid (64 px at 3.5 mm)."""
    from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny_3p5.safetensors"
    return save_checkpoint(init_checkpoint("tiny", seed=0, grid=GRID), path)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, grid_checkpoint):
    """``run_case`` (the local engine) on a 320 mm liver with a tumour outside today's
    window, with its progress reports."""
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.running.runner import run_case

    root = tmp_path_factory.mktemp("wide")
    ct, liver, lesion = wide_case(320)
    ct_path, liver_path = _save(root / "in", ct, liver)
    reports = []
    params = _params(batch_size=4)
    info = run_case(ct_path, liver_path, load_checkpoint(grid_checkpoint), params,
                    root / "local", progress=reports.append)  # fmt: skip
    return {"ct": ct, "liver": liver, "lesion": lesion, "paths": (ct_path, liver_path),
            "out": root / "local", "info": info, "reports": reports, "params": params}  # fmt: skip


def _read(folder: Path, name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name)))


def test_todays_single_window_misses_the_tumour_of_a_320_mm_liver():
    """The premise: centred on the liver, one 224 mm window leaves the tumour out."""
    _, liver, lesion = wide_case(320)
    mapping = PlaneMapping.for_volume(GRID, (SIZE, SIZE), (PIXEL_MM, PIXEL_MM), liver)
    covered = mapping.coverage((SIZE, SIZE))
    assert not covered[lesion.any(axis=0) > 0].any()
    assert np.count_nonzero(liver.any(axis=0) & ~covered) > 1000


@pytest.mark.parametrize("width_mm, height_mm", [(230, 140), (320, 140), (400, 140), (400, 300)])
def test_sliding_windows_cover_every_liver_voxel_up_to_400_mm(width_mm, height_mm):
    from GDPILiverAnomalyLib.method.repaint import slice_seeds
    from GDPILiverAnomalyLib.running.pipeline import plan_slices

    ct, liver, _ = wide_case(width_mm, height_mm, tumour=False)
    params = _params(samples=2)
    plan = plan_slices(ct, liver, GRID, params)
    assert plan.liver_outside_windows() == 0
    n = len(plan.liver_slices)
    expected = 9 if height_mm > 224 else 3  # the centre and 1 window each side, per axis
    assert len(plan.windows) == expected
    assert (plan.windows_per_slice() > 1).all()
    assert len(plan.cand_grid) == len(plan.ct_grid) == len(plan.image_slice) > n
    # window 0 is today's grid, every slice in order, seeded as today
    assert plan.windows[0] == plan.mapping
    assert list(plan.image_slice[:n]) == list(range(n)) and not plan.image_window[:n].any()
    for k in range(params.samples):
        assert plan.seeds[k][:n] == slice_seeds(params.seed, plan.liver_slices, k)
    every = [s for seeds in plan.seeds for s in seeds]
    assert len(set(every)) == len(every)  # each window image its own noise
    # neighbouring windows overlap by at least a quarter of the field of view
    fov = GRID.size * GRID.spacing_mm / PIXEL_MM  # CT pixels
    columns = sorted({w.centre[1] for w in plan.windows})
    assert (np.diff(columns) <= 0.75 * fov).all()


def test_network_work_grows_only_on_slices_wider_than_the_grid():
    """A liver 320 mm wide on two slices and 180 mm on the others: the narrow slices
    keep their one window, and only grid images with candidates cost network work."""
    from GDPILiverAnomalyLib.running.pipeline import plan_batches, plan_slices

    ct, liver, _ = wide_case(320, slices=8, tumour=False)
    narrow, narrow_liver, _ = wide_case(180, slices=8, tumour=False)
    liver[3:-1] = narrow_liver[3:-1]
    array = sitk.GetArrayFromImage(ct)
    array[3:-1] = sitk.GetArrayFromImage(narrow)[3:-1]
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    plan = plan_slices(image, liver, GRID, _params())
    assert list(plan.windows_per_slice()) == [3, 3, 1, 1, 1, 1]
    assert plan.liver_outside_windows() == 0
    images = len(plan.image_slice)
    assert images == 6 + 2 * 2
    batches = plan_batches(plan.cand_grid, 4)
    assert sorted(i for b in batches for i in b) == [
        i for i in range(images) if plan.cand_grid[i].any()
    ]


def test_blending_is_a_weighted_mean_of_the_windows():
    """Constant window values come back unchanged on every liver voxel; where windows
    overlap the value lies between theirs, weighted towards each window's centre."""
    from GDPILiverAnomalyLib.running.pipeline import plan_slices

    ct, liver, _ = wide_case(320, tumour=False)
    plan = plan_slices(ct, liver, GRID, _params())
    images = np.arange(len(plan.image_slice))
    shape = (len(images), GRID.size, GRID.size)
    slab_liver = plan.slab_liver > 0
    same = plan.to_slab(np.full(shape, 7.0, np.float32), images)
    assert np.allclose(same[slab_liver], 7.0, atol=1e-4) and not same[~slab_liver].any()
    by_window = plan.to_slab(
        np.broadcast_to(plan.image_window[:, None, None], shape).astype(np.float32), images
    )
    values = by_window[slab_liver]
    assert values.min() >= 0 and values.max() <= 2 + 1e-4
    row, (mid, centre) = plan.in_slab[0], (int(c) for c in plan.mapping.centre)
    assert [w.centre[1] < centre for w in plan.windows[1:]] == [True, False]  # left, right
    at = by_window[row, mid]  # along the middle row of the liver
    assert 0 < at[centre] < 1  # window 0 weighs most at its centre
    assert at[30] == pytest.approx(1, abs=1e-4)  # only the left window reaches there
    assert at[SIZE - 31] == pytest.approx(2, abs=1e-4)


def test_a_320_mm_liver_is_analysed_everywhere(wide_run):
    """The tumour beyond today's window is an AME candidate, inpainted and scored;
    run.json says no liver voxel was left out and how many windows it took; the NFE and
    progress totals count the extra window images."""
    info, out, lesion = wide_run["info"], wide_run["out"], wide_run["lesion"] > 0
    stats = info["stats"]
    assert stats["liver_outside_grid_voxels"] == 0
    assert stats["windows"]["windows"] == 3
    assert stats["windows"]["slices_by_windows"] == {"3": 3}
    assert stats["windows"]["grid_images"] == 9
    assert stats["slices_inpainted"] == 9  # grid images: each slice on its 3 windows
    nfe_batch = wide_run["params"].nfe_per_batch()
    assert stats["batches"] == 3 and info["nfe"] == 3 * nfe_batch  # 9 images, batches of 4
    last = wide_run["reports"][-1]
    assert (last.nfe_done, last.nfe_total) == (info["nfe"], info["nfe"])
    assert last.slices_total == last.slices_done == 9
    candidates, score = _read(out, "candidates.nrrd"), _read(out, "score.nrrd")
    pseudo = _read(out, "pseudo_healthy.nrrd")
    ct = sitk.GetArrayFromImage(wide_run["ct"])
    assert candidates[lesion].mean() > 0.95
    assert np.count_nonzero(score[lesion]) > 0.9 * lesion.sum()
    assert np.count_nonzero(pseudo[lesion] != ct[lesion]) > 0.9 * lesion.sum()
    assert not score[wide_run["liver"] == 0].any()


def test_the_ray_engine_gives_the_local_outputs_on_a_wide_liver(wide_run, grid_checkpoint):
    """Ray's tasks and model worker as plain functions (what Ray runs), the window images
    packed into batches of another size: the local engine's outputs voxel for voxel."""
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.running.runner import CaseInputs

    checkpoint, params = load_checkpoint(grid_checkpoint), wide_run["params"]
    out = wide_run["out"].parent / "ray"
    info, inpainted = detect_as_ray_tasks(
        CaseInputs(*wide_run["paths"]), checkpoint, params, 5, out
    )
    assert inpainted == 9 and info["stats"]["liver_outside_grid_voxels"] == 0
    assert_same_detection(wide_run["out"], out, params.threshold_hu)


def test_the_demo_model_finds_the_tumour_outside_todays_window():
    """With the bundled demo model (trained on healthy synthetic abdomens, same grid) and
    a 20-step schedule, a lesion is detected over the tumour beyond today's window (its
    score above the threshold), and hardly anything elsewhere in the liver."""
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.method.scoring import lesion_labels
    from GDPILiverAnomalyLib.running.pipeline import detect

    demo = REPO / "GDPILiverAnomaly" / "GDPILiverAnomalyLib" / "models" / "demo.safetensors"
    checkpoint = load_checkpoint(demo)
    assert checkpoint.grid == GRID
    ct, liver, lesion = wide_case(320)
    params = _params(steps=20, jump_length=5, jump_n_sample=2, batch_size=9)
    result = detect(ct, liver, checkpoint, params)
    assert result.stats["liver_outside_grid_voxels"] == 0
    labels, n = lesion_labels(result.anomaly, result.score)
    hits = set(np.unique(labels[lesion > 0])) - {0}
    assert hits, "no detection over the tumour"
    assert max(x.max_score_hu for x in result.lesions if x.id in hits) > params.threshold_hu
    healthy = (liver > 0) & (lesion == 0)
    assert result.anomaly[healthy].mean() < 0.01


_REFERENCE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import SimpleITK as sitk
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.files.volumes import read_ct, read_liver_mask
    from GDPILiverAnomalyLib.method.parameters import DetectionParams
    from GDPILiverAnomalyLib.running.pipeline import detect

    ckpt, ct_path, liver_path, label, out, variants = sys.argv[1:]
    checkpoint = load_checkpoint(ckpt)
    ct = read_ct(ct_path)
    liver = read_liver_mask(liver_path, ct, int(label) or None)
    arrays = {}
    settings = dict(steps=4, jump_length=1, jump_n_sample=1, device="cpu", batch_size=7,
                    bf16=False)  # float32 in both: same batches, so the same bits
    every = (("default", {}), ("two", dict(samples=2, two_sided=True)))
    for tag, extra in every[: int(variants)]:
        result = detect(ct, liver, checkpoint, DetectionParams.from_preset(
            "fast", **settings, **extra))
        for name in ("score", "pseudo_healthy", "candidates", "anomaly"):
            arrays[tag + "_" + name] = getattr(result, name)
    np.savez(out, **arrays)
    """
)


def _code_before(tmp: Path) -> Path:
    """The engine as it was before sliding windows (:data:`BEFORE`), from git."""
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", str(REPO), "cat-file", "-e", BEFORE + "^{commit}"],
                                     capture_output=True).returncode:  # fmt: skip
        pytest.skip(f"commit {BEFORE[:7]} is not in this checkout's history (shallow clone)")
    tmp.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run([git, "-C", str(REPO), "archive", BEFORE, "GDPILiverAnomaly"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp / "GDPILiverAnomaly"


def _outputs(code: Path, ckpt: Path, ct: Path, liver: Path, label: int, out: Path,
             variants: int) -> dict:  # fmt: skip
    """Outputs of ``detect`` by the engine in ``code``: the default settings, and with
    ``variants`` 2 also two inpaintings per slice with two-sided AME."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, str(ckpt), str(ct), str(liver),
                    str(label), str(out), str(variants)], env=env, check=True,
                   timeout=600)  # fmt: skip
    with np.load(out) as arrays:
        return dict(arrays)


@pytest.mark.parametrize("case", ["synthetic", "ts_small"])
def test_a_normal_size_liver_gives_the_outputs_of_before_voxel_for_voxel(
    case, tmp_path, grid_checkpoint
):
    """The code before sliding windows and now, each in its own process, on a liver that
    fits the grid: the same score, pseudo-healthy image, candidates and anomaly mask."""
    if case == "synthetic":
        from GDPILiverAnomalyLib.files.synthetic import synthetic_case

        made = synthetic_case(7)
        ct, liver = _save(tmp_path / "in", made.image(made.ct), made.liver)
        label, variants = 0, 2
    else:  # a real CT and its TotalSegmentator liver (label 5)
        ct, liver = shared("ts_small", "ct.nii.gz"), shared("ts_small", "totalseg.nii.gz")
        label, variants = 5, 1
    before = _code_before(tmp_path / "before")
    args = (grid_checkpoint, ct, liver, label)
    old = _outputs(before, *args, tmp_path / "old.npz", variants)
    new = _outputs(REPO / "GDPILiverAnomaly", *args, tmp_path / "new.npz", variants)
    assert sorted(old) == sorted(new)
    for name, array in old.items():
        assert np.array_equal(array, new[name]), name
    assert any(old[name].any() for name in old if name.endswith("candidates"))
    assert any(np.abs(old[name]).max() > 0 for name in old if name.endswith("score"))


def test_run_json_records_one_window_for_a_liver_that_fits(tmp_path, grid_checkpoint):
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.running.runner import run_case

    ct, liver, _ = wide_case(180)
    paths = _save(tmp_path / "in", ct, liver)
    run_case(*paths, load_checkpoint(grid_checkpoint), _params(), tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "run.json").read_text())["stats"]
    assert stats["windows"]["windows"] == 1 and stats["windows"]["slices_by_windows"] == {"1": 3}
    assert stats["liver_outside_grid_voxels"] == 0
    assert stats["windows"]["grid_images"] == stats["slices_with_liver"] == 3
