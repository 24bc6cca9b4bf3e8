"""ONNX Runtime for the network on a CPU: an optional extra, used when installed.

``pip install "gdpi-liver-anomaly[onnx]"`` adds onnxruntime and onnx (and onnxscript,
which ``torch.onnx.export`` needs once its TorchScript exporter is gone).
:func:`pipeline.inpaint_grid` then runs the network through ONNX Runtime when the device
is the CPU and bf16 autocast is off: the model is exported in memory once per process
(:func:`export_onnx`, a few seconds) with a dynamic batch axis, and run with as many
threads as PyTorch uses. Without the extra, or with
``GDPI_CPU_RUNTIME=torch``, PyTorch eager runs it as before. onnxruntime is imported only
by :func:`onnx_network`, never when this module is imported, so neither the Slicer panel
nor a run that does not use it loads it.

Figures and the choice: ``docs/performance.md#network-runtimes``.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import warnings
import weakref
from collections.abc import Callable

import torch

from ..errors import ParameterError

#: Environment variable choosing the CPU runtime: ``auto`` (default: ONNX Runtime where
#: installed), ``torch`` (PyTorch eager always) or ``onnxruntime`` (an error if missing).
RUNTIME_ENV = "GDPI_CPU_RUNTIME"
RUNTIMES = ("auto", "torch", "onnxruntime")
#: What the extra installs: the runtime, and the exporter's needs.
PACKAGES = ("onnxruntime", "onnx")

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def requested_runtime() -> str:
    """The runtime asked for by :data:`RUNTIME_ENV` (``auto`` when unset); a value that
    is none of :data:`RUNTIMES` raises :class:`ParameterError` naming the variable."""
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if value not in RUNTIMES:
        raise ParameterError(
            f"{RUNTIME_ENV}={value!r} is not a CPU runtime (choose from {', '.join(RUNTIMES)})"
        )
    return value


def onnx_installed() -> bool:
    """True when every package of the ``[onnx]`` extra can be imported (not imported here)."""
    return all(importlib.util.find_spec(name) is not None for name in PACKAGES)


def use_onnx(device: torch.device, bf16: bool) -> bool:
    """Whether the network runs on ONNX Runtime: CPU, float32 (bf16 autocast off), the
    extra installed and :data:`RUNTIME_ENV` not ``torch``. ``onnxruntime`` asked for but
    not installed raises :class:`ParameterError`."""
    if device.type != "cpu" or bf16:
        return False
    runtime = requested_runtime()
    if runtime == "torch":
        return False
    if not onnx_installed():
        if runtime == "onnxruntime":
            raise ParameterError(
                f"{RUNTIME_ENV}=onnxruntime but the [onnx] extra is not installed "
                f'(pip install "gdpi-liver-anomaly[onnx]")'
            )
        return False
    return True


def export_onnx(model: torch.nn.Module, image_size: int, channels: int = 1) -> bytes:
    """``model`` as an ONNX model (bytes) with a dynamic batch axis: inputs ``x``
    ``[N, C, n, n]`` float32 and ``t`` ``[N]`` int64, output ``out``. The TorchScript
    exporter where this torch still has it (seconds; deprecated since torch 2.9), else
    the dynamo exporter (tens of seconds on a 2-core CPU)."""
    x = torch.zeros(2, channels, image_size, image_size)
    t = torch.full((2,), 500, dtype=torch.long)
    names = {"input_names": ["x", "t"], "output_names": ["out"]}
    buffer = io.BytesIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporters' notes on torchvision and deprecation
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                axes = {name: {0: "batch"} for name in ("x", "t", "out")}
                torch.onnx.export(model, (x, t), buffer, dynamic_axes=axes, dynamo=False,
                                  opset_version=17, **names)  # fmt: skip
            except Exception:  # no TorchScript exporter in this torch: dynamo's
                buffer = io.BytesIO()
                batch = torch.export.Dim("batch", min=1, max=4096)
                program = torch.onnx.export(model, (x, t), dynamic_shapes=({0: batch}, {0: batch}),
                                            dynamo=True, verbose=False, **names)  # fmt: skip
                program.save(buffer)
    finally:
        quiet.setLevel(level)
    return buffer.getvalue()


def onnx_network(model: torch.nn.Module, image_size: int, channels: int = 1) -> tuple[Network, str]:
    """``model`` (eval mode, on the CPU) exported by :func:`export_onnx` and loaded in an
    ONNX Runtime session with PyTorch's thread count; returns the network (same call and
    output as the model: ``[N, C, n, n]`` model units and ``[N]`` timesteps in, float32
    out, any N) and a description for ``run.json``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(
        export_onnx(model, image_size, channels), options, providers=["CPUExecutionProvider"]
    )

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {"x": x.detach().float().contiguous().numpy(), "t": t.detach().long().numpy()}
        return torch.from_numpy(session.run(None, feeds)[0])

    return network, f"onnxruntime {ort.__version__}"


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_onnx_network(model: torch.nn.Module) -> Network:
    """:func:`onnx_network` of ``model`` at its own grid size, exported once per model
    object and thread count (a Ray worker or ``gdpi evaluate`` reuses it batch after batch)."""
    key = (torch.get_num_threads(), model.config.image_size, model.config.in_channels)
    known = _SESSIONS.get(model)
    if known is None or known[0] != key:
        known = (key, onnx_network(model, key[1], key[2])[0])
        _SESSIONS[model] = known
    return known[1]


def describe() -> str | None:
    """``onnxruntime X.Y.Z`` when installed (without importing it), else None."""
    if not onnx_installed():
        return None
    from importlib.metadata import version

    return f"onnxruntime {version('onnxruntime')}"
