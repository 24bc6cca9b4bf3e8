"""Preview PNGs during training: unconditional samples and an inpainting of held-out slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from GDPILiverAnomalyLib.files.checkpoint import Intensity
from GDPILiverAnomalyLib.method.diffusion import DiffusionConfig, GaussianDiffusion
from GDPILiverAnomalyLib.method.repaint import SliceNoise, repaint

from .store import SliceStore


@torch.no_grad()
def write_preview(
    model: torch.nn.Module,
    diffusion_config: DiffusionConfig,
    intensity: Intensity,
    store: SliceStore,
    path: Path,
    seed: int = 0,
    device: torch.device | str = "cpu",
    steps: int = 25,
    count: int = 4,
) -> Path:
    """Row 1: samples; rows 2-3: held-out healthy slices with a disk masked, and the re-painting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diffusion = GaussianDiffusion.from_config(diffusion_config, steps)
    n = store.images.shape[-1]
    model = model.eval()
    samples, _ = repaint(
        model,
        diffusion,
        torch.zeros(count, 1, n, n, device=device),
        torch.ones(count, 1, n, n, device=device),
        1,
        1,
        SliceNoise(range(seed, seed + count), device),
    )
    pool = store.select("healthy", "val")
    if not len(pool):
        pool = store.select("healthy")
    chosen = pool[np.linspace(0, len(pool) - 1, min(count, len(pool))).astype(int)]
    images = intensity.normalize(
        torch.from_numpy(np.asarray(store.images[np.sort(chosen)])).to(device)[:, None]
    )
    liver = np.asarray(store.liver[np.sort(chosen)])
    yy, xx = np.mgrid[0:n, 0:n]
    masks = np.zeros((len(chosen), 1, n, n), np.float32)
    for i, lv in enumerate(liver):
        cy, cx = np.argwhere(lv).mean(axis=0) if lv.any() else (n / 2, n / 2)
        masks[i, 0] = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (n / 8) ** 2
    masks_t = torch.from_numpy(masks).to(device)
    filled, _ = repaint(
        model, diffusion, images, masks_t, 5, 2, SliceNoise(range(len(chosen)), device)
    )

    def hu(x: torch.Tensor) -> np.ndarray:
        return intensity.to_hu(x[:, 0]).cpu().numpy()

    rows = [
        ("sample", hu(samples)),
        ("masked input", hu(images * (1 - masks_t) - masks_t)),
        ("re-painted", hu(filled)),
    ]
    fig, axes = plt.subplots(3, count, figsize=(2.2 * count, 6.6), squeeze=False)
    for r, (title, arrays) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(arrays):
                ax.imshow(arrays[c], cmap="gray", vmin=-160, vmax=240)
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
