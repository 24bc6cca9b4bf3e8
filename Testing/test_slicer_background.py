"""What keeps Slicer responsive and honest, on real MRML (``slicer-core``) and real
subprocesses: TotalSegmentator's liver made in the background (a stand-in program in
place of TotalSegmentator's, which needs its network weights: same command line, same
output folder), and the sample data's files.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from GDPILiverAnomalyLib.errors import GDPIError  # noqa: E402
from GDPILiverAnomalyLib.running.worker import group_members  # noqa: E402
from GDPILiverAnomalyLib.slicer_side.logic import DetectionLogic  # noqa: E402
from GDPILiverAnomalyLib.slicer_side.totalseg import totalSegmentatorCommand  # noqa: E402

#: Stands in for TotalSegmentator's program: records its arguments, prints on stdout and
#: (a progress bar) on stderr, writes ``<out>/liver.nii.gz`` on the input's grid: a box.
STAND_IN = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    import SimpleITK as sitk
    args = sys.argv[1:]
    with open(os.environ["STANDIN_ARGS"], "w") as f:
        json.dump({"args": args, "weights": os.environ.get("TOTALSEG_WEIGHTS_PATH")}, f)
    print("stand-in: started", flush=True)
    sys.stderr.write("Predicting: 50%\\r")
    sys.stderr.flush()
    time.sleep(float(os.environ.get("STANDIN_SLEEP", "0")))
    if os.environ.get("STANDIN_MODE") == "oom":
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB", flush=True)
        sys.exit(1)
    image = sitk.ReadImage(args[args.index("-i") + 1])
    mask = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    if os.environ.get("STANDIN_MODE") != "empty":
        mask[2:6, 4:12, 6:20] = 1
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(image)
    folder = args[args.index("-o") + 1]
    os.makedirs(folder, exist_ok=True)
    sitk.WriteImage(out, os.path.join(folder, "liver.nii.gz"))
    print("Saved in", folder, flush=True)
    """
)


@pytest.fixture()
def stand_in(tmp_path, monkeypatch) -> tuple[list[str], Path]:
    script = tmp_path / "TotalSegmentator"
    script.write_text(STAND_IN)
    record = tmp_path / "args.json"
    monkeypatch.setenv("STANDIN_ARGS", str(record))
    return [sys.executable, str(script)], record


def _ct_under_transform(scene):
    """An oblique 8 x 16 x 24 CT (HU) under a translation: what DICOM import of a
    series with irregular slice spacing gives."""
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)  # as in Slicer
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    values = np.full((8, 16, 24), 60, np.int16)
    slicer.util.updateVolumeFromArray(ct, values)
    ct.SetSpacing(0.8, 0.9, 2.5)
    ct.SetOrigin(-10.0, 20.0, 30.0)
    ct.SetIJKToRASDirections(0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "acquisition")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 12.5)
    matrix.SetElement(2, 3, -4.0)
    transform.SetMatrixTransformToParent(matrix)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    return ct


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_totalsegmentator_liver_only_under_the_cts_transform(tmp_path, stand_in):
    """The liver only, fast mode; the new segment lies where the CT is (same transform,
    same voxels), so Detect takes it without 'harden them first'; the program's stdout
    and stderr lines reach the log."""
    command, record = stand_in
    scene = slicer.vtkMRMLScene()
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    ct = _ct_under_transform(scene)
    lines = []
    segmentation, segment_id = logic.makeLiverSegmentation(
        ct, cpu=True, command=command, onEvent=lambda e: lines.append(e["message"])
    )
    args = json.loads(record.read_text())["args"]
    subset = args[args.index("--roi_subset") + 1 :]
    assert subset[0] == "liver" and subset[1].startswith("--"), args  # nothing else asked
    assert "--fast" in args and args[args.index("--device") + 1] == "cpu"
    assert segmentation.GetTransformNodeID() == ct.GetTransformNodeID() is not None
    assert logic.inputProblem(ct, segmentation, segment_id) is None
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "liver"
    expected = np.zeros((8, 16, 24), np.int32)
    expected[2:6, 4:12, 6:20] = 1
    np.testing.assert_array_equal(logic._segmentArray(segmentation, [segment_id], ct), expected)
    assert any("stand-in: started" in line for line in lines)
    assert any("Predicting: 50%" in line for line in lines)  # stderr, \r-terminated
    assert not logic._running
    assert not list(tmp_path.glob("GDPILiverAnomaly-TS-*"))  # temporary folder removed


def test_totalsegmentator_cancel_kills_it_and_leaves_the_scene(tmp_path, stand_in, monkeypatch):
    monkeypatch.setenv("STANDIN_SLEEP", "60")
    command, _ = stand_in
    scene = slicer.vtkMRMLScene()
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    ct = _ct_under_transform(scene)
    before = _node_ids(scene)
    job = logic.makeLiverSegmentation(ct, command=command, wait=False)
    deadline = time.monotonic() + 15
    while not any("started" in line for line in job.log) and time.monotonic() < deadline:
        assert job.poll()  # never blocks: the GUI timer's call
        time.sleep(0.05)
    pid = job.worker.pid
    assert group_members(pid)
    assert logic.cancelAll() == 1  # the panel's Cancel all / Slicer quitting
    assert job.state == "cancelled" and group_members(pid) == []
    assert _node_ids(scene) == before
    assert not job.folder.exists() and not logic._running


@pytest.mark.parametrize(
    ("mode", "message"),
    [("oom", "GPU ran out of memory: choose CPU"), ("empty", "found no liver in this CT")],
)
def test_totalsegmentator_failures_in_plain_words(tmp_path, stand_in, monkeypatch, mode, message):
    monkeypatch.setenv("STANDIN_MODE", mode)
    command, _ = stand_in
    scene = slicer.vtkMRMLScene()
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    ct = _ct_under_transform(scene)
    before = _node_ids(scene)
    with pytest.raises(GDPIError, match=message):
        logic.makeLiverSegmentation(ct, command=command)
    assert _node_ids(scene) == before and not logic._running


class _StandInTotalSegmentatorLogic:
    """Stands in for ``TotalSegmentator.TotalSegmentatorLogic`` (the extension needs a
    running Slicer): its installer writes the program where pip would, its weights
    folder is set."""

    def __init__(self, scripts: Path, program: str):
        self.scripts, self.program = scripts, program
        self.totalSegmentatorWeightsPath = str(scripts / "weights")
        self.installs = 0

    def setupPythonRequirements(self, upgrade=False):
        self.installs += 1
        (self.scripts / "TotalSegmentator").write_text(self.program)


def test_totalsegmentator_first_use_installs_then_runs_the_program(tmp_path, stand_in, monkeypatch):
    """The default command: PythonSlicer (here this Python) and the TotalSegmentator
    script of Slicer's Python scripts folder, installed by the extension on first use;
    its weights folder reaches the program."""
    import GDPILiverAnomalyLib.slicer_side.totalseg as totalseg

    command, record = stand_in
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    monkeypatch.setattr(totalseg.sysconfig, "get_path", lambda name: str(scripts))
    extension = _StandInTotalSegmentatorLogic(scripts, Path(command[1]).read_text())
    scene = slicer.vtkMRMLScene()
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    ct = _ct_under_transform(scene)
    segmentation, _ = logic.makeLiverSegmentation(ct, extension)
    assert extension.installs == 1 and segmentation.GetTransformNodeID() == ct.GetTransformNodeID()
    called = json.loads(record.read_text())
    assert called["weights"] == extension.totalSegmentatorWeightsPath
    assert called["args"][called["args"].index("--device") + 1] == "gpu"  # TS falls back to CPU
    logic.makeLiverSegmentation(ct, extension)  # installed now: not again
    assert extension.installs == 1


def test_totalsegmentator_missing_says_what_to_install(tmp_path, monkeypatch):
    """Without the extension (no program, no logic to install it): one sentence."""
    import GDPILiverAnomalyLib.slicer_side.totalseg as totalseg

    monkeypatch.setattr(totalseg.sysconfig, "get_path", lambda name: str(tmp_path))
    scene = slicer.vtkMRMLScene()
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    with pytest.raises(GDPIError, match="install the 'TotalSegmentator' extension"):
        logic.makeLiverSegmentation(_ct_under_transform(scene))
    assert totalSegmentatorCommand(str(tmp_path), "PythonSlicer.exe", "nt")[1].endswith(
        "TotalSegmentator.exe"
    )


# ---- the sample data: SampleData.downloadSample(...) from the console -----------------


def test_sample_files_load_through_file_uris_as_sampledata_does(tmp_path):
    """SampleData.downloadSample copies each source URI into its cache
    (``urllib.request.urlretrieve``), checks the SHA256 and loads the file by type; the
    module's sample is two shipped files: the demo's synthetic case (CT to 0.5 HU) and
    its liver segment."""
    from GDPILiverAnomalyLib.files.synthetic import synthetic_case
    from GDPILiverAnomalyLib.slicer_side import sample

    module_dir = Path(__file__).resolve().parents[1] / "GDPILiverAnomaly"
    source = sample.sampleDataSource(module_dir, None, "loadFileType")  # Slicer 5.6
    assert source["loadFileType"] == ["VolumeFile", "SegmentationFile"]
    source = sample.sampleDataSource(module_dir)
    assert source["sampleName"] == "GDPISyntheticLiverCT"
    assert len(source["uris"]) == len(source["fileNames"]) == len(source["checksums"]) == 2
    copies = []
    for uri, name, checksum in zip(
        source["uris"], source["fileNames"], source["checksums"], strict=True
    ):
        assert uri.startswith("file://")
        copy = tmp_path / name
        urllib.request.urlretrieve(uri, copy)  # what SampleDataLogic.downloadFile runs
        assert checksum == "SHA256:" + hashlib.sha256(copy.read_bytes()).hexdigest()
        copies.append(copy)
    scene = slicer.vtkMRMLScene()
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", source["nodeNames"][0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(copies[0]))
    assert storage.ReadData(ct)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", source["nodeNames"][1])
    seg_storage = slicer.vtkMRMLSegmentationStorageNode()
    seg_storage.SetFileName(str(copies[1]))
    assert seg_storage.ReadData(segmentation)
    case = synthetic_case(seed=sample.SEED)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(ct), case.ct, atol=0.5)
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    from GDPILiverAnomalyLib.slicer_side.display import liverSegmentId

    liver_id = liverSegmentId(segmentation)
    assert segmentation.GetSegmentation().GetSegment(liver_id).GetName() == "liver"
    liver = logic._segmentArray(segmentation, [liver_id], ct)
    np.testing.assert_array_equal(liver, case.liver)
    assert logic.inputProblem(ct, segmentation, liver_id) is None


def test_totalsegmentator_failure_advice():
    from GDPILiverAnomalyLib.slicer_side.totalseg import failureMessage

    cite = "If you use this tool please cite: https://pubs.rsna.org/doi/10.1148/ryai.230024"
    assert "Its last messages" in failureMessage(1, [cite, "KeyError: 'liver'"])
    offline = failureMessage(1, [cite, "requests.exceptions.ConnectionError: Max retries exceeded"])
    assert "internet connection" in offline
    assert "open the TotalSegmentator module" in failureMessage(
        1, ["ModuleNotFoundError: No module named 'nnunetv2'"]
    )
