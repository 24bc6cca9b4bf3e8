"""Which Python packages the worker needs inside Slicer, and how to install them safely.

torch comes from the PyTorch extension's installer (it picks the build for the GPU's
CUDA); the rest from pip, constrained so that Slicer's own numpy and SimpleITK are
never upgraded, downgraded or reinstalled.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
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


def installFailureAdvice(error: BaseException) -> str:
    """What the user can do after a failed installation, from the error."""
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
    if "permission" in lowered or "access is denied" in lowered:
        return (
            "Slicer cannot write its Python folder: run Slicer once as a user who can "
            "write its installation folder, or reinstall Slicer in your user folder."
        )
    if "no space" in lowered:
        return "The disk is full: free a few GB (PyTorch with CUDA needs about 5 GB)."
    return (
        "Restart Slicer and try again (Advanced > Install / upgrade); if it fails "
        "again, the details below name the package that failed."
    )
