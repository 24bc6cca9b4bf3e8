"""Lesion-level evaluation: FROC of the detected 3-D components, and bootstrap
confidence intervals over scans.

Detected components are what ``gdpi detect``'s lesion table lists: the 3-D connected
components (26-connectivity) of ``score > t`` inside the liver, no minimum size (one can
be asked for with ``min_voxels``). A lesion is a 3-D connected component (26-connectivity)
of the reference tumour mask. At a threshold ``t`` a lesion is *found* when a detected
component overlaps it (one component over two lesions finds both; a lesion split over
two components is found once); a detected component that overlaps no lesion is a
*false positive*. The FROC curve is lesion sensitivity against the mean number of
false-positive components per scan, over thresholds; the sensitivity at a false-positive
rate ``r`` is the highest sensitivity of any swept threshold with at most ``r`` false
positives per scan (no interpolation), and the mean over :data:`FROC_RATES` is the
competition performance metric of LUNA16 (Setio et al. 2017). Thresholds that more
than :data:`MAX_LIVER_FRACTION` of the liver voxels exceed are not swept: there the
components merge into a few over most of the liver, which would "find" every lesion
with hardly a false positive.

Confidence intervals resample *scans* (patients) with replacement (percentile
intervals, fixed seed): lesions and pixels of one scan stay together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: The false-positive rates (per scan) of the FROC score (LUNA16's seven points).
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: The rates whose sensitivity is reported on its own.
REPORTED_RATES = (0.5, 1.0, 2.0, 4.0)
#: Lesion size classes (mL, lower bound inclusive): name, low, high.
SIZE_CLASSES = (("<1 mL", 0.0, 1.0), ("1-10 mL", 1.0, 10.0), (">10 mL", 10.0, np.inf))
#: The rate at which the sensitivity per size class is reported.
SIZE_RATE = 1.0
#: Thresholds that more than this fraction of the liver voxels exceed are not swept.
MAX_LIVER_FRACTION = 0.1
_CONNECTIVITY = np.ones((3, 3, 3), bool)


def consecutive_runs(groups: list[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """``(case, rows)`` for each run of slices of one case with consecutive slice numbers
    (``groups[i] = (case, slice number)``), rows in slice order; cases in first-seen order."""
    by_case: dict[str, list[int]] = {}
    for i, (case, _) in enumerate(groups):
        by_case.setdefault(case, []).append(i)
    out = []
    for case, rows in by_case.items():
        rows = sorted(rows, key=lambda i: groups[i][1])
        current = [rows[0]]
        for a, b in zip(rows, rows[1:]):
            if groups[b][1] == groups[a][1] + 1:
                current.append(b)
            else:
                out.append((case, current))
                current = [b]
        out.append((case, current))
    return out


@dataclass
class ScanVolume:
    """One 3-D volume of a scan: ``score`` (any units; higher = more anomalous), ``liver``
    and ``truth`` (nonzero = liver / tumour), all ``[Z, Y, X]``; ``voxel_ml`` the volume
    of one voxel (mL; None: unknown, no size classes)."""

    scan: str
    score: np.ndarray
    liver: np.ndarray
    truth: np.ndarray
    voxel_ml: float | None = None


def volumes_from_slices(
    score: np.ndarray,
    liver: np.ndarray,
    truth: np.ndarray,
    groups: list[tuple[str, int]],
    voxel_ml: dict[str, float | None] | float | None = None,
) -> list[ScanVolume]:
    """Split a stack of slices ``[N, H, W]`` into volumes: ``groups[i] = (case, slice
    number)``; the slices of one case with consecutive numbers form one volume (as
    :func:`metrics.lesion_detection`). ``voxel_ml``: per case, one value, or None."""
    volumes = []
    for case, run in consecutive_runs(groups):
        ml = voxel_ml.get(case) if isinstance(voxel_ml, dict) else voxel_ml
        volumes.append(ScanVolume(case, score[run], liver[run], truth[run], ml))
    return volumes


@dataclass
class LesionSweep:
    """Detections of every threshold (descending): ``fp[k, s]`` false-positive
    components of scan ``s`` at ``thresholds[k]``, ``found[k, l]`` whether lesion ``l``
    is found there; ``lesion_scan[l]`` its scan, ``lesion_ml[l]`` its volume (mL, NaN
    when unknown)."""

    thresholds: np.ndarray
    scans: list[str]
    fp: np.ndarray
    found: np.ndarray
    lesion_scan: np.ndarray
    lesion_ml: np.ndarray
    components: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def curve(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean false positives per scan and lesion sensitivity per threshold; ``weights``
        = how often each scan is counted (a bootstrap resample). Sensitivity None
        without lesions."""
        w = np.ones(len(self.scans)) if weights is None else np.asarray(weights, float)
        fp_rate = self.fp @ w / w.sum()
        lesion_w = w[self.lesion_scan]
        if lesion_w.sum() == 0:
            return fp_rate, None
        return fp_rate, self.found @ lesion_w / lesion_w.sum()

    def operating_point(self, rate: float, weights: np.ndarray | None = None) -> int | None:
        """Index of the threshold of highest sensitivity with at most ``rate`` false
        positives per scan (the highest such threshold among ties); None without lesions."""
        fp_rate, sens = self.curve(weights)
        if sens is None:
            return None
        allowed = np.flatnonzero(fp_rate <= rate + 1e-12)  # never empty: k = 0 detects nothing
        return int(allowed[np.argmax(sens[allowed])])

    def froc_points(self, weights: np.ndarray | None = None) -> dict | None:
        """Sensitivity at each of :data:`FROC_RATES` and their mean; None without lesions."""
        fp_rate, sens = self.curve(weights)
        if sens is None:
            return None
        points = {}
        for rate in FROC_RATES:
            allowed = fp_rate <= rate + 1e-12
            points[rate] = float(sens[allowed].max())
        return {"sensitivity": points, "mean": float(np.mean(list(points.values())))}


def _lesions_of(volume: ScanVolume) -> tuple[np.ndarray, int]:
    return ndimage.label(np.asarray(volume.truth) > 0, structure=_CONNECTIVITY)


def sweep(
    volumes: list[ScanVolume],
    thresholds: np.ndarray | None = None,
    levels: int = 40,
    min_voxels: int = 0,
    max_liver_fraction: float | None = MAX_LIVER_FRACTION,
) -> LesionSweep:
    """Detected components, false positives and found lesions at every threshold.

    Default thresholds: just below each lesion's maximum liver score (where the
    sensitivity steps) and ``levels`` quantiles of the liver scores (from the level that
    ``max_liver_fraction`` of the liver voxels exceed to the one that 1 in 10,000
    exceed), plus the maximum (nothing detected). Thresholds that more than
    ``max_liver_fraction`` of the liver voxels (all volumes pooled) exceed are left out,
    given or not (None: none left out): there the components merge into a few that
    cover most of the liver, which would "find" every lesion with hardly a false
    positive. Each threshold labels the liver's bounding box once
    (``scipy.ndimage.label``): a few milliseconds per threshold on a model-grid volume.
    ``min_voxels`` > 0 drops smaller components (they neither find nor count as false).
    """
    scans = list(dict.fromkeys(v.scan for v in volumes))
    prepared = []
    for v in volumes:
        liver = np.asarray(v.liver) > 0
        box = ndimage.find_objects(liver.astype(np.uint8))
        box = box[0] if box and box[0] is not None else tuple(slice(0, 0) for _ in liver.shape)
        score = np.where(liver, np.asarray(v.score, np.float64), -np.inf)[box]
        labels, n = _lesions_of(v)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        # lesion voxels outside the liver box never score: they cannot be found
        lesion_max = np.full(n + 1, -np.inf)
        inside = labels[box]
        np.maximum.at(lesion_max, inside.ravel(), score.ravel())
        prepared.append((v, score, inside, n, sizes, lesion_max[1:]))
    liver_scores = np.concatenate([s[np.isfinite(s)] for _, s, *_ in prepared] or [[]])
    cap = 1.0 if max_liver_fraction is None else float(max_liver_fraction)
    if thresholds is None:
        finite_max = [m[np.isfinite(m)] for *_, m in prepared]
        candidates = [np.nextafter(np.concatenate(finite_max or [[]]), -np.inf)]
        if len(liver_scores):
            q = 1.0 - np.geomspace(min(cap, 0.5), 1e-4, levels)
            candidates += [np.quantile(liver_scores, q), [liver_scores.max()]]
        thresholds = np.concatenate(candidates)
    thresholds = np.unique(np.asarray(thresholds, np.float64))[::-1]
    if len(liver_scores) and cap < 1.0:
        ranked = np.sort(liver_scores)  # fraction of liver voxels above each threshold
        above = 1.0 - np.searchsorted(ranked, thresholds, side="right") / len(ranked)
        thresholds = thresholds[above <= cap]
    if not len(thresholds):
        thresholds = np.array([liver_scores.max() if len(liver_scores) else 0.0])
    k_count = len(thresholds)
    fp = np.zeros((k_count, len(scans)), np.int64)
    components = np.zeros(k_count, np.int64)
    found_parts, lesion_scan, lesion_ml = [], [], []
    for v, score, inside, n, sizes, _ in prepared:
        s = scans.index(v.scan)
        found = np.zeros((k_count, n), bool)
        for k, t in enumerate(thresholds):
            detected = score > t
            if not detected.any():
                continue
            labels, m = ndimage.label(detected, structure=_CONNECTIVITY)
            kept = np.ones(m + 1, bool)
            if min_voxels > 0:
                kept = np.bincount(labels.ravel(), minlength=m + 1) >= min_voxels
            kept[0] = False
            both = (labels > 0) & (inside > 0)
            pairs = np.unique(labels[both].astype(np.int64) * (n + 1) + inside[both])
            comp, lesion = pairs // (n + 1), pairs % (n + 1)
            touching = np.zeros(m + 1, bool)
            touching[comp] = True
            fp[k, s] = int((kept & ~touching).sum())
            components[k] += int(kept.sum())
            hit = kept[comp]
            found[k, lesion[hit] - 1] = True
        found_parts.append(found)
        lesion_scan += [s] * n
        ml = np.nan if v.voxel_ml is None else float(v.voxel_ml)
        lesion_ml += (sizes * ml).tolist()
    found_all = np.concatenate(found_parts, axis=1) if found_parts else np.zeros((k_count, 0))
    return LesionSweep(
        thresholds,
        scans,
        fp,
        found_all.astype(bool),
        np.asarray(lesion_scan, np.int64),
        np.asarray(lesion_ml, np.float64),
        components,
    )


def at_threshold(
    volumes: list[ScanVolume],
    threshold_hu: float,
    resamples: int = 1000,
    seed: int = 0,
    min_voxels: int = 0,
) -> dict:
    """Lesion sensitivity and false-positive components per scan at one fixed threshold
    (HU; e.g. the default of ``gdpi detect``, or one chosen on other data), each with a
    bootstrap interval over scans, and the lesions found per size class (JSON-ready).
    ``sensitivity`` is None without lesions."""
    result = sweep(volumes, np.array([float(threshold_hu)]), min_voxels=min_voxels,
                   max_liver_fraction=None)  # fmt: skip
    fp_rate, sens = result.curve()
    weights = bootstrap_weights(len(result.scans), resamples, seed)
    boot = np.full((len(weights), 2), np.nan)
    if len(result.scans) > 1:
        for b, w in enumerate(weights):
            f, s = result.curve(w)
            boot[b] = [f[0], np.nan if s is None or not np.isfinite(s[0]) else s[0]]
    sensitivity = None if sens is None else float(sens[0])
    return {
        "threshold_hu": float(threshold_hu),
        "scans": len(result.scans),
        "lesions": int(len(result.lesion_scan)),
        "found": int(result.found[0].sum()),
        "components": int(result.components[0]),
        "sensitivity": interval(boot[:, 1], sensitivity),
        "fp_per_scan": interval(boot[:, 0], float(fp_rate[0])),
        "by_size": _size_table(result, 0),
    }


def bootstrap_weights(n_scans: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """``[resamples, n_scans]``: how often each scan is drawn in each resample (scans
    drawn with replacement, ``n_scans`` per resample; seeded, reproducible)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_scans, size=(resamples, n_scans))
    counts = [np.bincount(d, minlength=n_scans) for d in draws]
    return np.stack(counts).astype(np.float64) if counts else np.zeros((0, n_scans))


def interval(values: np.ndarray, point: float | None, level: float = 0.95) -> dict:
    """``{"value", "low", "high", "resamples"}``: the point estimate and the percentile
    interval of bootstrap ``values`` (NaN = resample where the figure is undefined,
    left out); ``low``/``high`` None when fewer than two resamples are usable."""
    values = np.asarray(values, np.float64)
    usable = values[np.isfinite(values)]
    if point is None or len(usable) < 2:
        return {"value": point, "low": None, "high": None, "resamples": int(len(usable))}
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(usable, [tail, 100 - tail])
    return {"value": point, "low": float(low), "high": float(high), "resamples": int(len(usable))}


def _size_table(result: LesionSweep, k: int | None) -> dict:
    table = {}
    for name, low, high in SIZE_CLASSES:
        member = (result.lesion_ml >= low) & (result.lesion_ml < high)
        n = int(member.sum())
        hits = int(result.found[k, member].sum()) if k is not None and n else 0
        table[name] = {"lesions": n, "found": hits, "sensitivity": hits / n if n else None}
    unknown = int(np.isnan(result.lesion_ml).sum())
    if unknown:
        hits = int(result.found[k, np.isnan(result.lesion_ml)].sum()) if k is not None else 0
        table["size unknown"] = {"lesions": unknown, "found": hits, "sensitivity": hits / unknown}
    return table


def lesion_figures(
    volumes: list[ScanVolume],
    resamples: int = 1000,
    seed: int = 0,
    curve_points: int = 200,
    min_voxels: int = 0,
    max_liver_fraction: float | None = MAX_LIVER_FRACTION,
) -> dict:
    """Every lesion-level figure of a set of scans (JSON-ready).

    ``froc``: sensitivity at each of :data:`FROC_RATES` false positives per scan, their
    ``mean`` (the FROC score), each with a bootstrap interval over scans; ``at``: the
    :data:`REPORTED_RATES` with the threshold and counts of each operating point;
    ``by_size``: lesions found per size class at :data:`SIZE_RATE` false positives per
    scan; ``curve``: the FROC curve (thinned to about ``curve_points`` thresholds).
    """
    result = sweep(volumes, min_voxels=min_voxels, max_liver_fraction=max_liver_fraction)
    fp_rate, sens = result.curve()
    figures: dict = {
        "scans": len(result.scans),
        "lesions": int(len(result.lesion_scan)),
        "min_voxels": min_voxels,
        "max_liver_fraction": max_liver_fraction,
        "rule": "3-D components (26-conn.) of score > t in the liver; a lesion is found when "
        "a component overlaps it; a component overlapping no lesion is a false positive",
    }
    points = result.froc_points()
    if points is None:
        figures.update(froc=None, at=None, by_size=None, curve=None)
        return figures
    weights = bootstrap_weights(len(result.scans), resamples, seed)
    boot = np.full((len(weights), len(FROC_RATES) + 1), np.nan)
    for b, w in enumerate(weights):
        p = result.froc_points(w)
        if p is not None:
            boot[b] = [*p["sensitivity"].values(), p["mean"]]
    single = len(result.scans) < 2  # every resample is the one scan: no interval
    if single:
        boot[:] = np.nan
    froc = {
        str(rate): interval(boot[:, i], points["sensitivity"][rate])
        for i, rate in enumerate(FROC_RATES)
    }
    froc["mean"] = interval(boot[:, -1], points["mean"])
    at = {}
    for rate in REPORTED_RATES:
        k = result.operating_point(rate)
        at[str(rate)] = {
            "sensitivity": float(sens[k]),
            "threshold": float(result.thresholds[k]),
            "fp_per_scan": float(fp_rate[k]),
            "found": int(result.found[k].sum()),
            "components": int(result.components[k]),
        }
    keep = np.unique(np.linspace(0, len(fp_rate) - 1, curve_points).round().astype(int))
    figures.update(
        froc=froc,
        at=at,
        by_size=_size_table(result, result.operating_point(SIZE_RATE)),
        size_rate=SIZE_RATE,
        curve={
            "threshold": np.round(result.thresholds[keep], 5).tolist(),
            "fp_per_scan": np.round(fp_rate[keep], 5).tolist(),
            "sensitivity": np.round(sens[keep], 5).tolist(),
        },
        bootstrap={"resamples": resamples, "seed": seed, "over": "scans"},
    )
    return figures


def bootstrap_pixel_metrics(
    score: np.ndarray,
    truth: np.ndarray,
    scans: list[str] | np.ndarray,
    region: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Pixel AUROC and AP with bootstrap intervals over scans: ``score``, ``truth`` and
    ``region`` are ``[N, ...]`` stacks of slices and ``scans[i]`` names the scan of slice
    ``i``; each resample draws scans with replacement and weights their pixels by how
    often they were drawn. The point estimates equal ``sklearn``'s ``roc_auc_score``
    and ``average_precision_score``. Returns ``{"auroc": interval, "ap": interval,
    "scans"}`` (:func:`interval`; no interval with a single scan).

    Exact and fast: both figures only change at the distinct scores of tumour pixels,
    so each scan is summarised, at each of those, by its counts of tumour pixels equal
    to it and at or above it and of other pixels below, equal to and at or above it; a
    resample is then a weighted sum over scans (one matrix product for all resamples).
    """
    names, scan_of_slice = np.unique(np.asarray(scans), return_inverse=True)
    score = np.asarray(score, np.float64)
    truth = np.asarray(truth) > 0
    scan_px = np.broadcast_to(scan_of_slice.reshape(-1, *[1] * (score.ndim - 1)), score.shape)
    keep = np.ones(score.shape, bool) if region is None else np.asarray(region) > 0
    s, t, c = score[keep], truth[keep], scan_px[keep]
    levels = np.unique(s[t])  # distinct tumour-pixel scores, ascending
    counts = {k: np.zeros((len(names), len(levels))) for k in ("pos_eq", "pos_ge", "neg_lt", "neg_eq", "neg_ge")}  # fmt: skip
    for j in range(len(names)):
        pos, neg = np.sort(s[t & (c == j)]), np.sort(s[~t & (c == j)])
        pos_lt, pos_le = (np.searchsorted(pos, levels, side) for side in ("left", "right"))
        neg_lt, neg_le = (np.searchsorted(neg, levels, side) for side in ("left", "right"))
        counts["pos_eq"][j], counts["pos_ge"][j] = pos_le - pos_lt, len(pos) - pos_lt
        counts["neg_lt"][j], counts["neg_eq"][j] = neg_lt, neg_le - neg_lt
        counts["neg_ge"][j] = len(neg) - neg_lt
    n_pos = np.array([np.sum(t & (c == j)) for j in range(len(names))], np.float64)
    n_neg = np.array([np.sum(~t & (c == j)) for j in range(len(names))], np.float64)

    def figures(weights: np.ndarray) -> np.ndarray:
        """AUROC and AP of each weight row ``[B, scans]`` -> ``[B, 2]`` (NaN: undefined)."""
        w = {k: weights @ v for k, v in counts.items()}
        pos, neg = weights @ n_pos, weights @ n_neg
        with np.errstate(invalid="ignore", divide="ignore"):
            # pairs (tumour pixel, other pixel) ordered right, ties half
            auroc = (w["pos_eq"] * (w["neg_lt"] + 0.5 * w["neg_eq"])).sum(axis=1) / (pos * neg)
            above = w["pos_ge"] + w["neg_ge"]  # 0 only where no drawn scan reaches the level
            precision = np.divide(w["pos_ge"], above, out=np.zeros_like(above), where=above > 0)
            ap = (w["pos_eq"] * precision).sum(axis=1) / pos
        out = np.stack([auroc, ap], axis=1)
        out[(pos == 0) | (neg == 0)] = np.nan
        return out

    point = figures(np.ones((1, len(names))))[0]
    values = np.full((1, 2), np.nan)  # one scan, or no resamples: no interval
    if len(names) >= 2 and resamples > 0:
        values = figures(bootstrap_weights(len(names), resamples, seed))
    result = {}
    for i, name in enumerate(("auroc", "ap")):
        value = None if not np.isfinite(point[i]) else float(point[i])
        result[name] = interval(values[:, i], value)
    result["scans"] = int(len(names))
    return result
