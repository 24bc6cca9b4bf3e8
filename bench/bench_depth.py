"""Benchmark ``gdpi detect`` on a thin-slice CT: every slice (``--depth-spacing-mm 0``)
against the default depth spacing.

A generated CT (``files.synthetic``: 192 x 192 pixels of 2 mm, ``--slices`` slices of
``--slice-mm``; by default 200 slices of 1 mm, liver on every one: a 200 mm liver) is
detected by one ``gdpi detect`` child per setting with the bundled model and otherwise
default settings (the ``fast`` preset): wall seconds, inpainting seconds, grid images
inpainted, network evaluations and peak RSS (``bench_detect.run_detect``).

    python bench/bench_depth.py                 # 200 x 1 mm, spacing 0 and the default
    python bench/bench_depth.py --smoke         # 12 x 1 mm, 3-step schedule (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GDPILiverAnomaly"))

from bench_detect import run_detect  # noqa: E402
from GDPILiverAnomalyLib.files.synthetic import synthetic_case  # noqa: E402
from GDPILiverAnomalyLib.method.parameters import DetectionParams  # noqa: E402


def thin_case(folder: Path, slices: int, slice_mm: float) -> tuple[Path, Path]:
    """A generated CT (HU) and its liver mask with ``slices`` slices of ``slice_mm``."""
    case = synthetic_case(seed=0, n_slices=slices, slice_mm=slice_mm)
    paths = folder / "ct.nii.gz", folder / "liver.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    for array, path in ((case.ct, paths[0]), (case.liver, paths[1])):
        sitk.WriteImage(case.image(array), str(path))
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--slice-mm", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true", help="12 slices, 3-step schedule (CI)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    extra: list[str] = []
    if args.smoke:
        args.slices = 12
        extra = ["--steps", "3", "--jump-length", "1", "--jump-n-sample", "1"]
    default = DetectionParams.from_preset("fast").depth_spacing_mm
    settings = [("0", ["--depth-spacing-mm", "0"]), (f"{default:g} (default)", [])]
    print(f"# gdpi detect, bundled model, fast preset; generated CT {args.slices} x "
          f"{args.slice_mm:g} mm; {os.cpu_count()} CPU cores ({platform.machine()}), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(
        "| depth spacing (mm) | liver slices | grid images with candidates | inpainted | "
        "interpolated | network evaluations | inpainting s | total s | peak RAM GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ct, liver = thin_case(Path(tmp) / "case", args.slices, args.slice_mm)
        for name, options in settings:
            out = Path(tmp) / f"out-{len(rows)}"
            r = run_detect(ct, liver, None, out, [*options, *extra])
            s = r["stats"]
            depth = s["depth_sampling"]
            row = {"depth_spacing_mm": depth["spacing_mm"], "setting": name,
                   "liver_slices": s["slices_with_liver"],
                   "images_with_candidates": depth["images_with_candidates"],
                   "inpainted": s["slices_inpainted"], "by_rule": depth["inpainted_by_rule"],
                   "interpolated": depth["interpolated"], "network_evaluations": s["nfe"],
                   "inpaint_s": s["timings_s"]["inpaint"], "total_s": r["wall_s"],
                   "rss_gib": r["rss_gib"], "device": s["device"], "bf16": s["bf16"]}  # fmt: skip
            rows.append(row)
            print(f"| {name} | {row['liver_slices']} | {row['images_with_candidates']} | "
                  f"{row['inpainted']} | {row['interpolated']} | {row['network_evaluations']} | "
                  f"{row['inpaint_s']} | {row['total_s']} | {row['rss_gib']} |", flush=True)  # fmt: skip
    if len(rows) == 2 and rows[1]["total_s"]:
        print(f"\nspeed-up end to end: {rows[0]['total_s'] / rows[1]['total_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
