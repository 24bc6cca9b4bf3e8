"""Named detection settings (no torch import: the Slicer panel reads them at start-up)."""

#: ``paper``: the GDPI paper's RePaint setting (2410 network evaluations per batch);
#: ``fast``: fewer steps and resamplings (140 per batch). ``median_size`` in model-grid pixels.
PRESETS: dict[str, dict] = {
    "paper": dict(steps=250, jump_length=10, jump_n_sample=10, median_size=5),
    "fast": dict(steps=50, jump_length=5, jump_n_sample=3, median_size=5),
}
