"""Contrast-phase detection (automatic two-sided AME) on constructed and real scans."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared
from GDPILiverAnomalyLib.method.phase import (
    ARTERIAL_GAP_HU,
    PhaseEstimate,
    describe_ame_side,
    estimate_phase,
)


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
    [
        (250.0, 60.0, "arterial"),
        (170.0, 120.0, "venous"),
        (None, 55.0, "unknown"),
    ],  # blood in a body of the same HU
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


_CACHE: dict = {}


def _oriented(case: str, seg: str, label):
    """The oriented (LPS) CT and liver mask of a shared scan, read once per session."""
    from GDPILiverAnomalyLib.files.volumes import OrientedCase, read_ct, read_liver_mask

    if case not in _CACHE:
        ct = read_ct(shared(case, "dicom" if case == "dcmqi_3slice" else "ct.nii.gz"))
        _CACHE[case] = OrientedCase.from_arrays(ct, read_liver_mask(shared(case, seg), ct, label))
    return _CACHE[case]


def _real(case: str, seg: str = "seg.nii.gz", label=None, crop=None):
    oriented = _oriented(case, seg, label)
    ct, liver = oriented.ct, oriented.liver
    if crop is not None:
        ct, liver = crop(ct, liver, oriented.spacing_yx)
    return estimate_phase(ct, liver, oriented.spacing_yx)


@pytest.mark.parametrize(
    ("case", "seg", "label", "phase"),
    [
        ("hcc_1211", "seg.nii.gz", None, "arterial"),  # arterial phase, hyperdense HCC
        ("hcc_1720", "seg.nii.gz", None, "venous"),  # portal/equilibrium (was unknown)
        ("hcc_0697", "seg.nii.gz", None, "venous"),  # contrast CT (was unknown)
        ("chaos_ct3", "seg.nii.gz", None, "venous"),  # portal-venous
        ("ts_small", "totalseg.nii.gz", 5, "non-contrast"),  # no contrast (was unknown)
        ("dcmqi_3slice", "liver_seg.nrrd", None, "non-contrast"),  # 3 slices, DICOM
    ],
)
def test_phase_of_the_shared_scans(case, seg, label, phase):
    estimate = _real(case, seg, label)
    assert estimate.phase == phase, estimate.describe()
    assert estimate.reason and estimate.describe() == f"{phase} phase: {estimate.reason}"
    arterial = phase == "arterial"
    line = describe_ame_side(estimate.arterial, estimate.to_dict())
    assert ("brighter" in line) is arterial and estimate.reason in line


def _liver_box(ct, liver, spacing_yx, margin_mm=30.0):
    """Only the liver's in-plane box + ``margin_mm`` on every slice (the aorta may be cut)."""
    rows = np.flatnonzero(liver.any(axis=(0, 2)))
    cols = np.flatnonzero(liver.any(axis=(0, 1)))
    my, mx = (int(round(margin_mm / s)) for s in spacing_yx)
    box = (slice(None), slice(max(0, rows[0] - my), rows[-1] + my + 1),
           slice(max(0, cols[0] - mx), cols[-1] + mx + 1))  # fmt: skip
    return ct[box], liver[box]


def _middle_slices(ct, liver, spacing_yx, n=3):
    zs = np.flatnonzero(liver.any(axis=(1, 2)))
    z = zs[len(zs) // 2 - n // 2]
    return ct[z : z + n], liver[z : z + n]


def _caudal_half(ct, liver, spacing_yx):
    zs = np.flatnonzero(liver.any(axis=(1, 2)))
    return ct[zs[0] : (zs[0] + zs[-1]) // 2], liver[zs[0] : (zs[0] + zs[-1]) // 2]


@pytest.mark.parametrize(
    ("case", "crop", "phase"),
    [
        ("hcc_0697", _liver_box, "venous"),  # was unknown
        ("hcc_1211", _middle_slices, "arterial"),
        ("hcc_1720", _caudal_half, "venous"),
        ("chaos_ct3", _middle_slices, "venous"),  # was unknown
    ],
)
def test_phase_of_crops_of_the_shared_scans(case, crop, phase):
    estimate = _real(case, crop=crop)
    assert estimate.phase == phase, estimate.describe()


def _right_side(ct, liver, spacing_yx):
    """The patient's right 40 % of the columns (LPS): the liver without the aorta."""
    keep = int(0.4 * ct.shape[2])
    return ct[:, :, :keep], liver[:, :, :keep]


def test_without_the_aorta_bright_bowel_is_not_taken_for_it():
    """hcc_1211 cut to the liver's side: oral contrast in the bowel (373 HU, round, over 13
    slices) is no aorta; arterial needs a run over half the liver's slices: unknown, and
    the reason says why (a guard of the band search; the previous version found nothing)."""
    estimate = _real("hcc_1211", crop=_right_side)
    assert estimate.phase == "unknown", estimate.describe()
    assert "but it covers only" in estimate.reason and "perhaps bowel" in estimate.reason


# --- issue 22: robust recognition that says why ------------------------------------------


def _torso(
    aorta_hu,
    liver_hu=60.0,
    marrow_hu=200.0,
    touching=False,
    shift_mm=0.0,
    slices=12,
    cortex_hu=700.0,
    halo_hu=-100.0,
):
    """A 1 mm grid, 240 x 320 mm, LPS (rows: anterior to posterior, columns: right to
    left): body 40 HU around fat (-100 HU), the liver on the patient's right, a vertebral
    body (marrow ``marrow_hu``, a 3 mm cortex of ``cortex_hu``) with its posterior arch, and a
    24 mm aorta (``aorta_hu``; None: no aorta) in front of it, left of the midline; the
    spine and aorta ``shift_mm`` towards the patient's left of the body's centre;
    ``touching``: the aorta sits on the vertebral body (no fat between); ``halo_hu``: what
    surrounds the aorta (4 mm of fat, or 10 mm of that HU)."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:240, 0:320]
    plane = np.full((240, 320), -1000.0)
    body = ((y - 120) / 110) ** 2 + ((x - 160) / 150) ** 2 <= 1
    plane[body] = -100.0
    plane[body & (((y - 120) / 100) ** 2 + ((x - 160) / 140) ** 2 <= 1)] = 40.0
    liver = (
        body
        & (x < 150)
        & (y > 40)
        & (y < 170)
        & (((y - 110) / 70) ** 2 + ((x - 90) / 70) ** 2 <= 1)
    )
    plane[liver] = liver_hu
    cx, cy = 160 + shift_mm, 165  # vertebral body centre
    vertebra = (y - cy) ** 2 + (x - cx) ** 2 <= 19**2
    plane[(y - cy) ** 2 + (x - cx) ** 2 <= 23**2] = -100.0  # fat around the spine
    plane[vertebra] = cortex_hu
    plane[(y - cy) ** 2 + (x - cx) ** 2 <= 16**2] = marrow_hu
    arch = (np.abs(x - cx) < 14) & (y > cy + 22) & (y < cy + 45)
    plane[arch] = 700.0
    plane[(np.abs(x - cx) < 7) & (y > cy + 24) & (y < cy + 36)] = 10.0  # spinal canal
    if aorta_hu is not None:
        ay = cy - 19 - 12 + (1 if touching else -6)  # touching: overlaps the cortex by 1 mm
        ax = cx + 12
        if not touching:
            halo = 16 if halo_hu < 0 else 22  # fat 4 mm, else 10 mm of tissue
            plane[((y - ay) ** 2 + (x - ax) ** 2 <= halo**2) & (plane < 150)] = halo_hu
        plane[(y - ay) ** 2 + (x - ax) ** 2 <= 12**2] = aorta_hu
    ct = np.repeat(plane[None], slices, axis=0) + rng.normal(0, 8, (slices, 240, 320))
    return ct.astype(np.float32), np.repeat(liver[None], slices, 0).astype(np.uint8), (1.0, 1.0)


def test_torso_phantom_recognised():
    """Arterial aorta clear of the spine: found, with the reason saying why."""
    estimate = estimate_phase(*_torso(250.0))
    assert estimate.phase == "arterial", estimate.reason
    assert abs(estimate.aorta_hu - 250) < 10 and estimate.aorta_slices == 12
    assert estimate.reason == (
        f"aorta {estimate.aorta_hu:.0f} HU vs liver {estimate.liver_hu:.0f} HU: gap "
        f"{estimate.aorta_hu - estimate.liver_hu:.0f} >= 90 HU over 12 slices"
    )


@pytest.mark.parametrize("aorta", [450.0, 600.0])
def test_an_unusually_bright_aorta_touching_the_spine_is_arterial(aorta):
    """A 450-600 HU bolus on the vertebral body's 500 HU cortex: one bright region with
    the bone at any single threshold (the previous version: unknown)."""
    estimate = estimate_phase(*_torso(aorta, touching=True, cortex_hu=500.0))
    assert estimate.phase == "arterial", estimate.reason
    assert abs(estimate.aorta_hu - aorta) < 15


def test_an_aorta_off_the_body_centre_is_found_from_the_spine():
    """Spine and aorta 60 mm to the left of the body's centre (a patient lying off the
    table's centre line, scoliosis): the midline is the spine's (the previous version
    looked within 50 mm of the body's centre only)."""
    estimate = estimate_phase(*_torso(250.0, shift_mm=60.0))
    assert estimate.phase == "arterial", estimate.reason


def test_non_contrast_is_its_own_phase_and_bright_marrow_is_no_aorta():
    """Blood 40 HU, liver 55 HU: non-contrast (previous version: unknown); the vertebral
    body's marrow (200-300 HU, round, homogeneous) is not taken for an enhanced aorta
    (the previous version called marrow 230 HU in a 300 HU cortex arterial)."""
    estimate = estimate_phase(*_torso(40.0, liver_hu=55.0, marrow_hu=200.0))
    assert estimate.phase == "non-contrast", estimate.reason
    assert "both <= 70 HU" in estimate.reason
    for marrow, cortex in ((230.0, 300.0), (250.0, 700.0), (300.0, 400.0)):
        no_aorta = estimate_phase(*_torso(None, liver_hu=55.0, marrow_hu=marrow, cortex_hu=cortex))
        assert not no_aorta.arterial, no_aorta.reason


def test_a_bright_round_region_not_set_off_by_fat_is_not_called_arterial():
    """250 HU in 200 HU tissue (no fat around it, as marrow or an organ): its gap to the
    liver would say arterial, but its rim says it may not be the aorta: unknown, and why
    (a guard of the new band search, which finds it; the previous version did not)."""
    estimate = estimate_phase(*_torso(250.0, halo_hu=200.0))
    assert estimate.phase == "unknown", estimate.reason
    assert estimate.reason.endswith(
        "of its rim is fat or tissue (< 60 %): perhaps bone, not the aorta"
    )
    assert estimate_phase(*_torso(250.0, halo_hu=40.0)).phase == "arterial"


def test_a_vessel_far_darker_than_the_liver_is_no_venous_aorta():
    """A 60 HU round vessel beside a 140 HU liver is not enhanced blood beside an enhanced
    liver (it is not the aorta): unknown, not venous."""
    estimate = estimate_phase(*_torso(60.0, liver_hu=140.0))
    assert estimate.phase == "unknown", estimate.reason
    assert estimate.reason.endswith("nor non-contrast: perhaps not the aorta")


def test_the_reason_when_nothing_is_found_and_when_the_run_is_short():
    ct, liver, spacing = _torso(None)
    ct[:, 100:, :] = -1000.0  # no spine, no aorta: only the front of the body
    none = estimate_phase(ct, liver, spacing)
    assert none.phase == "unknown" and none.aorta_hu is None
    assert none.reason.startswith(
        "no round homogeneous region (aorta) within 50 mm of the midline on 12 liver slices"
    )
    ct, liver, spacing = _torso(250.0, slices=2)
    short = estimate_phase(ct, liver, spacing)
    assert short.phase == "unknown"
    assert short.reason.startswith("aorta run only 2 slices (< 3) of 2 liver slices")


def test_older_run_json_without_a_reason_still_reads():
    older = {"phase": "arterial", "liver_hu": 55.0, "aorta_hu": 180.0, "aorta_slices": 52,
             "arterial": True, "gap_hu": 90.0}  # fmt: skip
    estimate = PhaseEstimate.from_dict(older)
    assert estimate.reason == "" and estimate.arterial
    assert estimate.describe() == "arterial phase: aorta 180 HU over 52 slices, liver 55 HU"
    again = PhaseEstimate.from_dict(estimate_phase(*_torso(250.0)).to_dict())
    assert again.reason.startswith("aorta 2") and again.describe().startswith("arterial phase: ")
    assert PhaseEstimate("unknown", 50.0, None, 0).reason == ""  # old positional callers


def test_the_slicer_run_details_show_the_phase_and_why():
    job = pytest.importorskip("GDPILiverAnomalyLib.slicer_side.job", exc_type=ImportError)
    phase = estimate_phase(*_torso(250.0)).to_dict()
    info = {"stats": {"two_sided": True, "two_sided_from": "contrast phase", "phase": phase}}
    lines = job.formatRunDetails(info).splitlines()
    assert "Re-painted: darker and brighter tissue (contrast phase)" in lines
    assert f"Contrast phase: arterial phase: {phase['reason']}" in lines


def test_gdpi_detect_prints_and_records_the_phase_and_why(tmp_path, capsys):
    """The automatic side on a real non-contrast scan: the log line and run.json's
    ``stats.phase`` carry the phase and its reason (a tiny random model, 2 steps)."""
    pytest.importorskip("torch")
    import json

    from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint, save_checkpoint
    from GDPILiverAnomalyLib.running import cli

    checkpoint = save_checkpoint(init_checkpoint("tiny", seed=0), tmp_path / "tiny.safetensors")
    ct, labels = shared("ts_small", "ct.nii.gz"), shared("ts_small", "totalseg.nii.gz")
    code = cli.main(
        ["detect", "--ct", str(ct), "--liver", str(labels), "--liver-label", "5",
         "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--steps", "2",
         "--jump-length", "1", "--jump-n-sample", "1", "--device", "cpu", "--progress", "text"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    phase = json.loads((tmp_path / "out" / "run.json").read_text())["stats"]["phase"]
    assert phase["phase"] == "non-contrast" and phase["reason"].startswith("aorta ")
    assert f"re-painted darker tissue: non-contrast phase: {phase['reason']}; outputs in" in err
