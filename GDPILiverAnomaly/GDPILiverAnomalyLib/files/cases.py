"""Pairing CTs with liver masks in folders (``gdpi detect`` folder mode).

Rules, tried in order on ``--ct DIR --liver DIR`` (the two may be the same folder):
1. LiTS names: ``volume-N.<ext>`` pairs with ``segmentation-N.<ext>``.
2. Case subfolders: each subfolder of the CT folder holding one CT file named
   ``ct``/``image``/``volume``/``img`` and one mask named ``seg``/``segmentation``/
   ``liver``/``mask``/``label``/``labels``/``totalseg`` (any image suffix) is a case
   named after the subfolder.
3. Same name: an image file in the CT folder pairs with the file of the same name
   in the liver folder (MSD ``imagesTr``/``labelsTr``); needs two different folders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .volumes import IMAGE_SUFFIXES, image_stem

CT_NAMES = ("ct", "image", "volume", "img")
MASK_NAMES = ("seg", "segmentation", "liver", "mask", "label", "labels", "totalseg")


@dataclass
class Case:
    name: str
    ct: Path
    liver: Path


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
    )


def pair_cases(ct_dir: str | Path, liver_dir: str | Path) -> list[Case]:
    """All (CT, mask) pairs found in the folders, by the rules in this module's docstring."""
    ct_dir, liver_dir = Path(ct_dir), Path(liver_dir)
    for d in (ct_dir, liver_dir):
        if not d.is_dir():
            raise InputError(f"folder not found: {d}")
    lits = {}
    for p in _images(ct_dir):
        m = re.fullmatch(r"volume-(\d+)", image_stem(p))
        if m:
            lits[m.group(1)] = p
    if lits:
        masks = {re.fullmatch(r"segmentation-(\d+)", image_stem(p)): p for p in _images(liver_dir)}
        masks = {m.group(1): p for m, p in masks.items() if m}
        cases = [
            Case(f"volume-{n}", lits[n], masks.get(n, liver_dir / f"segmentation-{n}.nii"))
            for n in sorted(lits, key=int)
        ]
        return cases
    cases = []
    for sub in sorted(p for p in ct_dir.iterdir() if p.is_dir()):
        files = {image_stem(p).lower(): p for p in _images(sub)}
        ct = next((files[n] for n in CT_NAMES if n in files), None)
        mask = next((files[n] for n in MASK_NAMES if n in files), None)
        if ct is not None and mask is not None:
            cases.append(Case(sub.name, ct, mask))
    if cases:
        return cases
    if ct_dir.resolve() != liver_dir.resolve():
        masks = {p.name: p for p in _images(liver_dir)}
        cases = [
            Case(image_stem(p), p, masks.get(p.name, liver_dir / p.name)) for p in _images(ct_dir)
        ]
    if not cases:
        raise InputError(
            f"no cases found in {ct_dir} (see the pairing rules: LiTS names, "
            "case subfolders, or same file names in two folders)"
        )
    return cases
