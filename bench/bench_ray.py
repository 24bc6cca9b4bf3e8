"""Folder mode, local engine against the Ray engine: cases per hour, slices per second,
mean batch fill.

Both engines run ``gdpi detect`` on the same folder of cases (the shared CTs whose liver
mask is ``seg.nii.gz``, each ``--copies`` times, as case subfolders of symbolic links)
as a user runs it, in a child process: wall seconds include start-up (Ray's own start
and its model workers' loading for ``ray``). Slices per second counts the slices
inpainted (``run.json`` ``slices_inpainted``) over the wall time; batch fill is slices /
(batches x batch size): per case for ``local``, across cases for ``ray``.

    python bench/bench_ray.py                              # fast preset, bundled model
    python bench/bench_ray.py --copies 3 --ray-args "--workers 2 --cpus-per-worker 4"
    python bench/bench_ray.py --device cuda --ray-args "--gpus-per-worker 1"   # GPU machine
    python bench/bench_ray.py --smoke --json out.json      # CI: tiny model, 2-step schedule
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = ("hcc_0697", "hcc_1720", "hcc_1211", "chaos_ct3")


def make_folder(root: Path, cases: list[str], copies: int) -> Path:
    folder = root / "cases"
    for name in cases:
        for copy in range(copies):
            case = folder / (name if copies == 1 else f"{name}_{copy}")
            case.mkdir(parents=True)
            for file in ("ct.nii.gz", "seg.nii.gz"):
                (case / file).symlink_to(SHARED / name / file)
    return folder


def run(engine: str, folder: Path, out: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "GDPILiverAnomalyLib", "detect", "--ct", str(folder),
           "--liver", str(folder), "--out", str(out), "--progress", "json", "--engine", engine,
           *args]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    done = json.loads(proc.stdout.splitlines()[-1])
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]
    slices = sum(r["stats"]["slices_inpainted"] for r in runs)
    if engine == "ray":
        fill, batches, workers = done["batch_fill"], done["batches"], done["workers"]
    else:
        batches = sum(r["stats"]["batches"] for r in runs)
        capacity = sum(r["stats"]["batches"] * r["stats"]["batch_size"] for r in runs)
        fill, workers = (slices / capacity if capacity else 0.0), 1
    return {
        "engine": engine,
        "cases": len(runs),
        "wall_s": round(wall, 2),
        "cases_per_hour": round(3600 * len(runs) / wall, 1),
        "slices": slices,
        "slices_per_s": round(slices / wall, 3),
        "batches": batches,
        "batch_fill": round(fill, 4),
        "workers": workers,
        "device": runs[0]["device"] if runs else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="shared cases (comma list)")
    parser.add_argument("--copies", type=int, default=1, help="each case this many times")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--detect-args", default="", help="more gdpi detect options, both engines")
    parser.add_argument("--ray-args", default="", help="options of --engine ray only")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, 2 cases")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_ray-") as tmp:
        root = Path(tmp)
        cases = args.cases.split(",")
        common = ["--preset", args.preset, "--device", args.device, *shlex.split(args.detect_args)]
        if args.smoke:
            cases = ["hcc_0697", "hcc_1720"]
            subprocess.run([sys.executable, "-m", "GDPILiverAnomalyLib", "init-model", "--out",
                            str(root / "tiny.safetensors")], check=True, capture_output=True)  # fmt: skip
            common += ["--checkpoint", str(root / "tiny.safetensors"), "--steps", "2",
                       "--jump-length", "1", "--jump-n-sample", "1"]  # fmt: skip
        folder = make_folder(root, cases, args.copies)
        rows = []
        for engine in args.engines.split(","):
            extra = shlex.split(args.ray_args) if engine == "ray" else []
            rows.append(run(engine, folder, root / f"out_{engine}", common + extra))
    print(f"{len(cases) * args.copies} cases ({', '.join(cases)} x {args.copies}), preset "
          f"{args.preset}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    header = ["engine", "cases", "wall_s", "cases_per_hour", "slices", "slices_per_s",
              "batches", "batch_fill", "workers", "device"]  # fmt: skip
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
