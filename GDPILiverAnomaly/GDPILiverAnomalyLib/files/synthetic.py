"""Synthetic abdominal CT volumes with hypodense liver lesions and their ground truth.

For the demo, the tests and demo-model training; no real data involved. Everything is
in HU on a real-world grid and deterministic for a seed. Arrays are ``[z, y, x]`` in
LPS orientation: ``z`` inferior to superior, rows anterior to posterior, columns
patient right to left (the liver is on the image's left, as radiologists see it).

Each case comes twice from the same anatomy and noise: ``healthy`` and ``ct`` (with
lesions). ``tumour`` is exactly the set of voxels whose value the lesions changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


@dataclass
class SyntheticCase:
    ct: np.ndarray  # float32 HU with lesions
    healthy: np.ndarray  # float32 HU, same anatomy and noise, no lesions
    liver: np.ndarray  # uint8, 1 = liver (lesions included)
    tumour: np.ndarray  # uint8, 1 = lesion voxel (exactly the altered voxels)
    spacing: tuple[float, float, float]  # (x, y, z) mm, SimpleITK order
    lesions: list[dict] = field(default_factory=list)

    def image(self, array: np.ndarray) -> sitk.Image:
        """``array`` as a SimpleITK image with this case's LPS geometry."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        nz, ny, nx = array.shape
        image.SetOrigin((-(nx - 1) * self.spacing[0] / 2, -(ny - 1) * self.spacing[1] / 2, 0.0))
        return image


def _smooth_noise(rng: np.random.Generator, shape, sigma, amplitude) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (noise / (noise.std() + 1e-9) * amplitude).astype(np.float32)


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2


def synthetic_case(
    seed: int = 0,
    n_slices: int = 16,
    size: int = 192,
    pixel_mm: float = 2.0,
    slice_mm: float = 5.0,
    n_lesions: int | None = None,
    noise_hu: float = 12.0,
) -> SyntheticCase:
    """One synthetic abdomen of ``n_slices`` x ``size`` x ``size`` voxels through the liver.

    ``n_lesions=None`` draws 2 to 4 lesions; 0 gives a healthy case (``ct == healthy``).
    """
    rng = np.random.default_rng(seed)
    shape = (n_slices, size, size)
    zz = np.arange(n_slices, dtype=np.float32)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # mm from the top-left corner, broadcast over slices
    yy = np.broadcast_to(yy[None] * pixel_mm, shape)
    xx = np.broadcast_to(xx[None] * pixel_mm, shape)
    centre = (size - 1) * pixel_mm / 2
    zf = zz / max(1, n_slices - 1)  # 0 (inferior) .. 1 (superior)

    # body outline, subcutaneous fat, abdominal wall muscle, visceral fat
    body_rx = rng.uniform(150, 175) * (0.97 + 0.03 * zf)
    body_ry = rng.uniform(105, 125) * (0.97 + 0.03 * zf)
    body = _ellipse(yy, xx, centre + 5, centre, body_ry, body_rx)
    fat_mm = rng.uniform(12, 25)
    vol = np.full(shape, -1000.0, np.float32)
    vol[body <= 1] = -100.0
    inner = _ellipse(yy, xx, centre + 5, centre, body_ry - fat_mm, body_rx - fat_mm)
    vol[inner <= 1] = 45.0  # muscle wall
    visceral = _ellipse(yy, xx, centre + 5, centre, body_ry - fat_mm - 9, body_rx - fat_mm - 9)
    vol[visceral <= 1] = -85.0
    vol += np.where(vol > -500, _smooth_noise(rng, shape, (0.5, 3, 3), 8.0), 0)

    # spine: vertebral body, cortex, canal, posterior elements; aorta and IVC
    sy, sx = centre + body_ry.mean() * 0.55, centre
    vert = _ellipse(yy, xx, sy, sx, 17, 19)
    vol[vert <= 1.25] = 450.0
    vol[vert <= 1] = 230.0
    vol[_ellipse(yy, xx, sy + 28, sx, 8, 8) <= 1] = 20.0  # canal
    vol[
        (_ellipse(yy, xx, sy + 30, sx, 14, 22) <= 1) & (_ellipse(yy, xx, sy + 28, sx, 8, 8) > 1)
    ] = 380.0
    vol[_ellipse(yy, xx, sy - 30, sx + 14, 11, 11) <= 1] = 170.0  # aorta (patient left)
    vol[_ellipse(yy, xx, sy - 28, sx - 22, 12, 10) <= 1] = 135.0  # IVC (patient right)
    # psoas / paraspinal muscles
    for side in (-1, 1):
        vol[_ellipse(yy, xx, sy + 25, sx + side * 45, 22, 26) <= 1] = 50.0
    # ribs: bright ellipses just inside the fat ring, lateral and posterior
    for angle in np.linspace(0.25, np.pi - 0.25, 7):
        for side in (-1, 1):
            ry, rx = body_ry.mean() - fat_mm - 4, body_rx.mean() - fat_mm - 4
            cy = centre + 5 + ry * np.sin(angle) * 0.95
            cx = centre + side * rx * np.cos(angle) * 0.98
            if cy < centre - 20:
                continue
            rib = _ellipse(yy, xx, cy, cx, 5, 7)
            vol[(rib <= 1) & np.broadcast_to(zz % 3 != 0, shape)] = 600.0

    # kidneys (lower slices), stomach with gas (patient left, upper slices)
    for side, cx in ((1, sx + 68), (-1, sx - 68)):
        reach = np.clip(1.2 - 2.2 * zf, 0, 1)
        kid = _ellipse(
            yy, xx, sy - 5, cx, 30 * np.sqrt(reach) + 1e-3, 22 * np.sqrt(reach) + 1e-3, 0.4 * side
        )
        vol[(kid <= 1) & (reach > 0)] = 150.0
        vol[(kid <= 0.35) & (reach > 0)] = 20.0  # renal pelvis
    stomach = _ellipse(yy, xx, centre - 25, centre + 80, 45, 38, -0.3)
    in_stomach = (stomach <= 1) & (zf > 0.35)
    vol[in_stomach] = 35.0
    vol[in_stomach & (stomach <= 0.8)] = 15.0
    vol[in_stomach & (stomach <= 0.8) & (yy < centre - 45)] = -1000.0  # gas rises anteriorly
    bowel = rng.uniform(0, 1, 6)
    for i in range(6):
        by, bx = centre + rng.uniform(-40, 20), centre + rng.uniform(10, 110)
        loop = (_ellipse(yy, xx, by, bx, 13, 13) <= 1) & (zf < 0.5) & (bowel[i] > 0.3)
        vol[loop] = 30.0
        vol[loop & (_ellipse(yy, xx, by, bx, 6, 6) <= 1)] = -1000.0

    # liver: a deformed superquadric on the patient's right, tapering inferiorly
    lcx, lcy = centre - rng.uniform(55, 75), centre - rng.uniform(0, 15)
    lrx = rng.uniform(80, 95) * (0.55 + 0.45 * np.sqrt(zf))
    lry = rng.uniform(70, 85) * (0.6 + 0.4 * np.sqrt(zf))
    warp_y = _smooth_noise(rng, shape, (2, 12, 12), 10.0)
    warp_x = _smooth_noise(rng, shape, (2, 12, 12), 10.0)
    shape_val = np.abs((xx + warp_x - lcx) / lrx) ** 2.4 + np.abs((yy + warp_y - lcy) / lry) ** 2.4
    liver = (shape_val <= 1) & (visceral <= 1)
    liver &= _ellipse(yy, xx, sy, sx, 32, 34) > 1  # keep clear of the spine
    liver = ndimage.binary_opening(liver, np.ones((1, 5, 5)))
    labels, n = ndimage.label(liver)
    if n > 1:
        liver = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    liver_hu = rng.uniform(95, 120)
    texture = _smooth_noise(rng, shape, (0.7, 2.0, 2.0), 6.0)
    vol[liver] = liver_hu + texture[liver]
    # vessels: thin bright tubes (portal / hepatic veins) following smooth random paths
    vessels = np.zeros(shape, bool)
    for _ in range(rng.integers(5, 9)):
        t = np.linspace(0, 1, 80)
        p0 = np.array([lcy, lcx]) + rng.uniform(-20, 20, 2)
        heading = rng.uniform(0, 2 * np.pi)
        bend = rng.uniform(-1.5, 1.5)
        length = rng.uniform(50, 100)
        path_y = p0[0] + length * t * np.sin(heading + bend * t)
        path_x = p0[1] + length * t * np.cos(heading + bend * t)
        radius = rng.uniform(2.0, 4.5) * (1 - 0.5 * t)
        z0, z1 = sorted(rng.integers(0, n_slices, 2))
        for py, px, r in zip(path_y[::2], path_x[::2], radius[::2]):  # equal lengths
            disk = ((yy[0] - py) ** 2 + (xx[0] - px) ** 2) <= r**2
            vessels[z0 : z1 + 1] |= disk
    vessels &= liver
    vol[vessels] = liver_hu + rng.uniform(45, 70)

    # scanner: slight in-plane blur and correlated noise
    vol = ndimage.gaussian_filter(vol, (0, 0.7, 0.7))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), (0, 0.6, 0.6))
    noise *= noise_hu / noise.std()
    healthy = (vol + np.where(vol > -900, noise, noise * 0.3)).astype(np.float32)

    # lesions: deformed ellipsoids inside the liver, darker by 25..80 HU, soft edges
    count = int(rng.integers(2, 5)) if n_lesions is None else n_lesions
    ct = healthy.copy()
    tumour = np.zeros(shape, bool)
    change = np.zeros(shape, np.float32)
    lesions = []
    inside = np.argwhere(ndimage.binary_erosion(liver, np.ones((1, 9, 9))))
    for i in range(count if len(inside) else 0):
        cz, cy, cx = inside[rng.integers(len(inside))]
        radius = float(rng.choice([rng.uniform(5, 9), rng.uniform(9, 16), rng.uniform(16, 26)]))
        contrast = float(rng.uniform(25, 80))
        rz = max(slice_mm * 0.8, radius * rng.uniform(0.7, 1.1))
        dist = np.sqrt(
            ((zz - cz) * slice_mm / rz) ** 2
            + ((yy - cy * pixel_mm) / (radius * rng.uniform(0.8, 1.2))) ** 2
            + ((xx - cx * pixel_mm) / (radius * rng.uniform(0.8, 1.2))) ** 2
        )
        dist = dist + _smooth_noise(rng, shape, (1, 4, 4), 0.12)  # elastic, irregular margin
        region = (dist < 1) & liver
        if not region.any():
            continue
        edge = float(rng.uniform(0.15, 0.45))  # soft margin width (fraction of the radius)
        profile = np.clip((1 - dist) / edge, 0, 1)
        profile = profile * profile * (3 - 2 * profile)  # smoothstep: 0 at the edge, 1 inside
        inner_texture = np.clip(1 + _smooth_noise(rng, shape, (0.5, 1.5, 1.5), 0.15), 0.5, 1.5)
        delta = np.where(region, contrast * np.maximum(profile, 0.15) * inner_texture, 0).astype(
            np.float32
        )
        change = np.maximum(change, delta)
        tumour |= region
        lesions.append(
            {
                "id": i + 1,
                "centre_zyx": [int(cz), int(cy), int(cx)],
                "radius_mm": round(radius, 1),
                "contrast_hu": round(contrast, 1),
                "voxels": int(region.sum()),
            }
        )
    ct -= change
    return SyntheticCase(
        ct.astype(np.float32),
        healthy,
        liver.astype(np.uint8),
        tumour.astype(np.uint8),
        (pixel_mm, pixel_mm, slice_mm),
        lesions,
    )
