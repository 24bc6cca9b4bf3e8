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
