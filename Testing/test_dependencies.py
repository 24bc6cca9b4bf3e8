"""What Slicer installs on the first Detect, and what it tells the user when that fails."""

import importlib.metadata

from GDPILiverAnomalyLib.slicer_side import dependencies


def test_dependency_plan_never_touches_slicers_numpy_or_simpleitk():
    present = {"numpy", "SimpleITK", "tqdm"}
    missing = dependencies.missingModules(lambda name: object() if name in present else None)
    assert missing == ["torch", "scipy", "safetensors"]
    requirements = dependencies.pipRequirements(missing + ["numpy", "SimpleITK"])
    assert requirements == ["scipy>=1.10", "safetensors>=0.4"]
    assert not any(r.lower().startswith(("torch", "numpy", "simpleitk")) for r in requirements)
    versions = {"numpy": "1.26.4", "SimpleITK": "2.3.1"}
    assert dependencies.pinnedConstraints(versions.__getitem__) == (
        "numpy==1.26.4\nSimpleITK==2.3.1\n"
    )


def test_installed_versions_and_the_minimum_torch():
    known = {"torch": "2.0.1+cu118", "numpy": "1.26.4"}

    def version(name):
        if name not in known:
            raise importlib.metadata.PackageNotFoundError(name)
        return known[name]

    found = dependencies.installedVersions(version)
    assert found["torch"] == "2.0.1+cu118" and found["scipy"] is None
    assert set(found) == {"torch", "scipy", "safetensors", "tqdm", "numpy", "SimpleITK"}
    assert dependencies.MINIMUM_TORCH == "2.1"
    assert dependencies.torchTooOld("2.0.1+cu118")
    assert not dependencies.torchTooOld("2.1.0") and not dependencies.torchTooOld("2.13.0+cpu")
    assert not dependencies.torchTooOld(None)  # missing is handled as missing, not old
    assert dependencies.installedVersions()["numpy"]  # this environment has numpy


def test_install_failures_come_with_advice():
    advice = dependencies.installFailureAdvice
    assert "Extensions Manager" in advice(ModuleNotFoundError("No module named 'PyTorchUtils'"))
    assert "internet connection" in advice(OSError("Failed to establish a new connection"))
    assert "write" in advice(PermissionError("[Errno 13] Permission denied: '/opt/Slicer'"))
    assert "disk is full" in advice(OSError("[Errno 28] No space left on device"))
    assert "Restart Slicer" in advice(RuntimeError("pip exited with 1"))
