"""Device names: what ``--device`` accepts and what ``gdpi devices`` lists."""

import json
import subprocess
import sys

import pytest
import torch
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.running.devices import available_devices, resolve_device


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    for bad, message in (("tpu", "unknown device"), ("cuda:x", "unknown device")):
        with pytest.raises(ParameterError, match=message):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="CUDA is not available"):
            resolve_device("cuda:0")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with pytest.raises(ParameterError, match="MPS is not available"):
            resolve_device("mps")


def test_gdpi_devices_lists_every_usable_device_as_json():
    proc = subprocess.run(
        [sys.executable, "-m", "GDPILiverAnomalyLib", "devices", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    event = json.loads(proc.stdout)
    assert event["event"] == "devices" and event["torch"] == torch.__version__
    assert event["devices"] == available_devices()
    assert event["devices"][0]["id"] == "cpu"
    ids = [d["id"] for d in event["devices"]]
    assert len(ids) == 1 + torch.cuda.device_count() + ("mps" in ids)
    for device_id in ids:
        resolve_device(device_id)  # every listed id is a valid --device
    text = subprocess.run(
        [sys.executable, "-m", "GDPILiverAnomalyLib", "devices"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert text.splitlines()[0].startswith("cpu")


# ---- Apple silicon: auto uses MPS only where the network computes like on the CPU ----


def _tiny_model():
    from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint

    return init_checkpoint("tiny", seed=0).model


def test_self_check_agrees_cpu_with_cpu_and_catches_a_perturbed_device():
    from GDPILiverAnomalyLib.running.devices import SELF_CHECK_TOLERANCE, device_self_check

    model = _tiny_model()
    agree, difference = device_self_check(model, torch.device("cpu"))
    assert agree and difference < 1e-5  # the real UNet, CPU against CPU

    def wrong_kernel(cpu_model, x, t):  # a device whose output is off by 1 % of its range
        out = cpu_model(x, t)
        return out + 0.01 * out.abs().max()

    agree, difference = device_self_check(model, torch.device("cpu"), run_on_device=wrong_kernel)
    assert not agree and difference > SELF_CHECK_TOLERANCE
    nan = device_self_check(model, torch.device("cpu"),
                            run_on_device=lambda m, x, t: m(x, t) * float("nan"))  # fmt: skip
    assert nan == (False, float("inf"))


def test_auto_uses_mps_only_when_the_self_check_passes():
    from GDPILiverAnomalyLib.running.devices import auto_device

    model = _tiny_model()
    passes = lambda m, d: (True, 2e-6)  # noqa: E731
    fails = lambda m, d: (False, 0.04)  # noqa: E731
    device, note = auto_device("auto", model, mps_available=lambda: True, check=passes)
    if not torch.cuda.is_available():
        assert device.type == "mps" and "passed the self-check" in note
        device, note = auto_device("auto", model, mps_available=lambda: True, check=fails)
        assert device.type == "cpu"
        assert "differently from the CPU" in note and "running on the CPU" in note

        def crashes(m, d):
            raise RuntimeError("MPS backend out of memory")

        device, note = auto_device("auto", model, mps_available=lambda: True, check=crashes)
        assert device.type == "cpu" and "could not run the network" in note
    # an explicit device is never second-guessed; without MPS auto is as before
    assert auto_device("cpu", model, mps_available=lambda: True, check=fails) == (
        torch.device("cpu"), None,
    )  # fmt: skip
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    device, note = auto_device("auto", model, mps_available=lambda: False, check=fails)
    assert device.type == expected and note is None
