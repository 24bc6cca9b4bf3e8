"""Detection quality against the depth spacing (``--depth-spacing-mm``) on CTs with tumour masks.

Each case is inpainted once at depth spacing 0 (every slice with AME candidates, the
preset's schedule, the bundled model); every other spacing is then scored from the same
inpainted images: a slice's noise comes from its own seed whatever else is inpainted, so
a run at spacing ``S`` re-paints its slices (``plan.work``) exactly as the spacing-0 run
did, and :func:`pipeline.finish_detection` (the one scoring path) fills in the others.
Both ways of filling in are scored: the pseudo-healthy image interpolated in depth (what
``gdpi detect`` does) and the score interpolated. Pixel AUROC / AP over the liver voxels
of the CT grid (``label >= 1``; tumour ``label == --tumour-label``), and per tumour (3-D
component) its largest score.

    python bench/depth_quality.py CASE_DIR [CASE_DIR ...] [--spacings 0 2.5 3.5 5]
    python bench/depth_quality.py --thin SRC_DIR DST_DIR --slice-mm 1.25    # a thin-slice copy

A case folder holds ``ct.nii.gz`` and ``seg.nii.gz``. The spacing-0 differences are
kept in ``--cache`` (default: beside the case, ``depth0-<preset>-seed<seed>.npz``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GDPILiverAnomaly"))

from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint  # noqa: E402
from GDPILiverAnomalyLib.method.metrics import pixel_metrics  # noqa: E402
from GDPILiverAnomalyLib.method.parameters import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    DetectionParams,
)
from GDPILiverAnomalyLib.running.devices import resolve_device  # noqa: E402
from GDPILiverAnomalyLib.running.pipeline import (  # noqa: E402
    finish_detection,
    inpaint_grid,
    plan_slices,
)


def make_thin(src: Path, dst: Path, slice_mm: float) -> None:
    """``src``'s ct.nii.gz (linear) and seg.nii.gz (nearest) resampled to ``slice_mm``
    slices, same in-plane grid and extent in depth."""
    dst.mkdir(parents=True, exist_ok=True)
    for name, interp in (("ct.nii.gz", sitk.sitkLinear), ("seg.nii.gz", sitk.sitkNearestNeighbor)):
        image = sitk.ReadImage(str(src / name))
        sx, sy, sz = image.GetSpacing()
        nx, ny, nz = image.GetSize()
        size = [nx, ny, int(round((nz - 1) * sz / slice_mm)) + 1]
        out = sitk.Resample(image, size, sitk.Transform(), interp, image.GetOrigin(),
                            (sx, sy, slice_mm), image.GetDirection(), 0.0,
                            image.GetPixelID())  # fmt: skip
        sitk.WriteImage(out, str(dst / name))
    print(f"wrote {dst} ({size[2]} slices of {slice_mm} mm)")


def inpaint_all(case: Path, params: DetectionParams, cache: Path, checkpoint) -> np.ndarray:
    """Spacing-0 differences (HU, every grid image with candidates), cached."""
    if cache.exists():
        return np.load(cache)["diff"]
    ct = sitk.ReadImage(str(case / "ct.nii.gz"), sitk.sitkFloat32)
    liver = (sitk.GetArrayFromImage(sitk.ReadImage(str(case / "seg.nii.gz"))) > 0).astype(np.uint8)
    plan = plan_slices(ct, liver, checkpoint.grid, params)
    work = plan.work
    batch = params.batch_size or 8
    t0 = time.perf_counter()
    diff = inpaint_grid(plan.ct_grid, plan.paint_grid, checkpoint, plan.params,
                        resolve_device("cpu"), [work[i : i + batch] for i in range(0, len(work), batch)],
                        plan.seeds)  # fmt: skip
    print(f"{case.name}: inpainted {len(work)} grid images in {time.perf_counter() - t0:.0f} s",
          flush=True)  # fmt: skip
    np.savez_compressed(cache, diff=diff)
    return diff


def score_case(case: Path, params: DetectionParams, diff0: np.ndarray, spacing: float,
               tumour_label: int, grid) -> list[dict]:  # fmt: skip
    """Rows (one per way of filling in) for one spacing, from the spacing-0 differences."""
    ct = sitk.ReadImage(str(case / "ct.nii.gz"), sitk.sitkFloat32)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "seg.nii.gz")))
    liver = (seg > 0).astype(np.uint8)
    tumour = seg == tumour_label
    plan = plan_slices(ct, liver, grid, dataclasses.replace(params, depth_spacing_mm=spacing))
    diff = np.zeros_like(diff0)
    work = plan.work
    diff[work] = diff0[work]
    info = {"device": "cpu", "bf16": False, "batches": 0, "batch_size": 8, "nfe": 0,
            "timings_s": {"prepare": 0.0, "inpaint": 0.0}}  # fmt: skip
    labels, n = ndimage.label(tumour, structure=np.ones((3, 3, 3), bool))
    rows = []
    for mode in ("pseudo-healthy", "score") if spacing > 0 else ("pseudo-healthy",):
        result = finish_detection(plan, diff, work, info, 0.0, interpolate=mode)
        m = pixel_metrics(result.score, tumour, liver)
        maxima = ndimage.maximum(result.score, labels, np.arange(1, n + 1)) if n else []
        rows.append({
            "case": case.name, "spacing_mm": spacing, "fill": mode,
            "images_with_candidates": result.stats["depth_sampling"]["images_with_candidates"],
            "inpainted": len(work), "by_rule": plan.depth_counts,
            "auroc": round(100 * m["auroc"], 2), "ap": round(100 * m["ap"], 2),
            "best_dice": round(100 * m["best_dice"], 2),
            "tumour_max_hu": [round(float(v), 1) for v in maxima],
            "tumours_found": int(sum(float(v) > params.threshold_hu for v in maxima)),
            "tumours": n,
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", type=Path)
    parser.add_argument("--thin", nargs=2, type=Path, metavar=("SRC", "DST"))
    parser.add_argument("--slice-mm", type=float, default=1.25)
    parser.add_argument("--spacings", nargs="*", type=float, default=[0.0, 2.5, 3.5, 5.0])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tumour-label", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--steps", type=int, help="override the preset's steps (smoke)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.thin:
        make_thin(*args.thin, args.slice_mm)
        return 0
    checkpoint = load_checkpoint(args.checkpoint)
    overrides = {"seed": args.seed, "device": "cpu", "depth_spacing_mm": 0.0, "bf16": False}
    if args.steps:
        overrides.update(steps=args.steps, jump_length=1, jump_n_sample=1)
    params = DetectionParams.from_preset(args.preset, **overrides)
    rows = []
    print("| case | S (mm) | fill | images with candidates | inpainted | AUROC | AP | "
          "best Dice | tumours > threshold | largest score per tumour (HU) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        cache = case / f"depth0-{args.preset}-seed{args.seed}{'-smoke' if args.steps else ''}.npz"
        diff0 = inpaint_all(case, params, cache, checkpoint)
        for spacing in args.spacings:
            for r in score_case(case, params, diff0, spacing, args.tumour_label, checkpoint.grid):
                rows.append(r)
                print(f"| {r['case']} | {r['spacing_mm']:g} | {r['fill']} | "
                      f"{r['images_with_candidates']} | {r['inpainted']} | {r['auroc']} | "
                      f"{r['ap']} | {r['best_dice']} | {r['tumours_found']}/{r['tumours']} | "
                      f"{r['tumour_max_hu']} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
