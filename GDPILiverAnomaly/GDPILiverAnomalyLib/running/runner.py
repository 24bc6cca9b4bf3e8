"""Detection from files to files: one case, or every case of a folder.

This is the single code path behind ``gdpi detect``, the Slicer module's worker,
console batch processing and evaluation. Outputs are written into a hidden temporary
folder beside the output folder and moved into place only when complete.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import Cancelled, GDPIError, InputError, OutputError, os_error_message
from ..files.cases import Case, Skipped, find_cases
from ..files.checkpoint import Checkpoint
from ..files.checks import itk_path
from ..files.outputs import (
    TEXT_TMP_SUFFIX,
    atomic_dir,
    check_output_dir,
    csv_safe_row,
    partial_record,
    remove_stale_partials,
    write_text_atomic,
)
from ..files.volumes import (
    array_on_grid,
    check_hu,
    check_liver_volume,
    dicom_series_record,
    read_ct,
    read_liver_mask,
)
from ..method.parameters import DetectionParams
from ..method.scoring import LESION_FIELDS, LESION_SCORE
from . import signals
from .pipeline import DetectionResult, detect
from .progress import Progress
from .versions import versions

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
log = logging.getLogger("gdpi")


def geometry(image: sitk.Image) -> dict:
    return {
        "size": list(image.GetSize()),
        "spacing_mm": list(image.GetSpacing()),
        "origin_mm": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def _write_image(image: sitk.Image, path: Path) -> None:
    """``sitk.WriteImage`` whose failures are one line: ITK reports a full disk as a
    RuntimeError with a page of NRRD messages; here it becomes ``OSError(ENOSPC)``."""
    try:
        sitk.WriteImage(image, itk_path(path, "output"), useCompression=True)
    except RuntimeError as exc:
        if shutil.disk_usage(path.parent).free < 4 * 1024 * 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise OutputError(f"cannot write {path}: {lines[-1] if lines else exc}") from None


def _write_result(folder: Path, ct: sitk.Image, result: DetectionResult) -> None:
    volumes = {
        "score.nrrd": (result.score, np.float32),
        "pseudo_healthy.nrrd": (result.pseudo_healthy, np.float32),
        "candidates.nrrd": (result.candidates, np.uint8),
        "anomaly.nrrd": (result.anomaly, np.uint8),
    }
    for name, (array, dtype) in volumes.items():  # one volume's copy at a time
        image = array_on_grid(array.astype(dtype, copy=False), ct)
        _write_image(image, folder / name)
        del image
    with open(folder / "lesions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LESION_FIELDS)
        writer.writeheader()
        writer.writerows(csv_safe_row(lesion.to_dict()) for lesion in result.lesions)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def file_stamp(path: Path) -> dict | None:
    """What tells whether an input file changed: its size (``bytes``) and modification
    time (``mtime_ns``); for a folder (DICOM series) the sum of its files' sizes and the
    newest time. None when it cannot be read."""
    try:
        if path.is_dir():
            stats = [e.stat() for e in os.scandir(path) if e.is_file()]
            return {"bytes": sum(s.st_size for s in stats),
                    "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}  # fmt: skip
        stat = path.stat()
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:
        return None


@dataclass(frozen=True)
class CaseInputs:
    """One case's input files and how to read them; ``stamps``: the files'
    :func:`file_stamp` (``ct``, ``liver``) taken before they were read."""

    ct: Path
    liver: Path
    liver_label: int | None = None
    allow_non_hu: bool = False
    allow_non_ct: bool = False  # read a DICOM series whose Modality is not CT
    stamps: dict | None = field(default=None, compare=False)

    def file_stamps(self) -> dict:
        """``stamps``, or the files' stamps now."""
        return self.stamps or self.current_stamps()

    def current_stamps(self) -> dict:
        """The files' :func:`file_stamp` now."""
        return {"ct": file_stamp(self.ct), "liver": file_stamp(self.liver)}

    def changed(self) -> bool:
        """Whether the files differ from ``stamps`` (False when none were taken)."""
        return self.stamps is not None and self.stamps != self.current_stamps()

    def read(self) -> tuple[sitk.Image, np.ndarray]:
        """The CT (HU) and the liver mask on its grid (uint8, 1 = liver), checked."""
        ct = read_ct(self.ct, self.allow_non_ct)
        liver = read_liver_mask(self.liver, ct, self.liver_label)
        check_liver_volume(liver, ct.GetSpacing(), self.liver)
        if not self.allow_non_hu:
            check_hu(sitk.GetArrayViewFromImage(ct), liver, f"CT {self.ct}")
        return ct, liver


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
    allow_non_ct: bool = False,
) -> dict:
    """Detect on one case and write every output into ``out``; return run.json's content.

    ``on_partial`` streams the score so far (see :func:`pipeline.detect`);
    ``allow_non_ct`` reads a DICOM series whose Modality is not CT.
    """
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    params.validate(checkpoint.diffusion.num_timesteps)
    out = check_output_dir(
        out, overwrite, "run.json", lambda p: p.name in OUTPUT_FILES and p.is_file()
    )
    inputs = CaseInputs(
        Path(ct_path), Path(liver_path), liver_label, allow_non_hu, allow_non_ct=allow_non_ct
    )
    inputs = dataclasses.replace(inputs, stamps=inputs.file_stamps())  # before reading
    ct, liver = inputs.read()
    t_read = time.perf_counter() - t0
    result = detect(
        ct, liver, checkpoint, params, progress, should_cancel, on_partial, partial_interval_s
    )
    timings = {"read": round(t_read, 3), "started": started, "t0": t0}
    return write_case(
        out, inputs, ct, liver, result, params, checkpoint.identity(), timings,
        {"name": "local"}, overwrite, should_cancel,
    )  # fmt: skip


def write_case(
    out: Path,
    inputs: CaseInputs,
    ct: sitk.Image,
    liver: np.ndarray,
    result: DetectionResult,
    params: DetectionParams,
    checkpoint_identity: dict,
    timings: dict,
    engine: dict,
    replace: bool = False,
    should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """Write a case's outputs into ``out`` all or nothing; return run.json's content.

    ``timings`` holds ``read`` (s), ``started`` (a UTC datetime) and ``t0`` (the
    ``time.perf_counter()`` at the start); ``engine`` is recorded as run.json's
    ``engine`` (``{"name": "local"}``, or Ray's name, address and workers)."""
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    run_info = {
        "gdpi_version": __version__,
        "started": timings["started"].isoformat(timespec="seconds"),
        "inputs": {
            "ct": str(inputs.ct.absolute()),
            "liver": str(inputs.liver.absolute()),
            "liver_label": inputs.liver_label,
            "allow_non_hu": inputs.allow_non_hu,
            "allow_non_ct": inputs.allow_non_ct,
            "ct_dicom_series": dicom_series_record(ct),  # None: the CT is a file
            "files": inputs.file_stamps(),  # resume redoes the case when they change
            "liver_voxels": int(liver.sum()),
            "geometry": geometry(ct),
        },
        "parameters": params.to_dict(),
        "checkpoint": checkpoint_identity,
        "versions": versions(),
        "engine": engine,
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
            "lesion_score": f"{LESION_SCORE}; lesions.csv is sorted by it, id 1 first",
        },
        "outputs": list(OUTPUT_FILES),
    }
    run_info["timings_s"] = {"read": timings["read"], **result.stats["timings_s"]}
    # a signal meanwhile: nothing is moved into place
    with signals.cooperative(), atomic_dir(out, replace=replace) as tmp:
        t_write = time.perf_counter()
        _write_result(tmp, ct, result)
        run_info["timings_s"]["write"] = round(time.perf_counter() - t_write, 3)
        run_info["timings_s"]["wall"] = round(time.perf_counter() - timings["t0"], 3)
        run_info["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (tmp / "run.json").write_text(json.dumps(run_info, indent=2, default=_json_default))
        if should_cancel is not None and should_cancel():
            raise Cancelled()
    return run_info


@dataclass
class Batch:
    """A folder run: its output folder, every case, and the rows of cases already done
    (an earlier run of the same command into the same folder: resumed)."""

    out: Path
    cases: list[Case]
    done: dict[str, dict]  # case name -> summary row
    # case folders to redo: missing a file (an older version's) or of changed inputs
    incomplete: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  # entries that are not cases

    def open(self) -> None:
        """Make the folder ready: the temporary folders of interrupted runs (gdpi's own,
        whose writer is gone) and the case folders to redo removed, ``summary.csv`` there
        from the start (so that a run killed early is resumed too), with a row (and a
        warning) for each skipped entry."""
        if self.out.is_dir():
            remove_stale_partials(self.out)
            for leftover in self.out.glob(
                f".summary.csv.*{TEXT_TMP_SUFFIX}"
            ):  # write_text_atomic's
                if leftover.is_file() and not leftover.is_symlink():
                    leftover.unlink()
        for folder in self.incomplete:
            shutil.rmtree(folder)
        self.out.mkdir(parents=True, exist_ok=True)
        for entry in self.skipped:
            log.warning(f"gdpi: skipped {entry.path}: {entry.reason}")
        self.write_summary({})

    @property
    def todo(self) -> list[Case]:
        return [c for c in self.cases if c.name not in self.done]

    def row(self, case: Case) -> dict:
        """A summary row without results (filled by :func:`summary_row` or an error)."""
        return {"case": case.name, "ct": str(case.ct), "liver": str(case.liver),
                "out": str(self.out / case.name)}  # fmt: skip

    def write_summary(self, rows: dict[str, dict]) -> None:
        """``summary.csv``: the rows of ``rows`` and of the resumed cases, in case order."""
        every = {**self.done, **rows}
        skipped = [{"case": e.name, "status": "skipped", "error": e.reason, "ct": str(e.path)}
                   for e in self.skipped]  # fmt: skip
        _write_summary(
            self.out / "summary.csv",
            [every[c.name] for c in self.cases if c.name in every] + skipped,
        )


def start_batch(
    ct_dir: str | Path,
    liver_dir: str | Path,
    params: DetectionParams,
    checkpoint_sha256: str | None,
    out: str | Path,
    overwrite: bool = False,
    liver_label: int | None = None,
    allow_non_hu: bool = False,
) -> Batch:
    """Check ``out`` and pair the cases of a folder run; nothing is written (that is
    :meth:`Batch.open`).

    ``out`` follows :func:`files.check_output_dir` (an earlier batch is recognised by its
    ``summary.csv``). Without ``overwrite`` an earlier batch of the same inputs,
    parameters and checkpoint is resumed: its complete cases are kept and skipped; one
    made with other settings is refused (device, batch size and bf16 may change:
    :data:`HOW_NOT_WHAT`); a case whose CT or mask changed since (size or modification
    time, :func:`file_stamp`) is redone. With ``overwrite`` every case is redone and
    replaced. Entries of the CT folder that are not cases are ``skipped``.
    """
    path = Path(out).absolute()
    earlier = path.is_dir() and (path / "summary.csv").is_file()
    foreign = sorted(p.name for p in path.iterdir() if not _in_batch(p)) if earlier else []
    if earlier and foreign and not overwrite:
        raise OutputError(
            f"output folder {path} holds {foreign[0]}, which is not part of an earlier batch "
            "(never written into or removed): move it away to resume, or choose a new folder"
        )
    resuming = earlier and not overwrite
    path = check_output_dir(path, overwrite or resuming, "summary.csv", _in_batch)
    cases, skipped = find_cases(ct_dir, liver_dir)
    reserved = next((c for c in cases if c.name.casefold() == "summary.csv"), None)
    if reserved is not None:
        raise InputError(f"{reserved.ct} would be case summary.csv, the batch's summary: rename it")
    skipped = [s for s in skipped if s.path.absolute() != path]  # --out inside the CT folder
    batch = Batch(path, cases, {}, skipped=skipped)
    for case in batch.cases if resuming else []:
        info = complete_result(path / case.name)
        if info is not None:
            inputs = CaseInputs(Path(case.ct), Path(case.liver), liver_label, allow_non_hu)
            _check_same_settings(path / case.name, info, params, checkpoint_sha256, inputs)
            recorded = info.get("inputs", {}).get("files") or {}  # {}: made before it was
            now = inputs.current_stamps()
            changed = [k for k in ("ct", "liver") if k in recorded and recorded[k] != now[k]]
            if changed:
                batch.incomplete.append(path / case.name)
                log.warning(
                    f"gdpi: case {case.name}: its {' and '.join(changed)} file changed since "
                    "its result was made (size or modification time): redoing it"
                )
                continue
            wall = info.get("timings_s", {}).get("wall", "")
            batch.done[case.name] = summary_row(batch.row(case), info, wall)
        elif _is_case_result(path / case.name):
            batch.incomplete.append(path / case.name)
    return batch


def summary_row(row: dict, info: dict, seconds) -> dict:
    """A case's ``summary.csv`` row from its run.json content."""
    return {
        **row,
        "status": "ok",
        "error": "",
        "lesions": info["results"]["lesions"],
        "max_score_hu": round(info["results"]["max_score_hu"], 3),
        "anomaly_ml": info["results"]["anomaly_ml"],
        "nfe": info["nfe"],
        "seconds": seconds,
    }


def error_row(batch: Batch, case: Case, error: str, overwrite: bool) -> dict:
    """A failed case's row; with ``overwrite`` its earlier result (if any) is removed."""
    if overwrite and _is_case_result(batch.out / case.name):  # not an earlier run's result
        shutil.rmtree(batch.out / case.name)
    return {**batch.row(case), "status": "error", "error": error, "out": ""}


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
    allow_non_ct: bool = False,
) -> list[dict]:
    """Every case of a folder into ``out/<case>/`` plus ``out/summary.csv``, one case
    after another in this process (the ``local`` engine; :mod:`.ray_engine` is the other).

    A case that fails is recorded in the summary with its error and skipped. Re-running
    the same command resumes (:func:`start_batch`); with ``overwrite`` each case folder
    is replaced as a whole. Returns the summary rows in case order.
    """
    params.validate(checkpoint.diffusion.num_timesteps)
    batch = start_batch(
        ct_dir, liver_dir, params, checkpoint.sha256, out, overwrite, liver_label, allow_non_hu
    )
    batch.open()
    todo = batch.todo
    rows: dict[str, dict] = {}
    for number, case in enumerate(todo, start=1):
        if on_case is not None:
            on_case(number, len(todo), case.name)
        t0 = time.perf_counter()
        try:
            info = run_case(
                case.ct, case.liver, checkpoint, params, batch.out / case.name, liver_label,
                allow_non_hu, progress, should_cancel, overwrite=overwrite,
                allow_non_ct=allow_non_ct,
            )  # fmt: skip
            rows[case.name] = summary_row(batch.row(case), info, round(time.perf_counter() - t0, 2))
        except BrokenPipeError:  # the reader of the progress lines went away: stop the batch
            raise
        except (GDPIError, OSError) as exc:  # OSError: disk full, ... fails only this case
            message = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
            rows[case.name] = error_row(batch, case, message, overwrite)
            rows[case.name]["seconds"] = round(time.perf_counter() - t0, 2)
        batch.write_summary(rows)
        if should_cancel is not None and should_cancel():
            raise Cancelled()
    every = {**batch.done, **rows}
    return [every[c.name] for c in batch.cases]


def _is_case_result(path: Path) -> bool:
    """A case folder of an earlier batch: only the files a case result holds."""
    return (
        path.is_dir()
        and (path / "run.json").is_file()
        and all(p.name in OUTPUT_FILES for p in path.iterdir())
    )


def _is_leftover(path: Path) -> bool:
    """A temporary folder of gdpi's atomic writes (it carries gdpi's marker; case names
    never start with a dot) or a temporary ``summary.csv`` of an interrupted run."""
    if path.name.startswith(".summary.csv.") and path.name.endswith(TEXT_TMP_SUFFIX):
        return path.is_file() and not path.is_symlink()
    return partial_record(path) is not None


def _in_batch(path: Path) -> bool:
    return path.name == "summary.csv" or _is_case_result(path) or _is_leftover(path)


def complete_result(folder: Path) -> dict | None:
    """run.json's content when ``folder`` holds every output of a case, else None (a
    damaged or hand-edited run.json counts as incomplete: the case is redone)."""
    if not _is_case_result(folder) or {p.name for p in folder.iterdir()} != set(OUTPUT_FILES):
        return None
    try:
        info = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not _looks_like_run_json(info):
        log.warning(f"gdpi: {folder / 'run.json'} is damaged: redoing that case")
        return None
    return info


def _looks_like_run_json(info) -> bool:
    """The fields a resume reads, with their types."""
    if not isinstance(info, dict) or not isinstance(info.get("nfe"), int):
        return False
    sections = ("inputs", "parameters", "checkpoint", "results")
    if not all(isinstance(info.get(s), dict) for s in sections):
        return False
    results = info["results"]
    return all(isinstance(results.get(k), (int, float)) for k in LESION_SUMMARY_KEYS)


#: The run.json ``results`` figures a case's summary row is made of.
LESION_SUMMARY_KEYS = ("lesions", "max_score_hu", "anomaly_ml")


def _check_same_settings(
    folder: Path,
    info: dict,
    params: DetectionParams,
    checkpoint_sha256: str | None,
    inputs: CaseInputs,
) -> None:
    here = json.loads(json.dumps(params.to_dict(), default=_json_default))
    there = info.get("parameters", {})
    differ = [k for k in here if k not in HOW_NOT_WHAT and here[k] != there.get(k)]
    if info.get("checkpoint", {}).get("sha256") != checkpoint_sha256:
        differ.insert(0, "checkpoint")
    read = info.get("inputs", {})
    for key, value in (
        ("ct", str(inputs.ct.absolute())),
        ("liver", str(inputs.liver.absolute())),
        ("liver_label", inputs.liver_label),
        ("allow_non_hu", inputs.allow_non_hu),
    ):
        if read.get(key) != value:
            here[key], there[key] = value, read.get(key)
            differ.insert(0, key)
    if differ:
        name = differ[0]
        detail = "" if name == "checkpoint" else f": {here[name]!r} now, {there.get(name)!r} there"
        raise OutputError(
            f"{folder} was made with other settings ({name}{detail}); pass --overwrite to "
            "redo the batch, or choose a new output folder"
        )


#: Parameters a resumed batch may change: where and in what batches it runs.
HOW_NOT_WHAT = ("device", "batch_size", "bf16")


def _write_summary(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, restval="")
    writer.writeheader()
    writer.writerows(csv_safe_row(row) for row in rows)
    write_text_atomic(path, buffer.getvalue())
