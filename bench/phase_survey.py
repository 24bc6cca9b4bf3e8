"""Contrast-phase recognition on every shared scan and on crops of it (docs/method.md,
"Contrast phase").

For each scan of ``../shared/data`` (its expected phase from data/README.md) and each
crop (the whole scan; the cranial / caudal half of the liver's slices; the liver's
slices +- 2; the liver's in-plane box + 30 mm on every slice; the 3 middle liver slices;
the patient's right 40 % of the columns, which cuts the aorta off: expected
``unknown``), ``estimate_phase`` runs on the oriented (LPS) CT and
liver mask and the phase and its reason are written to a JSON table. ``--baseline`` names
another ``phase.py`` (e.g. the previous version, ``git show REV:PATH > old.py``) whose
result is recorded beside it.

    python bench/phase_survey.py [--smoke] [--baseline old_phase.py] [--json docs/results/phase_survey.json]

``--smoke``: ts_small only (a second), for CI-like checks of the script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from GDPILiverAnomalyLib.files.volumes import OrientedCase, read_ct, read_liver_mask
from GDPILiverAnomalyLib.method import phase as phase_module

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: folder, CT, liver mask, liver label (None: any nonzero... as read_liver_mask), expected phase
CASES = (
    ("hcc_1211", "ct.nii.gz", "seg.nii.gz", None, "arterial"),
    ("hcc_1720", "ct.nii.gz", "seg.nii.gz", None, "venous"),
    ("hcc_0697", "ct.nii.gz", "seg.nii.gz", None, "venous"),
    ("chaos_ct3", "ct.nii.gz", "seg.nii.gz", None, "venous"),
    ("ts_small", "ct.nii.gz", "totalseg.nii.gz", 5, "non-contrast"),
    ("ts_full", "ct.nii.gz", "totalseg.nii.gz", 5, "non-contrast"),
    ("dcmqi_3slice", "dicom", "liver_seg.nrrd", None, "non-contrast"),
)


#: The crop without the aorta: the patient's right 40 % of the columns (LPS), the liver's
#: side; its expected phase is ``unknown`` (whatever else is bright there is no aorta).
CUT = "patient's right 40 % (no aorta)"


def crops(ct: np.ndarray, liver: np.ndarray, spacing_yx: tuple[float, float]) -> dict:
    """Named (CT, liver) crops of an LPS case (slices ascend to the head)."""
    zs = np.flatnonzero(liver.any(axis=(1, 2)))
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    mid = (z0 + z1) // 2
    rows = np.flatnonzero(liver.any(axis=(0, 2)))
    cols = np.flatnonzero(liver.any(axis=(0, 1)))
    my, mx = (int(round(30 / s)) for s in spacing_yx)
    y = slice(max(0, rows[0] - my), rows[-1] + my + 1)
    x = slice(max(0, cols[0] - mx), cols[-1] + mx + 1)
    c = len(zs) // 2
    three = slice(int(zs[max(0, c - 1)]), int(zs[min(len(zs) - 1, c + 1)]) + 1)
    out = {
        "whole scan": (slice(None), slice(None), slice(None)),
        "cranial half of the liver": (slice(mid, z1), slice(None), slice(None)),
        "caudal half of the liver": (slice(z0, mid), slice(None), slice(None)),
        "liver slices +- 2": (slice(max(0, z0 - 2), z1 + 2), slice(None), slice(None)),
        "liver box + 30 mm in-plane": (slice(None), y, x),
        "3 middle liver slices": (three, slice(None), slice(None)),
        CUT: (slice(None), slice(None), slice(0, int(0.4 * ct.shape[2]))),
    }
    return {name: (ct[box], liver[box]) for name, box in out.items()}


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("phase_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="ts_small only")
    parser.add_argument("--baseline", help="another phase.py to compare with")
    parser.add_argument("--json", default="docs/results/phase_survey.json")
    args = parser.parse_args()
    baseline = load_module(args.baseline) if args.baseline else None
    rows = []
    for case, ct_name, seg, label, expected in CASES:
        if args.smoke and case != "ts_small":
            continue
        image = read_ct(DATA / case / ct_name)
        oriented = OrientedCase.from_arrays(image, read_liver_mask(DATA / case / seg, image, label))
        for crop, (ct, liver) in crops(oriented.ct, oriented.liver, oriented.spacing_yx).items():
            t0 = time.perf_counter()
            found = phase_module.estimate_phase(ct, liver, oriented.spacing_yx)
            row = {
                "case": case,
                "crop": crop,
                "slices": int(ct.shape[0]),
                "liver_slices": int(liver.any(axis=(1, 2)).sum()),
                "expected": "unknown" if crop == CUT else expected,
                "phase": found.phase,
                "reason": found.reason,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            if baseline is not None:
                old = baseline.estimate_phase(ct, liver, oriented.spacing_yx)
                row["baseline_phase"] = old.phase
                row["baseline"] = old.describe()
            rows.append(row)
            print(
                f"{case:13s} {crop:28s} {found.phase:12s} {found.reason}"
                + (f" | before: {row['baseline_phase']}" if baseline else "")
            )
    wrong_arterial = sum(r["phase"] == "arterial" and r["expected"] != "arterial" for r in rows)
    summary = {
        "runs": len(rows),
        "as_expected": sum(r["phase"] == r["expected"] for r in rows),
        "unknown": sum(r["phase"] == "unknown" for r in rows),
        "wrong_arterial": wrong_arterial,
        "missed_arterial": sum(
            r["expected"] == "arterial" and r["phase"] != "arterial" for r in rows
        ),
    }
    if baseline is not None:
        summary["baseline_as_expected"] = sum(r["baseline_phase"] == r["expected"] for r in rows)
        summary["baseline_unknown"] = sum(r["baseline_phase"] == "unknown" for r in rows)
        summary["baseline_wrong_arterial"] = sum(
            r["baseline_phase"] == "arterial" and r["expected"] != "arterial" for r in rows
        )
    print(json.dumps(summary))
    machine = f"{platform.machine()} CPU, {platform.python_version()}, numpy {np.__version__}"
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"machine": machine, "summary": summary, "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
