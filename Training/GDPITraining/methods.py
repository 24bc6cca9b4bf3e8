"""The methods ``gdpi evaluate`` knows: GDPI variants, baselines, references, and the
pixel pools its metrics use. A catalogue only (no torch): the evaluation and the report
both read it."""

from __future__ import annotations

from dataclasses import dataclass

from GDPILiverAnomalyLib.errors import ParameterError

#: GDPI variants: overrides of the base preset. ``ame`` False = inpaint the whole liver.
GDPI_VARIANTS: dict[str, dict] = {
    "gdpi": {},
    "gdpi-wrd": {"ame": False, "median_size": 0},
    "gdpi-wr": {"ame": False},
    "gdpi-wd": {"median_size": 0},
    "gdpi-two-sided": {"two_sided": True},
    "gdpi-one-sided": {"two_sided": False},
    "gdpi-fast": {"preset": "fast"},
    "gdpi-paper": {"preset": "paper"},
    "gdpi-memory-bank": {"memory_bank": True},
}
BASELINES = ("ae", "vae", "dae")
REFERENCES = ("darkness",)
METHODS = (*GDPI_VARIANTS, *BASELINES, *REFERENCES)
DISPLAY = {
    "gdpi": "GDPI",
    "gdpi-wrd": "GDPI-WRD",
    "gdpi-wr": "GDPI-WR",
    "gdpi-wd": "GDPI-WD",
    "gdpi-two-sided": "GDPI two-sided",
    "gdpi-one-sided": "GDPI one-sided (paper AME)",
    "gdpi-fast": "GDPI fast",
    "gdpi-paper": "GDPI paper",
    "gdpi-memory-bank": "GDPI memory bank",
    "ae": "AE",
    "vae": "VAE",
    "dae": "DAE",
    "darkness": "darkness (no model)",
}
POOLS = {
    "liver": "liver pixels of every evaluated slice (abnormal and healthy)",
    "slice": "every pixel of every evaluated slice (abnormal and healthy), as MedIAnomaly",
}


@dataclass
class MethodSpec:
    name: str
    checkpoint: str | None = None

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        name, _, path = text.partition("=")
        name = name.strip().lower()
        if name not in METHODS:
            raise ParameterError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
        if name in BASELINES and not path:
            raise ParameterError(f"method {name} needs a checkpoint: --method {name}=PATH")
        if name in REFERENCES and path:
            raise ParameterError(f"method {name} takes no checkpoint")
        return cls(name, path or None)
