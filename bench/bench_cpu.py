"""CPU speed of the network per model size, batch size and bf16 autocast.

Prints milliseconds per slice per network evaluation (NFE) for randomly initialised
models of each size at batch 1 to 8, in float32 and with bfloat16 autocast (where the
CPU runs bf16 natively: AVX-512 BF16 or AMX). The CPU defaults of ``gdpi detect``
(``parameters.default_batch_size``, bf16 on) were chosen from this table.

    .venv/bin/python bench/bench_cpu.py [--sizes tiny small] [--repeats 10] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GDPILiverAnomaly"))

from GDPILiverAnomalyLib.checkpoint import init_checkpoint  # noqa: E402
from GDPILiverAnomalyLib.pipeline import cpu_has_bf16  # noqa: E402


def measure(size: str, batch: int, bf16: bool, repeats: int) -> float:
    """Milliseconds per slice per network evaluation."""
    checkpoint = init_checkpoint(size)
    model, n = checkpoint.model.eval(), checkpoint.grid.size
    x, t = torch.randn(batch, 1, n, n), torch.full((batch,), 500)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x, t)  # warm-up (oneDNN picks its kernels)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, t)
    return 1000 * (time.perf_counter() - start) / repeats / batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="micro model, batch 1-2, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.batches, args.repeats = ["micro"], [1, 2], 1
    modes = [False, True] if cpu_has_bf16() else [False]
    print(f"# {platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, native bf16: {cpu_has_bf16()}")  # fmt: skip
    print("| model | grid px | batch | float32 ms/slice/NFE | bf16 ms/slice/NFE |")
    print("|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        grid = init_checkpoint(size).grid.size
        for batch in args.batches:
            times = {bf16: measure(size, batch, bf16, args.repeats) for bf16 in modes}
            rows.append({"size": size, "grid": grid, "batch": batch,
                         "fp32_ms": round(times[False], 2),
                         "bf16_ms": round(times[True], 2) if True in times else None})  # fmt: skip
            bf = f"{times[True]:.1f}" if True in times else "n/a"
            print(f"| {size} | {grid} | {batch} | {times[False]:.1f} | {bf} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
