"""The benchmark scripts run in their smoke modes and report what they measure."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, shared


def _smoke(script: str, out, timeout: int = 300) -> tuple[subprocess.CompletedProcess, object]:
    """Run ``bench/<script> --smoke --json out``; return the process and the JSON it wrote."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_bench_smoke(tmp_path):
    """bench/bench_detect.py runs gdpi detect as a child per case and preset and reports
    its time, network evaluations and peak memory."""
    shared("ts_small")
    proc, data = _smoke("bench_detect.py", tmp_path / "b.json")
    assert len([line for line in proc.stdout.splitlines() if line.startswith("| ts_small |")]) == 1
    assert "peak RAM of any gdpi detect run" in proc.stdout
    (row,) = data["rows"]
    assert row["nfe_per_slice"] == 3 and row["network_evaluations"] > 0
    assert 0.1 < row["rss_gib"] < 4 and row["total_s"] > row["inpaint_s"] > 0


def test_depth_bench_smoke(tmp_path):
    """bench/bench_depth.py times gdpi detect on a generated 1 mm-slice CT at depth
    spacing 0 and at the default: the default inpaints fewer grid images, interpolates
    the rest, and needs fewer network evaluations."""
    proc, data = _smoke("bench_depth.py", tmp_path / "depth.json")
    every, default = data["rows"]
    assert every["depth_spacing_mm"] == 0 and default["depth_spacing_mm"] > 0
    assert every["inpainted"] == every["images_with_candidates"] == 12
    assert every["interpolated"] == 0 and default["interpolated"] > 0
    assert default["inpainted"] + default["interpolated"] == 12
    assert default["network_evaluations"] < every["network_evaluations"]
    assert "speed-up end to end" in proc.stdout


def test_cpu_bench_smoke(tmp_path):
    """bench/bench_cpu.py (the table the CPU defaults were chosen from) runs and reports
    every row it was asked for."""
    proc, rows = _smoke("bench_cpu.py", tmp_path / "cpu.json")
    assert [(r["size"], r["batch"]) for r in rows] == [("micro", 1), ("micro", 2)]
    assert all(r["fp32_ms"] > 0 for r in rows)
    assert proc.stdout.count("| micro |") == 2


def test_gpu_bench_smoke(tmp_path):
    """bench/bench_gpu.py (the GPU timing table; here on the CPU) writes every row."""
    _, data = _smoke("bench_gpu.py", tmp_path / "g.json")
    rows = data["rows"]
    assert [(r["batch"], r["bf16"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    assert all(r["ms_per_slice_per_nfe"] > 0 for r in rows)


def test_diffusers_bench_smoke(tmp_path):
    """bench/bench_diffusers.py runs diffusers' RePaint loop and gdpi's inpainting on the
    same slices with the same schedule: the same number of network evaluations."""
    shared("hcc_1720")
    _, data = _smoke("bench_diffusers.py", tmp_path / "d.json", timeout=600)
    rows = {r["method"]: r for r in data["rows"]}
    same = rows["gdpi, RePaint, same schedule"]
    assert rows["diffusers RePaint, float32"]["network_evaluations"] == same["network_evaluations"]
    assert same["schedule"] == "repaint 10/2/2"
    assert all(r["seconds"] > 0 for r in rows.values())


def test_ray_bench_smoke(tmp_path):
    """bench/bench_ray.py runs the local and the Ray engine on the same folder and
    reports cases per hour, slices per second and batch fill for each."""
    pytest.importorskip("ray")
    shared("hcc_0697")
    proc, rows = _smoke("bench_ray.py", tmp_path / "r.json", timeout=600)
    local, ray = rows
    assert (local["engine"], ray["engine"]) == ("local", "ray")
    assert local["cases"] == ray["cases"] == 2 and local["slices"] == ray["slices"] > 0
    assert 0 < local["batch_fill"] <= ray["batch_fill"] <= 1  # packing fills batches
    assert all(r["cases_per_hour"] > 0 and r["slices_per_s"] > 0 for r in rows)
    assert proc.stdout.count("| cpu") == 2


def test_runtimes_bench_smoke(tmp_path):
    """bench/bench_runtimes.py (the network under each CPU runtime) measures PyTorch eager
    float32 and bf16 and reports each optional runtime it cannot load, with the reason."""
    proc, data = _smoke("bench_runtimes.py", tmp_path / "rt.json")
    rows = {r["runtime"]: r for r in data["rows"]}
    assert set(rows) == {"pytorch eager float32", "pytorch eager bf16 autocast", "openvino f32",
                         "openvino bf16 hint", "onnxruntime", "onnxruntime, TorchScript export",
                         "ipex float32"}  # fmt: skip
    fp32 = rows["pytorch eager float32"]
    assert fp32["max_abs_diff"] == 0 and fp32["speedup_vs_fp32_eager"] == 1
    for row in rows.values():
        assert row["available"] is ("ms_per_slice_per_nfe" in row)
        assert row["available"] or row["note"]  # missing: says why
        assert not row["available"] or row["max_abs_diff"] < 0.5  # model units
    assert proc.stdout.count("| micro |") == 7


def test_gpu_check_script_is_valid_bash():
    """The fast part of the GPU check's test; the smoke run itself takes minutes (below)."""
    for script in ("gpu_check.sh", "gpu_kit.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "bench" / script)], capture_output=True,
                              text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(
    not os.environ.get("GDPI_GPU_CHECK_SMOKE"),
    reason="2-4 minutes on a 2-core CPU: GDPI_GPU_CHECK_SMOKE=1 pytest -k gpu_check_script_smoke",
)
def test_gpu_check_script_smoke(tmp_path):
    """bench/gpu_check.sh, the one prepared GPU run, works end to end in its CPU smoke mode
    (every step; with bench/gpu_kit/, its install step too) and leaves every figure in OUT."""
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        env={**os.environ, "SMOKE": "1", "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 step(s) failed" in proc.stdout
    assert "passed" in (out / "cuda_tests.log").read_text()
    assert json.loads((out / "network.json").read_text())["rows"]
    compiled = json.loads((out / "compiled.json").read_text())["rows"]
    assert compiled and all(r["compiled"] for r in compiled)
    (default,) = json.loads((out / "presets_default.json").read_text())["rows"]
    fast, paper = json.loads((out / "presets_b64.json").read_text())["rows"]
    assert default["case"] == fast["case"] == "synthetic_100" and default["batch_size"] == 8
    assert (fast["preset"], paper["preset"], paper["batch_size"]) == ("fast", "paper", 4)
    summary = (out / "summary.md").read_text()
    assert "## network" in summary and "## presets_b64" in summary
    try:
        import ray  # noqa: F401  # the [ray] extra: the script then compares the engines
    except ImportError:
        return
    if (REPO.parent / "shared" / "data").exists():
        packing = json.loads((out / "packing.json").read_text())
        assert [r["engine"] for r in packing] == ["local", "ray"]
