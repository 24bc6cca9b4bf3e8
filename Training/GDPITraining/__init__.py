"""Training side of GDPI: healthy-slice datasets, improved-DDPM training, the demo model.

Not packaged into the Slicer extension; installed with the ``gdpi`` command.
"""
