"""The network on this CPU under each runtime: PyTorch eager, OpenVINO, ONNX Runtime, IPEX.

One run, per model size at its CPU batch (``parameters.default_batch_size``), milliseconds
per slice per network evaluation (NFE) for:

- PyTorch eager, float32 (``gdpi detect``'s default on CPUs without native bf16), and
  eager under bfloat16 autocast (its default where the CPU has AVX-512 BF16 or AMX;
  oneDNN also runs bf16 on plain AVX-512 CPUs, emulated);
- OpenVINO: the PyTorch module converted directly (``openvino.convert_model``), compiled
  for the CPU with inference precision f32 and with the bf16 hint (the precision the
  plugin then actually uses is reported: it falls back to f32 without native bf16);
- ONNX Runtime: ``torch.onnx.export`` (dynamo exporter; and the TorchScript one, faster
  to export but deprecated) then an ``InferenceSession`` on the CPU provider;
- Intel's PyTorch extension (IPEX) when it imports for this torch (else the reason).

Timings are interleaved (every runtime once per round, ``--rounds`` rounds, median),
since other processes share the cores; every runtime gets ``--threads`` threads (default:
torch's). Max |output - float32 eager output| is in model units (the network predicts
unit-variance noise, plus the variance channel). ``tiny`` uses the bundled real-CT model;
other sizes random weights (with a random, not zero, last layer so outputs differ).

    python bench/bench_runtimes.py [--sizes tiny small] [--rounds 7] [--threads 1] [--json out.json]
    python bench/bench_runtimes.py --smoke        # micro model, 2 rounds (CI)

The optional runtimes come from their own packages (``pip install openvino onnxruntime
onnx onnxscript``); a runtime that is missing is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GDPILiverAnomaly"))

from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint, load_checkpoint  # noqa: E402
from GDPILiverAnomalyLib.method.parameters import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    default_batch_size,
)
from GDPILiverAnomalyLib.running.pipeline import cpu_can_bf16, cpu_has_bf16  # noqa: E402

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cpu_flags() -> str:
    """The CPU's bf16-relevant feature flags (Linux), e.g. ``avx512f avx512_bf16 amx_bf16``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    return " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)


def model_for(size: str) -> torch.nn.Module:
    if size == "tiny":
        return load_checkpoint(DEFAULT_CHECKPOINT).model.eval()
    model = init_checkpoint(size, seed=0).model.eval()
    torch.manual_seed(0)
    model.out[-1].reset_parameters()  # init_checkpoint zeroes it: outputs would all be 0
    return model


def eager(model: torch.nn.Module, bf16: bool) -> Network:
    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x, t).float()

    return run


def openvino_network(model, x, t, precision: str, threads: int) -> tuple[Network, str]:
    """The module converted by OpenVINO and compiled for the CPU with ``precision``
    (``f32`` or ``bf16``); returns the network and the precision the plugin uses."""
    import openvino as ov

    converted = ov.convert_model(model, example_input=(x, t))
    compiled = ov.Core().compile_model(
        converted,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request = compiled.create_infer_request()

    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.numpy(), 1: t.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    used = getattr(used, "get_type_name", lambda: str(used))()
    return run, f"openvino {ov.__version__.split('-')[0]}, precision used: {used}"


def export_onnx(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, dynamo: bool) -> bytes:
    """``model`` as ONNX bytes with a dynamic batch axis (inputs ``x``, ``t``; output
    ``out``): the TorchScript exporter (seconds; deprecated since torch 2.9) or dynamo's."""
    names = {"input_names": ["x", "t"], "output_names": ["out"]}
    buffer = io.BytesIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporters' notes on torchvision and deprecation
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if not dynamo:
                axes = {name: {0: "batch"} for name in ("x", "t", "out")}
                torch.onnx.export(model, (x, t), buffer, dynamic_axes=axes, dynamo=False,
                                  opset_version=17, **names)  # fmt: skip
            else:
                batch = torch.export.Dim("batch", min=1, max=4096)
                program = torch.onnx.export(model, (x, t), dynamic_shapes=({0: batch}, {0: batch}),
                                            dynamo=True, verbose=False, **names)  # fmt: skip
                program.save(buffer)
    finally:
        quiet.setLevel(level)
    return buffer.getvalue()


def onnxruntime_network(model, x, t, threads: int, dynamo: bool) -> tuple[Network, str]:
    """The module exported by :func:`export_onnx` in an ONNX Runtime CPU session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(
        export_onnx(model, x, t, dynamo), options, providers=["CPUExecutionProvider"]
    )

    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.numpy(), "t": t.numpy()})[0])

    exporter = "dynamo" if dynamo else "TorchScript"
    return run, f"onnxruntime {ort.__version__}, {exporter} export"


def ipex_network(model, bf16: bool) -> tuple[Network, str]:
    import intel_extension_for_pytorch as ipex  # noqa: F401  (refuses a mismatched torch)

    optimized = ipex.optimize(model, dtype=torch.bfloat16 if bf16 else torch.float32)
    return eager(optimized, bf16), f"ipex {ipex.__version__}"


def timed(network: Network, x, t, calls: int) -> float:
    """Seconds per call over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        network(x, t)
    return (time.perf_counter() - start) / calls


def bench_size(size: str, rounds: int, threads: int, target_s: float) -> list[dict]:
    model = model_for(size)
    n = model.config.image_size
    batch = default_batch_size("cpu", n)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, n, n, generator=gen)
    t = torch.linspace(10, 990, batch).long()  # a spread of noise levels
    candidates: list[tuple[str, Callable[[], tuple[Network, str]]]] = [
        ("pytorch eager float32", lambda: (eager(model, False), f"torch {torch.__version__}")),
        ("pytorch eager bf16 autocast",
         lambda: (eager(model, True), f"torch {torch.__version__}")),
        ("openvino f32", lambda: openvino_network(model, x, t, "f32", threads)),
        ("openvino bf16 hint", lambda: openvino_network(model, x, t, "bf16", threads)),
        ("onnxruntime", lambda: onnxruntime_network(model, x, t, threads, dynamo=True)),
        ("onnxruntime, TorchScript export",
         lambda: onnxruntime_network(model, x, t, threads, dynamo=False)),
        ("ipex float32", lambda: ipex_network(model, False)),
    ]  # fmt: skip
    networks, rows = {}, []
    for name, make in candidates:
        start = time.perf_counter()
        try:
            network, note = make()
            out = network(x, t)  # first call: conversion, kernel choice
        except Exception as error:  # a runtime missing or refusing: report and go on
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            rows.append({"size": size, "batch": batch, "runtime": name, "available": False,
                         "note": reason})  # fmt: skip
            print(f"  {name}: not available ({reason})", file=sys.stderr, flush=True)
            continue
        setup = time.perf_counter() - start
        networks[name] = network
        rows.append({"size": size, "batch": batch, "runtime": name, "available": True,
                     "note": note, "setup_s": round(setup, 2), "out": out, "times": []})  # fmt: skip
    reference = rows[0]["out"]
    first = timed(networks[rows[0]["runtime"]], x, t, 1)
    calls = max(1, round(target_s / max(first, 1e-4)))
    for _ in range(rounds):  # interleaved: A, B, C, ... A, B, C, ...
        for row in rows:
            if row["available"]:
                row["times"].append(timed(networks[row["runtime"]], x, t, calls))
    base = None
    for row in rows:
        if not row["available"]:
            continue
        times = row.pop("times")
        out = row.pop("out")
        median = statistics.median(times)
        row["ms_per_slice_per_nfe"] = round(1000 * median / batch, 2)
        row["ms_range"] = [round(1000 * min(times) / batch, 2), round(1000 * max(times) / batch, 2)]
        row["max_abs_diff"] = float((out - reference).abs().max())
        base = base or median
        row["speedup_vs_fp32_eager"] = round(base / median, 2)
    bf16_row = next(r for r in rows if r["runtime"] == "pytorch eager bf16 autocast")
    for row in rows:
        if row["available"]:
            row["speedup_vs_bf16_eager"] = round(
                bf16_row["ms_per_slice_per_nfe"] / row["ms_per_slice_per_nfe"], 2
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--target-s", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--smoke", action="store_true", help="micro model, 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.rounds, args.target_s = ["micro"], 2, 0.01
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()} CPU ({cpu_flags()}), {args.threads} threads, torch "
          f"{torch.__version__}, native bf16: {cpu_has_bf16()}, oneDNN bf16: "
          f"{cpu_can_bf16()}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| model | batch | runtime | ms/slice/NFE (median, range) | vs fp32 eager | "
          "vs bf16 eager | max abs diff | setup s | version |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        for row in bench_size(size, args.rounds, args.threads, args.target_s):
            rows.append(row)
            if not row["available"]:
                print(f"| {size} | {row['batch']} | {row['runtime']} | not available | | | "
                      f"| | {row['note']} |")  # fmt: skip
                continue
            lo, hi = row["ms_range"]
            print(f"| {size} | {row['batch']} | {row['runtime']} | "
                  f"{row['ms_per_slice_per_nfe']} ({lo}-{hi}) | "
                  f"{row['speedup_vs_fp32_eager']}x | {row['speedup_vs_bf16_eager']}x | "
                  f"{row['max_abs_diff']:.2g} | {row['setup_s']} | {row['note']} |",
                  flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"cpu_flags": cpu_flags(), "threads": args.threads,
                                         "torch": torch.__version__, "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
