"""Benchmark ``gdpi detect``: batching versus one slice at a time, per preset.

For each case it runs the real pipeline (read, AME, resampling, RePaint, scoring,
writing) with a short RePaint schedule (``--sample-nfe`` network evaluations per
batch), once at ``--batch-size`` and once at batch 1, and measures:

- ms per slice per network evaluation (inpainting time / NFE / slices in a batch),
- NFE per volume for each preset (batches x network evaluations per batch),
- seconds per volume for each preset: the measured fixed cost plus the preset's
  NFE times the measured time per batch evaluation (extrapolated; ``--full`` runs
  the presets for real instead).

Peak RAM is measured in a child ``gdpi detect`` process on the largest case.

    python bench/bench_detect.py                 # all ../shared/data cases, small model
    python bench/bench_detect.py --smoke         # one small case, tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from GDPILiverAnomalyLib.checkpoint import init_checkpoint, save_checkpoint
from GDPILiverAnomalyLib.parameters import PRESETS, DetectionParams
from GDPILiverAnomalyLib.runner import run_case

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {  # name: (CT, liver mask, liver label)
    "ts_small": ("ts_small/ct.nii.gz", "ts_small/totalseg.nii.gz", 5),
    "dcmqi_3slice": ("dcmqi_3slice/dicom", "dcmqi_3slice/liver_seg.nrrd", None),
    "hcc_0697": ("hcc_0697/ct.nii.gz", "hcc_0697/seg.nii.gz", None),
    "hcc_1720": ("hcc_1720/ct.nii.gz", "hcc_1720/seg.nii.gz", None),
    "ts_full": ("ts_full/ct.nii.gz", "ts_full/totalseg.nii.gz", 5),
    "hcc_1211": ("hcc_1211/ct.nii.gz", "hcc_1211/seg.nii.gz", None),
}


def measure(
    case: str,
    ckpt,
    batch_size: int,
    sample_nfe: int,
    device: str,
    out: Path,
    preset: str | None = None,
) -> dict:
    ct, liver, label = CASES[case]
    if preset is None:
        params = DetectionParams.from_preset(
            "fast",
            steps=sample_nfe,
            jump_length=1,
            jump_n_sample=1,
            batch_size=batch_size,
            device=device,
        )
    else:
        params = DetectionParams.from_preset(preset, batch_size=batch_size, device=device)
    info = run_case(SHARED / ct, SHARED / liver, ckpt, params, out, liver_label=label)
    stats, timings = info["stats"], info["timings_s"]
    per_batch_nfe = timings["inpaint"] / max(1, info["nfe"])
    slices = stats["slices_inpainted"]
    return {
        "slices_inpainted": slices,
        "batches": stats["batches"],
        "nfe": info["nfe"],
        "s_per_batch_nfe": per_batch_nfe,
        "ms_per_slice_nfe": 1000 * timings["inpaint"] / max(1, stats["slice_evaluations"]),
        "fixed_s": timings["wall"] - timings["inpaint"],
        "wall_s": timings["wall"],
    }


def peak_ram(case: str, ckpt_path: Path, batch_size: int, device: str) -> float:
    """Peak resident memory (GiB) of a child ``gdpi detect`` on ``case``."""
    ct, liver, label = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "GDPILiverAnomalyLib",
            "detect",
            "--ct",
            str(SHARED / ct),
            "--liver",
            str(SHARED / liver),
            "--checkpoint",
            str(ckpt_path),
            "--out",
            str(Path(tmp) / "o"),
            "--steps",
            "5",
            "--jump-length",
            "1",
            "--jump-n-sample",
            "1",
            "--batch-size",
            str(batch_size),
            "--device",
            device,
            "--progress",
            "none",
        ]
        if label is not None:
            cmd += ["--liver-label", str(label)]
        subprocess.run(cmd, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample-nfe", type=int, default=6, help="RePaint steps per measuring run")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--full", action="store_true", help="run every preset completely (slow on CPU)"
    )
    parser.add_argument("--smoke", action="store_true", help="ts_small, tiny model, 2 NFE (CI)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.cases, args.sample_nfe = "tiny", ["ts_small"], 2
    if not SHARED.exists():
        print(f"{SHARED} not found: the benchmark needs ../shared/data", file=sys.stderr)
        return 1

    torch.set_num_threads(os.cpu_count() or 1)
    ckpt = init_checkpoint(args.size, seed=0)
    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cpu = platform.processor() or platform.machine()
    print(
        f"# gdpi detect benchmark: {args.size} random model "
        f"({sum(p.numel() for p in ckpt.model.parameters()) / 1e6:.1f} M parameters, "
        f"{ckpt.grid.size} px grid), device {device}, {os.cpu_count()} CPU cores ({cpu}), "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path = save_checkpoint(ckpt, Path(tmp) / "model.safetensors")
        header = (
            "| case | liver slices inpainted | batch | ms/slice/NFE | "
            + " | ".join(f"{p} NFE/vol | {p} s/vol" for p in PRESETS)
            + " |"
        )
        print(header)
        print("|" + "---|" * (4 + 2 * len(PRESETS)))
        for case in args.cases:
            for batch in (args.batch_size, 1):
                m = measure(
                    case, ckpt, batch, args.sample_nfe, device, Path(tmp) / f"{case}-{batch}"
                )
                row = {"case": case, "batch_size": batch, **m, "presets": {}}
                for name in PRESETS:
                    p = DetectionParams.from_preset(name, batch_size=batch)
                    nfe = m["batches"] * p.nfe_per_batch()
                    if args.full:
                        full = measure(
                            case,
                            ckpt,
                            batch,
                            args.sample_nfe,
                            device,
                            Path(tmp) / f"{case}-{batch}-{name}",
                            preset=name,
                        )
                        seconds, how = full["wall_s"], "measured"
                    else:
                        seconds, how = m["fixed_s"] + nfe * m["s_per_batch_nfe"], "extrapolated"
                    row["presets"][name] = {
                        "nfe_per_volume": nfe,
                        "seconds_per_volume": seconds,
                        "how": how,
                    }
                rows.append(row)
                cells = " | ".join(
                    f"{row['presets'][p]['nfe_per_volume']} | "
                    f"{row['presets'][p]['seconds_per_volume']:.0f}"
                    for p in PRESETS
                )
                print(
                    f"| {case} | {m['slices_inpainted']} | {batch} | {m['ms_per_slice_nfe']:.1f} | "
                    f"{cells} |",
                    flush=True,
                )
        largest = max(args.cases, key=lambda c: list(CASES).index(c))
        ram = peak_ram(largest, ckpt_path, args.batch_size, device)
        print(
            f"\npeak RAM, {largest} at batch {args.batch_size}: {ram:.2f} GiB "
            f"(child gdpi detect process, max RSS)"
        )
        print(
            "seconds per volume are "
            + (
                "measured"
                if args.full
                else "extrapolated: measured fixed cost + preset NFE x measured time per batch NFE"
            )
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "peak_ram_gib": ram, "size": args.size, "device": device}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
