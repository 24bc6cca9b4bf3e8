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


# ---- never blocking without feedback: slicer.packaging where Slicer has it ----------
# slicer.packaging exists from Slicer 5.11 on and needs a running Slicer (Qt dialogs):
# these stand-ins record what the module asks of it; the decision logic is real.


class _Packaging:
    def __init__(self):
        self.calls = []

    def pip_ensure(self, requirements, **options):
        self.calls.append((requirements, options))


def test_pip_ensure_is_used_where_slicer_has_it():
    packaging, installs, messages = _Packaging(), [], []
    how = dependencies.installPipRequirements(
        ["scipy>=1.10", "tqdm>=4.60"], "/tmp/c.txt", installs.append, packaging, messages.append
    )
    assert how == "pip_ensure" and not installs and not messages
    requirements, options = packaging.calls[0]
    assert requirements == ["scipy>=1.10", "tqdm>=4.60"]
    assert options["constraints"] == "/tmp/c.txt"  # Slicer's numpy, SimpleITK pinned
    assert options["prompt_install"] is False  # the module asked already (torch too)
    assert options["prompt_restart"] is True and options["show_progress"] is True
    # Slicer 5.6-5.10: pip_install, after a message saying that Slicer waits
    how = dependencies.installPipRequirements(
        ["scipy>=1.10"], "/tmp/c.txt", installs.append, None, messages.append
    )
    assert how == "pip_install" and installs == [["-c", "/tmp/c.txt", "scipy>=1.10"]]
    assert "Installing scipy" in messages[0] and "does not respond" in messages[0]
    assert dependencies.installPipRequirements([], "/tmp/c.txt", installs.append) == "nothing"


def test_slicer_packaging_is_found_only_with_pip_ensure():
    import types

    def missing(name):
        raise ModuleNotFoundError(name)

    assert dependencies.slicerPackaging(missing) is None  # Slicer 5.6-5.10
    old = types.SimpleNamespace(pip_install=print)  # a module without pip_ensure
    assert dependencies.slicerPackaging(lambda name: old) is None
    new = _Packaging()
    assert dependencies.slicerPackaging(lambda name: new) is new
    real = dependencies.slicerPackaging()  # here: the slicer-core wheel or no slicer
    assert real is None or callable(real.pip_ensure)


def test_a_failed_torch_install_names_the_usual_cause():
    advice = dependencies.installFailureAdvice
    loaded = advice(RuntimeError("pip exited with 1"), torchInvolved=True, torchLoaded=True)
    assert "already loaded" in loaded and "Restart Slicer" in loaded
    windows = advice(
        PermissionError(
            "[WinError 5] Access is denied: 'C:\\\\S\\\\lib\\\\torch\\\\lib\\\\c10.dll'"
        ),
        torchInvolved=True,
    )
    assert "already loaded" in windows
    # not torch: the general advice stays
    assert "already loaded" not in advice(RuntimeError("pip exited with 1"))
    assert "internet" in advice(OSError("connection refused"), torchInvolved=True)


# ---- macOS on Intel: torch built for NumPy 1, Slicer with NumPy 2 ------------------


def test_numpy_torch_mismatch_is_found_before_starting():
    problem = dependencies.numpyTorchProblem
    intel = problem("Darwin", "x86_64", "2.2.2", "2.1.3")
    assert "Intel" in intel and "numpy<2" in intel and "Slicer 5.8" in intel
    assert "NumPy 2.1.3" in intel and "PyTorch 2.2.2" in intel
    # elsewhere an old torch has a newer one to upgrade to
    assert "Install / upgrade" in problem("Linux", "x86_64", "2.1.0+cu118", "2.0.2")
    assert "Install / upgrade" in problem("Darwin", "arm64", "2.2.0", "2.0.0")
    for fits in (
        ("Darwin", "x86_64", "2.2.2", "1.26.4"),  # Slicer 5.8: NumPy 1
        ("Darwin", "arm64", "2.8.0", "2.2.0"),
        ("Windows", "AMD64", "2.3.0+cu121", "2.0.0"),
        ("Darwin", "x86_64", None, "2.1.3"),  # no torch yet: installing comes first
    ):
        assert problem(*fits) is None, fits
    assert problem() is None  # this machine: torch >= 2.3 or NumPy 1
