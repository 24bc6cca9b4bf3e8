"""A compact, memory-mappable store of slices on a model grid.

Folder layout (all arrays share the slice index):
- ``images.npy``  float32 ``[N, n, n]`` HU on the model grid
- ``liver.npy``   uint8 ``[N, n, n]``   1 = liver
- ``tumour.npy``  uint8 ``[N, n, n]``   1 = tumour
- ``ame_dark.npy``, ``ame_bright.npy``  float32 ``[N, n, n]``: AME margins (slice liver
  median - HU, HU - median) taken on the CT's pixels, maximum over each grid pixel's
  footprint (``ame.ame_margins``); ``gdpi evaluate`` thresholds them as ``gdpi detect``
  applies AME. Stores made before they existed lack them.
- ``slices.csv``  per slice: case, slice index (LPS, inferior to superior), kind
  (``healthy`` or ``abnormal``), split (``train``/``val``/``test``), in-plane and slice
  spacing (mm), liver and tumour pixels, source files
- ``store.json``  grid, counts, split and how the store was made
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from GDPILiverAnomalyLib.errors import InputError
from GDPILiverAnomalyLib.files.outputs import give_default_permissions

SLICE_FIELDS = [
    "index",
    "case",
    "slice",
    "kind",
    "split",
    "spacing_x_mm",
    "spacing_y_mm",
    "spacing_z_mm",
    "liver_px",
    "tumour_px",
    "ct",
    "liver",
    "tumour",
]


@dataclass
class SliceStore:
    path: Path
    images: np.ndarray
    liver: np.ndarray
    tumour: np.ndarray
    slices: list[dict]
    info: dict
    ame_dark: np.ndarray | None = None
    ame_bright: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> SliceStore:
        path = Path(path)
        if not (path / "store.json").is_file():
            raise InputError(
                f"{path} is not a slice store (no store.json); make one with gdpi prepare"
            )
        with open(path / "slices.csv", newline="") as f:
            slices = list(csv.DictReader(f))
        margins = [
            np.load(path / f"{name}.npy", mmap_mode="r")
            if (path / f"{name}.npy").is_file()
            else None
            for name in ("ame_dark", "ame_bright")
        ]
        images = np.load(path / "images.npy", mmap_mode="r")
        names = ("images", "ame_dark", "ame_bright")
        for name, values in zip(names, (images, *margins), strict=True):
            _check_finite(path, name, values)
        return cls(
            path,
            images,
            np.load(path / "liver.npy", mmap_mode="r"),
            np.load(path / "tumour.npy", mmap_mode="r"),
            slices,
            json.loads((path / "store.json").read_text()),
            *margins,
        )

    def select(self, kind: str | None = None, split: str | None = None) -> np.ndarray:
        """Indices of slices of a kind and split (None = any)."""
        return np.array(
            [
                int(s["index"])
                for s in self.slices
                if (kind is None or s["kind"] == kind) and (split is None or s["split"] == split)
            ],
            dtype=np.int64,
        )


def _check_finite(path: Path, name: str, values: np.ndarray | None) -> None:
    """Refuse a store whose ``name.npy`` holds NaN or infinite values (read in chunks of
    slices: the arrays are memory-mapped)."""
    if values is None:
        return
    bad = 0
    step = max(1, (1 << 26) // max(1, values[0].nbytes if len(values) else 1))  # ~64 MB
    for start in range(0, len(values), step):
        bad += int(np.count_nonzero(~np.isfinite(values[start : start + step])))
    if bad:
        raise InputError(
            f"slice store {path} holds {bad} NaN or infinite values in {name}.npy; "
            "make it again with gdpi prepare"
        )


class StoreWriter:
    """Collects slices, then writes the store atomically (temporary folder, rename)."""

    def __init__(self, out: str | Path, grid_size: int):
        self.out = Path(out)
        self.size = grid_size
        self.images: list[np.ndarray] = []
        self.liver: list[np.ndarray] = []
        self.tumour: list[np.ndarray] = []
        self.rows: list[dict] = []
        self.extras: dict[str, list[np.ndarray]] = {}

    def add(
        self,
        images: np.ndarray,
        liver: np.ndarray,
        tumour: np.ndarray,
        rows: list[dict],
        extras: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Slices of one case; ``extras``: further float32 ``[n_slices, n, n]`` arrays by name."""
        for name, values in (extras or {}).items():
            self.extras.setdefault(name, []).append(values.astype(np.float32))
        self.images.append(images.astype(np.float32))
        self.liver.append(liver.astype(np.uint8))
        self.tumour.append(tumour.astype(np.uint8))
        self.rows.extend(rows)

    def write(self, info: dict) -> Path:
        if self.out.exists() and any(self.out.iterdir()):
            raise FileExistsError(f"{self.out} exists and is not empty")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        try:
            empty = np.zeros((0, self.size, self.size))
            np.save(tmp / "images.npy", np.concatenate(self.images or [empty]).astype(np.float32))
            np.save(tmp / "liver.npy", np.concatenate(self.liver or [empty]).astype(np.uint8))
            np.save(tmp / "tumour.npy", np.concatenate(self.tumour or [empty]).astype(np.uint8))
            for name, parts in self.extras.items():
                np.save(tmp / f"{name}.npy", np.concatenate(parts).astype(np.float32))
            with open(tmp / "slices.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=SLICE_FIELDS)
                writer.writeheader()
                for i, row in enumerate(self.rows):
                    writer.writerow({**row, "index": i})
            (tmp / "store.json").write_text(json.dumps(info, indent=2))
            give_default_permissions(tmp)
            if self.out.exists():
                self.out.rmdir()
            os.rename(tmp, self.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.out
