"""Pairing CTs with liver masks in folders (``gdpi detect`` folder mode).

Rules, tried in order on ``--ct DIR --liver DIR`` (the two may be the same folder):
1. LiTS names: ``volume-N.<ext>`` pairs with ``segmentation-N.<ext>``.
2. Case subfolders: each subfolder of the CT folder holding one CT file named
   ``ct``/``image``/``volume``/``img`` and one mask named ``seg``/``segmentation``/
   ``liver``/``mask``/``label``/``labels``/``totalseg`` (any image suffix) is a case
   named after the subfolder.
3. Same name: an image file in the CT folder pairs with the file of the same name
   in the liver folder (MSD ``imagesTr``/``labelsTr``); needs two different folders.

Hidden files and folders (``.name``) are never cases, so a case name never starts with
a dot (the output folder's temporary folders all do). What else the CT folder holds
that is not a case (a case folder without a CT file of those names, or with a DICOM
folder; an image file of another name; a folder beside same-name files) is returned
as :class:`Skipped`, with the reason. Two files that would be the same case (``A.nii``
and ``A.nrrd``; names differing only in letter case, which are one output folder on
macOS and Windows) are refused.
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


@dataclass
class Skipped:
    """An entry of the CT folder that is not a case, and why."""

    name: str
    path: Path
    reason: str


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def pair_cases(ct_dir: str | Path, liver_dir: str | Path) -> list[Case]:
    """All (CT, mask) pairs found in the folders, by the rules in this module's docstring."""
    return find_cases(ct_dir, liver_dir)[0]


def find_cases(ct_dir: str | Path, liver_dir: str | Path) -> tuple[list[Case], list[Skipped]]:
    """The (CT, mask) pairs found in the folders and what was skipped, by the rules in
    this module's docstring. Raises :class:`InputError` when there is no case, or two
    files would be one case."""
    ct_dir, liver_dir = Path(ct_dir), Path(liver_dir)
    for d in (ct_dir, liver_dir):
        if not d.is_dir():
            raise InputError(f"folder not found: {d}")
    same = ct_dir.resolve() == liver_dir.resolve()
    lits: dict[str, list[Path]] = {}
    for p in _images(ct_dir):
        m = re.fullmatch(r"volume-(\d+)", image_stem(p))
        if m:
            lits.setdefault(m.group(1), []).append(p)
    if lits:
        masks: dict[str, list[Path]] = {}
        for p in _images(liver_dir):
            m = re.fullmatch(r"segmentation-(\d+)", image_stem(p))
            if m:
                masks.setdefault(m.group(1), []).append(p)
        for n, found in masks.items():
            if len(found) > 1:
                raise InputError(
                    f"two liver masks for case volume-{n} in {liver_dir}: "
                    f"{found[0].name} and {found[1].name}; keep one"
                )
        cases = [
            Case(f"volume-{n}", p, masks.get(n, [liver_dir / f"segmentation-{n}.nii"])[0])
            for n in sorted(lits, key=int)
            for p in lits[n]
        ]
        used = {c.ct for c in cases} | ({c.liver for c in cases} if same else set())
        skipped = [
            Skipped(p.name, p, "not a LiTS name (volume-N with segmentation-N)")
            for p in _images(ct_dir)
            if p not in used and not (same and re.fullmatch(r"segmentation-\d+", image_stem(p)))
        ]
        skipped += [
            _folder_skipped(p, "LiTS pairing reads volume-N files") for p in _subfolders(ct_dir)
        ]
        return _unique(cases, ct_dir), skipped
    cases, skipped = [], []
    for sub in _subfolders(ct_dir):
        case, reason = _case_folder(sub)
        if case is not None:
            cases.append(case)
        else:
            skipped.append(Skipped(sub.name, sub, reason))
    if cases:
        skipped += [
            Skipped(p.name, p, "an image file beside the case folders") for p in _images(ct_dir)
        ]
        return _unique(cases, ct_dir), skipped
    if not same:
        masks_by_name = {p.name: p for p in _images(liver_dir)}
        cases = [
            Case(image_stem(p), p, masks_by_name.get(p.name, liver_dir / p.name))
            for p in _images(ct_dir)
        ]
        if cases:
            skipped = [
                _folder_skipped(p, "same-name pairing reads image files")
                for p in _subfolders(ct_dir)
            ]
    if not cases:
        why = f"; e.g. {skipped[0].name}: {skipped[0].reason}" if skipped else ""
        raise InputError(
            f"no cases found in {ct_dir} (see the pairing rules: LiTS names, "
            f"case subfolders, or same file names in two folders){why}"
        )
    return _unique(cases, ct_dir), skipped


def _case_folder(sub: Path) -> tuple[Case | None, str]:
    """The case of a case subfolder, or None and why it is not one."""
    files: dict[str, list[Path]] = {}
    for p in _images(sub):
        files.setdefault(image_stem(p).lower(), []).append(p)
    found = {}
    for kind, names in (("CT", CT_NAMES), ("liver mask", MASK_NAMES)):
        stem = next((n for n in names if n in files), None)
        if stem is None:
            held = sorted(p.name + ("/" if p.is_dir() else "") for p in sub.iterdir()
                          if not p.name.startswith("."))  # fmt: skip
            listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "") or "nothing"
            dicom = (
                "; DICOM folders are not read in folder mode (convert them to NIfTI or NRRD, "
                "or run gdpi detect on each case)"
                if any(p.is_dir() for p in sub.iterdir() if not p.name.startswith("."))
                else ""
            )
            return None, (
                f"no {kind} file named {', '.join(names)} with an image suffix "
                f"({' '.join(IMAGE_SUFFIXES)}); it holds {listed}{dicom}"
            )
        if len(files[stem]) > 1:
            both = " and ".join(p.name for p in files[stem][:2])
            return None, f"two {kind} files ({both}): keep one"
        found[kind] = files[stem][0]
    return Case(sub.name, found["CT"], found["liver mask"]), ""


def _folder_skipped(folder: Path, rule: str) -> Skipped:
    return Skipped(
        folder.name, folder, f"a folder ({rule}; DICOM folders are not read in folder mode)"
    )


def _unique(cases: list[Case], ct_dir: Path) -> list[Case]:
    """``cases``, refused when two would share a name (output folder), letter case aside."""
    seen: dict[str, Case] = {}
    for case in cases:
        other = seen.setdefault(case.name.casefold(), case)
        if other is not case:
            raise InputError(
                f"{other.ct.relative_to(ct_dir)} and {case.ct.relative_to(ct_dir)} in {ct_dir} "
                f"would both be case {case.name!r} (one output folder): rename or remove one"
            )
    return cases
