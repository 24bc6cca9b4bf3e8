"""Validation curves: the diffusion loss of each EMA snapshot of a run on slices it never
trained on (a held-out patient's healthy slices) and on its own training slices.

``python -m GDPITraining.curves --data STORE --run RUN --cases CASE[,CASE] --out curve.json``
reads ``RUN/snapshots/step*.safetensors`` (``gdpi train --snapshot-every``). The loss is
L_simple (noise-prediction MSE, model units) averaged over 20 evenly spaced timesteps
with fixed noise (seed 0), so every snapshot sees the same draws: a curve that stops
falling on the held-out slices says that longer training no longer helps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
from GDPILiverAnomalyLib.method.diffusion import GaussianDiffusion, training_losses
from GDPILiverAnomalyLib.running.devices import resolve_device

from .loop import slice_batch
from .store import SliceStore


@torch.no_grad()
def snapshot_loss(
    path: Path, store: SliceStore, indices: np.ndarray, device: torch.device, levels: int = 20
) -> float:
    """Mean L_simple of one checkpoint over store slices ``indices`` (see module docstring)."""
    ckpt = load_checkpoint(path)
    model = ckpt.model.to(device).eval()
    diffusion = GaussianDiffusion.from_config(ckpt.diffusion)
    x0 = slice_batch(store, indices, ckpt.intensity, device)
    g = torch.Generator().manual_seed(0)
    total = []
    for t_value in np.linspace(0, diffusion.num_timesteps - 1, levels).round().astype(int):
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.full((len(x0),), int(t_value), device=device, dtype=torch.long)
        total.append(training_losses(diffusion, model, x0, t, noise)["mse"].mean().item())
    return float(np.mean(total))


def run_curve(
    data: str, run: str, cases: list[str], device: str = "auto", max_slices: int = 0
) -> dict:
    """Held-out and training loss of every snapshot of ``run`` (steps ascending);
    ``max_slices`` > 0: at most that many slices of each set, evenly spread."""
    store = SliceStore.open(data)
    dev = resolve_device(device)
    healthy = store.select("healthy", None)
    of_case = np.array([store.slices[int(i)]["case"] in cases for i in healthy], bool)
    held_out, trained = healthy[of_case], healthy[~of_case]
    if max_slices:
        held_out, trained = (
            s[np.unique(np.linspace(0, len(s) - 1, max_slices).round().astype(int))]
            for s in (held_out, trained)
        )
    rows = []
    for path in sorted(Path(run, "snapshots").glob("step*.safetensors")):
        rows.append(
            {
                "step": int(path.stem[4:]),
                "held_out_loss": snapshot_loss(path, store, held_out, dev),
                "train_loss": snapshot_loss(path, store, trained, dev),
            }
        )
    return {"run": str(run), "held_out_cases": cases, "held_out_slices": len(held_out),
            "points": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m GDPITraining.curves", description=__doc__)
    p.add_argument("--data", required=True, help="slice store the run trained on")
    p.add_argument("--run", required=True, help="run folder with snapshots/")
    p.add_argument("--cases", required=True, help="comma-separated held-out case names")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-slices", type=int, default=0, help="at most N slices per set")
    args = p.parse_args(argv)
    result = run_curve(args.data, args.run, args.cases.split(","), args.device, args.max_slices)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for r in result["points"]:
        print(f"step {r['step']}: held-out {r['held_out_loss']:.5f} train {r['train_loss']:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
