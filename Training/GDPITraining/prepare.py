"""``gdpi prepare``: healthy and abnormal slices from CT datasets, on a model grid.

Layouts (``--layout``):
- ``lits``: ``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]`` (1 liver, 2 tumour).
- ``msd``: Medical Segmentation Decathlon Task03, ``imagesTr/liver_N.nii.gz`` +
  ``labelsTr/liver_N.nii.gz`` (1 liver, 2 tumour).
- ``ircad``: 3D-IRCADb-01, ``3Dircadb1.N/PATIENT_DICOM/`` (DICOM series) +
  ``MASKS_DICOM/liver/`` + any ``MASKS_DICOM/livertumor*/`` (DICOM, nonzero = inside).
- ``folders``: one subfolder per case with ``ct.*`` and ``seg.*`` (as ``gdpi detect``'s
  folder mode; label values as LiTS unless ``--liver-label``/``--tumour-label``).
- ``list``: a CSV with columns ``ct,liver`` and optional ``tumour,liver_label,tumour_label,case``.
- ``synthetic``: ``--synthetic-cases`` generated abdomens (healthy unless ``--synthetic-lesions``).

Slices are taken in LPS orientation, mapped onto the model grid exactly as
``gdpi detect`` maps them (same code), and kept when the liver covers at least
``--min-liver-mm2``. Healthy = no tumour pixel in the slice; abnormal = at least one.
Cases, never slices, are split into train/val (``--val-fraction``) and test
(``--test-cases``), reproducibly for a seed.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from GDPILiverAnomalyLib.errors import InputError
from GDPILiverAnomalyLib.files.synthetic import synthetic_case
from GDPILiverAnomalyLib.files.volumes import (
    OrientedCase,
    image_stem,
    mask_on_ct_grid,
    read_ct,
    read_image,
)
from GDPILiverAnomalyLib.method.ame import ame_margins, denoise_for_ame
from GDPILiverAnomalyLib.method.grid import InputGrid, PlaneMapping
from GDPILiverAnomalyLib.method.parameters import PRESETS

from .store import StoreWriter


@dataclass
class CaseData:
    name: str
    ct: sitk.Image
    liver: np.ndarray  # uint8 on the CT grid
    tumour: np.ndarray  # uint8 on the CT grid
    sources: dict
    ignore: np.ndarray | None = None  # uint8 on the CT grid: slices touching it are dropped


def _labels_on_ct(path: Path, ct: sitk.Image, labels: tuple[int, ...] | None) -> np.ndarray:
    """Voxels of ``path`` whose value is in ``labels`` (None = nonzero), on the CT grid."""
    image = read_image(path, "mask")
    values = sitk.GetArrayViewFromImage(image)
    selected = values != 0 if labels is None else np.isin(values, labels)
    return mask_on_ct_grid(selected, image, ct)


def _label_map_case(
    name: str,
    ct_path: Path,
    seg_path: Path,
    liver_label: int | None = None,
    tumour_label: int | None = None,
    tumour_path: Path | None = None,
    ignore_label: int | None = None,
) -> CaseData:
    ct = read_ct(ct_path)
    ignore = _labels_on_ct(seg_path, ct, (ignore_label,)) if ignore_label is not None else None
    if tumour_path is not None:
        tumour = _labels_on_ct(tumour_path, ct, None if tumour_label is None else (tumour_label,))
    else:
        tumour = _labels_on_ct(seg_path, ct, (2 if tumour_label is None else tumour_label,))
    liver_labels = (1, 2) if liver_label is None else (liver_label,)
    liver = _labels_on_ct(seg_path, ct, liver_labels) | tumour
    if ignore is not None:
        liver |= ignore
    if not liver.any():
        raise InputError(f"{seg_path}: no liver voxels")
    return CaseData(
        name,
        ct,
        liver,
        tumour,
        {"ct": str(ct_path), "liver": str(seg_path), "tumour": str(tumour_path or seg_path)},
        ignore,
    )


def iter_cases(
    layout: str,
    source: Path | None,
    liver_label: int | None = None,
    tumour_label: int | None = None,
    synthetic_cases: int = 0,
    synthetic_lesions: bool = False,
    seed: int = 0,
    ignore_label: int | None = None,
) -> Iterator[CaseData | tuple[str, Exception]]:
    """Cases of a dataset layout; a case that cannot be read yields ``(name, error)``.

    ``ignore_label`` (label-map layouts): voxels with that label count as liver, and
    every slice that holds one is left out (e.g. real tumours in a synthetic-tumour set).
    """
    jobs = []  # (case name, loader)
    labels = dict(liver_label=liver_label, tumour_label=tumour_label, ignore_label=ignore_label)
    if layout == "synthetic":
        for i in range(seed, seed + synthetic_cases):
            jobs.append((f"synthetic-{i:04d}", partial(_synthetic, i, synthetic_lesions)))
    elif layout == "lits":
        for ct in sorted(source.iterdir()):
            m = re.fullmatch(r"volume-(\d+)", image_stem(ct))
            if m:
                name = f"volume-{m.group(1)}"
                segs = sorted(source.glob(f"segmentation-{m.group(1)}.nii*"))
                seg = segs[0] if segs else source / f"segmentation-{m.group(1)}.nii"
                jobs.append((name, partial(_label_map_case, name, ct, seg, **labels)))
        jobs.sort(key=lambda j: int(j[0].split("-")[1]))
    elif layout == "msd":
        for ct in sorted((source / "imagesTr").glob("*.nii*")):
            if not ct.name.startswith("."):
                seg = source / "labelsTr" / ct.name
                jobs.append(
                    (image_stem(ct), partial(_label_map_case, image_stem(ct), ct, seg, **labels))
                )
    elif layout == "ircad":
        patients = [p for p in sorted(source.iterdir()) if (p / "PATIENT_DICOM").is_dir()]
        if (source / "PATIENT_DICOM").is_dir():
            patients = [source]
        jobs = [(p.name, partial(_ircad_case, p)) for p in patients]
    elif layout == "folders":
        from GDPILiverAnomalyLib.files.cases import pair_cases

        for case in pair_cases(source, source):
            jobs.append(
                (case.name, partial(_label_map_case, case.name, case.ct, case.liver, **labels))
            )
    elif layout == "list":
        base = source.parent
        try:
            with open(source, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"cannot read the case list {source}: {exc}") from None
        missing = {"ct", "liver"} - set(rows[0] if rows else {})
        if missing:
            raise InputError(
                f"case list {source} needs the columns ct and liver (missing: "
                f"{', '.join(sorted(missing))}); optional: tumour, liver_label, tumour_label, case"
            )
        for i, row in enumerate(rows):
            name = row.get("case") or f"case-{i:04d}"
            try:
                ll = int(row["liver_label"]) if row.get("liver_label") else liver_label
                tl = int(row["tumour_label"]) if row.get("tumour_label") else tumour_label
            except ValueError:
                raise InputError(
                    f"case list {source}, row {i + 2}: label values must be integers"
                ) from None
            if not row.get("ct") or not row.get("liver"):
                raise InputError(f"case list {source}, row {i + 2}: ct and liver are required")
            tumour = base / row["tumour"] if row.get("tumour") else None
            jobs.append(
                (
                    name,
                    partial(
                        _list_case, name, base / row["ct"], base / row["liver"], tumour, ll, tl
                    ),
                )
            )
    else:
        raise InputError(f"unknown layout {layout!r}")
    if not jobs:
        raise InputError(f"no cases found in {source} for layout {layout}")
    for name, load in jobs:
        try:
            yield load()
        except (InputError, RuntimeError, OSError) as exc:
            yield name, exc


def _list_case(name, ct, liver, tumour, liver_label, tumour_label) -> CaseData:
    if tumour is None and liver_label is not None and tumour_label is None:
        # a label map such as TotalSegmentator's: the liver label only, no tumour label
        ct_image = read_ct(ct)
        mask = _labels_on_ct(liver, ct_image, (liver_label,))
        return CaseData(
            name,
            ct_image,
            mask,
            np.zeros_like(mask),
            {"ct": str(ct), "liver": str(liver), "tumour": ""},
        )
    return _label_map_case(name, ct, liver, liver_label, tumour_label, tumour)


def _ircad_case(patient: Path) -> CaseData:
    ct = read_ct(patient / "PATIENT_DICOM")
    masks = patient / "MASKS_DICOM"
    liver = _labels_on_ct(masks / "liver", ct, None)
    tumour = np.zeros_like(liver)
    tumour_dirs = sorted(
        p for p in masks.iterdir() if p.is_dir() and p.name.lower().startswith("livertumor")
    )
    for d in tumour_dirs:
        tumour |= _labels_on_ct(d, ct, None)
    return CaseData(
        patient.name,
        ct,
        liver | tumour,
        tumour,
        {
            "ct": str(patient / "PATIENT_DICOM"),
            "liver": str(masks / "liver"),
            "tumour": ";".join(str(d) for d in tumour_dirs),
        },
    )


def _synthetic(seed: int, lesions: bool) -> CaseData:
    case = synthetic_case(seed, n_lesions=None if lesions else 0)
    return CaseData(
        f"synthetic-{seed:04d}",
        case.image(case.ct),
        case.liver,
        case.tumour,
        {"ct": f"synthetic_case(seed={seed})", "liver": "", "tumour": ""},
    )


def assign_splits(
    names: list[str], val_fraction: float, test_cases: set[str], seed: int
) -> dict[str, str]:
    """Case -> split, by patient: a seeded shuffle, the first ``val_fraction`` go to val."""
    rest = sorted(n for n in names if n not in test_cases)
    order = np.random.default_rng(seed).permutation(len(rest))
    n_val = int(round(val_fraction * len(rest)))
    if val_fraction > 0 and n_val == 0 and len(rest) > 1:
        n_val = 1
    split = {n: "test" for n in names if n in test_cases}
    for rank, i in enumerate(order):
        split[rest[i]] = "val" if rank < n_val else "train"
    return split


def slices_of_case(
    case: CaseData, grid: InputGrid, min_liver_mm2: float, ame_sigma_mm: float = 0.0
) -> tuple[np.ndarray, ...] | None:
    """Grid images, liver, tumour and per-slice rows of one case (None: no usable slice)."""
    oriented = OrientedCase.from_arrays(case.ct, case.liver)
    tumour = oriented.lps(case.tumour.astype(np.uint8))
    sz, sy, sx = oriented.spacing_zyx
    area = oriented.liver.sum(axis=(1, 2)) * sy * sx
    usable = area >= min_liver_mm2
    if case.ignore is not None:
        ignore = oriented.lps(case.ignore.astype(np.uint8))
        usable &= ~ignore.any(axis=(1, 2))
    keep = np.flatnonzero(usable)
    if not len(keep):
        return None
    mapping = PlaneMapping.for_volume(grid, oriented.ct.shape[1:], (sy, sx), oriented.liver)
    images = mapping.to_grid(oriented.ct[keep], "image")
    liver = mapping.to_grid(oriented.liver[keep], "label")
    tum = mapping.to_grid(tumour[keep], "label")
    ame_ct = denoise_for_ame(oriented.ct[keep], (sy, sx), ame_sigma_mm)
    dark, bright = ame_margins(ame_ct, oriented.liver[keep])
    margins = {
        "ame_dark": mapping.to_grid(dark, "max"),
        "ame_bright": mapping.to_grid(bright, "max"),
    }
    tumour_any = tumour[keep].any(axis=(1, 2))
    rows = [
        {
            "case": case.name,
            "slice": int(k),
            "kind": "abnormal" if tumour_any[i] else "healthy",
            "spacing_x_mm": round(sx, 4),
            "spacing_y_mm": round(sy, 4),
            "spacing_z_mm": round(sz, 4),
            "liver_px": int(liver[i].sum()),
            "tumour_px": int(tum[i].sum()),
            **case.sources,
        }
        for i, k in enumerate(keep)
    ]
    return images, liver, tum, rows, margins


def prepare(
    layout: str,
    source: Path | None,
    out: Path,
    grid: InputGrid,
    *,
    liver_label: int | None = None,
    tumour_label: int | None = None,
    val_fraction: float = 0.1,
    test_cases: set[str] = frozenset(),
    min_liver_mm2: float = 1000.0,
    seed: int = 0,
    synthetic_cases: int = 0,
    synthetic_lesions: bool = False,
    ignore_label: int | None = None,
    ame_sigma_mm: float = PRESETS["fast"]["ame_sigma_mm"],
    log=print,
) -> dict:
    """Make a slice store; return its summary (also in ``store.json``).

    ``test_cases`` holds case names, or ``*`` for every case. The AME margins are taken
    on the CT smoothed by ``ame_sigma_mm`` (``DetectionParams.ame_sigma_mm``)."""
    writer = StoreWriter(out, grid.size)
    per_case, failed = [], []
    for item in iter_cases(
        layout,
        source,
        liver_label,
        tumour_label,
        synthetic_cases,
        synthetic_lesions,
        seed,
        ignore_label,
    ):
        if isinstance(item, tuple):
            failed.append({"case": item[0], "error": str(item[1])})
            log(f"skipped {item[0]}: {item[1]}")
            continue
        result = slices_of_case(item, grid, min_liver_mm2, ame_sigma_mm)
        if result is None:
            failed.append({"case": item.name, "error": "no slice with enough liver"})
            continue
        images, liver, tumour, rows, margins = result
        per_case.append((item.name, images, liver, tumour, rows, margins))
        log(
            f"{item.name}: {sum(r['kind'] == 'healthy' for r in rows)} healthy, "
            f"{sum(r['kind'] == 'abnormal' for r in rows)} abnormal slices"
        )
    if not per_case:
        raise InputError("no usable case")
    names = [c[0] for c in per_case]
    test = set(names) if "*" in test_cases else set(test_cases)
    splits = assign_splits(names, val_fraction, test, seed)
    for name, images, liver, tumour, rows, margins in per_case:
        for r in rows:
            r["split"] = splits[name]
        writer.add(images, liver, tumour, rows, margins)
    rows = writer.rows
    all_images = np.concatenate(writer.images)
    all_liver = np.concatenate(writer.liver).astype(bool)
    liver_hu = all_images[all_liver]
    counts = {
        f"{k}_{s}": sum(1 for r in rows if r["kind"] == k and r["split"] == s)
        for k in ("healthy", "abnormal")
        for s in ("train", "val", "test")
    }
    summary = {
        "layout": layout,
        "source": str(source) if source else None,
        "grid": grid.to_dict(),
        "seed": seed,
        "val_fraction": val_fraction,
        "min_liver_mm2": min_liver_mm2,
        "ignore_label": ignore_label,
        "ame_sigma_mm": ame_sigma_mm,
        "cases": {
            s: sorted(n for n, v in splits.items() if v == s) for s in ("train", "val", "test")
        },
        "failed": failed,
        "slices": len(rows),
        "counts": counts,
        "liver_area_px": {
            "mean": float(all_liver.sum(axis=(1, 2)).mean()),
            "min": int(all_liver.sum(axis=(1, 2)).min()),
            "max": int(all_liver.sum(axis=(1, 2)).max()),
        },
        "liver_hu": {
            "mean": float(liver_hu.mean()),
            "std": float(liver_hu.std()),
            "p5": float(np.percentile(liver_hu, 5)),
            "p95": float(np.percentile(liver_hu, 95)),
        },
        "command": " ".join(sys.argv),
    }
    writer.write(summary)
    return summary


def print_summary(summary: dict, log=print) -> None:
    c = summary["counts"]
    log(
        f"cases: train {len(summary['cases']['train'])}, val {len(summary['cases']['val'])}, "
        f"test {len(summary['cases']['test'])}, failed {len(summary['failed'])}"
    )
    log(
        f"healthy slices: train {c['healthy_train']}, val {c['healthy_val']}, test {c['healthy_test']}; "
        f"abnormal slices: train {c['abnormal_train']}, val {c['abnormal_val']}, test {c['abnormal_test']}"
    )
    log(
        f"liver area {summary['liver_area_px']['mean']:.0f} px on average "
        f"({summary['liver_area_px']['min']}..{summary['liver_area_px']['max']}); liver HU "
        f"{summary['liver_hu']['mean']:.1f} +- {summary['liver_hu']['std']:.1f} "
        f"(p5 {summary['liver_hu']['p5']:.0f}, p95 {summary['liver_hu']['p95']:.0f})"
    )
