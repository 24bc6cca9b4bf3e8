"""``gdpi demo``: a synthetic case with lesions, detection with the bundled demo model,
a figure, and pixel metrics against the ground truth. No downloads, no real data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import Cancelled, CheckpointError
from ..files.checkpoint import load_checkpoint
from ..files.outputs import atomic_dir, check_output_dir
from ..files.synthetic import synthetic_case
from ..method.parameters import DetectionParams
from . import signals
from .runner import OUTPUT_FILES, run_case

DEMO_MODEL = Path(__file__).parent.parent / "models" / "demo.safetensors"
#: What a demo folder holds (``--overwrite`` replaces only such a folder).
DEMO_OUTPUTS = ("input", "result", "metrics.json", "demo.png")
DEMO_INPUTS = ("ct.nrrd", "liver.nrrd", "tumour.nrrd")
DEMO_SEED = 7  # the demo model was trained on healthy synthetic cases with seeds 1000..1079


def _is_demo_output(path: Path) -> bool:
    """Whether ``path`` (an entry of ``--out``) is one a demo writes, with nothing of
    anyone else's in it: ``input/`` and ``result/`` hold only the demo's files."""
    inside = {"input": DEMO_INPUTS, "result": OUTPUT_FILES}.get(path.name)
    if inside is None:
        return path.name in DEMO_OUTPUTS and path.is_file()
    return (
        path.is_dir()
        and not path.is_symlink()
        and all(p.name in inside and p.is_file() for p in path.iterdir())
    )


def run_demo(
    out: str | Path,
    checkpoint: str | Path | None = None,
    seed: int = DEMO_SEED,
    preset: str = "fast",
    device: str = "auto",
    progress=None,
    log=print,
    should_cancel=None,
    overwrite: bool = False,
) -> dict:
    """Generate, detect, score and draw; return the metrics (also in ``out/metrics.json``)."""
    from ..method.metrics import pixel_metrics  # scikit-learn: not needed by detection or Slicer

    final = check_output_dir(out, overwrite, "metrics.json", _is_demo_output)
    path = Path(checkpoint) if checkpoint else DEMO_MODEL
    if not path.is_file():
        raise CheckpointError(f"demo model not found: {path}")
    # all or nothing; an earlier demo is replaced whole; a signal: nothing moved
    with signals.cooperative(), atomic_dir(final, replace=overwrite) as out:
        t0 = time.perf_counter()
        case = synthetic_case(seed)
        inputs = out / "input"
        inputs.mkdir(parents=True, exist_ok=True)
        for name, array in (
            ("ct.nrrd", case.ct.astype(np.int16)),
            ("liver.nrrd", case.liver),
            ("tumour.nrrd", case.tumour),
        ):
            sitk.WriteImage(case.image(array), str(inputs / name), useCompression=True)
        log(
            f"synthetic case (seed {seed}): {case.ct.shape[0]} slices, {len(case.lesions)} lesions, "
            f"{int(case.tumour.sum())} tumour voxels -> {final / 'input'}"
        )
        params = DetectionParams.from_preset(preset, device=device)
        info = run_case(
            inputs / "ct.nrrd",
            inputs / "liver.nrrd",
            load_checkpoint(path),
            params,
            out / "result",
            progress=progress,
            should_cancel=should_cancel,
        )
        run_json = out / "result" / "run.json"  # name the inputs where they will be
        recorded = json.loads(run_json.read_text())
        for name in ("ct", "liver"):
            recorded["inputs"][name] = str(final / "input" / f"{name}.nrrd")
        run_json.write_text(json.dumps(recorded, indent=2))
        score = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "result" / "score.nrrd")))
        metrics = pixel_metrics(score, case.tumour, region=case.liver)
        metrics.update(
            preset=preset,
            nfe=info["nfe"],
            seconds=round(time.perf_counter() - t0, 1),
            device=info["device"],
            checkpoint=str(path),
            seed=seed,
            pooled="liver voxels of every slice of the synthetic case",
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        draw_figure(
            case.ct,
            sitk.GetArrayFromImage(sitk.ReadImage(str(out / "result" / "pseudo_healthy.nrrd"))),
            score,
            case.tumour,
            case.liver,
            out / "demo.png",
            threshold=metrics["threshold"],
        )
        log(
            f"pixel AUROC {metrics['auroc']:.3f}, AP {metrics['ap']:.3f}, best Dice {metrics['best_dice']:.3f} "
            f"(threshold {metrics['threshold']:.1f} HU); {info['nfe']} NFE, {metrics['seconds']:.0f} s on "
            f"{info['device']}; figure {final / 'demo.png'}"
        )
        if should_cancel is not None and should_cancel():
            raise Cancelled()
    return metrics


def draw_figure(
    ct: np.ndarray,
    pseudo: np.ndarray,
    score: np.ndarray,
    truth: np.ndarray,
    liver: np.ndarray,
    path: Path,
    threshold: float,
    rows: int = 3,
) -> Path:
    """CT, pseudo-healthy, heatmap over CT and ground truth for the slices with most tumour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(truth.sum(axis=(1, 2)).astype(np.int64), kind="stable")[::-1][:rows]
    ys, xs = np.nonzero(liver.any(axis=0))
    crop = (
        slice(max(0, ys.min() - 15), ys.max() + 15),
        slice(max(0, xs.min() - 15), xs.max() + 15),
    )
    fig, axes = plt.subplots(len(order), 4, figsize=(12, 3.1 * len(order)), squeeze=False)
    window = dict(cmap="gray", vmin=-125, vmax=225)  # the paper's display window
    for r, k in enumerate(sorted(order)):
        panels = [
            ("CT", ct[k]),
            ("pseudo-healthy", pseudo[k]),
            ("score 0-50 HU", ct[k]),
            ("truth red, detected yellow", ct[k]),
        ]
        for c, (title, image) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(image[crop], **window)
            ax.set_title(f"slice {k}: {title}", fontsize=8)
            ax.axis("off")
        heat = np.ma.masked_less_equal(score[k][crop], 0)
        im = axes[r, 2].imshow(heat, cmap="inferno", vmin=0, vmax=50, alpha=0.75)
        axes[r, 3].contour(truth[k][crop], levels=[0.5], colors="red", linewidths=1)
        axes[r, 3].contour(
            (score[k] >= threshold)[crop].astype(float), levels=[0.5], colors="yellow", linewidths=1
        )
    fig.subplots_adjust(right=0.9)
    fig.colorbar(im, cax=fig.add_axes([0.92, 0.3, 0.012, 0.4]), label="score (HU)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
