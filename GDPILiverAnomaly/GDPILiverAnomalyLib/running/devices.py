"""Which torch devices exist, and which one a run uses: one rule for detection,
evaluation and training."""

from __future__ import annotations

import os

import torch

from ..errors import ParameterError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    ``local_rank`` (torchrun) picks the GPU that ``auto`` means in a multi-process run.
    Raises :class:`ParameterError` for an unknown device or a GPU that does not exist.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ParameterError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParameterError(
                f"device {name!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist"
            )
    elif device.type == "mps":
        if not _mps_available():
            raise ParameterError(f"device {name!r} requested but Apple MPS is not available")
    elif device.type != "cpu":
        raise ParameterError(f"unsupported device {name!r} (auto, cpu, cuda, cuda:N or mps)")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[dict]:
    """The devices this PyTorch can run on: ``{"id", "name"}`` each (``memory_gib`` for
    CUDA GPUs); ``id`` is what ``--device`` takes. The CPU is always first."""
    devices = [{"id": "cpu", "name": f"CPU ({os.cpu_count()} logical cores)"}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "id": f"cuda:{index}",
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    if _mps_available():
        devices.append({"id": "mps", "name": "Apple GPU (MPS)"})
    return devices
