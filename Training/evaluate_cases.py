"""Pixel AUROC / AP / best Dice of GDPI on the tumour slices of whole CT cases.

Runs ``gdpi detect`` (the one detection code path) on each case, then pools the
liver voxels of every slice that holds tumour (on the CT grid) over all cases.
Two label-free references are scored on the same voxels for context: the AME
candidate mask alone, and "darkness" (slice liver median - HU).

    python Training/evaluate_cases.py --checkpoint run/model.safetensors --preset fast \\
        --case hcc_1720 ../shared/data/hcc_1720/ct.nii.gz ../shared/data/hcc_1720/seg.nii.gz
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
from GDPILiverAnomalyLib.method.metrics import pixel_metrics
from GDPILiverAnomalyLib.method.parameters import DetectionParams
from GDPILiverAnomalyLib.running.runner import run_case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--case",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "CT", "SEG"),
        help="case name, CT, label map (1 liver, 2 tumour)",
    )
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    params = DetectionParams.from_preset(args.preset, device=args.device)
    pooled = {"gdpi": [], "ame": [], "darkness": [], "truth": []}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ct_path, seg_path in args.case:
            info = run_case(ct_path, seg_path, ckpt, params, Path(tmp) / name)
            seg = sitk.GetArrayFromImage(sitk.ReadImage(seg_path))
            ct = sitk.GetArrayFromImage(sitk.ReadImage(ct_path)).astype(np.float32)
            score = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(tmp) / name / "score.nrrd")))
            cand = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(tmp) / name / "candidates.nrrd")))
            for k in np.flatnonzero((seg == 2).any(axis=(1, 2))):
                liver = seg[k] > 0
                pooled["gdpi"].append(score[k][liver])
                pooled["ame"].append(cand[k][liver].astype(np.float32))
                pooled["darkness"].append(np.median(ct[k][liver]) - ct[k][liver])
                pooled["truth"].append(seg[k][liver] == 2)
            runs.append(
                {
                    "case": name,
                    "nfe": info["nfe"],
                    "seconds": info["timings_s"]["wall"],
                    "device": info["device"],
                }
            )
    truth = np.concatenate(pooled["truth"])
    results = {
        m: pixel_metrics(np.concatenate(pooled[m]), truth) for m in ("gdpi", "ame", "darkness")
    }
    report = {
        "checkpoint": args.checkpoint,
        "preset": args.preset,
        "runs": runs,
        "results": results,
        "pooled": "liver voxels of every CT slice holding tumour (CT grid)",
    }
    print("| method | pixel AUROC | AP | best Dice |\n|---|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {r['auroc']:.4f} | {r['ap']:.4f} | {r['best_dice']:.4f} |")
    print(json.dumps(runs))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
