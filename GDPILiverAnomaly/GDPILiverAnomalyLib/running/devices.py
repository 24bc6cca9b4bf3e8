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


#: The MPS self-check's tolerance: the largest difference between the network's outputs
#: on the GPU and on the CPU, relative to the largest CPU output (float32 on both; a
#: working device differs by about 1e-6 to 1e-5, a broken kernel by far more).
SELF_CHECK_TOLERANCE = 1e-3
#: Images in the self-check's batch (a few noise levels, the model's own grid size).
SELF_CHECK_BATCH = 4


def outputs_agree(
    reference: torch.Tensor, candidate: torch.Tensor, tolerance: float = SELF_CHECK_TOLERANCE
) -> tuple[bool, float]:
    """Whether ``candidate`` (a device's network output) matches ``reference`` (the
    CPU's): same shape, finite, largest absolute difference at most ``tolerance`` times
    the largest absolute reference value. Returns ``(agree, relative difference)``."""
    reference = reference.detach().float().cpu()
    candidate = candidate.detach().float().cpu()
    if reference.shape != candidate.shape or not bool(torch.isfinite(candidate).all()):
        return False, float("inf")
    scale = float(reference.abs().max().clamp_min(1e-6))
    difference = float((candidate - reference).abs().max()) / scale
    return difference <= tolerance, difference


def self_check_inputs(model: torch.nn.Module, batch: int = SELF_CHECK_BATCH, seed: int = 0):
    """A small batch for the device self-check: unit noise images on the model's grid
    and timesteps spread over 0..999 (CPU tensors, reproducible)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    size = config.image_size
    x = torch.randn(batch, config.in_channels, size, size, generator=generator)
    t = torch.linspace(0, 999, batch).round().long()
    return x, t


def device_self_check(
    model: torch.nn.Module,
    device: torch.device,
    tolerance: float = SELF_CHECK_TOLERANCE,
    run_on_device=None,
) -> tuple[bool, float]:
    """Run the real network on a small batch (:func:`self_check_inputs`) on the CPU and
    on ``device`` and compare (:func:`outputs_agree`). ``run_on_device(model, x, t)``
    replaces the device run (tests); the model is left on the CPU."""
    import copy

    x, t = self_check_inputs(model)
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    with torch.no_grad():
        reference = cpu_model(x, t)
        if run_on_device is None:
            device_model = copy.deepcopy(cpu_model).to(device)
            candidate = device_model(x.to(device), t.to(device)).cpu()
        else:
            candidate = run_on_device(cpu_model, x, t)
    return outputs_agree(reference, candidate, tolerance)


def auto_device(
    name: str,
    model: torch.nn.Module,
    mps_available=_mps_available,
    check=device_self_check,
) -> tuple[torch.device, str | None]:
    """The device ``name`` runs on, for this model: as :func:`resolve_device`, except
    that ``auto`` on a Mac without CUDA uses the Apple GPU (MPS) only when
    :func:`device_self_check` finds it computes the network like the CPU. Returns the
    device and a sentence for the log when ``auto`` had to decide about MPS (None
    otherwise)."""
    device = resolve_device(name)
    if name != "auto" or device.type != "cpu" or not mps_available():
        return device, None
    mps = torch.device("mps")
    try:
        agree, difference = check(model, mps)
    except Exception as exc:  # noqa: BLE001 - a failing GPU run is a failed check
        return device, (
            f"Device auto: the Apple GPU (MPS) could not run the network ({exc}); "
            "running on the CPU."
        )
    if agree:
        return mps, (
            f"Device auto: the Apple GPU (MPS) passed the self-check (largest difference "
            f"from the CPU {difference:.1e} of the output range); running on MPS."
        )
    return device, (
        f"Device auto: the Apple GPU (MPS) computes the network differently from the CPU "
        f"(largest difference {difference:.1e} of the output range, more than "
        f"{SELF_CHECK_TOLERANCE:g}): running on the CPU. Choose device mps to use it anyway."
    )
