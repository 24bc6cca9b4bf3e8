"""Synthetic liver tumours in real CT (``gdpi synth-tumours``).

Our own implementation of the generator described by Hu et al. (CVPR 2023, "Label-Free
Liver Tumor Segmentation"), written from the paper's description (its code is under a
non-commercial, no-derivatives licence and was not used):

1. location: a liver voxel far enough from the liver surface for the tumour's radius,
   away from other tumours, and not colliding with vessels (enhanced liver voxels more
   than 50 HU above the liver median);
2. shape: an ellipsoid (semi-axes 0.75-1.25 x the radius, random orientation)
   distorted by a smooth random displacement field (elastic deformation);
3. texture: a smooth Gaussian random field mapped to [0, 1] (mean 0.6, std 0.15);
4. intensity: ``HU - texture * edge * d``: a darkening of up to ``d`` HU, ``d`` drawn
   per tumour, where ``edge`` is the shape mask blurred by a Gaussian of 1-2 pixels
   (blurred edges) and scaled to a peak of 1. Only liver voxels change.

Variants (``VARIANTS``): ``hu2023`` (d = 65-145 HU, radius 5-20 mm: the published
range), ``subtle`` (d = 25-60 HU), ``bright`` (d = -90 to -40 HU: brighter than the
liver, like arterial-phase HCC) and ``small`` (d = 65-145 HU, radius 2-5 mm).
Ground truth: voxels where ``edge >= 0.5``, inside the liver. Deterministic for a seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from GDPILiverAnomalyLib.errors import InputError, ParameterError
from scipy import ndimage
from scipy.spatial.transform import Rotation


@dataclass(frozen=True)
class Variant:
    radius_mm: tuple[float, float]
    darkening_hu: tuple[float, float]  # d; negative = brighter than the liver
    blur_px: tuple[float, float] = (1.0, 2.0)
    texture_mean: float = 0.6
    texture_std: float = 0.15


VARIANTS: dict[str, Variant] = {
    "hu2023": Variant((5.0, 20.0), (65.0, 145.0)),
    "subtle": Variant((5.0, 20.0), (25.0, 60.0)),
    "bright": Variant((5.0, 20.0), (-90.0, -40.0)),
    "small": Variant((2.0, 5.0), (65.0, 145.0)),
}

VESSEL_HU_ABOVE_MEDIAN = 50.0


@dataclass
class Tumour:
    centre_kji: tuple[int, int, int]
    radius_mm: float
    semi_axes_mm: tuple[float, float, float]
    darkening_hu: float
    blur_px: float
    voxels: int
    volume_ml: float


def _random_field(
    shape: tuple[int, ...], sigma: tuple[float, ...], rng: np.random.Generator
) -> np.ndarray:
    """Smooth zero-mean unit-std Gaussian random field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    std = field.std()
    return field / std if std > 0 else field


def add_tumours(
    ct_hu: np.ndarray,
    liver: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    variant: str | Variant = "hu2023",
    count: int = 3,
    seed: int = 0,
    avoid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Tumour]]:
    """Add ``count`` synthetic tumours; return ``(new CT in HU, tumour mask, tumours)``.

    Arrays are ``[k, j, i]`` on the CT grid; ``spacing_zyx`` in mm; ``liver`` nonzero =
    liver; ``avoid`` (optional) marks voxels the tumours must keep clear of (e.g. real
    tumours). Inputs are not modified; voxels outside the liver are returned unchanged.
    """
    if isinstance(variant, str) and variant not in VARIANTS:
        raise ParameterError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    spec = VARIANTS[variant] if isinstance(variant, str) else variant
    if ct_hu.shape != liver.shape:
        raise InputError(f"CT shape {ct_hu.shape} and liver shape {liver.shape} differ")
    if count < 1:
        raise ParameterError("count must be >= 1")
    inside = liver > 0
    if not inside.any():
        raise InputError("the liver mask is empty")
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_zyx, float)
    ct = np.asarray(ct_hu, np.float32)
    median = float(np.median(ct[inside]))
    vessels = inside & (ndimage.median_filter(ct, size=(1, 3, 3)) > median + VESSEL_HU_ABOVE_MEDIAN)
    depth = ndimage.distance_transform_edt(inside, sampling=spacing)
    blocked = np.zeros_like(inside) if avoid is None else avoid > 0
    darkening = np.zeros(ct.shape, np.float32)
    truth = np.zeros(ct.shape, bool)
    tumours: list[Tumour] = []

    for _ in range(count):
        radius = float(rng.uniform(*spec.radius_mm))
        free = depth.copy()
        if blocked.any():
            clearance = ndimage.distance_transform_edt(~blocked, sampling=spacing)
            free = np.where(clearance > radius + 5.0, free, 0.0)
        candidates = np.flatnonzero(free >= min(0.7 * radius, free.max() * 0.9))
        if not len(candidates):
            break
        best = None
        for _try in range(30):
            centre = np.unravel_index(int(rng.choice(candidates)), ct.shape)
            semi = radius * rng.uniform(0.75, 1.25, 3)
            rot = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
            lo = [
                max(0, int(c - 1.6 * radius / s) - 1) for c, s in zip(centre, spacing, strict=True)
            ]
            hi = [
                min(n, int(c + 1.6 * radius / s) + 2)
                for c, s, n in zip(centre, spacing, ct.shape, strict=True)
            ]
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            axes = [
                (np.arange(b.start, b.stop, dtype=np.float32) - c) * s
                for b, c, s in zip(box, centre, spacing, strict=True)
            ]
            offset = np.stack(np.meshgrid(*axes, indexing="ij"))
            shape = offset.shape[1:]
            sigma = tuple(max(0.5 * radius / s, 0.5) for s in spacing)
            warp = np.stack([_random_field(shape, sigma, rng) for _ in range(3)]) * 0.2 * radius
            local = np.einsum("ij,j...->i...", rot.T, offset + warp)
            body = (sum((local[d] / semi[d]) ** 2 for d in range(3)) <= 1.0) & inside[box]
            if not body.any():
                continue
            collision = float((body & vessels[box]).sum()) / body.sum()
            if best is None or collision < best[0]:
                best = (collision, centre, semi, box, body)
            if collision <= 0.1:
                break
        if best is None:
            break
        _, centre, semi, box, body = best
        blur = float(rng.uniform(*spec.blur_px))
        edge = ndimage.gaussian_filter(
            body.astype(np.float32), (blur * spacing[1] / spacing[0], blur, blur)
        )
        edge /= max(float(edge.max()), 1e-6)  # small tumours keep their full contrast
        texture = np.clip(
            spec.texture_mean + spec.texture_std * _random_field(edge.shape, (0.6, 1.5, 1.5), rng),
            0.0,
            1.0,
        )
        d = float(rng.uniform(*spec.darkening_hu))
        add = texture * edge * d * inside[box]
        region = darkening[box]
        keep = np.abs(add) > np.abs(region)
        region[keep] = add[keep]
        mask = (edge >= 0.5) & inside[box]
        truth[box] |= mask
        blocked[box] |= mask
        voxels = int(mask.sum())
        tumours.append(
            Tumour(
                tuple(int(c) for c in centre),
                round(radius, 2),
                tuple(round(float(a), 2) for a in semi),
                round(d, 1),
                round(blur, 2),
                voxels,
                round(voxels * float(np.prod(spacing)) / 1000.0, 3),
            )
        )
    new_ct = np.where(inside, ct - darkening, ct).astype(np.float32)
    return new_ct, truth.astype(np.uint8), tumours


def write_synthetic_case(
    ct_path: str | Path,
    seg_path: str | Path,
    out: str | Path,
    variant: str,
    count: int,
    seed: int,
    liver_labels: tuple[int, ...] | None = None,
    source_tumour_label: int | None = 2,
) -> dict:
    """Read a CT and its label map, add tumours, write ``ct.nii.gz``, ``seg.nii.gz`` and
    ``tumours.json`` into ``out`` (all or nothing).

    ``seg.nii.gz``: 0 background, 1 liver, 2 synthetic tumour, 3 source tumour (the
    original ``source_tumour_label`` voxels, kept clear of; ``gdpi prepare
    --ignore-label 3`` drops their slices). ``liver_labels`` None = every nonzero label.
    """
    from GDPILiverAnomalyLib.files.outputs import atomic_dir, check_output_dir
    from GDPILiverAnomalyLib.files.volumes import mask_on_ct_grid, read_ct, read_image

    out = check_output_dir(out)  # new or empty (the output-folder contract)
    ct = read_ct(ct_path)
    seg_image = read_image(seg_path, "mask")
    seg = sitk.GetArrayViewFromImage(seg_image)
    source = (
        mask_on_ct_grid(seg == source_tumour_label, seg_image, ct)
        if source_tumour_label is not None
        else None
    )
    selected = seg != 0 if liver_labels is None else np.isin(seg, liver_labels)
    liver = mask_on_ct_grid(selected, seg_image, ct)
    if source is not None:
        liver |= source
    if not liver.any():
        raise InputError(f"{seg_path}: no liver voxels")
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    sx, sy, sz = ct.GetSpacing()
    new_ct, truth, tumours = add_tumours(
        hu, liver, (sz, sy, sx), variant, count, seed, avoid=source
    )
    labels = liver.astype(np.uint8)
    labels[truth > 0] = 2
    if source is not None:
        labels[source > 0] = 3
    out_ct = sitk.GetImageFromArray(np.round(new_ct).astype(np.int16))
    out_ct.CopyInformation(ct)
    out_seg = sitk.GetImageFromArray(labels)
    out_seg.CopyInformation(ct)
    info = {
        "source_ct": str(ct_path),
        "source_seg": str(seg_path),
        "variant": variant,
        "variant_spec": asdict(VARIANTS[variant]),
        "count_requested": count,
        "seed": seed,
        "labels": {"1": "liver", "2": "synthetic tumour", "3": "source tumour (ignore)"},
        "tumours": [asdict(t) for t in tumours],
    }
    with atomic_dir(out, replace=False) as tmp:  # never over files that came meanwhile
        sitk.WriteImage(out_ct, str(tmp / "ct.nii.gz"), True)
        sitk.WriteImage(out_seg, str(tmp / "seg.nii.gz"), True)
        (tmp / "tumours.json").write_text(json.dumps(info, indent=2))
    return info
