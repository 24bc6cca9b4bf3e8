"""Which torch device a run uses: one rule for detection, evaluation and training."""

from __future__ import annotations

import torch

from .errors import ParameterError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

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
    elif device.type != "cpu":
        raise ParameterError(f"unsupported device {name!r} (auto, cpu, cuda or cuda:N)")
    return device
