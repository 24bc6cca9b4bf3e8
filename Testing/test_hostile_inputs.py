"""Hostile inputs, table-driven: every bad file, option, checkpoint or output folder given
to ``gdpi detect``, ``prepare``, ``train``, ``evaluate`` and ``synth-tumours`` is refused
with exit 2 and exactly one ``gdpi: error:`` line naming the problem; no traceback
escapes, nothing is written, the inputs stay byte-identical and no temporary file is
left. The fixtures are generated here (from ``../shared/data/ts_small``), never committed.
The Slicer logic's share is in ``test_slicer_logic.py`` (errors and an unchanged scene).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import one_error_line, shared, tree_snapshot
from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint, save_checkpoint
from GDPITraining.cli import main


def _write(image: sitk.Image, path: Path, compress: bool = False) -> None:
    clean = sitk.GetImageFromArray(
        sitk.GetArrayFromImage(image), image.GetNumberOfComponentsPerPixel() > 1
    )
    clean.CopyInformation(image)
    sitk.WriteImage(clean, str(path), useCompression=compress)


def _cut(source: Path, target: Path, fraction: float = 0.5) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])


def _with_array(reference: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _forged_checkpoint(source: Path, target: Path, edit) -> None:
    """A copy of a safetensors checkpoint whose JSON header was changed by ``edit``."""
    data = source.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header = edit(header)
    raw = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("hostile")
    ct = sitk.ReadImage(str(shared("ts_small", "ct.nii.gz")))
    seg = sitk.ReadImage(str(shared("ts_small", "totalseg.nii.gz")))
    liver = sitk.Cast(seg == 5, sitk.sitkUInt8)
    _write(ct, w / "ct.nrrd")
    _write(liver, w / "liver.nrrd")
    _write(seg, w / "totalseg.nrrd")
    # complete files in every format, then cut short
    _write(ct, w / "ct.nii.gz", compress=True)
    _write(ct, w / "ct.nii")
    _write(ct, w / "ct_gz.nrrd", compress=True)
    _write(ct, w / "ct.mha")
    _write(ct, w / "ct_z.mha", compress=True)
    for name in ("ct.nii.gz", "ct.nii", "ct_gz.nrrd", "ct.nrrd", "ct.mha", "ct_z.mha"):
        stem, dot, ext = name.partition(".")
        _cut(w / name, w / f"{stem}_cut.{ext}")
    _write(ct, w / "detached.nhdr")
    (w / "detached.raw").unlink(missing_ok=True)
    for raw in w.glob("detached.*"):
        if raw.suffix != ".nhdr":
            raw.unlink()
    (w / "empty.nii.gz").write_bytes(b"")
    (w / "text.nii.gz").write_text("<html>not an image</html>")
    (w / "garbage.nrrd").write_text("NRRD0004\ntype: short\nsizes: 5 5\n\n")
    # geometry
    for name, spacing in (("spacing_tiny", 1e-6), ("spacing_huge", 1e6)):
        image = sitk.Image(ct)
        image.SetSpacing((spacing,) * 3)
        _write(image, w / f"{name}.nrrd")
    sheared = sitk.Image(ct)
    d = np.array(ct.GetDirection()).reshape(3, 3)
    d[0, 1] = 0.3
    sheared.SetDirection(tuple(d.ravel()))
    _write(sheared, w / "sheared.nrrd")
    coarse = sitk.Image(ct)
    coarse.SetSpacing((40.0, 40.0, 40.0))
    _write(coarse, w / "ct_coarse.nrrd")
    big = sitk.Image(liver)
    big.SetSpacing((40.0, 40.0, 40.0))
    _write(big, w / "liver_coarse.nrrd")  # the ts_small liver at 40 mm: metres long
    # values
    arr = sitk.GetArrayFromImage(sitk.Cast(ct, sitk.sitkFloat32))
    inside = np.argwhere(sitk.GetArrayFromImage(liver) > 0)[0]
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        # SimpleITK's NIfTI writer drops non-finite values: patch the stored float32 data
        _write(_with_array(ct, arr), w / f"{name}_in_liver.nii")
        data = bytearray((w / f"{name}_in_liver.nii").read_bytes())
        offset = int(struct.unpack("<f", data[108:112])[0])
        flat = np.ravel_multi_index(tuple(inside), arr.shape)
        data[offset + 4 * flat : offset + 4 * flat + 4] = struct.pack("<f", value)
        with gzip.open(w / f"{name}_in_liver.nii.gz", "wb") as f:
            f.write(bytes(data))
        (w / f"{name}_in_liver.nii").unlink()
    _write(_with_array(ct, (arr + 1024).astype(np.uint16)), w / "raw_counts.nrrd")
    _write(sitk.Compose(ct, ct), w / "vector.nrrd")
    _write(ct[:, :, 10], w / "slice2d.nrrd")
    sitk.WriteImage(sitk.JoinSeries([ct, ct]), str(w / "four_d.nii.gz"))
    # liver masks
    _write(_with_array(liver, np.zeros_like(sitk.GetArrayFromImage(liver))), w / "liver_empty.nrrd")
    far = sitk.Image(liver)
    far.SetOrigin([o + 5000 for o in far.GetOrigin()])
    _write(far, w / "liver_far.nrrd")
    (w / "not_dicom").mkdir()
    (w / "not_dicom" / "readme.txt").write_text("no images here")
    # forged headers
    nii = bytearray((w / "ct.nii").read_bytes())
    nii[108:112] = struct.pack("<f", float("nan"))  # vox_offset
    (w / "offset_nan.nii").write_bytes(bytes(nii))
    nii = bytearray((w / "ct.nii").read_bytes())
    nii[70:74] = struct.pack("<2h", 16, 8)  # float32 voxels of 8 bits
    (w / "float_bits.nii").write_bytes(bytes(nii))
    nii = bytearray((w / "ct.nii").read_bytes())
    nii[3] = 0x1A  # header size field broken (ITK reads on by the magic, unchecked)
    nii[80:84] = struct.pack("<f", float("nan"))  # ... so a NaN spacing became 1 mm
    (w / "sizeof_hdr.nii").write_bytes(bytes(nii))
    nii = bytearray((w / "ct.nii").read_bytes())
    nii[70:74] = struct.pack("<2h", 32, 64)  # complex64 voxels (found by the fuzzer)
    (w / "complex.nii").write_bytes(bytes(nii) + bytes(3 * (len(nii) - 352)))  # 4x int16
    nii = bytearray((w / "ct.nii").read_bytes())
    nii[42:44] = struct.pack("<h", -119)  # a negative size (ITK read on for seconds)
    (w / "negative_dim.nii").write_bytes(bytes(nii))
    mha = (w / "ct.mha").read_bytes().replace(b"NDims = 3", b"NDims = 3.2e158", 1)
    (w / "no_data_line.mha").write_bytes(mha.replace(b"ElementDataFile", b"ElementDataFiles", 1))
    mha = (w / "ct.mha").read_bytes().replace(b"NDims = 3", b"NDims = 100000", 1)
    (w / "ndims_huge.mha").write_bytes(mha)
    (w / "result_and_notes").mkdir()
    (w / "result_and_notes" / "run.json").write_text("{}")
    (w / "result_and_notes" / "notes.txt").write_text("mine")
    # checkpoints
    model = save_checkpoint(init_checkpoint("tiny"), w / "model.safetensors")
    _cut(model, w / "model_cut.safetensors", 0.4)
    (w / "ckpt_folder").mkdir()

    def huge(h):
        meta = json.loads(h["__metadata__"]["meta"])
        meta["model"]["model_channels"] = 10**7
        h["__metadata__"]["meta"] = json.dumps(meta)
        return h

    def other_shapes(h):
        meta = json.loads(h["__metadata__"]["meta"])
        meta["model"]["model_channels"] = 2 * meta["model"]["model_channels"]
        h["__metadata__"]["meta"] = json.dumps(meta)
        return h

    _forged_checkpoint(model, w / "model_huge.safetensors", huge)
    _forged_checkpoint(model, w / "model_shapes.safetensors", other_shapes)
    _forged_checkpoint(model, w / "model_list.safetensors", lambda h: [1, 2, 3])
    (w / "model_badlen.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    nested = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (w / "model_nested.safetensors").write_bytes(struct.pack("<Q", len(nested)) + nested)

    def grid_far(h):
        meta = json.loads(h["__metadata__"]["meta"])
        meta["input_grid"]["spacing_mm"] = 1e6
        h["__metadata__"]["meta"] = json.dumps(meta)
        return h

    _forged_checkpoint(model, w / "model_grid_1e6.safetensors", grid_far)
    # paths the file system itself objects to
    os.mkfifo(w / "pipe.nii.gz")
    os.mkfifo(w / "model_fifo.safetensors")
    (w / "loop_a.nii.gz").symlink_to(w / "loop_b.nii.gz")
    (w / "loop_b.nii.gz").symlink_to(w / "loop_a.nii.gz")
    shutil.copy(w / "ct.nrrd", w / os.fsdecode(b"ct_\xff.nrrd"))  # a name that is not UTF-8
    # outputs
    (w / "a_file").write_text("x")
    (w / "mine").mkdir()
    (w / "mine" / "notes.txt").write_text("the user's own file")
    (w / "link_to_mine").symlink_to(w / "mine")
    # prepare, train, evaluate
    (w / "cases.csv").write_text("image,mask\nct.nrrd,liver.nrrd\n")
    (w / "labels.csv").write_text("ct,liver,liver_label\nct.nrrd,totalseg.nrrd,five\n")
    assert main(["prepare", "--layout", "synthetic", "--synthetic-cases", "2",
                 "--synthetic-lesions", "--out", str(w / "store"),
                 "--grid-size", "32", "--grid-spacing", "9"]) == 0  # fmt: skip
    (w / "report_bad" / "scores").mkdir(parents=True)
    (w / "report_bad" / "results.json").write_text('{"methods": {}}')
    (w / "report_bad" / "scores" / "darkness.npz").write_bytes(b"PK\x03\x04 cut short")
    (w / "run").mkdir()
    (w / "run" / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    return w


def _detect(ct="ct.nrrd", liver="liver.nrrd", ckpt="model.safetensors", out="out", *extra):
    return ["detect", "--ct", ct, "--liver", liver, "--checkpoint", ckpt, "--out", out,
            "--device", "cpu", "--progress", "none", "--steps", "2", "--jump-length", "1",
            "--jump-n-sample", "1", *extra]  # fmt: skip


#: (id, command line relative to the fixture folder, message the one error line holds)
CASES = [
    # --- files that are not complete or not images
    ("nii.gz cut short", _detect("ct_cut.nii.gz"), "is incomplete"),
    ("nii cut short", _detect("ct_cut.nii"), "is incomplete"),
    ("gzip nrrd cut short", _detect("ct_gz_cut.nrrd"), "is incomplete"),
    ("raw nrrd cut short", _detect("ct_cut.nrrd"), "is incomplete"),
    ("mha cut short", _detect("ct_cut.mha"), "is incomplete"),
    ("zlib mha cut short", _detect("ct_z_cut.mha"), "is incomplete"),
    ("detached data missing", _detect("detached.nhdr"), "data file"),
    ("empty file", _detect("empty.nii.gz"), "CT"),
    ("text named nii.gz", _detect("text.nii.gz"), "cannot read CT"),
    ("broken nrrd header", _detect("garbage.nrrd"), "CT"),
    ("NIfTI offset NaN", _detect("offset_nan.nii"), "header is inconsistent"),
    ("NIfTI float of 8 bits", _detect("float_bits.nii"), "header is inconsistent"),
    ("NIfTI header size field", _detect("sizeof_hdr.nii"), "header size field"),
    ("NIfTI complex voxels", _detect("complex.nii"), "complex voxels"),
    ("NIfTI negative size", _detect("negative_dim.nii"), "header is inconsistent"),
    ("MetaImage without ElementDataFile", _detect("no_data_line.mha"), "no ElementDataFile"),
    ("MetaImage NDims 100000", _detect("ndims_huge.mha"), "header is inconsistent"),
    ("CT missing", _detect("missing.nrrd"), "CT not found"),
    ("liver missing", _detect(liver="missing.nrrd"), "liver mask not found"),
    ("liver cut short", _detect(liver="ct_cut.nii.gz"), "is incomplete"),
    ("not a DICOM folder", _detect("not_dicom"), "holds no DICOM series"),
    # --- geometry
    ("spacing 1e-6 mm", _detect("spacing_tiny.nrrd"), "voxel spacing 1e-06"),
    ("spacing 1e6 mm", _detect("spacing_huge.nrrd"), "voxel spacing 1e+06"),
    ("sheared direction", _detect("sheared.nrrd"), "not orthonormal"),
    ("liver metres long", _detect("ct_coarse.nrrd", "liver_coarse.nrrd"), "more than any liver"),
    ("2-D image", _detect("slice2d.nrrd"), "is 2-D"),
    ("4-D image", _detect("four_d.nii.gz"), "is 4-D"),
    ("vector image", _detect("vector.nrrd"), "components per voxel"),
    # --- values
    ("NaN in the liver", _detect("nan_in_liver.nii.gz"), "NaN or infinite"),
    ("Inf in the liver", _detect("inf_in_liver.nii.gz"), "NaN or infinite"),
    ("raw counts, not HU", _detect("raw_counts.nrrd"), "does not look like HU"),
    ("empty liver", _detect(liver="liver_empty.nrrd"), "contains no liver voxels"),
    ("liver elsewhere", _detect(liver="liver_far.nrrd"), "does not overlap the CT"),
    ("label map without label", _detect(liver="totalseg.nrrd"), "choose the liver label"),
    (
        "absent label",
        _detect("ct.nrrd", "totalseg.nrrd", "model.safetensors", "out", "--liver-label", "77"),
        "no voxel with label 77",
    ),  # fmt: skip
    # --- checkpoints
    ("checkpoint missing", _detect(ckpt="none.safetensors"), "checkpoint not found"),
    ("checkpoint is a folder", _detect(ckpt="ckpt_folder"), "is a folder"),
    ("checkpoint cut short", _detect(ckpt="model_cut.safetensors"), "corrupt"),
    ("image as checkpoint", _detect(ckpt="ct.nrrd"), "not a GDPI checkpoint"),
    ("oversized model config", _detect(ckpt="model_huge.safetensors"), "out of range"),
    ("config vs weights", _detect(ckpt="model_shapes.safetensors"), "do not match"),
    ("header not an object", _detect(ckpt="model_list.safetensors"), "not a GDPI checkpoint"),
    ("header length absurd", _detect(ckpt="model_badlen.safetensors"), "not a GDPI checkpoint"),
    ("header nested 1e5 deep", _detect(ckpt="model_nested.safetensors"), "not a GDPI checkpoint"),
    ("grid spacing 1e6 mm", _detect(ckpt="model_grid_1e6.safetensors"), "0.1..20 mm"),
    # --- paths the file system objects to (before: a hang, a traceback or an abort)
    ("CT is a named pipe", _detect("pipe.nii.gz"), "neither a file nor a folder"),
    ("checkpoint is a named pipe", _detect(ckpt="model_fifo.safetensors"), "not a regular file"),
    ("CT given as the mask", _detect("ct.nrrd", "ct.nrrd"), "was the CT given as the mask"),
    (
        "stream dir inside out",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--stream-dir", "out/s"),
        "is inside --out",
    ),  # fmt: skip
    ("symbolic link loop", _detect("loop_a.nii.gz"), "Too many levels of symbolic links"),
    ("CT name too long", _detect("c" * 300 + ".nrrd"), "File name too long"),
    ("out name too long", _detect(out="o" * 300 + ".d"), "File name too long"),
    ("CT name not UTF-8", _detect(os.fsdecode(b"ct_\xff.nrrd")), "not UTF-8"),
    ("out name not UTF-8", _detect(out=os.fsdecode(b"out_\xfe.d")), "not UTF-8"),
    # --- output folders
    ("out is a file", _detect(out="a_file"), "not a folder"),
    ("out under a file", _detect(out="a_file/sub"), "not writable"),
    ("out holds user files", _detect(out="mine"), "exists and is not empty"),
    (
        "overwrite non-result",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "mine", "--overwrite"),
        "not an earlier result",
    ),  # fmt: skip
    ("symlink to user files", _detect(out="link_to_mine"), "exists and is not empty"),
    (
        "overwrite result + notes",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "result_and_notes", "--overwrite"),
        "notes.txt is not part of one",
    ),  # fmt: skip
    # --- options
    (
        "steps -5",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--steps", "-5"),
        "steps must be in 1..1000, got -5",
    ),  # fmt: skip
    (
        "jump length 0",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--jump-length", "0"),
        "jump length must be in",
    ),  # fmt: skip
    (
        "batch size 0",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--batch-size", "0"),
        "batch size must be in 1..512",
    ),  # fmt: skip
    (
        "threshold nan",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--threshold", "nan"),
        "threshold must be a finite",
    ),  # fmt: skip
    (
        "seed -1",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--seed=-1"),
        "seed must be in 0..",
    ),  # fmt: skip
    (
        "seed 1e20",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--seed", "10" * 10),
        "seed must be in 0..",
    ),  # fmt: skip
    (
        "steps not a number",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--steps", "many"),
        "invalid int value",
    ),  # fmt: skip
    (
        "unknown preset",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--preset", "slow"),
        "invalid choice",
    ),  # fmt: skip
    (
        "unknown option",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--colour", "red"),
        "unrecognized arguments",
    ),  # fmt: skip
    (
        "missing --ct",
        ["detect", "--liver", "liver.nrrd", "--checkpoint", "model.safetensors", "--out", "out"],
        "required",
    ),  # fmt: skip
    (
        "device tpu",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--device", "tpu"),
        "unknown device",
    ),  # fmt: skip
    (
        "device cuda:7",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--device", "cuda:7"),
        "cuda:7",
    ),
    (
        "steps 5000",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--steps", "5000"),
        "steps must be in 1..1000",
    ),
    (
        "jump longer than steps",
        _detect(
            "ct.nrrd",
            "liver.nrrd",
            "model.safetensors",
            "out",
            "--steps",
            "5",
            "--jump-length",
            "9",
        ),
        "jump length must be in 1..steps",
    ),
    (
        "offset -5 HU",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--offset-hu", "-5"),
        "offset must be in 0..500 HU",
    ),
    (
        "median 99 px",
        _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", "--median-size", "99"),
        "median filter size",
    ),
    # --- prepare
    (
        "prepare: CSV missing",
        ["prepare", "--layout", "list", "--input", "missing.csv", "--out", "store2"],
        "not found",
    ),  # fmt: skip
    (
        "prepare: CSV columns",
        ["prepare", "--layout", "list", "--input", "cases.csv", "--out", "store2"],
        "needs the columns ct and liver",
    ),  # fmt: skip
    (
        "prepare: CSV label",
        ["prepare", "--layout", "list", "--input", "labels.csv", "--out", "store2"],
        "must be integers",
    ),  # fmt: skip
    (
        "prepare: folder is a file",
        ["prepare", "--layout", "lits", "--input", "ct.nrrd", "--out", "store2"],
        "must be a folder",
    ),  # fmt: skip
    (
        "prepare: out not empty",
        ["prepare", "--layout", "synthetic", "--synthetic-cases", "1", "--out", "store"],
        "not empty",
    ),  # fmt: skip
    (
        "prepare: no input",
        ["prepare", "--layout", "lits", "--out", "store2"],
        "--input is required",
    ),
    # --- train
    ("train: no store", ["train", "--data", "nostore", "--out", "run2", "--steps", "1"], "nostore"),
    (
        "train: damaged state",
        [
            "train",
            "--data",
            "store",
            "--out",
            "run",
            "--size",
            "micro",
            "--steps",
            "1",
            "--no-progress",
        ],
        "is damaged",
    ),  # fmt: skip
    (
        "train: steps 0",
        ["train", "--data", "store", "--out", "run2", "--steps", "0"],
        "must be >= 1",
    ),
    # --- evaluate
    (
        "evaluate: unknown method",
        ["evaluate", "--data", "store", "--out", "ev", "--method", "magic"],
        "unknown method",
    ),  # fmt: skip
    (
        "evaluate: baseline needs file",
        ["evaluate", "--data", "store", "--out", "ev", "--method", "ae"],
        "needs a checkpoint",
    ),  # fmt: skip
    (
        "evaluate: out not empty",
        ["evaluate", "--data", "store", "--out", "mine", "--method", "darkness"],
        "not empty",
    ),  # fmt: skip
    (
        "evaluate: bank level",
        ["evaluate", "--data", "store", "--out", "ev", "--method", "darkness", "--bank-level", "2"],
        "--bank-level",
    ),  # fmt: skip
    (
        "evaluate: reuse without results",
        ["evaluate", "--data", "store", "--out", "ev", "--method", "darkness", "--reuse", "mine"],
        "is not a gdpi evaluate report",
    ),  # fmt: skip
    (
        "evaluate: reuse damaged scores",
        [
            "evaluate",
            "--data",
            "store",
            "--out",
            "ev",
            "--method",
            "darkness",
            "--reuse",
            "report_bad",
            "--abnormal-split",
            "val",
            "--healthy-split",
            "val",
        ],
        "no usable darkness results",
    ),  # fmt: skip
    (
        "evaluate: no store",
        ["evaluate", "--data", "nostore", "--out", "ev", "--method", "darkness"],
        "nostore",
    ),  # fmt: skip
    # --- synth-tumours
    (
        "synth: CT cut short",
        ["synth-tumours", "--ct", "ct_cut.nii.gz", "--seg", "liver.nrrd", "--out", "syn"],
        "is incomplete",
    ),  # fmt: skip
    (
        "synth: out not empty",
        ["synth-tumours", "--ct", "ct.nrrd", "--seg", "liver.nrrd", "--out", "mine"],
        "not empty",
    ),  # fmt: skip
]


def _resolve(world: Path, argv: list[str]) -> list[str]:
    """Relative file arguments -> paths inside the fixture folder."""
    out = []
    for arg in argv:
        candidate = world / arg
        looks_like_path = not arg.startswith("-") and (
            "." in arg
            or "/" in arg
            or candidate.exists()
            or arg in ("out", "ev", "syn", "run", "run2", "store2", "nostore", "report_bad")
        )
        out.append(str(candidate) if looks_like_path else arg)  # fmt: skip
    return out


def test_at_least_fifty_classes():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_cleanly(world, capsys, argv, message):
    before = tree_snapshot(world)
    code = main(_resolve(world, argv))  # an escaping exception fails the test: no traceback
    one_error_line(code, capsys.readouterr(), message)
    assert tree_snapshot(world) == before  # nothing written, inputs byte-identical, no temp


# ---- as a user who cannot read or write everywhere (root's bypass dropped) ------------


def _unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if os.environ.get("CI"):
            pytest.fail("setpriv (util-linux) is missing on CI")
        pytest.skip("setpriv not available")
    prefix = (
        [setpriv, "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    )
    return subprocess.run(
        [*prefix, sys.executable, "-m", "GDPILiverAnomalyLib", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_unreadable_ct_and_read_only_output_folder(world, tmp_path):
    locked = tmp_path / "locked.nrrd"
    shutil.copy(world / "ct.nrrd", locked)
    locked.chmod(0)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        result = _unprivileged(
            [a if a != "out" else str(tmp_path / "out") for a in
             _resolve(world, _detect(str(locked)))]
        )  # fmt: skip
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "cannot read CT" in result.stderr and "Permission denied" in result.stderr
        result = _unprivileged(
            [a if a != str(world / "out") else str(readonly / "out")
             for a in _resolve(world, _detect())]
        )  # fmt: skip
        assert result.returncode == 2 and "not writable" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
        assert list(readonly.iterdir()) == [] and not (tmp_path / "out").exists()
    finally:
        readonly.chmod(0o755)


# ---- signals ----------------------------------------------------------------------------


def _gdpi(world: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = _resolve(world, _detect("ct.nrrd", "liver.nrrd", "model.safetensors", "out", *extra))
    argv = [str(out) if a == str(world / "out") else a for a in argv]
    argv[argv.index("--progress") + 1] = "json"
    return subprocess.Popen(
        [sys.executable, "-m", "GDPILiverAnomalyLib", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_signal_during_start_up_is_a_clean_cancel(world, tmp_path):
    """SIGTERM while torch is still being imported: exit 130 with the message, no output."""
    proc = _gdpi(world, tmp_path / "out")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "gdpi: cancelled" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_second_signal_ends_the_run_at_once(world, tmp_path):
    proc = _gdpi(world, tmp_path / "out", "--steps", "400", "--jump-length", "10",
                 "--jump-n-sample", "5")  # fmt: skip
    for line in proc.stdout:
        if json.loads(line).get("event") == "progress":
            break
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5
    assert proc.returncode in (130, -signal.SIGTERM)  # cooperative if the first got there
    assert list(tmp_path.iterdir()) == []


def test_a_cancel_while_outputs_are_written_moves_nothing_into_place(world, tmp_path):
    """The last cancellation check runs after every output file is written into the
    temporary folder and before it becomes --out: a signal there leaves nothing."""
    from GDPILiverAnomalyLib.errors import Cancelled
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.method.parameters import DetectionParams
    from GDPILiverAnomalyLib.running.runner import run_case

    finished = {"network": False, "checks_after": 0}

    def progress(p):
        finished["network"] = p.nfe_done == p.nfe_total and p.slices_done == p.slices_total

    def should_cancel() -> bool:
        if not finished["network"]:
            return False
        finished["checks_after"] += 1
        return finished["checks_after"] >= 2  # 1: end of the network loop, 2: before the move

    params = DetectionParams.from_preset(
        "fast", steps=2, jump_length=1, jump_n_sample=1, device="cpu"
    )
    with pytest.raises(Cancelled):
        run_case(world / "ct.nrrd", world / "liver.nrrd", load_checkpoint(world / "model.safetensors"),
                 params, tmp_path / "out", progress=progress, should_cancel=should_cancel)  # fmt: skip
    assert finished["checks_after"] == 2
    assert list(tmp_path.iterdir()) == []  # no --out, no temporary folder


def test_non_hu_override_processes_the_ct(world, capsys, tmp_path):
    argv = _resolve(
        world,
        _detect("raw_counts.nrrd", "liver.nrrd", "model.safetensors", "out", "--allow-non-hu"),
    )
    argv[argv.index("--out") + 1] = str(tmp_path / "o")
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "run.json").exists()


def test_a_successful_run_leaves_the_inputs_byte_identical(world, capsys, tmp_path):
    before = tree_snapshot(world)
    argv = _resolve(world, _detect())
    argv[argv.index("--out") + 1] = str(tmp_path / "o")
    assert main(argv) == 0, capsys.readouterr().err
    assert tree_snapshot(world) == before and (tmp_path / "o" / "score.nrrd").exists()
