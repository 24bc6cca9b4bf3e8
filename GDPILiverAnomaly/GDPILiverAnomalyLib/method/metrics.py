"""Pixel-level detection metrics (MedIAnomaly style: pooled over all pixels considered).

``best_dice`` is the pixel F1 at the F1-optimal threshold, read exactly off the
precision-recall curve; ``threshold`` is that score value (predict ``score >= threshold``).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from .lesions import consecutive_runs


def pixel_metrics(
    score: np.ndarray,
    truth: np.ndarray,
    region: np.ndarray | None = None,
    curve_points: int = 0,
) -> dict:
    """AUROC, AP and best Dice of ``score`` against binary ``truth`` over ``region`` (default: all).

    ``curve_points > 0`` adds ``curves``: ROC (fpr, tpr) and precision-recall, each thinned
    to about that many points, from the same pooled pixels.
    """
    s = np.asarray(score, dtype=np.float64)
    t = np.asarray(truth) > 0
    if region is not None:
        keep = np.asarray(region) > 0
        s, t = s[keep], t[keep]
    s, t = s.ravel(), t.ravel()
    if t.all() or not t.any():
        raise ValueError("metrics need both positive and negative pixels")
    precision, recall, thresholds = precision_recall_curve(t, s)
    f1 = np.where(
        precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0
    )
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    result = {
        "auroc": float(roc_auc_score(t, s)),
        "ap": float(average_precision_score(t, s)),
        "best_dice": float(f1[best]),
        "threshold": float(thresholds[best]),
        "pixels": int(t.size),
        "positives": int(t.sum()),
    }
    if curve_points > 0:
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(t, s)

        def thin(*arrays: np.ndarray) -> list[list[float]]:
            keep = np.unique(np.linspace(0, len(arrays[0]) - 1, curve_points).round().astype(int))
            return [np.round(a[keep], 5).tolist() for a in arrays]

        fpr_t, tpr_t = thin(fpr, tpr)
        rec_t, prec_t = thin(recall, precision)
        result["curves"] = {"fpr": fpr_t, "tpr": tpr_t, "recall": rec_t, "precision": prec_t}
    return result


def lesion_detection(
    score: np.ndarray,
    truth: np.ndarray,
    groups: list[tuple[str, int]],
    threshold: float,
) -> dict:
    """Per-lesion detection rate of ``score >= threshold`` on a stack of slices ``[N, H, W]``.

    ``groups[i] = (case, slice number)``: slices of one case with consecutive numbers are
    stacked, and a lesion is a 3-D connected component (26-connectivity) of ``truth``
    there. A lesion is found when any of its pixels scores at or above ``threshold``.
    """
    from scipy import ndimage

    truth = np.asarray(truth) > 0
    hit = np.asarray(score) >= threshold
    found, sizes = [], []
    for _, run in consecutive_runs(groups):
        labels, n = ndimage.label(truth[run], structure=np.ones((3, 3, 3), bool))
        if n == 0:
            continue
        ids = np.arange(1, n + 1)
        sizes.extend(ndimage.sum(np.ones_like(labels), labels, ids).astype(int).tolist())
        found.extend(ndimage.maximum(hit[run].astype(np.uint8), labels, ids).astype(bool).tolist())
    total = len(found)
    return {
        "lesions": total,
        "found": int(sum(found)),
        "rate": float(np.mean(found)) if total else None,
        "lesion_pixels": sizes,
        "found_each": [bool(f) for f in found],
    }


def slice_auroc(slice_scores: np.ndarray, abnormal: np.ndarray) -> float | None:
    """AUROC of per-slice scores for abnormal (1) vs healthy (0) slices; None without both."""
    labels = np.asarray(abnormal) > 0
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(slice_scores, dtype=np.float64)))
