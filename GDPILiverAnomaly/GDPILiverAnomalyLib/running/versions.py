"""Versions of the software a result was made with (recorded in run.json and reports)."""

from __future__ import annotations

import platform

import numpy as np
import scipy
import torch

from .. import __version__


def versions() -> dict:
    """gdpi, Python, torch, numpy, scipy, SimpleITK (None where not installed) and the OS."""
    try:
        import SimpleITK as sitk

        itk = sitk.Version_VersionString()
    except ImportError:
        itk = None
    return {
        "gdpi": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "SimpleITK": itk,
        "platform": platform.platform(),
    }
