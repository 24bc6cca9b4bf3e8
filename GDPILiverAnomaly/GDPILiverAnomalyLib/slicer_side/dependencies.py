"""Which Python packages the worker needs inside Slicer, and how to install them safely.

torch comes from the PyTorch extension's installer (it picks the build for the GPU's
CUDA); the rest from pip, constrained so that Slicer's own numpy and SimpleITK are
never upgraded, downgraded or reinstalled.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
from collections.abc import Callable

#: import name -> pip requirement (None: installed by the PyTorch extension).
REQUIRED: dict[str, str | None] = {
    "torch": None,
    "scipy": "scipy>=1.10",
    "safetensors": "safetensors>=0.4",
    "tqdm": "tqdm>=4.60",
}
#: Shipped with Slicer: required, but pinned to the installed version, never reinstalled.
SLICER_PROVIDED = ("numpy", "SimpleITK")
#: Oldest torch the engine supports (asked of the PyTorch extension's installer).
MINIMUM_TORCH = "2.1"


def missingModules(find: Callable[[str], object] = importlib.util.find_spec) -> list[str]:
    """Import names of required packages that cannot be imported."""
    return [name for name in (*REQUIRED, *SLICER_PROVIDED) if find(name) is None]


def pipRequirements(missing: list[str]) -> list[str]:
    """pip requirements for ``missing`` (torch and Slicer's own packages excluded)."""
    return [REQUIRED[name] for name in missing if REQUIRED.get(name)]


def pinnedConstraints(version: Callable[[str], str] = importlib.metadata.version) -> str:
    """A pip constraints file's text pinning Slicer's numpy and SimpleITK as installed."""
    lines = []
    for name in SLICER_PROVIDED:
        try:
            lines.append(f"{name}=={version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def installedVersions(
    version: Callable[[str], str] = importlib.metadata.version,
) -> dict[str, str | None]:
    """Installed version of every required package (None = not installed)."""
    found: dict[str, str | None] = {}
    for name in (*REQUIRED, *SLICER_PROVIDED):
        try:
            found[name] = version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def torchTooOld(installed: str | None) -> bool:
    """True when an installed torch is older than :data:`MINIMUM_TORCH`."""
    if not installed:
        return False
    numbers = []
    for part in installed.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    minimum = [int(p) for p in MINIMUM_TORCH.split(".")]
    return numbers < minimum


def installFailureAdvice(error: BaseException, torchInvolved: bool = False,
                         torchLoaded: bool = False) -> str:  # fmt: skip
    """What the user can do after a failed installation, from the error. ``torchInvolved``:
    the installation included torch; ``torchLoaded``: Slicer's process had already
    imported torch (another module), the usual reason a torch install fails."""
    text = f"{type(error).__name__}: {error}"
    if "PyTorchUtils" in text or "PyTorch extension" in text:
        return (
            "Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, "
            "then click Detect (or Advanced > Install / upgrade) again."
        )
    lowered = text.lower()
    if any(w in lowered for w in ("connection", "network", "resolve", "timed out", "proxy")):
        return (
            "The package index could not be reached: check the internet connection or "
            "proxy settings, then try again (Advanced > Install / upgrade)."
        )
    if "no space" in lowered:
        return "The disk is full: free a few GB (PyTorch with CUDA needs about 5 GB)."
    if torchInvolved and (torchLoaded or "torch" in lowered):
        return (
            "The usual cause: torch is already loaded in this Slicer session (another "
            "module used it), so its files cannot be replaced. Restart Slicer, then click "
            "Advanced > Install / upgrade first, before using any other AI module."
        )
    if "permission" in lowered or "access is denied" in lowered:
        return (
            "Slicer cannot write its Python folder: run Slicer once as a user who can "
            "write its installation folder, or reinstall Slicer in your user folder."
        )
    return (
        "Restart Slicer and try again (Advanced > Install / upgrade); if it fails "
        "again, the details below name the package that failed."
    )


def slicerPackaging(importModule: Callable[[str], object] = importlib.import_module):
    """Slicer's ``slicer.packaging`` module where it offers ``pip_ensure`` (Slicer 5.11
    and later: checks first, shows a progress dialog while Slicer stays responsive,
    offers a restart when an updated package was already imported), else None."""
    try:
        module = importModule("slicer.packaging")
    except ImportError:
        return None
    return module if callable(getattr(module, "pip_ensure", None)) else None


#: Who asks for the packages, in ``slicer.packaging``'s dialogs.
REQUESTER = "GDPI Liver Anomaly"


def installPipRequirements(
    requirements: list[str],
    constraintsPath: str,
    pipInstall: Callable,
    packaging=None,
    status: Callable[[str], None] | None = None,
) -> str:
    """Install ``requirements`` (pinned by the constraints file) and return how:
    ``"pip_ensure"`` through ``packaging`` (:func:`slicerPackaging`; the user has
    confirmed already, it asks again only to restart), else ``"pip_install"``
    (``slicer.util.pip_install``, blocking) after a progress message to ``status``."""
    if not requirements:
        return "nothing"
    if packaging is not None:
        packaging.pip_ensure(
            list(requirements), constraints=constraintsPath, prompt_install=False,
            prompt_restart=True, requester=REQUESTER, show_progress=True,
        )  # fmt: skip
        return "pip_ensure"
    if status is not None:
        names = ", ".join(r.split(">")[0].split("=")[0].split("<")[0] for r in requirements)
        status(
            f"Installing {names}: this takes a minute or two, and Slicer does not respond "
            "until it is done."
        )
    pipInstall(["-c", constraintsPath, *requirements])
    return "pip_install"


#: The newest torch built for macOS on Intel processors (built for NumPy 1).
LAST_INTEL_MAC_TORCH = "2.2"
#: The first torch built for NumPy 2 (works with NumPy 1 and 2).
FIRST_NUMPY2_TORCH = "2.3"


def _major_minor(version: str) -> tuple[int, int]:
    numbers = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return (numbers + [0, 0])[0], (numbers + [0, 0])[1]


def numpyTorchProblem(
    system: str | None = None,
    machine: str | None = None,
    torchVersion: str | None = None,
    numpyVersion: str | None = None,
) -> str | None:
    """Why detection cannot start because the installed torch was built for NumPy 1
    while NumPy 2 is installed (the worker would fail with "Numpy is not available"),
    with what to do; None when they fit. Every argument defaults to this computer
    (``platform``; versions from the package metadata, nothing imported). On macOS
    with an Intel processor (or Slicer under Rosetta) no newer torch exists."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    versions = None
    if torchVersion is None or numpyVersion is None:
        versions = installedVersions()
    torchVersion = torchVersion if torchVersion is not None else versions.get("torch")
    numpyVersion = numpyVersion if numpyVersion is not None else versions.get("numpy")
    if not torchVersion or not numpyVersion:
        return None
    if _major_minor(numpyVersion) < (2, 0):
        return None
    if _major_minor(torchVersion) >= _major_minor(FIRST_NUMPY2_TORCH):
        return None
    if system == "Darwin" and machine.lower() in ("x86_64", "i386", "amd64"):
        return (
            f"This Slicer has NumPy {numpyVersion}, but PyTorch {torchVersion}, the last "
            f"PyTorch for Macs with an Intel processor, works only with NumPy 1, so the "
            "detection cannot run here. Use Slicer 5.8 (it has NumPy 1) on this Mac, or "
            "install numpy<2 into this Slicer (Python console: "
            "slicer.util.pip_install('numpy<2'), then restart Slicer; other modules may "
            "then stop working), or run gdpi on another computer."
        )
    return (
        f"PyTorch {torchVersion} works only with NumPy 1, but this Slicer has NumPy "
        f"{numpyVersion}: click Advanced > Install / upgrade to get a newer PyTorch, then "
        "restart Slicer."
    )
