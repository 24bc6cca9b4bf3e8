"""The volume pipeline: CT + liver mask in, score / pseudo-healthy / masks / lesions out.

Only axial slices with liver are processed; AME runs on the CT grid; slices are
resampled to the model's grid, inpainted in batches (slices whose candidate mask is
empty cost nothing), scored there, and mapped back. A slice whose liver reaches beyond
the grid's field of view is also resampled onto overlapping sliding windows, whose
results are blended where they overlap. Every output array has the CT's own index
order and geometry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import Cancelled, CheckpointError, GDPIError
from ..files.checkpoint import Checkpoint
from ..method.ame import adaptive_mask, denoise_for_ame
from ..method.calibration import reference_patches, remove_bias
from ..method.depth import depth_samples, interpolation_sources, min_component_pixels
from ..method.diffusion import GaussianDiffusion
from ..method.grid import InputGrid, PlaneMapping, sliding_windows, window_weights
from ..method.parameters import DetectionParams, default_batch_size
from ..method.phase import PhaseEstimate, estimate_phase
from ..method.repaint import SliceNoise, repaint, slice_seeds
from ..method.scoring import Lesion, anomaly_mask, find_lesions, finish_score, smooth_across_slices
from . import signals
from .devices import auto_device
from .progress import Progress

if TYPE_CHECKING:
    import SimpleITK as sitk

    from ..files.volumes import OrientedCase


@dataclass
class DetectionResult:
    """Arrays in the CT's own index order ``[k, j, i]``."""

    score: np.ndarray  # float32 HU, 0 outside the liver
    pseudo_healthy: np.ndarray  # float32 HU
    candidates: np.ndarray  # uint8, 1 = inpainted (AME)
    anomaly: np.ndarray  # uint8, score > threshold
    lesions: list[Lesion]
    stats: dict = field(default_factory=dict)


@dataclass
class SlicePlan:
    """What a detection inpaints, before any network work (see :func:`plan_slices`).

    Arrays on the liver's slab are LPS-ordered ``[slab slice, row, column]``; grid
    arrays ``[grid image, n, n]`` on the model grid: image ``i < len(liver_slices)`` is
    liver slice ``i`` on ``mapping`` (the field of view centred on the liver), further
    images are the sliding windows of slices whose liver reaches beyond it
    (``image_slice``, ``image_window``). Masks: 1 = re-paint.
    """

    params: DetectionParams  # with the automatic AME side resolved
    case: OrientedCase
    slab: tuple[int, int]  # LPS slice range [z0, z1) holding every liver slice
    slab_ct: np.ndarray  # float32 HU
    slab_liver: np.ndarray  # uint8, 1 = liver
    liver_slices: np.ndarray  # LPS indices of the slices with liver
    in_slab: np.ndarray  # the same, relative to the slab
    phase: PhaseEstimate | None  # None when the AME side was given
    candidates: np.ndarray  # uint8 AME candidates on the slab
    mapping: PlaneMapping
    ct_grid: np.ndarray  # float32 HU
    cand_grid: np.ndarray  # AME candidates
    paint_grid: np.ndarray  # candidates plus the calibration discs
    refs_grid: np.ndarray | None  # the calibration discs (``calibrate``)
    seeds: list[list[int]]  # seeds[k][i]: grid image i's k-th inpainting
    windows: list[PlaneMapping]  # windows[0] is ``mapping``
    image_slice: np.ndarray  # int, the liver slice (index into liver_slices) of each image
    image_window: np.ndarray  # int, the window (index into windows) of each image
    inpainted: np.ndarray  # bool, the grid images to inpaint (candidates, depth sampling)
    sources: np.ndarray  # int [image, 2]: the inpainted images (below, above) an image
    # with candidates but not inpainted is interpolated from; -1 for the others
    source_weight: np.ndarray  # float, the weight of ``sources[:, 0]`` (linear in depth)
    depth_counts: dict  # images each depth-sampling rule chose (method.depth)

    @property
    def work(self) -> list[int]:
        """The grid images to inpaint, in image order (every image with candidates when
        ``params.depth_spacing_mm`` is 0)."""
        return np.flatnonzero(self.inpainted).tolist()

    def interpolated(self) -> np.ndarray:
        """The grid images filled in by interpolation in depth."""
        return np.flatnonzero(self.sources[:, 0] >= 0)

    def grid_ct(self, images: np.ndarray) -> np.ndarray:
        """The CT (HU) of grid ``images``, from ``ct_grid`` or, on an attached plan
        (Ray: no ``ct_grid``), resampled from the slab again (the same values)."""
        if self.ct_grid is not None:
            return self.ct_grid[images]
        out = np.zeros((len(images), self.mapping.size, self.mapping.size), np.float32)
        for w in np.unique(self.image_window[images]):
            which = np.flatnonzero(self.image_window[images] == w)
            rows = self.in_slab[self.image_slice[np.asarray(images)[which]]]
            out[which] = self.windows[w].to_grid(self.slab_ct[rows], "image")
        return out

    def to_slab(self, grid: np.ndarray, images: Sequence[int]) -> np.ndarray:
        """Values of grid ``images`` (``grid[j]`` for ``images[j]``, HU) on the slab, 0
        elsewhere and outside the liver. A slice with only its ``mapping`` image takes
        it as is; where a slice has several windows, their values are blended with
        :func:`.grid.window_weights` (a weighted mean over the windows covering a pixel)."""
        images = np.asarray(images, dtype=np.intp)
        slab = np.zeros(self.slab_liver.shape, np.float32)
        shape = self.slab_liver.shape[1:]
        slices = self.image_slice[images]
        counts = np.bincount(slices, minlength=len(self.liver_slices))
        single = (self.image_window[images] == 0) & (counts[slices] == 1)
        if single.all():  # every liver that fits the grid: one mapping, no blending
            slab[self.in_slab[slices]] = self.mapping.to_slices(grid, shape)
        else:
            if single.any():
                rows = self.in_slab[slices[single]]
                slab[rows] = self.mapping.to_slices(grid[single], shape)
            weights = window_weights(self.mapping.size)
            total: dict[int, list[np.ndarray]] = {}
            for j in np.flatnonzero(~single):
                window = self.windows[self.image_window[images[j]]]
                row = int(self.in_slab[slices[j]])
                values = window.to_slices(np.stack([grid[j] * weights, weights]), shape)
                if row in total:
                    total[row][0] += values[0]
                    total[row][1] += values[1]
                else:
                    total[row] = [values[0], values[1]]
            for row, (weighted, weight) in total.items():
                slab[row] = np.where(weight > 0, weighted / np.maximum(weight, 1e-12), 0.0)
        slab[self.slab_liver == 0] = 0.0
        return slab

    def windows_per_slice(self) -> np.ndarray:
        """Number of grid images (windows) of each liver slice."""
        return np.bincount(self.image_slice, minlength=len(self.liver_slices))

    def liver_outside_windows(self) -> int:
        """Liver voxels that no window of their slice covers (they get score 0)."""
        if not len(self.liver_slices):
            return 0
        shape = self.slab_liver.shape[1:]
        covered = np.zeros((len(self.liver_slices), *shape), bool)
        for w, window in enumerate(self.windows):
            slices = self.image_slice[self.image_window == w]
            if len(slices):
                covered[slices] |= window.coverage(shape)
        liver = self.slab_liver[self.in_slab] > 0
        return int(np.count_nonzero(liver & ~covered))

    def detached(self) -> SlicePlan:
        """The plan without the volumes and grid images (the CT, its slab, ``ct_grid``,
        ``paint_grid``): what scoring needs besides the CT itself, small enough to pass
        between processes. :meth:`attach` puts the CT back."""
        return dataclasses.replace(
            self, case=None, slab_ct=None, slab_liver=None, ct_grid=None, paint_grid=None
        )

    def attach(self, ct: sitk.Image, liver: np.ndarray) -> SlicePlan:
        """A detached plan with its CT (HU) and liver mask read again."""
        from ..files.volumes import OrientedCase

        case = OrientedCase.from_arrays(ct, liver)
        return dataclasses.replace(self, case=case, **_slab(case, *self.slab))


def _slab(case: OrientedCase, z0: int, z1: int) -> dict:
    """The CT (float32 HU) and liver mask on LPS slices [z0, z1), contiguous."""
    return {
        "slab_ct": np.ascontiguousarray(case.ct[z0:z1], dtype=np.float32),
        "slab_liver": np.ascontiguousarray(case.liver[z0:z1]),
    }


def plan_slices(
    ct: sitk.Image, liver: np.ndarray, grid: InputGrid, params: DetectionParams
) -> SlicePlan:
    """Orientation, liver slab, contrast phase, AME and the slices on the model's ``grid``
    of a CT (HU) and its liver mask (uint8 on the CT grid, 1 = liver)."""
    from ..files.volumes import OrientedCase  # SimpleITK: not needed to inpaint store slices

    case = OrientedCase.from_arrays(ct, liver)  # views: nothing copied
    height, width = case.ct.shape[1:]
    sy, sx = case.spacing_yx
    liver_slices = np.flatnonzero(case.liver.any(axis=(1, 2)))
    # Everything below works on the liver's slab of slices only (memory: docs/performance.md).
    z0, z1 = (int(liver_slices[0]), int(liver_slices[-1]) + 1) if len(liver_slices) else (0, 0)
    slab = _slab(case, z0, z1)
    slab_ct, slab_liver = slab["slab_ct"], slab["slab_liver"]
    in_slab = liver_slices - z0
    phase = None
    if params.two_sided is None:  # automatic: two-sided AME on arterial-phase scans
        phase = estimate_phase(slab_ct, slab_liver, (sy, sx))
        params = dataclasses.replace(params, two_sided=phase.arterial)

    min_area_px = math.ceil(params.min_candidate_mm2 / (sy * sx)) if params.min_candidate_mm2 else 0
    ame_ct = denoise_for_ame(slab_ct, (sy, sx), params.ame_sigma_mm)
    candidates = adaptive_mask(ame_ct, slab_liver, params.offset_hu, params.two_sided, min_area_px)
    del ame_ct
    mapping = PlaneMapping.for_volume(grid, (height, width), (sy, sx), slab_liver)
    windows, image_slice, image_window = _windows(mapping, slab_liver[in_slab])
    ct_grid, cand_grid, refs_grid = [], [], []
    seeds: list[list[int]] = [[] for _ in range(params.samples)]
    for w, window in enumerate(windows):  # window 0 (mapping): every liver slice, in order
        which = image_slice[image_window == w]
        if w and not len(which):
            continue
        rows = in_slab[which]
        ct_grid.append(window.to_grid(slab_ct[rows], "image"))
        cand_grid.append(window.to_grid(candidates[rows], "mask"))
        window_seeds = [
            slice_seeds(params.seed, liver_slices[which], s, w) for s in range(params.samples)
        ]
        for s in range(params.samples):
            seeds[s].extend(window_seeds[s])
        if params.calibrate:
            liver_grid = window.to_grid(slab_liver[rows], "label")
            refs_grid.append(reference_patches(liver_grid, cand_grid[-1], window_seeds[0]))
    ct_grid, cand_grid = _stack(ct_grid), _stack(cand_grid)
    paint_grid, refs_grid = cand_grid, (_stack(refs_grid) if params.calibrate else None)
    if refs_grid is not None:
        paint_grid = np.maximum(cand_grid, refs_grid)
    positions = liver_slices[image_slice] * case.spacing_zyx[0]
    sampling = _depth_sampling(positions, cand_grid, image_window, params)
    return SlicePlan(
        params, case, (z0, z1), slab_ct, slab_liver, liver_slices, in_slab, phase, candidates,
        mapping, ct_grid, cand_grid, paint_grid, refs_grid, seeds, windows, image_slice,
        image_window, *sampling,
    )  # fmt: skip


def _depth_sampling(
    positions_mm: np.ndarray, cand_grid: np.ndarray, image_window: np.ndarray, params
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """:func:`.depth.depth_samples` (``params.depth_spacing_mm``) and
    :func:`.depth.interpolation_sources` on each window's images (their slices in depth
    order): ``(inpainted, sources, source_weight, counts)`` over all grid images."""
    spacing_mm, min_pixels = params.depth_spacing_mm, min_component_pixels(params.median_size)
    n = len(cand_grid)
    inpainted = np.zeros(n, bool)
    sources = np.full((n, 2), -1, np.intp)
    weight = np.full(n, np.nan)
    counts = {"regular": 0, "components": 0, "overlap": 0}
    for w in np.unique(image_window):
        images = np.flatnonzero(image_window == w)  # ascending slices (see _windows)
        picked, added = depth_samples(
            positions_mm[images], cand_grid[images], spacing_mm, min_pixels
        )
        has = cand_grid[images].reshape(len(images), -1).any(axis=1)
        src, wt = interpolation_sources(positions_mm[images], has, picked)
        inpainted[images] = picked
        sources[images] = np.where(src >= 0, images[np.maximum(src, 0)], -1)
        weight[images] = wt
        for key, value in added.items():
            counts[key] += value
    return inpainted, sources, weight, counts


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """The grid images of every window, window 0's first (itself when it is the only one)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _windows(
    mapping: PlaneMapping, liver: np.ndarray
) -> tuple[list[PlaneMapping], np.ndarray, np.ndarray]:
    """Sliding windows for the liver slices ``liver`` (``[N, H, W]``, 1 = liver) and the
    grid images they need: every slice on ``mapping`` (window 0, in slice order), then
    window by window the slices with liver that ``mapping`` misses and that window
    covers. Returns ``(windows, image_slice, image_window)``."""
    n = len(liver)
    image_slice, image_window = [np.arange(n)], [np.zeros(n, np.intp)]
    windows = sliding_windows(mapping, liver) if n else [mapping]
    if len(windows) > 1:
        shape = liver.shape[1:]
        missed = (liver > 0) & ~mapping.coverage(shape)
        if missed.any():
            for w, window in enumerate(windows[1:], start=1):
                which = np.flatnonzero((missed & window.coverage(shape)).any(axis=(1, 2)))
                image_slice.append(which)
                image_window.append(np.full(len(which), w, np.intp))
    return windows, np.concatenate(image_slice), np.concatenate(image_window)


def detect(
    ct: sitk.Image,
    liver: np.ndarray,
    checkpoint: Checkpoint,
    params: DetectionParams,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_partial: Callable[[np.ndarray], None] | None = None,
    partial_interval_s: float = 2.0,
) -> DetectionResult:
    """Run GDPI on one volume. ``liver`` is uint8 on the CT grid (1 = liver).

    ``on_partial``, if given, receives the score volume so far (CT index order, float32
    HU, 0 where not yet inpainted) after a batch, at most every ``partial_interval_s``
    seconds; finished slices already hold their final values.
    """
    params.validate(checkpoint.diffusion.num_timesteps)
    # auto: CUDA, else the Apple GPU where it computes this network like the CPU
    device, device_note = auto_device(params.device, checkpoint.model)
    start = time.perf_counter()
    plan = plan_slices(ct, liver, checkpoint.grid, params)
    params = plan.params
    batch_size = params.batch_size or default_batch_size(device.type, checkpoint.grid.size)
    work = plan.work
    batches = [work[i : i + batch_size] for i in range(0, len(work), batch_size)]
    t_prepare = time.perf_counter() - start

    nfe_batch = params.nfe_per_batch()
    nfe_total = nfe_batch * len(batches)
    n_images = len(plan.cand_grid)  # liver slices, and their extra sliding windows
    done = {"nfe": 0, "slices": n_images - len(work)}
    t0 = time.perf_counter()

    def report(nfe_in_batch: int = 0) -> None:
        if progress is None:
            return
        nfe = done["nfe"] + nfe_in_batch
        elapsed = time.perf_counter() - t0
        eta = elapsed / nfe * (nfe_total - nfe) if nfe else None
        progress(
            Progress(
                done["slices"],
                n_images,
                nfe,
                nfe_total,
                round(elapsed, 3),
                None if eta is None else round(eta, 1),
                str(device),
            )
        )

    finished: list[int] = []
    diff_grid = np.zeros_like(plan.ct_grid)

    def partial_score() -> np.ndarray:
        grid = finish_score(diff_grid[finished], params.two_sided, params.median_size)
        volume, lps = plan.case.new_original(np.float32)
        lps[slice(*plan.slab)] = plan.to_slab(grid, finished)
        return volume

    last_partial = time.perf_counter()

    def after_batch(number: int, batch: list[int], nfe: int) -> None:
        nonlocal last_partial
        done["nfe"] += nfe
        done["slices"] += len(batch)
        finished.extend(batch)
        report()
        if on_partial is not None and number < len(batches):
            if time.perf_counter() - last_partial >= partial_interval_s:
                on_partial(partial_score())
                last_partial = time.perf_counter()

    report()
    with signals.cooperative():  # a signal stops at the next network evaluation
        inpaint_grid(
            plan.ct_grid,
            plan.paint_grid,
            checkpoint,
            params,
            device,
            batches,
            plan.seeds,
            out=diff_grid,
            on_progress=report,
            on_batch=after_batch,
            should_cancel=should_cancel,
        )
    if should_cancel is not None and should_cancel():
        raise Cancelled()
    inpainting = {
        "device": str(device),
        "device_check": device_note,
        "bf16": bf16_active(params.bf16, device),
        "batches": len(batches),
        "batch_size": batch_size,
        "nfe": done["nfe"],
        "timings_s": {
            "prepare": round(t_prepare, 3),
            "inpaint": round(time.perf_counter() - t0, 3),
        },
    }
    return finish_detection(plan, diff_grid, work, inpainting, start)


def finish_detection(
    plan: SlicePlan,
    diff_grid: np.ndarray,
    work: list[int],
    inpainting: dict,
    start: float,
    interpolate: str = "pseudo-healthy",
) -> DetectionResult:
    """Score a plan whose grid slices ``work`` were inpainted (``diff_grid``: inpainted -
    input, HU, ``[liver slice, n, n]``) and build the outputs. ``inpainting`` holds how
    (device, bf16, batches, batch_size, nfe, timings_s of prepare and inpaint); ``start``
    is the ``time.perf_counter()`` the detection began at. Local and Ray engines alike.
    Images the depth sampling skipped get the pseudo-healthy image interpolated in depth
    (``interpolate="score"``: their score is interpolated instead; for measurements)."""
    params, case, (z0, z1) = plan.params, plan.case, plan.slab
    t1 = time.perf_counter()
    bias = None
    if params.calibrate:
        refs = plan.refs_grid
        if not plan.inpainted.all():  # the bias from the discs that were re-painted
            refs = np.where(plan.inpainted[:, None, None], refs, 0).astype(refs.dtype)
        diff_grid, bias = remove_bias(diff_grid, plan.cand_grid, refs)
    between = plan.interpolated()
    if len(between):
        diff_grid = _interpolate_pseudo_healthy(plan, diff_grid, between)
    score_grid = finish_score(diff_grid, params.two_sided, params.median_size)
    if len(between) and interpolate == "score":
        a, b = plan.sources[between, 0], plan.sources[between, 1]
        w = plan.source_weight[between].astype(np.float32)[:, None, None]
        score_grid[between] = w * score_grid[a] + (1 - w) * score_grid[b]
    positions = plan.liver_slices[plan.image_slice] * case.spacing_zyx[0]
    score_grid = smooth_across_slices(  # each window on its own
        score_grid, positions, params.depth_sigma_mm, plan.image_window
    )
    # the outputs: full volumes in the CT's own index order, written through LPS views
    score, score_lps = case.new_original(np.float32)
    pseudo = case.to_original(case.ct)  # a copy of the CT in HU
    cand, cand_lps = case.new_original(np.uint8)
    cand_lps[z0:z1] = plan.candidates
    if len(plan.liver_slices):
        images = np.arange(len(score_grid))
        score_lps[z0:z1] = plan.to_slab(score_grid, images)
        case.lps(pseudo)[z0:z1] += plan.to_slab(diff_grid, images)
    for name, volume in (("score", score), ("pseudo-healthy image", pseudo)):
        if not np.isfinite(volume).all():  # never written: no NaN reaches lesions.csv
            raise GDPIError(
                f"the {name} holds {int(np.count_nonzero(~np.isfinite(volume)))} NaN or "
                "infinite values; nothing written (a broken model or input)"
            )
    anomaly = anomaly_mask(score, params.threshold_hu)
    lesions = find_lesions(anomaly, score, case.original)
    t_score = time.perf_counter() - t1

    device = inpainting["device"]
    nfe_batch = params.nfe_per_batch()
    stats = {
        "device": device,
        "device_check": inpainting.get("device_check"),
        "bf16": inpainting["bf16"],
        "two_sided": params.two_sided,
        "two_sided_from": "contrast phase" if plan.phase is not None else "parameter",
        "phase": None if plan.phase is None else plan.phase.to_dict(),
        "cpu_native_bf16": cpu_has_bf16() if device.startswith("cpu") else None,
        "slices_total": int(case.ct.shape[0]),
        "slab_slices": z1 - z0,
        "slices_with_liver": len(plan.liver_slices),
        "slices_inpainted": len(work),  # grid images: a slice once per sliding window
        "depth_sampling": {
            "spacing_mm": params.depth_spacing_mm,
            "images_with_candidates": int(np.count_nonzero(plan.cand_grid.any(axis=(1, 2)))),
            "inpainted_by_rule": dict(plan.depth_counts),
            "interpolated": len(between),
        },
        "batches": inpainting["batches"],
        "batch_size": inpainting["batch_size"],
        "nfe": inpainting["nfe"],
        "nfe_per_batch": nfe_batch,
        "samples": params.samples,
        "calibration_bias_hu": None
        if bias is None or not len(work)
        else {
            "median": round(float(np.median(bias[work])), 2),
            "min": round(float(bias[work].min()), 2),
            "max": round(float(bias[work].max()), 2),
        },
        "slice_evaluations": nfe_batch * len(work) * params.samples,
        "model_grid": {
            "size": plan.mapping.size,
            "centre_rc": plan.mapping.centre,
            "step_rc": plan.mapping.step,
        },
        "windows": _window_stats(plan),
        "liver_outside_grid_voxels": plan.liver_outside_windows(),
        "timings_s": {
            **inpainting["timings_s"],
            "score": round(t_score, 3),
            "total": round(time.perf_counter() - start, 3),
        },
    }
    return DetectionResult(score, pseudo, cand, anomaly, lesions, stats)


def _interpolate_pseudo_healthy(
    plan: SlicePlan, diff_grid: np.ndarray, between: np.ndarray
) -> np.ndarray:
    """``diff_grid`` with each image of ``between`` (not inpainted) set, on its own
    candidates, to the linear interpolation in depth of its inpainted neighbours'
    pseudo-healthy images (CT + difference, HU) minus its own CT; 0 elsewhere."""
    out = diff_grid.copy()
    below, above = plan.sources[between, 0], plan.sources[between, 1]
    needed = np.unique(np.concatenate([between, below, above]))
    ct = dict(zip(needed.tolist(), plan.grid_ct(needed)))
    for j, a, b, w in zip(between, below, above, plan.source_weight[between]):
        healthy = w * (ct[a] + out[a]) + (1 - w) * (ct[b] + out[b])
        out[j] = np.where(plan.cand_grid[j] > 0, healthy - ct[j], 0.0)
    return out


def bf16_active(requested: bool | None, device: torch.device) -> bool:
    """Whether bfloat16 autocast runs. ``None`` (default): on CPUs that run bf16
    natively (AVX-512 BF16 / AMX), off elsewhere: on plain AVX-512 oneDNN only emulates
    bf16 and float32 is 2.7x faster end to end (``bench/bench_runtimes.py``); off on
    CUDA. ``True``: wherever oneDNN runs bf16 at all (emulated too) and on CUDA.
    ``False``: never. float32 rounds a convolution differently with its batch's
    composition (~1e-5 HU), so results match across engines/batches within 1e-3 HU,
    not bit for bit."""
    if requested is False:
        return False
    if device.type == "cpu":
        return cpu_can_bf16() if requested else cpu_has_bf16()
    return bool(requested) and device.type == "cuda"


def cpu_has_bf16() -> bool:
    """True when this CPU runs bfloat16 natively (AVX-512 BF16 or AMX): where bf16
    autocast is faster than float32. oneDNN also runs bf16 on plain AVX-512 CPUs
    (:func:`cpu_can_bf16`), by conversion, at about half float32's speed."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]  # fmt: skip
    if all(check is None for check in checks):  # torch < 2.3: the CPU's own flags (Linux)
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"}) and cpu_can_bf16()
    try:
        return any(bool(check()) for check in checks if check is not None) and cpu_can_bf16()
    except RuntimeError:
        return False


def cpu_can_bf16() -> bool:
    """True when oneDNN can run bfloat16 on this CPU at all (natively or emulated)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def slices_to_inpaint(inpaint_mask: np.ndarray) -> list[int]:
    """Indices of the slices whose ``inpaint_mask`` (``[N, n, n]``) is not empty; slices
    with nothing to re-paint need no network work."""
    return [i for i in range(len(inpaint_mask)) if inpaint_mask[i].any()]


def plan_batches(inpaint_mask: np.ndarray, batch_size: int) -> list[list[int]]:
    """:func:`slices_to_inpaint` in batches of ``batch_size`` (one case on its own)."""
    work = slices_to_inpaint(inpaint_mask)
    return [work[i : i + batch_size] for i in range(0, len(work), batch_size)]


def inpaint_grid(
    ct_grid: np.ndarray,
    inpaint_mask: np.ndarray,
    checkpoint: Checkpoint,
    params: DetectionParams,
    device: torch.device,
    batches: list[list[int]],
    seeds: Sequence[Sequence[int]],
    out: np.ndarray | None = None,
    prompts: np.ndarray | None = None,
    prompt_level: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_batch: Callable[[int, list[int], int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """RePaint slices already on the model grid; return ``inpainted - input`` in HU.

    ``ct_grid`` is ``[N, n, n]`` HU, ``inpaint_mask`` ``[N, n, n]`` (1 = re-paint).
    Only the slices listed in ``batches`` are processed (the others keep 0 in the
    result); ``seeds[k][i]`` seeds slice ``i``'s k-th inpainting whatever its batch:
    the result is the mean over the ``len(seeds)`` inpaintings (``params.samples``),
    which run in the same network batch.
    ``prompts`` (HU, like ``ct_grid``) with ``prompt_level`` start each slice from its
    prompt noised to that respaced level (see :func:`repaint`). ``on_progress(nfe)``
    is called during a batch, ``on_batch(number, batch, nfe)`` after it.
    This is the one inpainting code path of ``gdpi detect`` and ``gdpi evaluate``.
    """
    diffusion = GaussianDiffusion.from_config(checkpoint.diffusion, params.steps)
    model = checkpoint.model.to(device).eval()
    use_bf16 = bf16_active(params.bf16, device)
    checked = False

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        ctx = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if use_bf16
            else contextlib.nullcontext()
        )
        with ctx:
            out = model(x, t).float()
        if not checked:  # the first evaluation: a broken model is refused at once
            check_network_output(out, checkpoint)
            checked = True
        return out

    intensity = checkpoint.intensity
    diff = np.zeros_like(ct_grid, dtype=np.float32) if out is None else out
    k = len(seeds)
    for number, batch in enumerate(batches, start=1):
        items = [i for i in batch for _ in range(k)]  # each slice k times, side by side
        hu = torch.from_numpy(np.ascontiguousarray(ct_grid[items], np.float32)[:, None])
        image = intensity.normalize(hu.to(device))
        mask = torch.from_numpy(np.ascontiguousarray(inpaint_mask[items])[:, None]).to(device)
        noise = SliceNoise([seeds[s][i] for i in batch for s in range(k)], device)
        start = None
        if prompts is not None and prompt_level is not None:
            prompt = torch.from_numpy(np.ascontiguousarray(prompts[items], np.float32)[:, None])
            start = (intensity.normalize(prompt.to(device)), prompt_level)
        x0, nfe = repaint(
            network,
            diffusion,
            image,
            mask,
            params.jump_length,
            params.jump_n_sample,
            noise,
            progress=None if on_progress is None else (lambda n, _total: on_progress(n)),
            should_cancel=should_cancel,
            start=start,
            sampler=params.sampler,
            eta=params.eta,
        )
        moved = ((x0 - image)[:, 0] * intensity.hu_per_unit).cpu().numpy()
        if not np.isfinite(moved).all():
            raise CheckpointError(
                f"the network of {checkpoint.path or 'the checkpoint'} gave NaN or infinite "
                f"values in batch {number}: a broken or unstable model; nothing written"
            )
        diff[batch] = moved.reshape(len(batch), k, *moved.shape[1:]).mean(axis=1)
        if on_batch is not None:
            on_batch(number, batch, nfe)
    return diff


#: Largest network output (model units) a working model gives: it predicts unit-variance
#: noise (and variance interpolation values near [-1, 1]); trained models stay below 10.
MAX_NETWORK_OUTPUT = 100.0


def check_network_output(out: torch.Tensor, checkpoint: Checkpoint) -> None:
    """Refuse a model whose output is not finite or beyond :data:`MAX_NETWORK_OUTPUT`
    (:class:`CheckpointError`): checked on its first evaluation of a detection."""
    where = checkpoint.path or "the checkpoint"
    if not bool(torch.isfinite(out).all()):
        raise CheckpointError(
            f"the network of {where} gives NaN or infinite output: a broken model"
        )
    largest = float(out.abs().max()) if out.numel() else 0.0
    if largest > MAX_NETWORK_OUTPUT:
        raise CheckpointError(
            f"the network of {where} gives output up to {largest:.3g}, beyond the "
            f"{MAX_NETWORK_OUTPUT:g} a working model stays within: a broken model"
        )


def _window_stats(plan: SlicePlan) -> dict:
    """run.json's ``stats.windows``: the sliding windows a wide liver needed."""
    per_slice = plan.windows_per_slice()
    used = sorted(set(plan.image_window.tolist()))
    return {
        "windows": len(used),
        "grid_images": len(plan.image_slice),
        "slices_by_windows": {
            str(n): int(np.count_nonzero(per_slice == n)) for n in np.unique(per_slice)
        },
        "centres_rc": [[round(c, 2) for c in plan.windows[w].centre] for w in used],
    }
