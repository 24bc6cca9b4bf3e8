"""Evaluation: metrics with known answers, the baselines, the synthetic tumour generator,
the memory bank and ``gdpi evaluate`` end to end on a tiny generated test set."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO, shared
from GDPILiverAnomalyLib.errors import OutputError, ParameterError
from GDPILiverAnomalyLib.files.synthetic import synthetic_case
from GDPILiverAnomalyLib.method.diffusion import DiffusionConfig, GaussianDiffusion
from GDPILiverAnomalyLib.method.grid import InputGrid
from GDPILiverAnomalyLib.method.metrics import pixel_metrics
from GDPILiverAnomalyLib.method.repaint import SliceNoise, repaint
from GDPILiverAnomalyLib.method.schedule import schedule_counts
from GDPITraining.baselines import load_baseline
from GDPITraining.evaluate import EvaluateConfig, evaluate, memory_bank_prompts
from GDPITraining.loop import TrainConfig
from GDPITraining.methods import MethodSpec
from GDPITraining.prepare import prepare
from GDPITraining.store import SliceStore
from GDPITraining.train import train
from GDPITraining.tumours import add_tumours

GDPI = [sys.executable, "-m", "GDPITraining"]
GRID = InputGrid(32, 7.0)


def test_repaint_from_a_prompt_starts_at_its_level_and_keeps_the_known_region():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False), 20)
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    image = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 1
    x0, nfe = repaint(
        model, diffusion, image, mask, 5, 2, SliceNoise([1, 2]), start=(image.clone(), 9)
    )
    full, _ = schedule_counts(20, 5, 2)
    assert nfe == len(calls) < full
    level9 = int(diffusion.timestep_map[9])
    assert calls[0] == level9  # the first denoising step is at the prompt's level
    assert max(calls) <= int(diffusion.timestep_map[9 + 5])  # later jumps go up 5 at most
    known = mask == 0
    assert torch.equal(x0[known], image[known])
    with pytest.raises(ParameterError):
        repaint(model, diffusion, image, mask, 5, 2, start=(image[:1], 9))


def test_memory_bank_picks_the_most_similar_healthy_slice_and_matches_its_level():
    rng = np.random.default_rng(0)
    bank = rng.normal(60, 30, (5, 16, 16)).astype(np.float32)
    liver = np.zeros((5, 16, 16), np.uint8)
    liver[:, 4:12, 4:12] = 1
    test = bank[[3]] + 25.0  # slice 3 of the bank, 25 HU brighter
    cand = np.zeros((1, 16, 16), np.uint8)
    cand[0, 6:8, 6:8] = 1
    prompts, chosen = memory_bank_prompts(test, liver[[0]], cand, bank)
    assert chosen.tolist() == [3]
    np.testing.assert_allclose(prompts[0], bank[3] + 25.0, atol=1e-3)
    # never a neighbour from the test slice's own patient
    cases = ["p1", "p1", "p2", "p3", "p3"]
    _, chosen = memory_bank_prompts(
        test, liver[[0]], cand, bank, test_cases=["p3"], bank_cases=cases
    )
    assert cases[int(chosen[0])] != "p3"


# --- synthetic tumours ------------------------------------------------------------------


def test_synthetic_tumours_are_deterministic_and_change_only_liver_voxels():
    case = synthetic_case(3, n_slices=12, size=96, pixel_mm=2.0, slice_mm=3.0, n_lesions=0)
    ct = case.ct.copy()
    before = ct.copy()
    a = add_tumours(ct, case.liver, (3.0, 2.0, 2.0), "hu2023", count=3, seed=5)
    b = add_tumours(ct, case.liver, (3.0, 2.0, 2.0), "hu2023", count=3, seed=5)
    c = add_tumours(ct, case.liver, (3.0, 2.0, 2.0), "hu2023", count=3, seed=6)
    np.testing.assert_array_equal(ct, before)  # input untouched
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    new, truth, tumours = a
    changed = new != ct
    assert changed.any() and not (changed & (case.liver == 0)).any()
    assert truth.any() and not (truth.astype(bool) & (case.liver == 0)).any()
    assert len(tumours) == 3
    assert (ct - new)[truth > 0].mean() > 25  # darker (texture x edge x 65..145 HU)
    bright, bt, _ = add_tumours(ct, case.liver, (3.0, 2.0, 2.0), "bright", count=2, seed=5)
    assert (bright - ct)[bt > 0].mean() > 15
    with pytest.raises(ParameterError, match="unknown variant"):
        add_tumours(ct, case.liver, (3.0, 2.0, 2.0), "huge", count=1, seed=5)
    small_truth = add_tumours(ct, case.liver, (3.0, 2.0, 2.0), "small", count=2, seed=5)[1]
    assert 0 < small_truth.sum() < truth.sum()


def test_synth_tumours_cli_keeps_real_tumours_clear_and_labels_them(tmp_path):
    ct_path = shared("hcc_0697", "ct.nii.gz")
    seg_path = shared("hcc_0697", "seg.nii.gz")
    out = tmp_path / "case"
    cmd = [*GDPI, "synth-tumours", "--ct", str(ct_path), "--seg", str(seg_path)]
    cmd += ["--out", str(out), "--variant", "subtle", "--count", "2", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    src_ct = sitk.ReadImage(str(ct_path))
    new_ct = sitk.ReadImage(str(out / "ct.nii.gz"))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "seg.nii.gz")))
    src_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))
    assert new_ct.GetSize() == src_ct.GetSize() and new_ct.GetOrigin() == src_ct.GetOrigin()
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(seg == 3, src_seg == 2)  # real tumour kept as label 3
    diff = sitk.GetArrayFromImage(new_ct).astype(int) - sitk.GetArrayFromImage(src_ct)
    assert not diff[src_seg == 0].any() and not diff[src_seg == 2].any()
    info = json.loads((out / "tumours.json").read_text())
    assert info["variant"] == "subtle" and len(info["tumours"]) == 2
    # an existing, non-empty folder is refused and left alone
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not empty" in proc.stderr


def test_prepare_ignore_label_drops_the_slices_that_hold_it(tmp_path):
    case = synthetic_case(2, n_slices=6, size=64, pixel_mm=5.0, slice_mm=5.0, n_lesions=0)
    plain = case.liver.astype(np.uint8)
    marked = plain.copy()
    marked[3][marked[3] > 0] = 3  # slice 3: liver labelled "ignore"
    for name, seg in (("plain", plain), ("marked", marked)):
        folder = tmp_path / name / "c1"
        folder.mkdir(parents=True)
        sitk.WriteImage(case.image(case.ct.astype(np.int16)), str(folder / "ct.nii.gz"))
        sitk.WriteImage(case.image(seg), str(folder / "seg.nii.gz"))
        prepare(
            "folders", tmp_path / name, tmp_path / f"{name}-store", GRID, ignore_label=3,
            log=lambda m: None,
        )  # fmt: skip
    kept = {r["slice"] for r in SliceStore.open(tmp_path / "plain-store").slices}
    left = {r["slice"] for r in SliceStore.open(tmp_path / "marked-store").slices}
    assert left < kept and len(kept - left) == 1


@pytest.mark.parametrize("sigma_mm", [0.0, 2.0])
def test_store_ame_margins_apply_ame_as_detect_does(tmp_path, sigma_mm):
    """Thresholding the store's margins flags the grid pixels gdpi detect would inpaint
    (with the same AME smoothing)."""
    from GDPILiverAnomalyLib.files.volumes import OrientedCase
    from GDPILiverAnomalyLib.method.ame import adaptive_mask, denoise_for_ame
    from GDPILiverAnomalyLib.method.grid import PlaneMapping

    case = synthetic_case(4, n_slices=6, size=128, pixel_mm=2.0, slice_mm=5.0)
    folder = tmp_path / "cases" / "c1"
    folder.mkdir(parents=True)
    seg = case.liver.astype(np.uint8)
    seg[case.tumour > 0] = 2
    ct_image = case.image(case.ct.astype(np.int16))
    sitk.WriteImage(ct_image, str(folder / "ct.nii.gz"))
    sitk.WriteImage(case.image(seg), str(folder / "seg.nii.gz"))
    prepare(
        "folders", tmp_path / "cases", tmp_path / "s", GRID, ame_sigma_mm=sigma_mm,
        log=lambda m: None,
    )  # fmt: skip
    store = SliceStore.open(tmp_path / "s")
    assert store.info["ame_sigma_mm"] == sigma_mm
    oriented = OrientedCase.from_arrays(ct_image, (seg > 0).astype(np.uint8))
    ame_ct = denoise_for_ame(oriented.ct, oriented.spacing_yx, sigma_mm)
    keep = [int(r["slice"]) for r in store.slices]
    mapping = PlaneMapping.for_volume(
        GRID, oriented.ct.shape[1:], oriented.spacing_yx, oriented.liver
    )
    for offset in (10.0, 20.0, 40.0):
        detect = mapping.to_grid(adaptive_mask(ame_ct, oriented.liver, offset)[keep], "mask") > 0
        margins = np.asarray(store.ame_dark) > offset
        assert detect.any()
        np.testing.assert_array_equal(margins, detect)


# --- baselines and gdpi evaluate end to end ----------------------------------------------


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prepare(
        "synthetic",
        None,
        root / "store",
        GRID,
        synthetic_cases=3,
        synthetic_lesions=True,
        test_cases={"synthetic-0002"},
        val_fraction=0,
        seed=0,
        log=lambda m: None,
    )
    return root / "store"


@pytest.fixture(scope="module")
def baselines(eval_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    paths = {}
    for kind in ("ae", "vae", "dae"):
        config = TrainConfig(
            data=str(eval_store),
            out=str(root / kind),
            model=kind,
            steps=24,
            batch_size=8,
            lr=1e-3,
            log_every=8,
            save_every=24,
            progress=False,
            augment=False,
        )
        paths[kind] = train(config)
    return paths


@pytest.mark.parametrize("kind", ["ae", "vae", "dae"])
def test_each_baseline_trains_and_lowers_its_loss(baselines, kind):
    log = (baselines[kind].parent / "log.csv").read_text().splitlines()
    losses = [float(line.split(",")[1]) for line in log[1:]]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0]
    b = load_baseline(baselines[kind])
    assert b.config.kind == kind and b.training["steps"] == 24
    assert b.grid.size == GRID.size


def test_gdpi_evaluate_end_to_end_writes_every_table_json_and_figure(
    tmp_path, eval_store, baselines
):
    # a diffusion prior on the store's 32 px grid, trained for two steps (the evaluation
    # plumbing is under test here, not the model's quality)
    ckpt = train(
        TrainConfig(
            data=str(eval_store), out=str(tmp_path / "ddpm"), steps=2, batch_size=2,
            progress=False,
        )
    )  # fmt: skip
    out = tmp_path / "report"
    cmd = [*GDPI, "evaluate", "--data", str(eval_store), "--out", str(out)]
    cmd += ["--checkpoint", str(ckpt), "--method", "gdpi", "--method", f"ae={baselines['ae']}"]
    cmd += ["--preset", "fast", "--steps", "6", "--jump-length", "2", "--jump-n-sample", "2"]
    cmd += ["--max-slices", "3", "--panels", "2", "--device", "cpu", "--title", "tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "results.json").read_text())
    assert set(report["methods"]) == {"gdpi", "ae"}
    assert report["test_set"]["abnormal_slices"] == 3 and report["test_set"]["healthy_slices"] == 3
    for r in report["methods"].values():
        for pool in ("liver", "slice"):
            assert 0 <= r[pool]["auroc"] <= 1 and 0 <= r[pool]["best_dice"] <= 1
            assert r[pool]["lesions"]["lesions"] >= 1
            assert 0 <= r[pool]["healthy_fp_fraction"] <= 1
        assert r["slice_auroc"] is not None and r["normal_bias"] is not None
    assert report["methods"]["gdpi"]["nfe"] > 0
    # lesion level: FROC points with intervals over cases, size classes in mL of the grid
    for r in report["methods"].values():
        lesion = r["lesion_level"]
        assert lesion["scans"] == len(report["test_set"]["cases"]) == 1
        assert lesion["lesions"] == r["liver"]["lesions"]["lesions"]
        for rate in ("0.125", "0.5", "1.0", "2.0", "4.0", "8.0", "mean"):
            ci = lesion["froc"][rate]  # one case: no interval over cases
            assert 0 <= ci["value"] <= 1 and ci["low"] is None and ci["high"] is None
        assert sum(c["lesions"] for c in lesion["by_size"].values()) == lesion["lesions"]
        assert "size unknown" not in lesion["by_size"]  # the store's grid is 7 mm
        pixel = lesion["pixel_bootstrap"]
        assert pixel["auroc"]["value"] == pytest.approx(r["liver"]["auroc"])
        assert pixel["ap"]["value"] == pytest.approx(r["liver"]["ap"])
    assert report["config"]["steps"] == 6
    md = (out / "results.md").read_text()
    assert md.startswith("# tiny")
    for heading in ("Pixels pooled: liver", "Pixels pooled: slice", "Table I/II", "Table III",
                    "Lesion level (liver)"):  # fmt: skip
        assert heading in md
    assert "| GDPI |" in md and "| AE |" in md
    for png in ("roc_liver.png", "pr_liver.png", "roc_slice.png", "pr_slice.png", "froc_liver.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    panels = sorted((out / "qualitative").glob("*.png"))
    assert len(panels) == 2
    scores = np.load(out / "scores" / "gdpi.npz")
    assert scores["score"].shape == (6, GRID.size, GRID.size)
    # the scores written are those the metrics came from
    store = SliceStore.open(eval_store)
    idx = scores["store_index"]
    again = pixel_metrics(scores["score"], store.tumour[idx], store.liver[idx])
    assert again["auroc"] == pytest.approx(report["methods"]["gdpi"]["liver"]["auroc"])
    # metrics of a subset from the saved scores, without re-running any method
    case = store.slices[int(idx[0])]["case"]
    sub = evaluate(
        EvaluateConfig(
            str(eval_store), str(tmp_path / "sub"), ["gdpi", f"ae={baselines['ae']}"],
            checkpoint=str(ckpt), max_slices=3, cases=[case], reuse=str(out), panels=0,
        ),
        log=lambda m: None,
    )  # fmt: skip
    assert sub["test_set"]["cases"] == [case]
    assert sub["methods"]["gdpi"]["details"]["reused_from"] == str(out)
    rows = [i for i, j in enumerate(idx) if store.slices[int(j)]["case"] == case]
    expected = pixel_metrics(scores["score"][rows], store.tumour[idx[rows]], store.liver[idx[rows]])
    assert sub["methods"]["gdpi"]["liver"]["auroc"] == pytest.approx(expected["auroc"])


def test_evaluate_refuses_bad_input_and_writes_nothing(tmp_path, eval_store):
    with pytest.raises(ParameterError, match="unknown method"):
        MethodSpec.parse("gdpi-xyz")
    with pytest.raises(ParameterError, match="needs a checkpoint"):
        MethodSpec.parse("ae")
    out = tmp_path / "r"
    with pytest.raises(ParameterError, match="needs --checkpoint"):
        evaluate(EvaluateConfig(str(eval_store), str(out), ["gdpi"]), log=lambda m: None)
    with pytest.raises(ParameterError, match="once"):
        evaluate(
            EvaluateConfig(str(eval_store), str(out), ["darkness", "darkness"]),
            log=lambda m: None,
        )
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        evaluate(EvaluateConfig(str(eval_store), str(out), ["darkness"]), log=lambda m: None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_the_benchmark_case_list_points_at_shared_data():
    """The real-CT model card and Training/run_benchmark.sh read this list in place."""
    listing = REPO / "GDPILiverAnomaly" / "GDPILiverAnomalyLib" / "models" / "real_ct_cases.csv"
    with open(listing, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [
        "hcc_0697",
        "hcc_1211",
        "hcc_1720",
        "ts_full",
        "dcmqi_3slice",
    ]
    for row in rows:
        folder = shared(row["case"])
        for key in ("ct", "liver"):
            target = (listing.parent / row[key]).resolve()
            assert target.exists() and target.parent == folder.resolve()
