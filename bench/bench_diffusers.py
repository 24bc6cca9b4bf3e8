"""``gdpi detect``'s inpainting against diffusers' RePaint, side by side in one run.

Same network (the bundled real-CT model), same slices and masks (those ``gdpi detect``
re-paints on a real case: AME candidates plus calibration discs), same RePaint
schedule (steps, jump length, resamplings). diffusers runs the loop of its
``RePaintPipeline`` (``RePaintScheduler.step`` / ``undo_step``, noise-prediction
channels of the network) at the same batch size, once in float32 (how the pipeline
runs unless told otherwise) and once under the same bfloat16 autocast ``gdpi detect``
uses on this CPU. ``gdpi`` rows are ``pipeline.inpaint_grid`` (the one inpainting
path of ``gdpi detect``), for RePaint with that schedule (the ``fast`` preset's unless
``--smoke``) and for DDNM with 50 steps.

    .venv/bin/python bench/bench_diffusers.py [--case ../shared/data/hcc_1720] [--smoke]

diffusers is a benchmark-only dependency (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GDPILiverAnomaly"))

from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint, load_checkpoint  # noqa: E402
from GDPILiverAnomalyLib.files.volumes import read_ct, read_liver_mask  # noqa: E402
from GDPILiverAnomalyLib.method.parameters import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    PRESETS,
    DetectionParams,
    default_batch_size,
)
from GDPILiverAnomalyLib.running.devices import resolve_device  # noqa: E402
from GDPILiverAnomalyLib.running.pipeline import (  # noqa: E402
    bf16_active,
    inpaint_grid,
    plan_batches,
    plan_slices,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def diffusers_repaint(model, image, known, params, batches, bf16, seed) -> tuple[float, int]:
    """RePaintPipeline's loop over ``batches`` of ``image`` (model units, ``[N, 1, n, n]``;
    ``known`` 1 = keep, diffusers' convention); returns (seconds, network evaluations)."""
    from diffusers import RePaintScheduler

    scheduler = RePaintScheduler(num_train_timesteps=1000, beta_schedule="linear", eta=0.0)
    nfe = 0
    start = time.perf_counter()
    for batch in batches:
        original, mask = image[batch], known[batch]
        scheduler.set_timesteps(params.steps, params.jump_length, params.jump_n_sample)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(original.shape, generator=generator)
        t_last = scheduler.timesteps[0] + 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for t in scheduler.timesteps:
                if t < t_last:
                    eps = model(x, t.expand(len(batch))).float()[:, :1]
                    x = scheduler.step(eps, t, x, original, mask, generator).prev_sample
                    nfe += 1
                else:
                    x = scheduler.undo_step(x, t_last, generator)
                t_last = t
    return time.perf_counter() - start, nfe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=DATA / "hcc_1720")
    parser.add_argument("--smoke", action="store_true",
                        help="random micro model, 4 slices, 10/2/2 schedule (CI)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    device = resolve_device("cpu")
    if args.smoke:
        checkpoint = init_checkpoint("micro")
        schedule = dict(steps=10, jump_length=2, jump_n_sample=2)
    else:
        checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)
        schedule = {k: PRESETS["fast"][k] for k in ("steps", "jump_length", "jump_n_sample")}
    model = checkpoint.model.eval()
    ct = read_ct(args.case / "ct.nii.gz")
    liver = read_liver_mask(args.case / "seg.nii.gz", ct)
    default = DetectionParams.from_preset("fast", device="cpu")
    repaint = dataclasses.replace(default, sampler="repaint", **schedule)
    plan = plan_slices(ct, liver, checkpoint.grid, repaint)
    batch_size = default_batch_size("cpu", checkpoint.grid.size)
    batches = plan_batches(plan.paint_grid, batch_size)
    if args.smoke:
        batches = [batches[0][:4]]
    slices = sum(len(b) for b in batches)
    bf16 = bf16_active(None, device)
    image = checkpoint.intensity.normalize(torch.from_numpy(plan.ct_grid[:, None]))
    known = torch.from_numpy(1.0 - plan.paint_grid[:, None].astype(np.float32))

    rows = []

    def add(name: str, seconds: float, nfe: int, params: DetectionParams | None = None) -> None:
        rows.append({
            "method": name, "seconds": round(seconds, 2), "network_evaluations": nfe,
            "ms_per_slice_per_nfe": round(1000 * seconds / max(1, nfe * slices / len(batches)), 2),
            "schedule": None if params is None else
            f"{params.sampler} {params.steps}/{params.jump_length}/{params.jump_n_sample}",
        })  # fmt: skip

    for use_bf16 in (False, True) if bf16 else (False,):
        seconds, nfe = diffusers_repaint(model, image, known, repaint, batches, use_bf16, 0)
        add(f"diffusers RePaint, {'bf16 autocast' if use_bf16 else 'float32'}", seconds, nfe,
            repaint)  # fmt: skip
    ddnm = dataclasses.replace(default, sampler="ddnm", steps=50, jump_length=5, jump_n_sample=1)
    for name, params in (("gdpi, RePaint, same schedule", repaint),
                         ("gdpi, DDNM 50 steps", ddnm)):  # fmt: skip
        counted: list[int] = []
        start = time.perf_counter()
        inpaint_grid(plan.ct_grid, plan.paint_grid, checkpoint, params, device, batches,
                     plan.seeds, on_batch=lambda _n, _b, nfe, c=counted: c.append(nfe))  # fmt: skip
        add(name, time.perf_counter() - start, sum(counted), params)

    base = rows[0]["seconds"]
    print(f"# {args.case.name}: {slices} slices in {len(batches)} batches of up to "
          f"{batch_size}; {platform.machine()} CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, gdpi bf16 autocast: {bf16}")  # fmt: skip
    print("| method | schedule | network evaluations | seconds | ms / slice / NFE | "
          "speed-up over diffusers float32 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["speedup_vs_diffusers_fp32"] = round(base / r["seconds"], 2)
        print(f"| {r['method']} | {r['schedule']} | {r['network_evaluations']} | "
              f"{r['seconds']} | {r['ms_per_slice_per_nfe']} | {r['speedup_vs_diffusers_fp32']}x |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"case": args.case.name, "slices": slices, "rows": rows},
                                        indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
