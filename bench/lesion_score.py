"""Which lesion score ranks true lesions above false ones? (docs/evaluation.md, "Lesion score")

For each ``gdpi detect`` output folder and the reference label map of its CT, the
lesions of the lesion table (3-D components, 26-connectivity, of score > threshold) at
each ``--thresholds`` value are split into true (overlapping a voxel of ``--label`` in
the reference) and false, and each candidate score ranks them: AUC of true against
false components, pooled over the cases, with a 95 % interval from a stratified
bootstrap over components (true and false ones resampled apart, seed 0).

    python bench/lesion_score.py --case DET_FOLDER SEG [--case ...] --json out.json

Candidates (per component): ``max`` (maximum score, HU), ``mean`` (mean score, HU),
``volume_weighted`` (the sum of the score over its voxels times the voxel volume,
HU x mL = mean x volume), and ``volume`` (mL) as a reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from GDPILiverAnomalyLib.method.lesions import interval
from scipy import ndimage
from sklearn.metrics import roc_auc_score

CANDIDATES = ("max", "mean", "volume_weighted", "volume")


def components(score: np.ndarray, truth: np.ndarray, threshold: float, voxel_ml: float) -> dict:
    """Candidate scores and truth (overlaps the reference) of each component."""
    labels, n = ndimage.label(score > threshold, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return {**{c: np.zeros(0) for c in CANDIDATES}, "true": np.zeros(0, bool)}
    k = labels[labels > 0]
    values = score[labels > 0].astype(np.float64)
    voxels = np.bincount(k, minlength=n + 1)[1:]
    total = np.bincount(k, weights=values, minlength=n + 1)[1:]
    maxima = np.full(n + 1, -np.inf)
    np.maximum.at(maxima, k, values)
    true = np.zeros(n + 1, bool)
    true[np.unique(labels[(labels > 0) & truth])] = True
    return {
        "max": maxima[1:],
        "mean": total / voxels,
        "volume_weighted": total * voxel_ml,
        "volume": voxels * voxel_ml,
        "true": true[1:],
    }


def auc(scores: np.ndarray, true: np.ndarray) -> float:
    """AUC of true vs false components (NaN without both)."""
    if true.all() or not true.any():
        return float("nan")
    return float(roc_auc_score(true, scores))


def bootstrap_auc(scores: np.ndarray, true: np.ndarray, resamples: int) -> np.ndarray:
    """AUC of ``resamples`` stratified bootstrap resamples of the components (true and
    false ones each drawn with replacement; seed 0)."""
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(true), np.flatnonzero(~true)
    if not len(pos) or not len(neg):
        return np.full(resamples, np.nan)
    out = np.empty(resamples)
    for b in range(resamples):
        pick = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        out[b] = auc(scores[pick], true[pick])
    return out


def _text(ci: dict) -> str:
    if ci["value"] is None or not np.isfinite(ci["value"]):
        return "-"
    bounds = "" if ci["low"] is None else f" [{ci['low']:.3f}, {ci['high']:.3f}]"
    return f"{ci['value']:.3f}{bounds}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs=2, action="append", required=True, metavar=("DET", "SEG"))
    p.add_argument("--label", type=int, default=2, help="tumour label of the reference")
    p.add_argument("--thresholds", type=float, nargs="+", default=[10.0, 15.0, 20.0])
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    cases = []
    for det, seg in args.case:
        image = sitk.ReadImage(str(Path(det) / "score.nrrd"))
        score = sitk.GetArrayFromImage(image)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(seg)) == args.label
        if truth.shape != score.shape:
            raise SystemExit(f"{seg} and {det}/score.nrrd differ in size")
        cases.append((det, score, truth, float(np.prod(image.GetSpacing())) / 1000))
    result = {"cases": [c[0] for c in cases], "thresholds": {}}
    for threshold in args.thresholds:
        parts = [components(s, t, threshold, ml) for _, s, t, ml in cases]
        true = np.concatenate([p["true"] for p in parts])
        row = {"true": int(true.sum()), "false": int((~true).sum())}
        for name in CANDIDATES:
            values = np.concatenate([p[name] for p in parts])
            point = auc(values, true)
            boot = bootstrap_auc(values, true, args.resamples)
            row[name] = interval(boot, point if np.isfinite(point) else None)
        result["thresholds"][str(threshold)] = row
        cells = "  ".join(f"{n} {_text(row[n])}" for n in CANDIDATES)
        print(f"threshold {threshold:g} HU: {row['true']} true, {row['false']} false; AUC {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
