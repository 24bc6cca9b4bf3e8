"""Contrast-phase detection (automatic two-sided AME) on constructed and real scans."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared
from GDPILiverAnomalyLib.method.phase import ARTERIAL_GAP_HU, describe_ame_side, estimate_phase


def _abdomen(aorta_hu: float | None, liver_hu: float, slices: int = 20) -> tuple:
    """A 1 mm grid: body 40 HU, liver (patient's right) at ``liver_hu``, a 24 mm round
    aorta in front of the spine at ``aorta_hu`` (None: unenhanced blood, 40 HU)."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:slices, 0:200, 0:200]
    ct = np.full((slices, 200, 200), -1000.0)
    body = ((y - 100) / 90) ** 2 + ((x - 100) / 95) ** 2 <= 1
    ct[body] = 40.0
    liver = body & (x < 80) & (y > 40) & (y < 150)
    ct[liver] = liver_hu
    aorta = (y - 120) ** 2 + (x - 110) ** 2 <= 12**2
    ct[aorta] = 40.0 if aorta_hu is None else aorta_hu
    ct += rng.normal(0, 8, ct.shape)
    return ct.astype(np.float32), liver.astype(np.uint8), (1.0, 1.0)


@pytest.mark.parametrize(
    ("aorta", "liver", "phase"),
    [(250.0, 60.0, "arterial"), (170.0, 120.0, "venous"), (None, 55.0, "unknown")],
)
def test_phase_of_constructed_scans(aorta, liver, phase):
    estimate = estimate_phase(*_abdomen(aorta, liver))
    assert estimate.phase == phase
    assert estimate.arterial == (phase == "arterial")
    if aorta is not None:
        assert abs(estimate.aorta_hu - aorta) < 10 and estimate.aorta_slices == 20
    assert abs(estimate.liver_hu - liver) < 3


def test_the_aorta_liver_gap_decides():
    just_below = estimate_phase(*_abdomen(60.0 + ARTERIAL_GAP_HU - 15, 60.0))
    above = estimate_phase(*_abdomen(60.0 + ARTERIAL_GAP_HU + 15, 60.0))
    assert just_below.phase == "venous" and above.phase == "arterial"


def _real(case: str, seg: str = "seg.nii.gz", label=None):
    from GDPILiverAnomalyLib.files.volumes import OrientedCase, read_ct, read_liver_mask

    ct = read_ct(shared(case, "ct.nii.gz"))
    oriented = OrientedCase.from_arrays(ct, read_liver_mask(shared(case, seg), ct, label))
    return estimate_phase(oriented.ct, oriented.liver, oriented.spacing_yx)


@pytest.mark.parametrize(
    ("case", "seg", "label", "arterial"),
    [
        ("hcc_1211", "seg.nii.gz", None, True),  # arterial phase, hyperdense HCC
        ("hcc_1720", "seg.nii.gz", None, False),  # portal-venous
        ("hcc_0697", "seg.nii.gz", None, False),
        ("chaos_ct3", "seg.nii.gz", None, False),  # portal-venous, aorta found
        ("ts_full", "totalseg.nii.gz", 5, False),  # no contrast
    ],
)
def test_phase_of_the_shared_scans(case, seg, label, arterial):
    estimate = _real(case, seg, label)
    assert estimate.arterial is arterial, estimate.describe()
    line = describe_ame_side(estimate.arterial, estimate.to_dict())
    assert ("brighter" in line) is arterial
