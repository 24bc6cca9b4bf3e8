"""The method: the GDPI paper's parts, arrays in and arrays out.

Adaptive mask extraction (:mod:`.ame`), the contrast phase (:mod:`.phase`), the
diffusion process (:mod:`.diffusion`), the network (:mod:`.unet`), the jump schedule
and its cost (:mod:`.schedule`), inpainting (:mod:`.repaint`, :mod:`.ddnm`), the model's
input grid (:mod:`.grid`), scoring (:mod:`.scoring`, :mod:`.calibration`), pixel
metrics (:mod:`.metrics`) and the one definition of the detection parameters
(:mod:`.parameters`). Knows nothing of files, processes or Slicer: imports only
``..errors`` from outside this folder.
"""
