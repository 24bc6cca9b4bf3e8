"""A radiologist's result is never silently wrong (issue 21), on real MRML (``slicer-core``).

Every detection here runs the real worker subprocess with a tiny random checkpoint and
a short schedule on a real CT of ``../shared/data``: a tumour segment is part of the
liver mask, a result is shown over its own CT, outputs are never offered as inputs, and
liver the model could not see is reported in plain words.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from conftest import shared  # noqa: E402
from GDPILiverAnomalyLib.slicer_side.display import (  # noqa: E402
    INPUT_VOLUME_REFERENCE,
    RESULT_ROLE_ATTRIBUTE,
    defaultCtNode,
    resultVolumeIds,
    sliceCompositeNodes,
)
from GDPILiverAnomalyLib.slicer_side.job import (  # noqa: E402
    completionMessage,
    coverageWarning,
    formatRunDetails,
)
from GDPILiverAnomalyLib.slicer_side.logic import DetectionLogic  # noqa: E402
from GDPILiverAnomalyLib.slicer_side.settings import DetectionSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(preset="custom", steps=4, jump_length=2, jump_n_sample=1, device="cpu")


def _read(scene, path: Path, class_name: str, name: str):
    node = scene.AddNewNodeByClass(class_name, name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _scene():
    scene = slicer.vtkMRMLScene()
    for name in ("Red", "Yellow", "Green"):
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        scene.AddNewNodeByClass("vtkMRMLSliceNode").SetLayoutName(name)
    return scene


def _segmentation_from_labels(scene, reference, labels: np.ndarray, names: dict[int, str]):
    """A segmentation with one segment per label value (named ``names[value]``), made
    the way Slicer imports a labelmap; returns it and ``{name: segment id}``."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labelmap.CopyOrientation(reference)
    slicer.util.updateVolumeFromArray(labelmap, labels.astype(np.int16))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap, segmentation
    )
    scene.RemoveNode(labelmap)
    seg = segmentation.GetSegmentation()
    ids = {}
    for index in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(index)
        segment.SetName(names[segment.GetLabelValue()])
        ids[segment.GetName()] = seg.GetNthSegmentID(index)
    return segmentation, ids


@pytest.fixture(scope="module")
def hcc(tiny_checkpoint, tmp_path_factory):
    """hcc_1720 (two HCCs) twice in one scene: as its LiTS-style label map (1 liver,
    2 tumour) and as a segmentation with separate 'Liver' and 'Tumor' segments (the
    layout of TotalSegmentator's liver + lesion tasks or a LiTS import), each detected
    with the same settings; a second CT sits in the same scene."""
    scene = _scene()
    ct = _read(scene, shared("hcc_1720", "ct.nii.gz"), "vtkMRMLScalarVolumeNode", "hcc CT")
    labelmap = _read(
        scene, shared("hcc_1720", "seg.nii.gz"), "vtkMRMLLabelMapVolumeNode", "hcc labels"
    )
    labels = slicer.util.arrayFromVolume(labelmap)
    segmentation, ids = _segmentation_from_labels(scene, labelmap, labels, {1: "Liver", 2: "Tumor"})
    other = _read(scene, shared("ts_small", "ct.nii.gz"), "vtkMRMLScalarVolumeNode", "other CT")
    added: list[tuple[str, str | None]] = []

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def on_added(caller, event, node):
        added.append((node.GetName(), node.GetAttribute(RESULT_ROLE_ATTRIBUTE)))

    scene.AddObserver(scene.NodeAddedEvent, on_added)
    logic = DetectionLogic(scene, tempRoot=str(tmp_path_factory.mktemp("temp")))
    settings = DetectionSettings(checkpoint=str(tiny_checkpoint), threshold_hu=5.0, **QUICK)
    from_labels = logic.process(ct, labelmap, labelValue=0, settings=settings)
    log: list[str] = []
    from_segments = logic.process(
        ct, segmentation, ids["Liver"], settings=settings,
        onEvent=lambda e: log.append(e.get("message", "")) if e["event"] == "log" else None,
    )  # fmt: skip
    return dict(
        scene=scene, ct=ct, other=other, labels=labels, segmentation=segmentation, ids=ids,
        logic=logic, from_labels=from_labels, from_segments=from_segments, added=added,
        log=log,
    )  # fmt: skip


def test_a_tumour_segment_is_part_of_the_liver_mask(hcc):
    """Given the 'Liver' segment of a segmentation that also holds a 'Tumor' segment,
    the detection's mask is their union: the same score volume as the LiTS label map
    (before: only 'Liver' was exported and the tumours scored 0)."""
    labels = hcc["labels"]
    from_labels = slicer.util.arrayFromVolume(hcc["from_labels"].scoreVolume)
    from_segments = slicer.util.arrayFromVolume(hcc["from_segments"].scoreVolume)
    assert np.abs(from_segments[labels == 2]).max() > 0, "the tumours were not analysed"
    np.testing.assert_array_equal(from_segments, from_labels)
    assert "Liver region: segments Liver, Tumor" in hcc["log"]


def test_the_liver_region_is_the_liver_and_the_lesion_segments_with_it(hcc):
    """Which segments join the liver: lesion names (any case) touching it and unnamed
    segments inside it; not a cyst of another organ, not an organ beside the liver. A
    list of IDs is taken as it is (the user's ticks)."""
    scene, logic = hcc["scene"], hcc["logic"]
    labels = np.zeros((12, 40, 40), np.int16)
    labels[2:10, 5:30, 5:30] = 1  # liver
    labels[4:8, 12:18, 12:18] = 2  # enclosed by liver, unnamed
    labels[4:8, 5:9, 30:34] = 3  # touching the liver, named as a lesion
    labels[4:8, 35:39, 35:39] = 4  # named as a cyst, away from the liver
    labels[4:8, 30:36, 10:20] = 5  # an organ touching the liver
    labels[2:10, 20:26, 20:26] = 6  # METASTASIS, overlapping the liver segment
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "grid")
    slicer.util.updateVolumeFromArray(reference, np.zeros(labels.shape, np.int16))
    names = {1: "liver", 2: "Segment_2", 3: "Lesion 1", 4: "kidney_cyst_left",
             5: "gallbladder", 6: "METASTASIS"}  # fmt: skip
    segmentation, ids = _segmentation_from_labels(scene, reference, labels, names)
    region = logic.liverRegionSegmentIds(segmentation, ids["liver"], reference)
    assert region == [ids[n] for n in ("liver", "Segment_2", "Lesion 1", "METASTASIS")]
    assert logic.liverRegionSegmentIds(segmentation, ids["liver"]) == region  # own grid
    # the mask written for the worker: exactly the union of the chosen segments
    ticked = [ids["liver"], ids["gallbladder"]]
    assert logic.inputProblem(reference, segmentation, ticked) is None
    assert "no segment" in logic.inputProblem(reference, segmentation, ["nope"])
    assert "Select the liver segment" in logic.inputProblem(reference, segmentation, [])
    folder = Path(logic.tempRoot) / "region"
    folder.mkdir()
    args = logic._writeInputs(folder, reference, segmentation, ticked, 0)
    assert args[-2:] == ["--liver-label", "1"]
    import SimpleITK as sitk

    written = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "liver.nrrd")))
    np.testing.assert_array_equal(written, np.isin(labels, (1, 5)).astype(written.dtype))
    scene.RemoveNode(segmentation)
    scene.RemoveNode(reference)


def test_a_result_is_shown_over_the_ct_it_was_computed_from(hcc):
    """With two CTs in the scene and the other one in the views (and selected in the
    panel), choosing an earlier result switches the background to its own CT; a result
    whose CT is gone is shown without a background, never over another CT."""
    scene, logic, ct, other = hcc["scene"], hcc["logic"], hcc["ct"], hcc["other"]
    score = hcc["from_segments"].scoreVolume
    logic.showInSliceViews(other, hcc["from_labels"].scoreVolume)  # the other CT is shown
    assert logic.showResult(score, 0.4) is ct
    for composite in sliceCompositeNodes(scene):
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert composite.GetForegroundVolumeID() == score.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    orphan = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "orphan score")
    orphan.SetAttribute(RESULT_ROLE_ATTRIBUTE, "score")
    logic.showInSliceViews(other, score)
    assert logic.showResult(orphan) is None
    for composite in sliceCompositeNodes(scene):
        assert composite.GetBackgroundVolumeID() is None
        assert composite.GetForegroundVolumeID() == orphan.GetID()
    scene.RemoveNode(orphan)
    assert score.GetNodeReference(INPUT_VOLUME_REFERENCE) is ct


def test_outputs_are_marked_before_they_enter_the_scene_and_never_offered_as_ct(hcc):
    """The CT selector hides what resultVolumeIds lists; every score and pseudo-healthy
    volume carries its role when the scene announces it (the selector's filter is
    updated on NodeAddedEvent)."""
    scene = hcc["scene"]
    roles = {name: role for name, role in hcc["added"] if name.startswith("hcc CT ")}
    assert roles == {
        "hcc CT GDPI score": "score",
        "hcc CT pseudo-healthy": "pseudo-healthy",
        "hcc CT GDPI lesions": "lesions",
    }
    outputs = [hcc[k] for k in ("from_labels", "from_segments")]
    expected = {n.GetID() for o in outputs for n in (o.scoreVolume, o.pseudoHealthyVolume)}
    assert set(resultVolumeIds(scene)) == expected
    assert hcc["ct"].GetID() not in resultVolumeIds(scene)
    assert defaultCtNode(scene) is hcc["ct"]


def test_liver_outside_the_model_grid_is_reported_in_plain_words(tmp_path, monkeypatch):
    """A model whose field of view (64 px at 1.5 mm = 96 mm) is smaller than the liver:
    sliding windows cover the whole liver, and the panel says so; a result where liver
    was left outside (run.json of an earlier version) gets a status line and log saying
    how much of the liver (percent and mL) was not analysed. While it runs, a
    streamed heatmap file that cannot be opened yet (Windows: still held by the worker
    or a virus scanner; simulated, Linux has no such lock) is read again at the next
    poll instead of being dropped."""
    pytest.importorskip("torch")
    from GDPILiverAnomalyLib.files.checkpoint import init_checkpoint, save_checkpoint
    from GDPILiverAnomalyLib.method.grid import InputGrid
    from GDPILiverAnomalyLib.slicer_side import job as job_module

    checkpoint = save_checkpoint(
        init_checkpoint("tiny", seed=0, grid=InputGrid(64, 1.5)), tmp_path / "narrow.safetensors"
    )
    scene = _scene()
    ct = _read(scene, shared("ts_small", "ct.nii.gz"), "vtkMRMLScalarVolumeNode", "CT")
    totalseg = _read(
        scene, shared("ts_small", "totalseg.nii.gz"), "vtkMRMLLabelMapVolumeNode", "totalseg"
    )
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    logic.streamEvery = 0.0  # a heatmap file after every batch but the last
    reads: list[tuple[str, bool]] = []

    def held_open_once(path):
        if not reads:
            reads.append((str(path), False))
            raise PermissionError(13, "used by another process", str(path))
        reads.append((str(path), True))
        return np.load(path)

    monkeypatch.setattr(job_module, "loadPartial", held_open_once)
    settings = DetectionSettings(
        checkpoint=str(checkpoint), preset="custom", steps=4, jump_length=2, jump_n_sample=1,
        device="cpu",
    )  # fmt: skip
    job = logic.process(ct, totalseg, labelValue=5, settings=settings, wait=False)
    outputs = job.wait(pollInterval=0.05)
    assert reads[0][1] is False and reads[1] == (reads[0][0], True), reads
    info = outputs.runInfo
    assert info["stats"]["liver_outside_grid_voxels"] == 0 < info["stats"]["windows"]["windows"] - 1
    assert coverageWarning(info) is None and "Not analysed" not in job.message
    assert "Liver analysed: all of it" in formatRunDetails(info)
    outside = 1234  # what an earlier version, without sliding windows, recorded
    info = dict(info, stats=dict(info["stats"], liver_outside_grid_voxels=outside))
    percent = 100 * outside / info["inputs"]["liver_voxels"]
    ml = outside * np.prod(info["inputs"]["geometry"]["spacing_mm"]) / 1000
    warning = coverageWarning(info)
    assert warning == (
        f"Not analysed: {percent:.1f} % of the liver ({ml:.0f} mL) lies outside the model's "
        "96 mm field of view; its score is 0 there, so a tumour in that part would not be shown."
    )
    assert completionMessage(info, 0, 20.0, 1.0).endswith(warning)
    assert warning in formatRunDetails(info).splitlines()
    # the run details the panel shows for this result
    details = logic.runDetails(outputs.scoreVolume)
    sha256 = info["checkpoint"]["sha256"]
    assert f"Model file: {checkpoint}" in details and f"sha256: {sha256}" in details
    assert "Preset: custom (from paper: steps 4 instead of 250" in details
    assert "Device: cpu" in details and f"torch {info['versions']['torch']}" in details
    assert f"started {info['started']}" in details
    # the contrast phase the automatic AME side came from, and why (issue 22)
    assert "Re-painted: darker tissue (contrast phase)" in details.splitlines()
    assert f"Contrast phase: non-contrast phase: {info['stats']['phase']['reason']}" in details
    full = dict(info, stats=dict(info["stats"], liver_outside_grid_voxels=0))
    assert coverageWarning(full) is None
    assert "Liver analysed: all of it" in formatRunDetails(full)


def test_a_streamed_heatmap_held_open_never_stops_the_worker(tmp_path, monkeypatch, capsys):
    """Windows refuses to delete a file another process holds open (the panel reading the
    previous partial-N.npy, a virus scanner): the worker keeps streaming and deletes it
    with a later file (the sharing violation is simulated: Linux has none)."""
    from GDPILiverAnomalyLib.running.progress import PartialWriter, Reporter

    refusals = {"partial-0001.npy": 2}
    unlink = Path.unlink

    def windows_unlink(self, missing_ok=False):
        if refusals.get(self.name):
            refusals[self.name] -= 1
            raise PermissionError(13, "used by another process", str(self))
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", windows_unlink)
    writer = PartialWriter(tmp_path / "stream", Reporter("json"))
    score = np.zeros((4, 5, 5), np.float32)
    kept = []
    for k in range(4):
        score[k] = k + 1
        writer(score)
        kept.append(sorted(p.name for p in (tmp_path / "stream").iterdir()))
    assert kept == [
        ["partial-0001.npy"],
        ["partial-0001.npy", "partial-0002.npy"],  # 0001 still open
        ["partial-0001.npy", "partial-0003.npy"],  # still open; 0002 deleted
        ["partial-0004.npy"],  # closed at last: deleted too
    ]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(e["path"]).name for e in events] == [f"partial-000{n}.npy" for n in (1, 2, 3, 4)]
    np.testing.assert_array_equal(np.load(events[-1]["path"]), score)


def test_run_details_name_the_preset_only_when_every_value_is_its_own():
    from GDPILiverAnomalyLib.method.parameters import DetectionParams
    from GDPILiverAnomalyLib.slicer_side.job import presetDescription

    fast = DetectionParams.from_preset("fast", device="cuda:0", threshold_hu=30).to_dict()
    assert presetDescription(fast) == "fast"  # run options are not part of a preset
    assert presetDescription(dict(fast, calibrate=False)) == (
        "custom (from fast: calibrate False instead of True)"
    )


def test_extension_index_entry_matches_the_cmakelists():
    """GDPILiverAnomaly.json is what Slicer/ExtensionsIndex takes (schema v1.0.1 fields
    only; build_dependencies == EXTENSION_DEPENDS; scm_url == EXTENSION_HOMEPAGE); the
    extension metadata is complete (screenshots: a marked placeholder until a real
    Slicer screenshot exists) and LICENSE is at the repository root."""
    entry = json.loads((REPO / "GDPILiverAnomaly.json").read_text())
    cmake = (REPO / "CMakeLists.txt").read_text()

    def cmake_set(name: str) -> str:
        return re.search(rf'set\({name} "([^"]*)"\)', cmake).group(1)

    schema_fields = {"$schema", "category", "scm_url", "scm_revision", "scm_type",
                     "build_dependencies", "build_subdirectory", "enabled", "tier"}  # fmt: skip
    assert set(entry) <= schema_fields
    assert entry["$schema"] == (
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
        "slicer-extension-catalog-entry-schema-v1.0.1.json#"
    )
    assert entry["build_dependencies"] == cmake_set("EXTENSION_DEPENDS").split()
    assert entry["category"] == cmake_set("EXTENSION_CATEGORY")
    assert entry["scm_url"] == cmake_set("EXTENSION_HOMEPAGE")
    assert entry["scm_revision"] and 1 <= entry["tier"] <= 5
    assert re.search(r"project\(GDPILiverAnomaly\)", cmake)
    for name in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL",
                 "SCREENSHOTURLS"):  # fmt: skip
        assert cmake_set(f"EXTENSION_{name}"), name
    icon = cmake_set("EXTENSION_ICONURL")
    assert icon.startswith("https://raw.githubusercontent.com/")
    assert (REPO / icon.split("/main/", 1)[1]).is_file()
    for url in cmake_set("EXTENSION_SCREENSHOTURLS").split():  # a real file, or marked
        assert (REPO / url.split("/main/", 1)[1]).is_file() or "PLACEHOLDER" in url, url
    assert (REPO / "LICENSE").is_file()
    assert b"\r" not in (REPO / "GDPILiverAnomaly.json").read_bytes()


def test_module_help_links_the_documentation_and_cites_the_paper():
    import ast

    source = (REPO / "GDPILiverAnomaly" / "GDPILiverAnomaly.py").read_text()
    tree = ast.parse(source)
    constants = {
        n.targets[0].id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign)
        and getattr(n.targets[0], "id", "") in ("HOMEPAGE", "PAPER_CITATION")
    }
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_HOMEPAGE "{constants["HOMEPAGE"]}")' in cmake
    assert 'DOCUMENTATION_URL = HOMEPAGE + "/blob/main/docs/slicer.md"' in source
    assert (REPO / "docs" / "slicer.md").is_file()
    assert "Y. Shi, C. Niu, A. L. Simpson, B. De Man, R. Do, G. Wang" in constants["PAPER_CITATION"]
    assert (
        "CT-based Anomaly Detection of Liver Tumors Using Generative Diffusion Prior"
        in (constants["PAPER_CITATION"])
    )
    assert "{DOCUMENTATION_URL}" in source and "{PAPER_CITATION}" in source
    acknowledgement = next(
        ast.literal_eval(n.value.args[0])
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "attr", "") == "acknowledgementText"
    )
    for text in ("HCC-TACE-Seg", "CC BY 4.0", "CHAOS", "CC BY-SA 4.0", "TotalSegmentator",
                 "dcmqi", "real-CT weights are shared under CC BY-SA 4.0"):  # fmt: skip
        assert text in acknowledgement, text


def test_the_panel_states_research_use_and_the_models_limits():
    pytest.importorskip("torch")
    from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
    from GDPILiverAnomalyLib.slicer_side.settings import RESEARCH_NOTICE

    grid = load_checkpoint(DetectionSettings().checkpointPath()).grid  # the bundled model
    assert f"{grid.size} x {grid.size} grid at {grid.spacing_mm:g} mm" in RESEARCH_NOTICE
    assert f"{grid.size * grid.spacing_mm:g} mm field of view" in RESEARCH_NOTICE
    assert "not a medical device" in RESEARCH_NOTICE and "six CT scans" in RESEARCH_NOTICE
    source = (REPO / "GDPILiverAnomaly" / "GDPILiverAnomaly.py").read_text()
    assert "self.ui.researchNoticeLabel.text = RESEARCH_NOTICE" in source
