"""GPU speed of the network per model size, batch size, precision and compilation.

Prints (and with ``--json`` writes) milliseconds per slice per network evaluation for
randomly initialised models of each size at each batch size, in float32 and with
bfloat16 autocast, eagerly, after ``torch.compile`` and after
``torch.compile(mode="reduce-overhead")`` (CUDA graphs; compile time printed beside),
and the peak GPU memory of each setting. Runs on a CPU in ``--smoke`` mode.

    python bench/bench_gpu.py [--sizes tiny medium small] [--batches 1 8 32 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GDPILiverAnomaly"))

from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    size: str,
    batch: int,
    bf16: bool,
    compiled: str | None,
    repeats: int,
    device,
    backend: str = "inductor",
) -> dict:
    """ms per slice per network evaluation, compile seconds and peak memory (MiB)."""
    model = init_checkpoint(size).model.eval().to(device)
    n = init_checkpoint(size).grid.size
    if compiled:  # "default", or "reduce-overhead" = CUDA graphs
        torch._dynamo.reset()  # each setting compiles afresh (its warm-up counts it)
        model = torch.compile(model, mode=compiled, backend=backend)
    x = torch.randn(batch, 1, n, n, device=device)
    t = torch.full((batch,), 500, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), ctx:
        start = time.perf_counter()
        for _ in range(2):  # warm-up (and compilation)
            model(x, t)
        _sync(device)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, t)
        _sync(device)
    ms = 1000 * (time.perf_counter() - start) / repeats / batch
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"size": size, "grid_px": n, "batch": batch, "bf16": bf16, "compiled": compiled,
            "ms_per_slice_per_nfe": round(ms, 4), "warmup_s": round(warm, 2),
            "peak_mib": None if peak is None else round(peak, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", help="default tiny medium small (--smoke: micro)")
    parser.add_argument("--batches", nargs="+", type=int,
                        help="default 1 8 32 64 (--smoke: 1 2)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile-sizes", nargs="*",
                        help="sizes also measured with torch.compile (default tiny; --smoke: "
                             "none)")  # fmt: skip
    parser.add_argument("--compile-batches", nargs="*", type=int, default=[8, 64],
                        help="batch sizes also measured compiled")  # fmt: skip
    parser.add_argument("--compiled-only", action="store_true",
                        help="only the compiled settings (the eager ones measured elsewhere)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, micro model, 1 repeat; compilation with the eager backend")  # fmt: skip
    parser.add_argument("--json", type=Path, help="the rows as JSON, rewritten after each row")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    smoke = args.smoke
    args.sizes = args.sizes or (["micro"] if smoke else ["tiny", "medium", "small"])
    args.batches = args.batches or ([1, 2] if smoke else [1, 8, 32, 64])
    if args.compile_sizes is None:
        args.compile_sizes = [] if smoke else ["tiny"]
    if smoke:
        args.repeats = 1
    backend = "eager" if smoke else "inductor"  # eager: the compile path without codegen
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}")
    print("| model | grid px | batch | bf16 | compiled | ms/slice/NFE | warm-up s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            for bf16 in (False, True):
                modes = (
                    [None, "default", "reduce-overhead"]
                    if device.type == "cuda"
                    else [None, "default"]
                )
                compile_here = size in args.compile_sizes and batch in args.compile_batches
                settings = modes if compile_here else [None]
                if args.compiled_only:
                    settings = [m for m in settings if m is not None]
                for compiled in settings:
                    r = measure(size, batch, bf16, compiled, args.repeats, device, backend)
                    rows.append(r)
                    if args.json:  # so far: a run cut short still leaves its rows
                        write_json(args.json, name, rows)
                    print(f"| {size} | {r['grid_px']} | {batch} | {bf16} | {compiled} | "
                          f"{r['ms_per_slice_per_nfe']} | {r['warmup_s']} | {r['peak_mib']} |",
                          flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, name, rows)
    return 0


def write_json(path: Path, device_name: str, rows: list[dict]) -> None:
    path.write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
