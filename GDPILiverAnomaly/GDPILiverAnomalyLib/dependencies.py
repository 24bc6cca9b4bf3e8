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
