"""Every bad input gets a one-line error naming the problem, exit code 2, and nothing written."""

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared
from GDPILiverAnomalyLib.checkpoint import init_checkpoint, save_checkpoint
from GDPILiverAnomalyLib.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    ct = sitk.ReadImage(str(shared("ts_small", "ct.nii.gz")))
    seg = sitk.ReadImage(str(shared("ts_small", "totalseg.nii.gz")))
    liver = sitk.Cast(seg == 5, sitk.sitkUInt8)
    sitk.WriteImage(ct, str(d / "ct.nrrd"))
    sitk.WriteImage(liver, str(d / "liver.nrrd"))
    sitk.WriteImage(seg, str(d / "totalseg.nrrd"))
    (d / "garbage.nii.gz").write_bytes(b"\x1f\x8b garbage")
    sitk.WriteImage(ct[:, :, 10], str(d / "slice2d.nrrd"))
    empty = sitk.Image(liver.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(liver)
    sitk.WriteImage(empty, str(d / "empty.nrrd"))
    far = sitk.Image(liver)
    far.SetOrigin([o + 5000 for o in far.GetOrigin()])
    sitk.WriteImage(far, str(d / "far.nrrd"))
    raw = sitk.Cast(ct + 1024, sitk.sitkUInt16)  # unsigned 0..4095 with no rescale
    sitk.WriteImage(raw, str(d / "raw.nrrd"))
    arr = sitk.GetArrayFromImage(sitk.Cast(ct, sitk.sitkFloat32))
    arr[15, 50, 60] = np.nan
    nan = sitk.GetImageFromArray(arr)
    nan.CopyInformation(ct)
    sitk.WriteImage(nan, str(d / "nan.nrrd"))
    arr[15, 50, 60] = np.inf
    inf = sitk.GetImageFromArray(arr)
    inf.CopyInformation(ct)
    sitk.WriteImage(inf, str(d / "inf.nrrd"))
    save_checkpoint(init_checkpoint("tiny"), d / "model.safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    (d / "a_file").write_text("x")
    return d


def _run(
    files, capsys, *extra, ct="ct.nrrd", liver="liver.nrrd", ckpt="model.safetensors", out=None
):
    out = out or files / "out"
    args = [
        "detect",
        "--ct",
        str(files / ct),
        "--liver",
        str(files / liver),
        "--checkpoint",
        str(files / ckpt),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--progress",
        "none",
        "--steps",
        "2",
        "--jump-length",
        "1",
        "--jump-n-sample",
        "1",
        *extra,
    ]
    before = sorted(p.name for p in files.iterdir())
    code = main(args)
    err = capsys.readouterr().err
    assert sorted(p.name for p in files.iterdir()) == before, "something was written"
    return code, err


CASES = [
    (dict(ct="missing.nrrd"), "CT not found"),
    (dict(liver="missing.nrrd"), "liver mask not found"),
    (dict(ct="garbage.nii.gz"), "cannot read CT"),
    (dict(ct="slice2d.nrrd"), "is 2-D; a 3-D volume is required"),
    (dict(liver="empty.nrrd"), "contains no liver voxels"),
    (dict(liver="totalseg.nrrd"), "is a label map"),
    (dict(liver="totalseg.nrrd", extra=("--liver-label", "200")), "no voxel with label 200"),
    (dict(liver="far.nrrd"), "does not overlap the CT"),
    (dict(ct="raw.nrrd"), "does not look like HU"),
    (dict(ct="nan.nrrd"), "NaN or infinite"),
    (dict(ct="inf.nrrd"), "NaN or infinite"),
    (dict(ckpt="missing.safetensors"), "checkpoint not found"),
    (dict(ckpt="truncated.safetensors"), "corrupt"),
    (dict(ckpt="ct.nrrd"), "not a GDPI checkpoint"),
    (dict(out="a_file"), "not a folder"),
    (dict(out="a_file/sub"), "not writable"),
    (dict(extra=("--steps", "5000")), "steps must be in 1..1000"),
    (dict(extra=("--offset-hu", "-5")), "offset must be in 0..500 HU"),
    (dict(extra=("--median-size", "99")), "median filter size"),
    (dict(extra=("--steps", "5", "--jump-length", "9")), "jump length must be in 1..steps"),
    (dict(extra=("--device", "cuda:7")), "cuda"),
    (dict(extra=("--device", "tpu")), "device"),
    (dict(extra=("--threshold", "nan")), "threshold"),
]


@pytest.mark.parametrize("case,message", CASES, ids=[m for _, m in CASES])
def test_bad_input_is_refused_cleanly(files, capsys, case, message):
    out = files / case["out"] if "out" in case else None
    code, err = _run(
        files,
        capsys,
        *case.get("extra", ()),
        ct=case.get("ct", "ct.nrrd"),
        liver=case.get("liver", "liver.nrrd"),
        ckpt=case.get("ckpt", "model.safetensors"),
        out=out,
    )
    assert code == 2
    assert err.startswith("gdpi: error: ") and message in err, err
    assert err.count("\n") == 1  # one line


def test_non_hu_override_processes_the_ct(files, capsys, tmp_path):
    code, err = _run(files, capsys, "--allow-non-hu", ct="raw.nrrd", out=tmp_path / "o")
    assert code == 0, err
    assert (tmp_path / "o" / "run.json").exists()


def test_input_files_are_not_modified(files, capsys, tmp_path):
    before = {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()}
    assert _run(files, capsys, out=tmp_path / "o")[0] == 0
    assert {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()} == before
