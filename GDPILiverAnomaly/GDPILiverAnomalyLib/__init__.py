"""GDPI engine: liver tumour anomaly detection in CT with a generative diffusion prior.

Pure Python (torch, numpy, scipy, SimpleITK); never imports ``slicer`` or ``qt``.
"""

__version__ = "0.1.0"
