"""Pixel-level detection metrics (MedIAnomaly style: pooled over all pixels considered).

``best_dice`` is the pixel F1 at the F1-optimal threshold, read exactly off the
precision-recall curve; ``threshold`` is that score value (predict ``score >= threshold``).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def pixel_metrics(score: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None) -> dict:
    """AUROC, AP and best Dice of ``score`` against binary ``truth`` over ``region`` (default: all)."""
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
    return {
        "auroc": float(roc_auc_score(t, s)),
        "ap": float(average_precision_score(t, s)),
        "best_dice": float(f1[best]),
        "threshold": float(thresholds[best]),
        "pixels": int(t.size),
        "positives": int(t.sum()),
    }
