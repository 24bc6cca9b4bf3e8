"""The optional ONNX Runtime extra (``[onnx]``, :mod:`running.cpu_runtime`): the engine
runs the network on it on a CPU when it is installed, and never imports it otherwise."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from GDPILiverAnomalyLib.running import cpu_runtime

ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'GDPILiverAnomaly'}{os.pathsep}{REPO / 'Training'}"}

# A real detection (random tiny model, generated CT, 2-step schedule) in a child process;
# prints what ran the network and whether onnxruntime was ever imported.
DETECT = r"""
import json, sys
if sys.argv[1] == "absent":
    sys.modules["onnxruntime"] = None  # as if the [onnx] extra were not installed
from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint
from GDPILiverAnomalyLib.files.synthetic import synthetic_case
from GDPILiverAnomalyLib.method.parameters import DetectionParams
from GDPILiverAnomalyLib.running.pipeline import detect
case = synthetic_case(seed=0, n_slices=3, size=96, pixel_mm=3.0)
params = DetectionParams.from_preset("fast", steps=2, jump_length=1, jump_n_sample=1,
                                     device="cpu", bf16=False)
result = detect(case.image(case.ct), case.liver, init_checkpoint("tiny"), params)
if len(sys.argv) > 2:
    import numpy as np
    np.save(sys.argv[2], result.score)
print(json.dumps({"runtime": result.stats["runtime"],
                  "imported": sys.modules.get("onnxruntime") is not None}))
"""


def _detect(mode: str, runtime: str | None, score=None) -> dict:
    env = {k: v for k, v in ENV.items() if k != cpu_runtime.RUNTIME_ENV}
    if runtime is not None:
        env[cpu_runtime.RUNTIME_ENV] = runtime
    args = [sys.executable, "-c", DETECT, mode] + ([str(score)] if score else [])
    proc = subprocess.run(args, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_the_extra_pytorch_runs_and_onnxruntime_is_never_imported():
    ran = _detect("absent", None)
    assert ran == {"runtime": f"pytorch {torch.__version__}", "imported": False}


def test_gdpi_cpu_runtime_torch_keeps_pytorch_and_imports_nothing():
    ran = _detect("installed-or-not", "torch")
    assert ran == {"runtime": f"pytorch {torch.__version__}", "imported": False}


def test_the_slicer_panel_and_the_engine_modules_do_not_import_onnxruntime():
    """Slicer's GUI process imports these; onnxruntime loads only inside a detection."""
    code = (
        "import sys\n"
        "import GDPILiverAnomalyLib.running.pipeline, GDPILiverAnomalyLib.running.cpu_runtime\n"
        "import GDPILiverAnomalyLib.running.cli, GDPILiverAnomalyLib.running.worker\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('slicer'):  # the slicer-core wheel ([test] extra)\n"
        "    import GDPILiverAnomalyLib.slicer_side.logic, GDPILiverAnomalyLib.slicer_side.job\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'onnx')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_wrong_runtime_name_or_a_missing_extra_is_a_one_line_error(tmp_path, monkeypatch):
    from GDPILiverAnomalyLib.errors import ParameterError

    monkeypatch.setenv(cpu_runtime.RUNTIME_ENV, "tensorrt")
    with pytest.raises(ParameterError, match="GDPI_CPU_RUNTIME='tensorrt' is not a CPU runtime"):
        cpu_runtime.use_onnx(torch.device("cpu"), bf16=False)
    monkeypatch.setenv(cpu_runtime.RUNTIME_ENV, "onnxruntime")
    monkeypatch.setattr(cpu_runtime, "onnx_installed", lambda: False)
    with pytest.raises(ParameterError, match=r"\[onnx\] extra is not installed"):
        cpu_runtime.use_onnx(torch.device("cpu"), bf16=False)
    # never on a GPU, nor under bf16 autocast (ONNX Runtime runs the float32 network)
    assert not cpu_runtime.use_onnx(torch.device("cuda"), bf16=False)
    assert not cpu_runtime.use_onnx(torch.device("cpu"), bf16=True)


needs_onnx = pytest.mark.skipif(
    not cpu_runtime.onnx_installed(),
    reason='the [onnx] extra is not installed (pip install ".[onnx]")',
)


@needs_onnx
def test_onnxruntime_gives_pytorchs_output_at_any_batch_size():
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.method.parameters import DEFAULT_CHECKPOINT

    model = load_checkpoint(DEFAULT_CHECKPOINT).model.eval()  # the bundled real-CT model
    network, description = cpu_runtime.onnx_network(model, model.config.image_size)
    assert description.startswith("onnxruntime ")
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 1, 64, 64, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        with torch.no_grad():
            expected = model(x, t)
        got = network(x, t)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert float((got - expected).abs().max()) < 1e-4  # model units


@needs_onnx
def test_with_the_extra_the_engine_runs_onnxruntime_with_pytorchs_scores(tmp_path):
    import numpy as np

    ran = _detect("installed", None, tmp_path / "onnx.npy")
    assert ran["runtime"].startswith("onnxruntime ") and ran["imported"]
    assert _detect("installed", "torch", tmp_path / "torch.npy")["runtime"].startswith("pytorch")
    onnx, eager = np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "torch.npy")
    assert np.count_nonzero(eager) > 0
    assert float(np.abs(onnx - eager).max()) < 0.5  # HU
