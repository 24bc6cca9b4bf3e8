"""Benchmark ``gdpi detect`` end to end, per case and preset, as a user runs it.

Each row is one ``gdpi detect`` child process with the bundled model and the CPU/GPU
defaults (read, AME, inpainting, scoring, writing): wall seconds, the inpainting
seconds and network evaluations from its ``run.json``, and its peak resident memory
(``wait4`` of that child). Cases: every case of ``../shared/data`` and a generated
synthetic CT with liver on 100 slices (``synthetic_100``). The ``paper`` preset is
extrapolated from the same run's time per network evaluation unless ``--full``
(2410 NFE per batch: hours per CT on a CPU).

    python bench/bench_detect.py                     # every case, presets fast (+ paper extrapolated)
    python bench/bench_detect.py --cases hcc_1211 --full
    python bench/bench_detect.py --smoke             # ts_small, 3-step schedule (CI)
    python bench/bench_detect.py --cases synthetic_100 --presets fast paper --detect-args "--batch-size 64"
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

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GDPILiverAnomaly"))

from GDPILiverAnomalyLib.files.synthetic import synthetic_case  # noqa: E402
from GDPILiverAnomalyLib.method.parameters import PRESETS, DetectionParams  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {  # name: (CT, liver mask, liver label)
    "ts_small": ("ts_small/ct.nii.gz", "ts_small/totalseg.nii.gz", 5),
    "dcmqi_3slice": ("dcmqi_3slice/dicom", "dcmqi_3slice/liver_seg.nrrd", None),
    "hcc_0697": ("hcc_0697/ct.nii.gz", "hcc_0697/seg.nii.gz", None),
    "hcc_1720": ("hcc_1720/ct.nii.gz", "hcc_1720/seg.nii.gz", None),
    "ts_full": ("ts_full/ct.nii.gz", "ts_full/totalseg.nii.gz", 5),
    "hcc_1211": ("hcc_1211/ct.nii.gz", "hcc_1211/seg.nii.gz", None),
    "chaos_ct3": ("chaos_ct3/ct.nii.gz", "chaos_ct3/seg.nii.gz", None),
    "synthetic_100": None,  # generated: liver on 100 slices
}


def synthetic_100(folder: Path, n_slices: int = 100) -> tuple[Path, Path, None]:
    """A generated CT (192 x 192 x 100, 2 mm pixels, 2 mm slices) with liver on every
    slice (``n_slices`` other than 100: a smaller one, for smoke runs)."""
    case = synthetic_case(seed=0, n_slices=n_slices, slice_mm=2.0)
    paths = folder / "ct.nii.gz", folder / "liver.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    for array, path in ((case.ct, paths[0]), (case.liver, paths[1])):
        sitk.WriteImage(case.image(array), str(path))
    return paths[0], paths[1], None


def run_detect(ct: Path, liver: Path, label, out: Path, options: list[str]) -> dict:
    """One ``gdpi detect`` child: its run.json stats, wall seconds and peak RSS (GiB)."""
    cmd = [sys.executable, "-m", "GDPILiverAnomalyLib", "detect", "--ct", str(ct), "--liver",
           str(liver), "--out", str(out), "--progress", "none", *options]  # fmt: skip
    if label is not None:
        cmd += ["--liver-label", str(label)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"gdpi detect failed: {child.stderr.read().decode()[-2000:]}")
    child.stderr.close()
    run = json.loads((out / "run.json").read_text())
    return {"wall_s": round(wall, 2), "rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "stats": run["stats"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=list(CASES),
                        help="default: every case (--smoke: ts_small)")  # fmt: skip
    parser.add_argument("--presets", nargs="*", choices=list(PRESETS),
                        help="presets run for real (default: all but paper; --smoke: fast)")  # fmt: skip
    parser.add_argument("--full", action="store_true", help="also run the paper preset for real")
    parser.add_argument("--smoke", action="store_true", help="ts_small, 3-step schedule (CI)")
    parser.add_argument("--detect-args", default="", help="more gdpi detect options, every run")
    parser.add_argument("--synthetic-slices", type=int, default=100,
                        help="slices of the generated case (smoke runs: fewer)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    extra: list[str] = shlex.split(args.detect_args)
    if args.cases is None:
        args.cases = ["ts_small"] if args.smoke else list(CASES)
    if args.presets is None:
        args.presets = ["fast"] if args.smoke else [p for p in PRESETS if p != "paper"]
    if args.smoke:
        extra += ["--steps", "3", "--jump-length", "1", "--jump-n-sample", "1"]
    if args.full and "paper" not in args.presets:
        args.presets.append("paper")
    print(f"# gdpi detect, bundled model, defaults; {os.cpu_count()} CPU cores "
          f"({platform.machine()}), {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| case | liver slices | inpainted | preset | NFE per slice | network evaluations | "
          "inpainting s | total s | peak RAM GiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            if CASES[case] is None:
                ct, liver, label = synthetic_100(Path(tmp) / case, args.synthetic_slices)
            else:
                if not SHARED.exists():
                    print(f"{SHARED} not found: skipping {case}", file=sys.stderr)
                    continue
                ct, liver, label = (SHARED / CASES[case][0], SHARED / CASES[case][1],
                                    CASES[case][2])  # fmt: skip
            for preset in args.presets:
                out = Path(tmp) / f"{case}-{preset}"
                r = run_detect(ct, liver, label, out, ["--preset", preset, *extra])
                s = r["stats"]
                row = {"case": case, "preset": preset, "liver_slices": s["slices_with_liver"],
                       "inpainted": s["slices_inpainted"], "nfe_per_slice": s["nfe_per_batch"],
                       "network_evaluations": s["nfe"], "inpaint_s": s["timings_s"]["inpaint"],
                       "total_s": r["wall_s"], "rss_gib": r["rss_gib"], "how": "measured",
                       "batch_size": s["batch_size"], "bf16": s["bf16"], "device": s["device"]}  # fmt: skip
                rows.append(row)
                if args.json:  # so far: a run cut short still leaves its rows
                    args.json.write_text(json.dumps({"rows": rows}, indent=2))
                if preset == args.presets[0] and "paper" not in args.presets and not args.smoke:
                    paper = DetectionParams.from_preset("paper").nfe_per_batch()
                    per_nfe = row["inpaint_s"] / max(1, row["network_evaluations"])
                    nfe = s["batches"] * paper
                    rows.append({**row, "preset": "paper", "nfe_per_slice": paper,
                                 "network_evaluations": nfe,
                                 "inpaint_s": round(per_nfe * nfe, 1),
                                 "total_s": round(row["total_s"] - row["inpaint_s"] + per_nfe * nfe, 1),
                                 "rss_gib": None, "how": "extrapolated"})  # fmt: skip
        for row in rows:
            rss = "-" if row["rss_gib"] is None else row["rss_gib"]
            how = "" if row["how"] == "measured" else " (extrapolated)"
            print(f"| {row['case']} | {row['liver_slices']} | {row['inpainted']} | "
                  f"{row['preset']}{how} | {row['nfe_per_slice']} | {row['network_evaluations']} | "
                  f"{row['inpaint_s']} | {row['total_s']} | {rss} |")  # fmt: skip
    peak = max((r["rss_gib"] for r in rows if r["rss_gib"] is not None), default=None)
    print(f"\npeak RAM of any gdpi detect run: {peak} GiB")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
