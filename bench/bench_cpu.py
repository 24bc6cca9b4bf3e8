"""CPU speed of the network per model size, batch size and bf16 autocast.

Prints milliseconds per slice per network evaluation (NFE) for randomly initialised
models of each size at batch 1 to 8, in float32 and with bfloat16 autocast (where oneDNN
runs bf16: natively with AVX-512 BF16 or AMX, emulated on plain AVX-512). The CPU defaults of ``gdpi detect``
(``parameters.default_batch_size``, bf16 on) were chosen from this table.

    .venv/bin/python bench/bench_cpu.py [--sizes tiny small] [--repeats 10] [--smoke]

``--options`` adds a second table at each size's default CPU batch with bf16: threads
(1 vs all), channels-last memory format and ``torch.compile`` (with its compile time).
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

from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint  # noqa: E402
from GDPILiverAnomalyLib.method.parameters import default_batch_size  # noqa: E402
from GDPILiverAnomalyLib.running.pipeline import cpu_can_bf16, cpu_has_bf16  # noqa: E402


def measure(
    size: str,
    batch: int,
    bf16: bool,
    repeats: int,
    channels_last: bool = False,
    compile: bool = False,
) -> tuple[float, float]:
    """(milliseconds per slice per network evaluation, seconds of warm-up/compilation)."""
    checkpoint = init_checkpoint(size)
    model, n = checkpoint.model.eval(), checkpoint.grid.size
    x, t = torch.randn(batch, 1, n, n), torch.full((batch,), 500)
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    if compile:
        model = torch.compile(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        warm = time.perf_counter()
        model(x, t)  # warm-up (oneDNN picks its kernels; compilation)
        warm = time.perf_counter() - warm
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, t)
    return 1000 * (time.perf_counter() - start) / repeats / batch, warm


def options_table(sizes: list[str], repeats: int, bf16: bool) -> list[dict]:
    """Threads, channels-last and torch.compile at each size's default CPU batch."""
    threads = torch.get_num_threads()
    print("\n| model | batch | variant | ms/slice/NFE | warm-up s |")
    print("|---|---|---|---|---|")
    rows = []
    for size in sizes:
        batch = default_batch_size("cpu", init_checkpoint(size).grid.size)
        variants = [("default", {}), ("channels-last", {"channels_last": True}),
                    ("torch.compile", {"compile": True})]  # fmt: skip
        for name, options in variants:
            ms, warm = measure(size, batch, bf16, repeats, **options)
            rows.append({"size": size, "batch": batch, "variant": name, "ms": round(ms, 2),
                         "warm_s": round(warm, 2)})  # fmt: skip
            print(f"| {size} | {batch} | {name} | {ms:.1f} | {warm:.1f} |", flush=True)
        if threads > 1:
            torch.set_num_threads(1)
            ms, warm = measure(size, batch, bf16, repeats)
            torch.set_num_threads(threads)
            rows.append({"size": size, "batch": batch, "variant": "1 thread", "ms": round(ms, 2),
                         "warm_s": round(warm, 2)})  # fmt: skip
            print(f"| {size} | {batch} | 1 thread (of {threads}) | {ms:.1f} | {warm:.1f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="micro model, batch 1-2, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--options", action="store_true",
                        help="also: threads, channels-last, torch.compile")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.batches, args.repeats = ["micro"], [1, 2], 1
    modes = [False, True] if cpu_can_bf16() else [False]  # emulated bf16 too: measured
    print(f"# {platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, native bf16: {cpu_has_bf16()}, oneDNN bf16: {cpu_can_bf16()}")  # fmt: skip
    print("| model | grid px | batch | float32 ms/slice/NFE | bf16 ms/slice/NFE |")
    print("|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        grid = init_checkpoint(size).grid.size
        for batch in args.batches:
            times = {bf16: measure(size, batch, bf16, args.repeats)[0] for bf16 in modes}
            rows.append({"size": size, "grid": grid, "batch": batch,
                         "fp32_ms": round(times[False], 2),
                         "bf16_ms": round(times[True], 2) if True in times else None})  # fmt: skip
            bf = f"{times[True]:.1f}" if True in times else "n/a"
            print(f"| {size} | {grid} | {batch} | {times[False]:.1f} | {bf} |", flush=True)
    if args.options:
        rows += options_table(args.sizes, args.repeats, cpu_has_bf16())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
