"""Detection from files to files: one case, or every case of a folder.

This is the single code path behind ``gdpi detect``, the Slicer module's worker,
console batch processing and evaluation. Outputs are written into a hidden temporary
folder beside the output folder and moved into place only when complete.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__, signals
from .cases import pair_cases
from .checkpoint import Checkpoint
from .errors import Cancelled, GDPIError
from .files import atomic_dir, check_output_dir, write_text_atomic
from .parameters import DetectionParams
from .pipeline import DetectionResult, detect
from .progress import Progress
from .scoring import LESION_FIELDS
from .versions import versions
from .volumes import array_on_grid, check_hu, read_ct, read_liver_mask

OUTPUT_FILES = (
    "score.nrrd",
    "pseudo_healthy.nrrd",
    "candidates.nrrd",
    "anomaly.nrrd",
    "lesions.csv",
    "run.json",
)
SUMMARY_FIELDS = [
    "case",
    "status",
    "error",
    "lesions",
    "max_score_hu",
    "anomaly_ml",
    "nfe",
    "seconds",
    "ct",
    "liver",
    "out",
]


def geometry(image: sitk.Image) -> dict:
    return {
        "size": list(image.GetSize()),
        "spacing_mm": list(image.GetSpacing()),
        "origin_mm": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def _write_result(folder: Path, ct: sitk.Image, result: DetectionResult) -> None:
    volumes = {
        "score.nrrd": (result.score, np.float32),
        "pseudo_healthy.nrrd": (result.pseudo_healthy, np.float32),
        "candidates.nrrd": (result.candidates, np.uint8),
        "anomaly.nrrd": (result.anomaly, np.uint8),
    }
    for name, (array, dtype) in volumes.items():  # one volume's copy at a time
        image = array_on_grid(array.astype(dtype, copy=False), ct)
        sitk.WriteImage(image, str(folder / name), useCompression=True)
        del image
    with open(folder / "lesions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LESION_FIELDS)
        writer.writeheader()
        writer.writerows(lesion.to_dict() for lesion in result.lesions)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def run_case(
    ct_path: str | Path,
    liver_path: str | Path,
    checkpoint: Checkpoint,
    params: DetectionParams,
    out: str | Path,
    liver_label: int | None = None,
    allow_non_hu: bool = False,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_partial: Callable[[np.ndarray], None] | None = None,
    partial_interval_s: float = 2.0,
    overwrite: bool = False,
) -> dict:
    """Detect on one case and write every output into ``out``; return run.json's content.

    ``on_partial`` streams the score so far (see :func:`pipeline.detect`).
    """
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    params.validate(checkpoint.diffusion.num_timesteps)
    out = check_output_dir(out, overwrite, "run.json", lambda p: p.name in OUTPUT_FILES)
    ct = read_ct(ct_path)
    liver = read_liver_mask(liver_path, ct, liver_label)
    if not allow_non_hu:
        check_hu(sitk.GetArrayViewFromImage(ct), liver, f"CT {ct_path}")
    t_read = time.perf_counter() - t0
    result = detect(
        ct, liver, checkpoint, params, progress, should_cancel, on_partial, partial_interval_s
    )
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    run_info = {
        "gdpi_version": __version__,
        "started": started.isoformat(timespec="seconds"),
        "inputs": {
            "ct": str(Path(ct_path).absolute()),
            "liver": str(Path(liver_path).absolute()),
            "liver_label": liver_label,
            "allow_non_hu": allow_non_hu,
            "liver_voxels": int(liver.sum()),
            "geometry": geometry(ct),
        },
        "parameters": params.to_dict(),
        "checkpoint": checkpoint.identity(),
        "versions": versions(),
        "device": result.stats["device"],
        "nfe": result.stats["nfe"],
        "stats": result.stats,
        "results": {
            "lesions": len(result.lesions),
            "max_score_hu": float(result.score.max()) if result.score.size else 0.0,
            "anomaly_voxels": int(result.anomaly.sum()),
            "anomaly_ml": round(int(result.anomaly.sum()) * voxel_ml, 4),
            "candidate_voxels": int(result.candidates.sum()),
        },
        "conventions": {
            "score": "|inpainted - test| in HU"
            if result.stats["two_sided"]
            else "inpainted - test in HU (positive = darker than the healthy re-painting)",
            "candidates": "1 = inpainted region (AME)",
            "anomaly": f"1 = score > {params.threshold_hu} HU",
            "lesion_centroids": "patient LPS coordinates in mm",
        },
        "outputs": list(OUTPUT_FILES),
    }
    run_info["timings_s"] = {"read": round(t_read, 3), **result.stats["timings_s"]}
    # a signal meanwhile: nothing is moved into place
    with signals.cooperative(), atomic_dir(out, replace=overwrite) as tmp:
        t_write = time.perf_counter()
        _write_result(tmp, ct, result)
        run_info["timings_s"]["write"] = round(time.perf_counter() - t_write, 3)
        run_info["timings_s"]["wall"] = round(time.perf_counter() - t0, 3)
        run_info["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (tmp / "run.json").write_text(json.dumps(run_info, indent=2, default=_json_default))
        if should_cancel is not None and should_cancel():
            raise Cancelled()
    return run_info


def run_folder(
    ct_dir: str | Path,
    liver_dir: str | Path,
    checkpoint: Checkpoint,
    params: DetectionParams,
    out: str | Path,
    liver_label: int | None = None,
    allow_non_hu: bool = False,
    on_case: Callable[[int, int, str], None] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Every case of a folder into ``out/<case>/`` plus ``out/summary.csv``.

    A case that fails is recorded in the summary with its error and skipped. ``out``
    follows the output contract of :func:`files.check_output_dir` (an earlier batch is
    recognised by its ``summary.csv``); with ``overwrite`` each case folder is replaced
    as a whole.
    """
    params.validate(checkpoint.diffusion.num_timesteps)
    out = check_output_dir(
        out, overwrite, "summary.csv", lambda p: p.name == "summary.csv" or _is_case_result(p)
    )
    cases = pair_cases(ct_dir, liver_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, case in enumerate(cases, start=1):
        if on_case is not None:
            on_case(number, len(cases), case.name)
        row = {
            "case": case.name,
            "ct": str(case.ct),
            "liver": str(case.liver),
            "out": str(out / case.name),
        }
        t0 = time.perf_counter()
        try:
            info = run_case(
                case.ct,
                case.liver,
                checkpoint,
                params,
                out / case.name,
                liver_label,
                allow_non_hu,
                progress,
                should_cancel,
                overwrite=overwrite,
            )
            row.update(
                status="ok",
                error="",
                lesions=info["results"]["lesions"],
                max_score_hu=round(info["results"]["max_score_hu"], 3),
                anomaly_ml=info["results"]["anomaly_ml"],
                nfe=info["nfe"],
            )
        except GDPIError as exc:
            row.update(status="error", error=str(exc), out="")
            if overwrite and _is_case_result(out / case.name):  # not an earlier run's result
                shutil.rmtree(out / case.name)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        _write_summary(out / "summary.csv", rows)
        if should_cancel is not None and should_cancel():
            raise Cancelled()
    return rows


def _is_case_result(path: Path) -> bool:
    """A case folder of an earlier batch: only the files a case result holds."""
    return (
        path.is_dir()
        and (path / "run.json").is_file()
        and all(p.name in OUTPUT_FILES for p in path.iterdir())
    )


def _write_summary(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
