"""The README's picture: one real CT slice, its healthy re-painting, the anomaly heatmap
and the ground truth, made with the project's own ``gdpi detect`` (default settings,
bundled real-CT model) on a shared case.

    python bench/make_readme_figure.py                       # hcc_1720, Resources/real_ct_result.png
    python bench/make_readme_figure.py --case ../shared/data/hcc_0697 --out fig.png

The case's ``seg.nii.gz`` has 1 = liver, 2 = tumour (both are the liver mask given to
``gdpi detect``; label 2 is shown as the truth only). The slice shown is the one with
the most tumour voxels. Display: CT and pseudo-healthy at W 400 / L 50 HU; score in HU
with the Slicer panel's colour window (0-50 HU), outlined where it exceeds the
threshold in ``run.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _lps(path: Path) -> np.ndarray:
    """Volume as an array ``[z, y, x]`` in LPS (axial slices shown the radiological way)."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=REPO.parent / "shared/data/hcc_1720")
    parser.add_argument("--out", type=Path, default=REPO / "Resources/real_ct_result.png")
    parser.add_argument("--detect-args", default="", help="extra `gdpi detect` options")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result"
        cmd = [sys.executable, "-m", "GDPILiverAnomalyLib", "detect", "--ct",
               str(args.case / "ct.nii.gz"), "--liver", str(args.case / "seg.nii.gz"),
               "--out", str(result), "--progress", "none", *args.detect_args.split()]  # fmt: skip
        subprocess.run(cmd, check=True)
        ct = _lps(args.case / "ct.nii.gz")
        truth = _lps(args.case / "seg.nii.gz")
        healthy = _lps(result / "pseudo_healthy.nrrd")
        score = _lps(result / "score.nrrd")
        run = json.loads((result / "run.json").read_text())
    threshold = float(run["parameters"]["threshold_hu"])
    k = int(np.argmax((truth == 2).sum(axis=(1, 2))))
    rows, cols = np.nonzero(truth[k] > 0)
    pad = 40
    box = (slice(max(rows.min() - pad, 0), rows.max() + pad),
           slice(max(cols.min() - pad, 0), cols.max() + pad))  # fmt: skip
    window = {"cmap": "gray", "vmin": -150, "vmax": 250}
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    panels = [
        ("CT", ct[k][box], window),
        ("pseudo-healthy (re-painted)", healthy[k][box], window),
        ("anomaly score (HU)", ct[k][box], window),
        ("truth: liver, tumour", ct[k][box], window),
    ]
    for ax, (title, image, kw) in zip(axes, panels, strict=True):
        ax.imshow(image, **kw)
        ax.set_title(title)
        ax.axis("off")
    heat = np.ma.masked_less_equal(score[k][box], 0.5)
    shown = axes[2].imshow(heat, cmap="inferno", vmin=0, vmax=50, alpha=0.85)
    axes[2].contour(score[k][box] > threshold, levels=[0.5], colors="cyan", linewidths=0.8)
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02)
    axes[3].contour(truth[k][box] > 0, levels=[0.5], colors="lime", linewidths=0.8)
    axes[3].contour(truth[k][box] == 2, levels=[0.5], colors="red", linewidths=1.0)
    fig.suptitle(f"{args.case.name}, slice {k} (LPS), gdpi detect defaults; cyan: score > "
                 f"{threshold:g} HU", fontsize=10)  # fmt: skip
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
