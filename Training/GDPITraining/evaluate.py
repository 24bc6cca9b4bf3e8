"""``gdpi evaluate``: the paper's protocol on a prepared test set, for several methods.

Test set: the abnormal slices (liver and tumour masks) of a slice store made by
``gdpi prepare``, plus its healthy slices when asked, all on the store's model grid.

Methods (``--method NAME[=CHECKPOINT]``; GDPI variants use ``--checkpoint`` unless given):

- ``gdpi``: full GDPI (AME + RePaint + median filter), ``--preset`` (default paper);
- ``gdpi-wrd`` (no AME: the whole liver is inpainted; no median filter),
  ``gdpi-wr`` (no AME, filter), ``gdpi-wd`` (AME, no filter): the paper's Table IV;
- ``gdpi-two-sided`` (AME also flags brighter voxels, score = |difference|),
  ``gdpi-fast`` / ``gdpi-paper`` (that preset), ``gdpi-memory-bank`` (see below);
- ``ae``, ``vae``, ``dae``: the baselines (``=CHECKPOINT`` from ``gdpi train --model``),
  scored by squared reconstruction error;
- ``darkness``: no model; the slice's liver median minus HU (a label-free reference).

AME is applied as ``gdpi detect`` applies it, on the CT's own pixels: the store keeps
each grid pixel's largest AME margin over the CT pixels it covers (``ame_dark.npy``,
``ame_bright.npy``); stores without them fall back to AME on the model-grid image,
which is smoothed (3.5 mm pixels average ~20 CT pixels) and so flags far fewer
tumour pixels. The inpainting is ``pipeline.inpaint_grid``, shared with ``gdpi detect``.

Memory bank (our interpretation of the paper's remark): for each test slice the most
similar healthy training slice of another patient (mean squared HU difference over the test slice's
known tissue: the liver and a 5-pixel ring around it, candidates excluded) is shifted
to the test slice's liver median and used as a prompt: RePaint starts from it noised to
half the respaced schedule (``--bank-level``) instead of from pure noise.

Metrics (``GDPILiverAnomalyLib.method.metrics``), for two pixel pools, always both:
``liver`` (liver pixels of every evaluated slice) and ``slice`` (every pixel of every
evaluated slice, as MedIAnomaly pools whole images); pixel AUROC, AP, best Dice (pixel
F1 at the exact F1-optimal threshold) and that threshold; per-lesion detection rate at
that threshold; slice-level AUROC (slice score = maximum over its liver pixels);
normal-image bias (Table III: mean score over the liver pixels of healthy slices) and
the fraction of healthy liver pixels at or above the threshold. Lesion level
(``GDPILiverAnomalyLib.method.lesions``, liver pixels): the FROC of the 3-D components of
``score > t`` (lesion sensitivity against false-positive components per case), its
sensitivity at 0.5, 1, 2, 4 false positives per case, the FROC score (mean over 1/8 to
8), the sensitivity per lesion size, and bootstrap intervals over cases for those and
for the liver-pixel AUROC and AP.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from GDPILiverAnomalyLib.errors import GDPIError, InputError, ParameterError
from GDPILiverAnomalyLib.method.ame import adaptive_mask
from GDPILiverAnomalyLib.method.calibration import reference_patches, remove_bias
from GDPILiverAnomalyLib.method.lesions import (
    at_threshold,
    bootstrap_pixel_metrics,
    lesion_figures,
    volumes_from_slices,
)
from GDPILiverAnomalyLib.method.metrics import lesion_detection, pixel_metrics, slice_auroc
from GDPILiverAnomalyLib.method.parameters import DetectionParams, default_batch_size
from GDPILiverAnomalyLib.method.repaint import slice_seeds
from GDPILiverAnomalyLib.method.scoring import finish_score, smooth_across_slices
from GDPILiverAnomalyLib.running.devices import resolve_device
from GDPILiverAnomalyLib.running.pipeline import inpaint_grid, plan_batches
from GDPILiverAnomalyLib.running.progress import progress_bar
from scipy import ndimage

from .methods import BASELINES, DISPLAY, GDPI_VARIANTS, POOLS, MethodSpec
from .store import SliceStore


@dataclass
class MethodOutput:
    score: np.ndarray  # [N, n, n] float32; HU for GDPI and darkness, model units^2 otherwise
    reconstruction: np.ndarray | None  # [N, n, n] HU
    units: str
    seconds: float
    nfe: int = 0  # network evaluations (whole batches)
    details: dict = field(default_factory=dict)


@dataclass
class TestSet:
    store: SliceStore
    index: np.ndarray  # store indices, abnormal first
    abnormal: np.ndarray  # bool per evaluated slice
    images: np.ndarray  # HU
    liver: np.ndarray
    tumour: np.ndarray
    groups: list[tuple[str, int]]  # (case, slice number)
    ame_dark: np.ndarray | None = None  # AME margins from the CT's pixels (store), HU
    ame_bright: np.ndarray | None = None

    def voxel_ml(self) -> dict[str, float | None]:
        """Volume of one model-grid voxel of each case (mL): grid spacing squared times
        the case's slice spacing; None on grids without a fixed spacing."""
        step = (self.store.info.get("grid") or {}).get("spacing_mm")
        rows = {s["case"]: s for s in self.store.slices}
        return {
            case: None
            if step is None
            else float(step) ** 2 * float(rows[case]["spacing_z_mm"]) / 1000
            for case in {g[0] for g in self.groups}
        }

    def describe(self) -> dict:
        cases = sorted({g[0] for g in self.groups})
        return {
            "store": str(self.store.path),
            "grid": self.store.info.get("grid"),
            "abnormal_slices": int(self.abnormal.sum()),
            "healthy_slices": int((~self.abnormal).sum()),
            "cases": cases,
            "tumour_pixels": int(self.tumour.sum()),
            "liver_pixels": int((self.liver > 0).sum()),
        }


def _pick(indices: np.ndarray, limit: int | None) -> np.ndarray:
    """At most ``limit`` indices, evenly spread (deterministic)."""
    if limit is None or len(indices) <= limit:
        return indices
    return indices[np.unique(np.linspace(0, len(indices) - 1, limit).round().astype(int))]


def load_test_set(
    store_path: str | Path,
    abnormal_split: str = "test",
    healthy_split: str = "test",
    max_slices: int | None = None,
    cases: list[str] | None = None,
) -> TestSet:
    """Abnormal slices of ``abnormal_split`` and healthy slices of ``healthy_split``
    (``any`` = every split; healthy ``none`` = no healthy slices), of ``cases`` only
    when given."""
    store = SliceStore.open(store_path)
    abnormal = store.select("abnormal", None if abnormal_split == "any" else abnormal_split)
    if healthy_split == "none":
        healthy = np.zeros(0, np.int64)
    else:
        healthy = store.select("healthy", None if healthy_split == "any" else healthy_split)
    if cases:
        unknown = set(cases) - {s["case"] for s in store.slices}
        if unknown:
            raise InputError(f"{store_path} has no case(s) {', '.join(sorted(unknown))}")
        of_cases = np.array([s["case"] in cases for s in store.slices])
        abnormal, healthy = abnormal[of_cases[abnormal]], healthy[of_cases[healthy]]
    abnormal, healthy = _pick(abnormal, max_slices), _pick(healthy, max_slices)
    if not len(abnormal):
        raise InputError(
            f"{store_path} holds no abnormal slices in split {abnormal_split!r} "
            "(slices with tumour are needed; see gdpi prepare --test-cases)"
        )
    index = np.concatenate([abnormal, healthy])
    rows = {int(s["index"]): s for s in store.slices}
    return TestSet(
        store,
        index,
        np.arange(len(index)) < len(abnormal),
        np.asarray(store.images[index], np.float32),
        np.asarray(store.liver[index], np.uint8),
        np.asarray(store.tumour[index], np.uint8),
        [(rows[int(i)]["case"], int(rows[int(i)]["slice"])) for i in index],
        None if store.ame_dark is None else np.asarray(store.ame_dark[index], np.float32),
        None if store.ame_bright is None else np.asarray(store.ame_bright[index], np.float32),
    )


def memory_bank_prompts(
    images: np.ndarray,
    liver: np.ndarray,
    candidates: np.ndarray,
    bank_images: np.ndarray,
    hu_window: tuple[float, float] = (-200.0, 300.0),
    test_cases: list[str] | None = None,
    bank_cases: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest healthy bank slice of each test slice, intensity-matched; ``(prompts, ids)``.

    Distance: mean squared difference of window-clipped HU over the test slice's known
    tissue (its liver dilated by 5 pixels, minus the candidates). The prompt is the bank
    slice shifted by the difference of the two slices' medians over the test slice's
    known liver pixels. With ``test_cases`` and ``bank_cases``, a slice never gets a
    neighbour from its own patient.
    """
    lo, hi = hu_window
    bank = np.clip(bank_images, lo, hi).reshape(len(bank_images), -1)
    prompts = np.empty_like(images)
    chosen = np.zeros(len(images), np.int64)
    ring = np.ones((1, 11, 11), bool)
    region = ndimage.binary_dilation(liver > 0, ring) & ~(candidates > 0)
    for i in range(len(images)):
        keep = region[i].ravel()
        if not keep.any():
            keep = np.ones_like(keep)
        test = np.clip(images[i], lo, hi).ravel()[keep]
        distance = ((bank[:, keep] - test) ** 2).mean(axis=1)
        if test_cases is not None and bank_cases is not None:
            distance[np.asarray(bank_cases) == test_cases[i]] = np.inf
            if not np.isfinite(distance).any():
                raise InputError(f"the memory bank holds only slices of {test_cases[i]}")
        j = int(np.argmin(distance))
        chosen[i] = j
        known = (liver[i] > 0) & ~(candidates[i] > 0)
        if not known.any():
            known = np.ones_like(known)
        shift = np.median(images[i][known]) - np.median(bank_images[j][known])
        prompts[i] = bank_images[j] + shift
    return prompts, chosen


def case_phases(test: TestSet) -> dict[str, dict]:
    """Contrast phase of each test case (``phase.estimate_phase``) from its source CT
    and label map (any nonzero label counts as liver); cases without readable sources
    (synthetic layouts) are ``unknown``."""
    import SimpleITK as sitk
    from GDPILiverAnomalyLib.files.volumes import OrientedCase, read_ct, read_image
    from GDPILiverAnomalyLib.method.phase import PhaseEstimate, estimate_phase

    rows = {s["case"]: s for s in test.store.slices}
    phases = {}
    for case in sorted({g[0] for g in test.groups}):
        row = rows[case]
        try:
            ct = read_ct(row["ct"])
            labels = sitk.GetArrayFromImage(read_image(row["liver"], "liver mask")) > 0
            oriented = OrientedCase.from_arrays(ct, labels.astype(np.uint8))
            estimate = estimate_phase(oriented.ct, oriented.liver, oriented.spacing_yx)
        except (GDPIError, OSError, RuntimeError, KeyError, ValueError):
            estimate = PhaseEstimate("unknown", float("nan"), None, 0, "no readable source CT")
        phases[case] = estimate.to_dict()
    return phases


def two_sided_slices(test: TestSet, params: DetectionParams) -> tuple[np.ndarray, dict | None]:
    """Whether each test slice uses two-sided AME: the parameter, or when it is None
    (automatic, as ``gdpi detect``) its case's contrast phase; and the phases found."""
    if params.two_sided is not None:
        return np.full(len(test.index), bool(params.two_sided)), None
    phases = case_phases(test)
    return np.array([phases[g[0]]["arterial"] for g in test.groups]), phases


def gdpi_candidates(
    test: TestSet, params: DetectionParams, use_ame: bool, two_sided: np.ndarray
) -> tuple[np.ndarray, str | None]:
    """The inpainting mask of each test slice (1 = re-paint) and where AME ran.

    As ``gdpi detect``: AME on the CT's pixels, from the store's margins (any covered CT
    pixel flags a grid pixel); stores without margins fall back to the model grid.
    ``two_sided``: per slice. Without AME the whole liver is re-painted.
    """
    if not use_ame:
        return (test.liver > 0).astype(np.uint8), None
    if test.ame_dark is not None:
        made_with = float(test.store.info.get("ame_sigma_mm", 0.0))
        if made_with != params.ame_sigma_mm:
            raise ParameterError(
                f"the store's AME margins were taken with --ame-sigma-mm {made_with:g}, the "
                f"evaluation asks for {params.ame_sigma_mm:g}: make the store with gdpi "
                f"prepare --ame-sigma-mm {params.ame_sigma_mm:g} (or evaluate with "
                f"--ame-sigma-mm {made_with:g})"
            )
        cand = test.ame_dark > params.offset_hu
        cand |= (test.ame_bright > params.offset_hu) & two_sided[:, None, None]
        return cand.astype(np.uint8), "CT pixels (store margins), as gdpi detect"
    cand = np.stack(
        [
            adaptive_mask(test.images[i], test.liver[i], params.offset_hu, bool(two_sided[i]))
            for i in range(len(test.images))
        ]
    )
    return cand, "model-grid pixels (the store has no AME margins: re-run gdpi prepare)"


def slice_positions_mm(test: TestSet) -> np.ndarray:
    """Position of each test slice along its case's axis (slice number x spacing), mm."""
    rows = {int(s["index"]): s for s in test.store.slices}
    return np.array(
        [int(rows[int(i)]["slice"]) * float(rows[int(i)]["spacing_z_mm"]) for i in test.index]
    )


def memory_bank_start(
    test: TestSet,
    cand: np.ndarray,
    bank_store: str | None,
    bank_level: float,
    steps: int,
    intensity,
) -> tuple[np.ndarray, int, dict]:
    """Memory-bank prompts of the test slices, their respaced start level, and details."""
    bank = SliceStore.open(bank_store or test.store.path)
    bank_idx = bank.select("healthy", "train")
    if not len(bank_idx):
        raise InputError(f"memory bank {bank.path} holds no healthy training slices")
    bank_images = np.asarray(bank.images[bank_idx], np.float32)
    prompts, chosen = memory_bank_prompts(
        test.images,
        test.liver,
        cand,
        bank_images,
        (intensity.hu_min, intensity.hu_max),
        [g[0] for g in test.groups],
        [bank.slices[int(j)]["case"] for j in bank_idx],
    )
    level = min(steps - 1, max(0, int(round(bank_level * steps))))
    details = {
        "store": str(bank.path),
        "slices": len(bank_idx),
        "level": level,
        "level_fraction": bank_level,
        "neighbours": [int(bank_idx[j]) for j in chosen],
    }
    return prompts, level, details


def run_gdpi(
    name: str,
    test: TestSet,
    checkpoint_path: str,
    preset: str,
    device: str,
    seed: int,
    batch_size: int | None,
    offset_hu: float | None,
    bank_store: str | None,
    bank_level: float,
    overrides: dict | None = None,
) -> MethodOutput:
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint

    variant = dict(GDPI_VARIANTS[name])
    use_ame = variant.pop("ame", True)
    memory_bank = variant.pop("memory_bank", False)
    params = DetectionParams.from_preset(
        variant.pop("preset", preset),
        device=device,
        seed=seed,
        batch_size=batch_size,
        offset_hu=offset_hu,
        **{**(overrides or {}), **variant},
    )
    checkpoint = load_checkpoint(checkpoint_path)
    params.validate(checkpoint.diffusion.num_timesteps)
    if checkpoint.grid.size != test.images.shape[-1]:
        raise ParameterError(
            f"{checkpoint_path} works on {checkpoint.grid.size} px slices, the test set has "
            f"{test.images.shape[-1]} px"
        )
    dev = resolve_device(params.device)
    start = time.perf_counter()
    sided, phases = two_sided_slices(test, params)
    cand, ame_source = gdpi_candidates(test, params, use_ame, sided)
    seeds = [slice_seeds(params.seed, test.index, s) for s in range(params.samples)]
    paint = cand
    if params.calibrate:
        refs = reference_patches(test.liver, cand, seeds[0])
        paint = np.maximum(cand, refs)
    size = params.batch_size or default_batch_size(dev.type, checkpoint.grid.size)
    batches = plan_batches(cand, size)
    work = [i for batch in batches for i in batch]
    prompts = level = None
    details: dict = {
        "params": params.to_dict(),
        "ame": use_ame,
        "ame_on": ame_source,
        "slices_inpainted": len(work),
        "samples": params.samples,
        "two_sided_slices": int(sided.sum()),
        "phases": phases,
    }
    if memory_bank:
        prompts, level, details["memory_bank"] = memory_bank_start(
            test, cand, bank_store, bank_level, params.steps, checkpoint.intensity
        )
    bar = progress_bar(len(batches), DISPLAY[name], "batch", leave=False)
    nfe = {"total": 0}

    def after(_number: int, _batch: list[int], n: int) -> None:
        nfe["total"] += n
        bar.update(1)

    diff = inpaint_grid(
        test.images,
        paint,
        checkpoint,
        params,
        dev,
        batches,
        seeds,
        prompts=prompts,
        prompt_level=level,
        on_batch=after,
    )
    bar.close()
    if params.calibrate:
        diff, bias = remove_bias(diff, cand, refs, [g[0] for g in test.groups])
        details["calibration_bias_hu"] = [round(float(b), 2) for b in bias]
    score = finish_score(diff, sided, params.median_size)
    score = smooth_across_slices(
        score, slice_positions_mm(test), params.depth_sigma_mm, [g[0] for g in test.groups]
    )
    score = np.where(test.liver > 0, score, 0.0).astype(np.float32)
    details["checkpoint"] = str(checkpoint_path)
    details["checkpoint_sha256"] = checkpoint.sha256
    return MethodOutput(
        score,
        (test.images + diff).astype(np.float32),
        "HU",
        time.perf_counter() - start,
        nfe["total"],
        details,
    )


def run_baseline(name: str, test: TestSet, path: str, device: str) -> MethodOutput:
    from .baselines import load_baseline, reconstruct

    baseline = load_baseline(path)
    if baseline.config.kind != name:
        raise ParameterError(f"{path} is a {baseline.config.kind} checkpoint, not {name}")
    if baseline.config.image_size != test.images.shape[-1]:
        raise ParameterError(
            f"{path} works on {baseline.config.image_size} px slices, the test set has "
            f"{test.images.shape[-1]} px"
        )
    dev = resolve_device(device)
    start = time.perf_counter()
    model = baseline.model.to(dev)
    x = baseline.intensity.normalize(torch.from_numpy(test.images)[:, None].to(dev))
    recon = reconstruct(model, x)
    score = ((recon - x) ** 2)[:, 0].cpu().numpy().astype(np.float32)
    recon_hu = baseline.intensity.to_hu(recon)[:, 0].cpu().numpy().astype(np.float32)
    return MethodOutput(
        score,
        recon_hu,
        "model units^2 (squared reconstruction error)",
        time.perf_counter() - start,
        len(test.images),
        {"checkpoint": str(path), "training_steps": baseline.training.get("steps")},
    )


def run_darkness(test: TestSet) -> MethodOutput:
    start = time.perf_counter()
    score = np.zeros_like(test.images)
    for i in range(len(test.images)):
        inside = test.liver[i] > 0
        if inside.any():
            score[i][inside] = np.median(test.images[i][inside]) - test.images[i][inside]
    return MethodOutput(score, None, "HU", time.perf_counter() - start)


def _reusable(report: Path, name: str) -> tuple[dict, dict]:
    """A method's saved scores and results in an earlier report, or one-line refusal."""
    try:
        saved = dict(np.load(report / "scores" / f"{name}.npz"))
        earlier = json.loads((report / "results.json").read_text())["methods"][name]
        for key in ("units", "seconds", "nfe"):
            earlier[key]  # noqa: B018 - KeyError when absent
        saved["store_index"], saved["score"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        reason = f"no {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise InputError(f"--reuse {report}: no usable {name} results ({reason})") from None
    return saved, earlier


def reuse_scores(report: Path, name: str, test: TestSet) -> MethodOutput:
    """A method's scores from an earlier report folder, for the slices of ``test``
    (metrics on a subset without re-running; seconds and NFE are the earlier run's)."""
    saved, earlier = _reusable(report, name)
    position = {int(i): k for k, i in enumerate(saved["store_index"])}
    missing = [int(i) for i in test.index if int(i) not in position]
    if missing:
        raise InputError(f"{report} has no {name} scores for store slice(s) {missing[:5]}")
    rows = [position[int(i)] for i in test.index]
    recon = saved["reconstruction"][rows] if "reconstruction" in saved else None
    details = {**earlier.get("details", {}), "reused_from": str(report)}
    return MethodOutput(
        saved["score"][rows], recon, earlier["units"], earlier["seconds"], earlier["nfe"], details
    )


#: The anomaly threshold of ``gdpi detect`` (HU), whose lesion figures are reported apart.
DEFAULT_THRESHOLD_HU = DetectionParams.from_preset("fast").threshold_hu


def lesion_level(
    score: np.ndarray, test, resamples: int = 1000, threshold_hu: float | None = None
) -> dict:
    """Lesion-level figures of a score stack (``lesions.lesion_figures``: FROC, its
    points and size classes, bootstrap intervals over cases), the liver-pixel AUROC
    and AP with their bootstrap intervals (``pixel_bootstrap``) and, given a
    ``threshold_hu`` (HU scores only), the figures at that one threshold
    (``at_threshold``: sensitivity, false positives per scan). ``test``: a
    :class:`TestSet` or anything with ``liver``, ``tumour``, ``groups`` and ``voxel_ml()``."""
    volumes = volumes_from_slices(score, test.liver, test.tumour, test.groups, test.voxel_ml())
    figures = lesion_figures(volumes, resamples=resamples)
    if threshold_hu is not None:
        figures["at_threshold"] = at_threshold(volumes, threshold_hu, resamples)
    cases = [g[0] for g in test.groups]
    figures["pixel_bootstrap"] = bootstrap_pixel_metrics(
        score, test.tumour, cases, test.liver, resamples=resamples
    )
    return figures


def method_metrics(out: MethodOutput, test: TestSet) -> dict:
    """Every figure of one method (see the module docstring)."""
    liver = test.liver > 0
    truth = test.tumour > 0
    result: dict = {"units": out.units, "seconds": round(out.seconds, 2), "nfe": out.nfe}
    hu = out.units == "HU"
    result["lesion_level"] = lesion_level(
        out.score, test, threshold_hu=DEFAULT_THRESHOLD_HU if hu else None
    )
    for pool in POOLS:
        region = liver if pool == "liver" else None
        pixel = pixel_metrics(out.score, truth, region, curve_points=200)
        pixel["lesions"] = lesion_detection(out.score, truth, test.groups, pixel["threshold"])
        healthy = ~test.abnormal
        if healthy.any():
            values = (
                out.score[healthy][liver[healthy]] if region is not None else out.score[healthy]
            )
            pixel["healthy_fp_fraction"] = float((values >= pixel["threshold"]).mean())
        result[pool] = pixel
    slice_scores = np.array(
        [out.score[i][liver[i]].max() if liver[i].any() else 0.0 for i in range(len(liver))]
    )
    result["slice_auroc"] = slice_auroc(slice_scores, test.abnormal)
    healthy = ~test.abnormal
    if healthy.any():
        result["normal_bias"] = {
            "mean_liver": float(out.score[healthy][liver[healthy]].mean()),
            "mean_slice": float(out.score[healthy].mean()),
        }
    else:
        result["normal_bias"] = None
    result["details"] = out.details
    return result


@dataclass
class EvaluateConfig:
    store: str
    out: str
    methods: list[str]
    checkpoint: str | None = None
    preset: str = "fast"
    abnormal_split: str = "test"
    healthy_split: str = "test"
    max_slices: int | None = None
    device: str = "auto"
    seed: int = 0
    batch_size: int | None = None
    offset_hu: float | None = None
    steps: int | None = None  # override the preset's RePaint settings (all GDPI methods)
    jump_length: int | None = None
    jump_n_sample: int | None = None
    bank: str | None = None
    bank_level: float = 0.5
    panels: int = 4
    title: str = ""
    cases: list[str] | None = None  # only the slices of these cases
    reuse: str | None = None  # an earlier report folder: reuse its scores/ where present
    params: dict = field(default_factory=dict)  # further detection parameters, by name


def evaluate(config: EvaluateConfig, log=print) -> dict:
    """Run every method, write the report folder (all or nothing); return the results."""
    from GDPILiverAnomalyLib.files.outputs import atomic_dir, check_output_dir
    from GDPILiverAnomalyLib.running.versions import versions

    from .report import write_report

    specs = [MethodSpec.parse(m) for m in config.methods]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ParameterError("each method may be given once")
    if not specs:
        raise ParameterError("give at least one --method")
    for s in specs:
        if s.name in GDPI_VARIANTS and not (s.checkpoint or config.checkpoint):
            raise ParameterError(f"method {s.name} needs --checkpoint (or {s.name}=PATH)")
    if not 0.0 < config.bank_level < 1.0:
        raise ParameterError("--bank-level must be between 0 and 1")
    if config.reuse and not Path(config.reuse, "results.json").is_file():
        raise InputError(f"--reuse {config.reuse} is not a gdpi evaluate report (no results.json)")
    for spec in specs:  # before any work: damaged earlier scores are refused up front
        if config.reuse and Path(config.reuse, "scores", f"{spec.name}.npz").is_file():
            _reusable(Path(config.reuse), spec.name)
    out = check_output_dir(config.out)  # new or empty (the output-folder contract)
    test = load_test_set(
        config.store, config.abnormal_split, config.healthy_split, config.max_slices, config.cases
    )
    log(
        f"test set: {int(test.abnormal.sum())} abnormal and {int((~test.abnormal).sum())} "
        f"healthy slices from {len({g[0] for g in test.groups})} case(s)"
    )
    outputs: dict[str, MethodOutput] = {}
    results: dict[str, dict] = {}
    for spec in specs:
        reused = config.reuse and Path(config.reuse, "scores", f"{spec.name}.npz").is_file()
        if reused:
            output = reuse_scores(Path(config.reuse), spec.name, test)
        elif spec.name in GDPI_VARIANTS:
            output = run_gdpi(
                spec.name,
                test,
                spec.checkpoint or config.checkpoint,
                config.preset,
                config.device,
                config.seed,
                config.batch_size,
                config.offset_hu,
                config.bank,
                config.bank_level,
                {
                    "steps": config.steps,
                    "jump_length": config.jump_length,
                    "jump_n_sample": config.jump_n_sample,
                    **config.params,
                },
            )
        elif spec.name in BASELINES:
            output = run_baseline(spec.name, test, spec.checkpoint, config.device)
        else:
            output = run_darkness(test)
        outputs[spec.name] = output
        results[spec.name] = method_metrics(output, test)
        r = results[spec.name]["liver"]
        froc = results[spec.name]["lesion_level"]["froc"]
        log(
            f"{DISPLAY[spec.name]}: AUROC {r['auroc']:.4f} AP {r['ap']:.4f} "
            f"Dice {r['best_dice']:.4f}"
            + ("" if froc is None else f" FROC score {froc['mean']['value']:.4f}")
            + f" ({output.seconds:.1f} s, {output.nfe} NFE)"
        )
    device = resolve_device(config.device)
    report = {
        "config": asdict(config),
        "command": " ".join(sys.argv),
        "test_set": test.describe(),
        "pools": POOLS,
        "methods": results,
        "hardware": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
        ),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with atomic_dir(out, replace=False) as tmp:  # never over files that came meanwhile
        write_report(tmp, report, test, outputs, config.panels, config.title)
    return report
