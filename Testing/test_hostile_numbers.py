"""Hostile numbers: checkpoints, stores, CT values and liver masks whose numbers are
absurd, and inputs the tool is not meant for (issue 20, sections 2 and 3). Each is
refused with exit 2 and one ``gdpi: error:`` line that says what is wrong, and nothing
is written; or, where stated (0/255 masks), handled exactly like the ordinary input.
The fixtures are generated here from ``../shared/data/ts_small``, never committed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import one_error_line, shared, tree_snapshot
from GDPILiverAnomalyLib.errors import CheckpointError, GDPIError, InputError
from GDPILiverAnomalyLib.files.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    init_checkpoint,
    save_checkpoint,
)
from GDPILiverAnomalyLib.files.synthetic import synthetic_case
from GDPILiverAnomalyLib.files.volumes import check_hu, read_ct, read_liver_mask
from GDPITraining.cli import main
from safetensors.torch import save_file
from scipy import ndimage


def _write(array: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


def _forged_checkpoint(path: Path, tensors_edit=None, meta_edit=None) -> Path:
    """A tiny checkpoint written straight with safetensors (as another tool could),
    its weights or metadata changed: the writer's own guard is not in the way."""
    ckpt = init_checkpoint("tiny")
    tensors = {k: v.detach().clone().contiguous() for k, v in ckpt.model.state_dict().items()}
    meta = ckpt.metadata()
    if tensors_edit is not None:
        tensors_edit(tensors)
    if meta_edit is not None:
        meta_edit(meta)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)}
    save_file(tensors, str(path), metadata=header)
    return path


def _set(name: str, value: float):
    def edit(tensors):
        tensors[name].view(-1)[0] = value

    return edit


def _window(hu_min: float, hu_max: float):
    def edit(meta):
        meta["intensity"] = {"hu_min": hu_min, "hu_max": hu_max}

    return edit


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("numbers")
    ct = sitk.ReadImage(str(shared("ts_small", "ct.nii.gz")))
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    liver = (sitk.GetArrayFromImage(sitk.ReadImage(str(shared("ts_small", "totalseg.nii.gz"))))
             == 5).astype(np.uint8)  # fmt: skip
    _write(hu.astype(np.int16), ct, w / "ct.nrrd")
    _write(liver, ct, w / "liver.nrrd")
    save_checkpoint(init_checkpoint("tiny"), w / "model.safetensors")
    # checkpoints with absurd numbers
    _forged_checkpoint(w / "nan_weight.safetensors", _set("input_conv.weight", float("nan")))
    _forged_checkpoint(w / "inf_weight.safetensors", _set("out.2.weight", float("inf")))
    _forged_checkpoint(w / "huge_weight.safetensors", _set("input_conv.weight", 1e30))
    _forged_checkpoint(w / "window_wide.safetensors", meta_edit=_window(-1e6, 1e6))
    _forged_checkpoint(w / "window_narrow.safetensors", meta_edit=_window(40.0, 40.001))
    _forged_checkpoint(w / "window_far.safetensors", meta_edit=_window(1e5, 1e5 + 500))

    def loud(tensors):  # weights within bounds, but the network's output is absurd
        tensors["out.2.bias"][:] = 5000.0

    _forged_checkpoint(w / "loud_output.safetensors", loud)
    # CT values: +-3e38 next to the liver (outside it), an 8-bit export, an MR
    ring = ndimage.binary_dilation(liver > 0, iterations=2) & (liver == 0)
    where = np.argwhere(ring)
    huge = hu.copy()
    huge[tuple(where[::5].T)] = 3e38
    huge[tuple(where[2::5].T)] = -3e38
    _write(huge, ct, w / "ct_3e38_outside_liver.nrrd")
    window = np.clip((hu + 160) / 400 * 255, 0, 255).round().astype(np.uint8)
    _write(window, ct, w / "ct_uint8_export.nrrd")
    mr = np.clip((hu + 1000) * 0.3, 0, None).astype(np.float32)  # air 0, liver ~300
    _write(mr, ct, w / "mr_like.nrrd")
    # liver masks
    one = np.zeros_like(liver)
    one[tuple(np.argwhere(liver > 0)[len(np.argwhere(liver > 0)) // 2])] = 1
    _write(one, ct, w / "liver_one_voxel.nrrd")
    probability = (ndimage.gaussian_filter(liver.astype(np.float32), 1.0)).astype(np.float32)
    _write(probability, ct, w / "liver_probability.nrrd")
    _write((liver * 2.5).astype(np.float32), ct, w / "liver_fractional.nrrd")
    _write(liver * 255, ct, w / "liver_255.nrrd")
    # folders for the Ray engine
    for sub, name, src in (("cts", "a.nrrd", "ct.nrrd"), ("livers", "a.nrrd", "liver.nrrd")):
        (w / sub).mkdir()
        shutil.copy(w / src, w / sub / name)
    return w


def _detect(world: Path, ct="ct.nrrd", liver="liver.nrrd", ckpt="model.safetensors", *extra):
    return ["detect", "--ct", str(world / ct), "--liver", str(world / liver), "--checkpoint",
            str(world / ckpt), "--out", str(world / "out"), "--device", "cpu", "--progress",
            "none", "--steps", "2", "--jump-length", "1", "--jump-n-sample", "1",
            *extra]  # fmt: skip


def _refused(world: Path, capsys, argv: list[str], message: str) -> str:
    """Run ``gdpi argv``: exit 2, exactly one error line holding ``message``, no output
    folder, the inputs byte-identical. The output folder is a fresh one outside
    ``world`` (a run that wrongly succeeds leaves nothing for the next test)."""
    parent = Path(tempfile.mkdtemp(prefix="numbers-out-"))
    out = parent / "out"
    argv = [str(out) if a == str(world / "out") else a for a in argv]
    before = tree_snapshot(world)
    try:
        line = one_error_line(main(argv), capsys.readouterr(), message)
        assert not out.exists()
        assert tree_snapshot(world) == before
    finally:
        shutil.rmtree(parent)
    return line


# ---- 1. checkpoints: weights, intensity window, network output ------------------------


@pytest.mark.parametrize(
    ("ckpt", "message"),
    [
        ("nan_weight.safetensors", "NaN or infinite weights (1, first in input_conv.weight)"),
        ("inf_weight.safetensors", "NaN or infinite weights"),
        ("huge_weight.safetensors", "absurd weight (1e+30 in input_conv.weight"),
        ("window_wide.safetensors", "intensity window -1000000.0..1000000.0 HU is absurd"),
        ("window_narrow.safetensors", "width 10..5000 HU"),
        ("window_far.safetensors", "must lie in -2000..5000 HU"),
        ("loud_output.safetensors", "e+03, beyond the 100 a working model"),  # ~5000,
    ],
)
def test_checkpoint_with_absurd_numbers_is_refused(world, capsys, ckpt, message):
    """Before: NaN scores and '0 lesion(s), max score nan HU' with exit 0."""
    _refused(world, capsys, _detect(world, ckpt=ckpt), message)


def test_no_nan_score_reaches_the_outputs(world, quick_params):
    """Whatever produced them, non-finite scores stop the case before anything is written
    (the last guard behind the checkpoint and network checks)."""
    from GDPILiverAnomalyLib.running.pipeline import finish_detection, plan_slices

    ct = read_ct(world / "ct.nrrd")
    liver = read_liver_mask(world / "liver.nrrd", ct)
    plan = plan_slices(ct, liver, init_checkpoint("tiny").grid, quick_params)
    diff = np.zeros_like(plan.ct_grid)
    work = list(range(len(diff)))
    diff[work[len(work) // 2]] = np.nan
    inpainting = {"device": "cpu", "bf16": False, "batches": 1, "batch_size": len(work),
                  "nfe": 1, "timings_s": {"prepare": 0.0, "inpaint": 0.0}}  # fmt: skip
    with pytest.raises(GDPIError, match="NaN or infinite values; nothing written"):
        finish_detection(plan, diff, work, inpainting, 0.0)


def test_a_model_with_nan_or_absurd_weights_is_never_saved(tmp_path):
    ckpt = init_checkpoint("micro")
    with torch.no_grad():
        ckpt.model.input_conv.weight.view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="not saving .* NaN or infinite weights"):
        save_checkpoint(ckpt, tmp_path / "nan.safetensors")
    with torch.no_grad():
        ckpt.model.input_conv.weight.view(-1)[0] = 1e5  # float16 cannot hold it either
    with pytest.raises(CheckpointError, match="not saving .* absurd weight"):
        save_checkpoint(ckpt, tmp_path / "huge.safetensors", torch.float16)
    assert list(tmp_path.iterdir()) == []  # not even a temporary file


# ---- 2. training: stores with NaN, diverging loss, no non-finite model saved -----------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("numbers_store") / "store"
    assert main(["prepare", "--layout", "synthetic", "--synthetic-cases", "2", "--out",
                 str(path), "--grid-size", "32", "--grid-spacing", "9"]) == 0  # fmt: skip
    return path


def _train(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(store), "--out", str(out), "--size", "micro", "--steps",
            "4", "--batch-size", "2", "--no-progress", "--log-every", "1", *extra]  # fmt: skip


def test_a_store_with_one_nan_voxel_is_refused(tmp_path, store, capsys):
    """Before: training ran to the end and saved an all-NaN model, exit 0."""
    bad = tmp_path / "nan_store"
    shutil.copytree(store, bad)
    images = np.load(bad / "images.npy")
    images[1, 5, 7] = np.nan
    np.save(bad / "images.npy", images)
    code = main(_train(bad, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"slice store {bad} holds 1 NaN or infinite values in images.npy" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "state.pt").exists()


def test_a_diverging_training_stops_at_the_step_and_saves_nothing(tmp_path, store, capsys):
    """lr 1e30: step 1 throws the weights to 1e30, step 2's loss is infinite. Before: the
    run went on and saved a NaN model at the end, exit 0."""
    code = main(_train(store, tmp_path / "run", "--lr", "1e30", "--save-every", "100"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "gdpi: error: training stopped at step 2: the loss is not finite" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "state.pt").exists()


def test_training_never_saves_a_model_loading_would_refuse(tmp_path, store, capsys):
    """Saving every step: step 1's model (weights ~1e30) is refused before it is written."""
    code = main(_train(store, tmp_path / "run", "--lr", "1e30", "--save-every", "1"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "not saving" in err and "absurd weight" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not list((tmp_path / "run").glob(".model*"))


# ---- 3. CT values beyond anything a scanner writes, anywhere in the volume ---------------


def test_values_of_3e38_outside_the_liver_are_refused(world, capsys):
    """Before: accepted, and they changed the result (0 lesions instead of 3 here)."""
    line = _refused(world, capsys, _detect(world, "ct_3e38_outside_liver.nrrd"),
                    "outside -34000..65535 HU")  # fmt: skip
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(world / "ct_3e38_outside_liver.nrrd")))
    bad = int(np.count_nonzero(np.abs(values) > 1e38))
    assert f"has {bad} voxel(s) outside" in line and "lowest -3e+38, highest 3e+38" in line


# ---- 4. a liver mask too small to be a liver ----------------------------------------------


def test_a_one_voxel_liver_is_refused_with_the_threshold(world, capsys):
    """Before: detection ran on the one voxel, exit 0."""
    _refused(
        world,
        capsys,
        _detect(world, liver="liver_one_voxel.nrrd"),
        "holds 0.027 mL (1 voxel(s)), less than the 50 mL GDPI needs",
    )


# ---- 5. --liver-label 0: the background is never the liver --------------------------------


def test_liver_label_0_is_refused_by_both_engines_and_the_reader(world, capsys):
    """Before: the background was taken as the liver and detection ran, exit 0."""
    _refused(world, capsys, _detect(world, "ct.nrrd", "liver.nrrd", "model.safetensors",
                                    "--liver-label", "0"), "0 is the background")  # fmt: skip
    ray = _detect(world, "cts", "livers", "model.safetensors", "--engine", "ray",
                  "--liver-label", "0")  # fmt: skip
    _refused(world, capsys, ray, "0 is the background")
    ct = read_ct(world / "ct.nrrd")
    with pytest.raises(InputError, match="liver label 0 is the background"):
        read_liver_mask(world / "liver.nrrd", ct, 0)


# ---- 6. images that are not in HU ------------------------------------------------------


@pytest.mark.parametrize(
    ("ct", "message"),
    [
        ("ct_uint8_export.nrrd", "holds only whole values 0..255, an 8-bit export?"),
        ("mr_like.nrrd", "its lowest value is 0, an MR or a display export?"),
    ],
)
def test_an_8bit_export_or_an_mr_does_not_pass_as_hu(world, capsys, ct, message):
    """Before: both passed the HU test (liver median within -300..400)."""
    line = _refused(world, capsys, _detect(world, ct), message)
    assert "does not look like HU" in line and "--allow-non-hu" in line


def test_allow_non_hu_still_processes_an_8bit_export(world, capsys):
    argv = _detect(world, "ct_uint8_export.nrrd", "liver.nrrd", "model.safetensors",
                   "--allow-non-hu")  # fmt: skip
    try:
        assert main(argv) == 0, capsys.readouterr().err
        assert (world / "out" / "score.nrrd").exists()
    finally:
        shutil.rmtree(world / "out", ignore_errors=True)


CASES = [
    ("hcc_1720", "ct.nii.gz", "seg.nii.gz", None),
    ("hcc_0697", "ct.nii.gz", "seg.nii.gz", None),
    ("hcc_1211", "ct.nii.gz", "seg.nii.gz", None),
    ("ts_small", "ct.nii.gz", "totalseg.nii.gz", 5),
    ("ts_full", "ct.nii.gz", "totalseg.nii.gz", 5),
    ("chaos_ct3", "ct.nii.gz", "seg.nii.gz", None),
    ("dcmqi_3slice", "dicom", "liver_seg.nrrd", None),  # padding -3024 HU, 70 mL liver
]


@pytest.mark.parametrize(("case", "ct", "mask", "label"), CASES, ids=[c[0] for c in CASES])
def test_every_shared_case_passes_the_number_checks(case, ct, mask, label):
    """The value range, the HU test (also on the liver's bounding box alone: a cropped
    CT) and the liver volume accept every real case."""
    from GDPILiverAnomalyLib.files.volumes import check_liver_volume

    image = read_ct(shared(case, ct))
    liver = read_liver_mask(shared(case, mask), image, label)
    check_liver_volume(liver, image.GetSpacing(), mask)
    values = sitk.GetArrayViewFromImage(image)
    check_hu(values, liver)
    box = tuple(slice(w.min(), w.max() + 1) for w in np.nonzero(liver))
    check_hu(values[box], liver[box])


@pytest.mark.parametrize(
    "kw",
    [
        dict(seed=0),  # the demo's cases
        dict(seed=7),  # the Slicer self-test's
        dict(seed=11, n_slices=6, size=64, pixel_mm=5.0, slice_mm=5.0),  # test_training
        dict(seed=3, n_slices=12, size=96, pixel_mm=2.0, slice_mm=3.0, n_lesions=0),
    ],
)
def test_synthetic_cases_pass_the_number_checks(kw):
    from GDPILiverAnomalyLib.files.volumes import check_liver_volume

    case = synthetic_case(**kw)
    check_liver_volume(case.liver, case.spacing, "synthetic")
    check_hu(case.ct, case.liver)


# ---- 7. probability maps and 0/255 masks ---------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ("liver_probability.nrrd", "holds values between 0 and 1 (a probability map?); "
                                   "threshold it at 0.5"),
        ("liver_fractional.nrrd", "holds fractional values (0..2.5)"),
    ],
)  # fmt: skip
def test_a_probability_map_is_refused_with_what_to_do(world, capsys, mask, message):
    """Before: 'is a label map (labels 0.0, 0.0001...); choose the liver label'."""
    _refused(world, capsys, _detect(world, liver=mask), message)


def test_a_0_255_mask_is_a_binary_mask(world, capsys, tmp_path):
    """Accepted without --liver-label, with exactly the result of the 0/1 mask."""
    outputs = {}
    for mask in ("liver.nrrd", "liver_255.nrrd"):
        argv = _detect(world, "ct.nrrd", mask)
        argv[argv.index("--out") + 1] = str(tmp_path / mask)
        assert main(argv) == 0, capsys.readouterr().err
        outputs[mask] = tmp_path / mask
    one, other = outputs.values()
    for name in ("score.nrrd", "anomaly.nrrd", "candidates.nrrd"):
        assert np.array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(one / name))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(other / name))),
        ), name
    assert (one / "lesions.csv").read_text() == (other / "lesions.csv").read_text()


def test_slicer_logic_takes_a_0_255_labelmap_like_the_engine(tmp_path):
    slicer = pytest.importorskip("slicer")
    from GDPILiverAnomalyLib.slicer_side.logic import DetectionLogic

    scene = slicer.vtkMRMLScene()
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(ct, np.zeros((4, 8, 8), np.int16))
    mask = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask255")
    values = np.zeros((4, 8, 8), np.uint8)
    values[1:3, 2:6, 2:6] = 255
    slicer.util.updateVolumeFromArray(mask, values)
    assert logic.inputProblem(ct, mask, labelValue=0) is None  # 0 = the engine's default
