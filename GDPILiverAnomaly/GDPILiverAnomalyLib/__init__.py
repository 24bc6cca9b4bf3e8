"""GDPI engine: liver tumour anomaly detection in CT with a generative diffusion prior.

Four parts, each importing only the ones below it (``Testing/test_layers.py``):

- :mod:`.slicer_side`: MRML nodes to files and back (imports ``slicer``, never Qt or torch);
- :mod:`.running`: a detection from files to files, ``gdpi`` commands, the Ray engine;
- :mod:`.files`: reading, checking and writing volumes, checkpoints and output folders;
- :mod:`.method`: the paper's method on arrays (AME, diffusion, inpainting, scoring).

:mod:`.errors` holds the exceptions every part raises. Nothing here imports the
training package (``GDPITraining``).
"""

__version__ = "0.1.0"
