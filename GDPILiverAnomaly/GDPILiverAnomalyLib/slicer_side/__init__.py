"""The Slicer side: MRML nodes to files and back, never Qt, never torch.

What a detection runs with (:mod:`.settings`), the logic the module and the Python
console call (:mod:`.logic`), one detection in a background worker (:mod:`.job`),
showing results in a scene (:mod:`.display`) and installing the worker's packages
(:mod:`.dependencies`). Runs in Slicer's GUI process and on the ``slicer-core`` wheel.
"""
