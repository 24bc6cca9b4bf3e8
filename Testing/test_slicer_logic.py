"""The Slicer logic on real MRML (the ``slicer-core`` wheel: no Qt, no Slicer app).

Nodes are read by storage nodes from ``../shared/data``; detection runs in the real
worker subprocess with a tiny random checkpoint. Only the Qt panel is not exercised
here (it needs a running Slicer; see the module's self-test).
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from conftest import SAME_HU, assert_same_detection, shared  # noqa: E402
from GDPILiverAnomalyLib.errors import GDPIError  # noqa: E402
from GDPILiverAnomalyLib.running.worker import group_members  # noqa: E402
from GDPILiverAnomalyLib.slicer_side.display import LESION_COLUMNS, SCORE_WINDOW_HU  # noqa: E402
from GDPILiverAnomalyLib.slicer_side.logic import DetectionLogic  # noqa: E402
from GDPILiverAnomalyLib.slicer_side.settings import DetectionSettings  # noqa: E402

QUICK = dict(preset="custom", steps=10, jump_length=2, jump_n_sample=2, device="cpu")


def _read(scene, path: Path, class_name: str):
    node = scene.AddNewNodeByClass(class_name, path.parent.name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _digest(node) -> str:
    return hashlib.sha256(slicer.util.arrayFromVolume(node).tobytes()).hexdigest()


def _scene_state(scene) -> tuple:
    ids = tuple(sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())))
    layers = tuple(
        (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
        for c in (
            scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
        )
    )
    return ids, layers


@pytest.fixture(scope="module")
def hcc_scene():
    """hcc_1720 (two HCCs): CT, its LiTS-style labelmap (1 liver, 2 tumour) and a
    segmentation with a 'liver' segment (liver + tumour), as a radiologist would have."""
    scene = slicer.vtkMRMLScene()
    for name in ("Red", "Yellow", "Green"):
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        scene.AddNewNodeByClass("vtkMRMLSliceNode").SetLayoutName(name)
    ct = _read(scene, shared("hcc_1720", "ct.nii.gz"), "vtkMRMLScalarVolumeNode")
    labelmap = _read(scene, shared("hcc_1720", "seg.nii.gz"), "vtkMRMLLabelMapVolumeNode")
    whole = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "whole liver")
    whole.CopyOrientation(labelmap)
    slicer.util.updateVolumeFromArray(
        whole, (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    )
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "liver segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        whole, segmentation
    )
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    segmentation.GetSegmentation().GetSegment(segment_id).SetName("liver")
    scene.RemoveNode(whole)
    # the CT in a patient's study, as DICOM loading puts it
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    hierarchy.CreateItem(hierarchy.CreateStudyItem(patient, "study"), ct)
    return scene, ct, labelmap, segmentation, segment_id


@pytest.fixture(scope="module")
def labelmap_run(hcc_scene, tiny_checkpoint, tmp_path_factory):
    """One blocking detection from the labelmap (label 0 = liver + tumour)."""
    scene, ct, labelmap, _, _ = hcc_scene
    temp_root = tmp_path_factory.mktemp("temp")
    before = (_digest(ct), _matrix(ct), _digest(labelmap))
    logic = DetectionLogic(scene, tempRoot=str(temp_root))
    events: list[dict] = []
    settings = DetectionSettings(checkpoint=str(tiny_checkpoint), threshold_hu=5.0, **QUICK)
    outputs = logic.process(ct, labelmap, labelValue=0, settings=settings, onEvent=events.append)
    return logic, outputs, events, before, temp_root


def test_results_are_nodes_with_the_ct_geometry(hcc_scene, labelmap_run):
    scene, ct, labelmap, _, _ = hcc_scene
    logic, outputs, events, before, temp_root = labelmap_run
    score = slicer.util.arrayFromVolume(outputs.scoreVolume)
    pseudo = slicer.util.arrayFromVolume(outputs.pseudoHealthyVolume)
    ct_array = slicer.util.arrayFromVolume(ct)
    assert score.shape == pseudo.shape == ct_array.shape
    np.testing.assert_allclose(_matrix(outputs.scoreVolume), _matrix(ct), atol=1e-9)
    np.testing.assert_allclose(_matrix(outputs.pseudoHealthyVolume), _matrix(ct), atol=1e-9)
    liver = slicer.util.arrayFromVolume(labelmap) > 0
    assert np.all(score[~liver] == 0) and np.abs(score[liver]).max() > 0
    # pseudo-healthy = CT outside the liver, re-painted inside
    np.testing.assert_allclose(pseudo[~liver], ct_array[~liver], atol=1e-3)
    assert outputs.runInfo["parameters"]["steps"] == 10
    assert json_attribute(outputs.scoreVolume)["nfe"] == outputs.runInfo["nfe"]
    # inputs untouched, temporary folder gone
    assert (_digest(ct), _digest(labelmap)) == (before[0], before[2])
    np.testing.assert_array_equal(_matrix(ct), before[1])
    assert list(temp_root.iterdir()) == []


def json_attribute(node) -> dict:
    import json

    return json.loads(node.GetAttribute("GDPI.run"))


def test_progress_events_reach_the_caller(labelmap_run):
    _, outputs, events, _, _ = labelmap_run
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, "no progress event received"
    assert progress[-1]["nfe_done"] == progress[-1]["nfe_total"] == outputs.runInfo["nfe"]
    assert progress[-1]["slices_done"] == progress[-1]["slices_total"] > 0
    assert [e["event"] for e in events].count("done") == 1


def test_score_display_colour_window_threshold_and_layers(hcc_scene, labelmap_run):
    scene, ct, _, _, _ = hcc_scene
    logic, outputs, _, _, _ = labelmap_run
    display = outputs.scoreVolume.GetDisplayNode()
    colour = display.GetColorNode()
    assert colour.GetName() in ("Inferno", "GDPI Inferno") and colour.GetNumberOfColors() == 256
    # perceptual: luminance rises monotonically from black to pale yellow
    rgba = [colour.GetLookupTable().GetTableValue(i) for i in range(0, 256, 15)]
    luminance = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b, _ in rgba]
    assert all(b > a for a, b in zip(luminance, luminance[1:], strict=False))
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == SCORE_WINDOW_HU
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == 5.0
    logic.setDisplayThreshold(outputs.scoreVolume, 12.5)
    assert display.GetLowerThreshold() == 12.5
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert composite.GetForegroundVolumeID() == outputs.scoreVolume.GetID()
    logic.setOpacity(0.8)
    assert scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode").GetForegroundOpacity() == 0.8


def test_lesion_table_matches_the_score_and_centres_the_views(hcc_scene, labelmap_run):
    scene, ct, _, _, _ = hcc_scene
    logic, outputs, _, _, _ = labelmap_run
    table = outputs.lesionTable
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(
        LESION_COLUMNS
    )
    # the worker's lesions (LPS, from the NRRD) == the logic's recomputation (RAS, from MRML)
    recomputed = logic.lesionsAt(outputs.scoreVolume, 5.0)
    assert table.GetNumberOfRows() == len(recomputed) > 0
    for row, lesion in enumerate(recomputed):
        for column in LESION_COLUMNS:
            value = float(table.GetTable().GetColumnByName(column).GetValue(row))
            assert value == pytest.approx(lesion[column], abs=0.02), (row, column)
    # centroid inside the CT's RAS bounds; a click centres every slice view on it
    bounds = [0.0] * 6
    ct.GetRASBounds(bounds)
    ras = logic.jumpToLesion(table, 0)
    assert all(bounds[2 * a] - 1 <= ras[a] <= bounds[2 * a + 1] + 1 for a in range(3))
    slice_node = scene.GetNthNodeByClass(0, "vtkMRMLSliceNode")
    to_ras = slice_node.GetSliceToRAS()
    np.testing.assert_allclose([to_ras.GetElement(a, 3) for a in range(3)], ras, atol=1e-6)
    # a higher threshold finds fewer, smaller lesions
    higher = logic.lesionsAt(outputs.scoreVolume, 15.0)
    assert sum(x["volume_ml"] for x in higher) < sum(x["volume_ml"] for x in recomputed)
    logic.updateLesionTable(table, higher)
    assert table.GetNumberOfRows() == len(higher)
    logic.updateLesionTable(table, recomputed)


def test_segmentation_from_threshold(hcc_scene, labelmap_run):
    scene, _, _, _, _ = hcc_scene
    logic, outputs, _, _, _ = labelmap_run
    score = slicer.util.arrayFromVolume(outputs.scoreVolume)
    lesions = logic.lesionsAt(outputs.scoreVolume, 5.0)
    per_lesion = logic.createSegmentation(outputs.scoreVolume, 5.0, perLesion=True)
    segmentation = per_lesion.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(lesions)
    names = {segmentation.GetNthSegment(i).GetName() for i in range(len(lesions))}
    assert names == {f"Lesion {x['id']}" for x in lesions}
    single = logic.createSegmentation(outputs.scoreVolume, 5.0, perLesion=False)
    assert single.GetSegmentation().GetNumberOfSegments() == 1
    assert single.GetSegmentation().GetNthSegment(0).GetName() == "Anomaly"
    # voxel count of the single segment == voxels above the threshold
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(single.GetSegmentation().GetNthSegmentID(0))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        single, ids, labelmap, outputs.scoreVolume
    )
    exported = slicer.util.arrayFromVolume(labelmap) > 0
    np.testing.assert_array_equal(exported, score > 5.0)
    for node in (per_lesion, single, labelmap):
        scene.RemoveNode(node)


def test_segment_input_streams_the_heatmap_while_running(hcc_scene, tiny_checkpoint, tmp_path):
    """Non-blocking run from a segmentation: partial heatmaps appear in the score node
    before the worker finishes, and the final score equals the labelmap run's inputs."""
    scene, ct, _, segmentation, segment_id = hcc_scene
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    logic.streamEvery = 0.5
    seen: list[tuple[str, float]] = []
    buffers: set[int] = set()
    last_partial: list[np.ndarray] = []
    job = None

    def on_event(event: dict) -> None:
        if event["event"] == "partial":
            node = job._scoreNode
            array = slicer.util.arrayFromVolume(node)
            buffers.add(array.__array_interface__["data"][0])
            seen.append((node.GetID(), float(np.abs(array).sum())))
            last_partial[:] = [array.copy()]

    settings = DetectionSettings(checkpoint=str(tiny_checkpoint), **QUICK)
    job = logic.process(
        ct, segmentation, segment_id, settings=settings, wait=False, onEvent=on_event
    )
    assert job.running
    while job.poll():
        time.sleep(0.05)
    assert job.state == "completed", job.error
    assert len(seen) >= 2, "expected streamed partial heatmaps"
    sums = [s for _, s in seen]
    assert sums == sorted(sums) and sums[0] > 0  # the heatmap fills in
    assert {i for i, _ in seen} == {job.outputs.scoreVolume.GetID()}
    final = slicer.util.arrayFromVolume(job.outputs.scoreVolume)
    assert np.abs(final).sum() >= sums[-1]
    # updated in place: one voxel buffer from the first partial to the final result
    assert buffers == {final.__array_interface__["data"][0]}
    # streamed slices already hold their final values
    done = last_partial[0] != 0
    np.testing.assert_allclose(final[done], last_partial[0][done], atol=1e-4)


def _launcher(tmp_path: Path) -> str:
    """Like ``PythonSlicer``: a launcher process that runs the real interpreter as a child."""
    script = tmp_path / "PythonLauncher"
    script.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process-tree check reads /proc")
def test_cancel_kills_the_tree_and_leaves_the_scene_as_before(hcc_scene, tiny_checkpoint, tmp_path):
    scene, ct, labelmap, _, _ = hcc_scene
    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    logic = DetectionLogic(scene, python=_launcher(tmp_path), tempRoot=str(temp_root))
    logic.streamEvery = 0.0
    state, digest = _scene_state(scene), _digest(ct)
    settings = DetectionSettings(checkpoint=str(tiny_checkpoint), **{**QUICK, "steps": 40})
    job = logic.process(ct, labelmap, labelValue=0, settings=settings, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (job._scoreNode is None or job.progress is None):
        assert job.poll(), job.error
        time.sleep(0.05)
    assert job._scoreNode is not None, "no streamed score before cancelling"
    members = group_members(job.worker.pid)
    assert len(members) >= 2, "expected the launcher and its python child"
    job.cancel()
    assert job.state == "cancelled" and not job.poll()
    assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in members)
    assert group_members(job.worker.pid) == []
    assert list(temp_root.iterdir()) == []
    assert _scene_state(scene) == state
    assert _digest(ct) == digest


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_worker_failure_gives_the_error_and_changes_nothing(hcc_scene, tmp_path):
    scene, ct, labelmap, _, _ = hcc_scene
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    state = _scene_state(scene)
    settings = DetectionSettings(checkpoint=str(bad), **QUICK)
    with pytest.raises(GDPIError) as error:
        logic.process(ct, labelmap, labelValue=0, settings=settings)
    assert "exit status 2" in str(error.value) and "broken.safetensors" in str(error.value)
    assert _scene_state(scene) == state
    assert [p.name for p in tmp_path.iterdir()] == ["broken.safetensors"]


def test_input_problems_are_reported_before_running(hcc_scene):
    scene, ct, labelmap, segmentation, segment_id = hcc_scene
    logic = DetectionLogic(scene)
    assert logic.inputProblem(None, labelmap) == "Select a CT volume."
    assert "Select the liver" in logic.inputProblem(ct, None)
    assert "segment" in logic.inputProblem(ct, segmentation, None)
    assert logic.inputProblem(ct, segmentation, segment_id) is None
    assert logic.inputProblem(ct, labelmap, labelValue=0) is None
    assert logic.inputProblem(ct, labelmap, labelValue=1) is None
    assert "no voxel with label 5" in logic.inputProblem(ct, labelmap, labelValue=5)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    labelmap.SetAndObserveTransformNodeID(transform.GetID())
    try:
        assert "different transforms" in logic.inputProblem(ct, labelmap, labelValue=0)
    finally:
        labelmap.SetAndObserveTransformNodeID(None)
        scene.RemoveNode(transform)
    with pytest.raises(GDPIError, match="Select a CT"):
        logic.process(None, labelmap)


def test_process_folder_continues_past_a_broken_case(tiny_checkpoint, tmp_path):
    cases = tmp_path / "cases"
    for name in ("a_good", "b_broken"):
        (cases / name).mkdir(parents=True)
    shutil.copy(shared("ts_small", "ct.nii.gz"), cases / "a_good" / "ct.nii.gz")
    shutil.copy(shared("ts_small", "totalseg.nii.gz"), cases / "a_good" / "seg.nii.gz")
    (cases / "b_broken" / "ct.nii.gz").write_bytes(b"truncated")
    shutil.copy(shared("ts_small", "totalseg.nii.gz"), cases / "b_broken" / "seg.nii.gz")
    logic = DetectionLogic(slicer.vtkMRMLScene(), tempRoot=str(tmp_path))
    events: list[dict] = []
    settings = DetectionSettings(checkpoint=str(tiny_checkpoint), **QUICK)
    rows = logic.processFolder(
        cases, tmp_path / "out", settings=settings, liverLabel=5, onEvent=events.append
    )
    assert [(r["case"], r["status"]) for r in rows] == [("a_good", "ok"), ("b_broken", "error")]
    assert "ct.nii.gz" in rows[1]["error"]
    assert (tmp_path / "out" / "a_good" / "score.nrrd").is_file()
    assert not (tmp_path / "out" / "b_broken").exists()
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert [e["case"] for e in events if e["event"] == "case"] == ["a_good", "b_broken"]
    with pytest.raises(GDPIError, match="unknown engine"):
        logic.processFolder(cases, tmp_path / "out3", settings=settings, engine="spark")
    with pytest.raises(GDPIError, match="no cases found"):
        logic.processFolder(tmp_path / "out" / "a_good", tmp_path / "out2", settings=settings)
    # the same batch on a local Ray instance (gdpi detect --engine ray): the same rows
    pytest.importorskip("ray")

    ray_events: list[dict] = []
    on_ray = logic.processFolder(
        cases, tmp_path / "on_ray", settings=settings, liverLabel=5, onEvent=ray_events.append,
        engine="ray", workers=1,
    )  # fmt: skip
    same = ("case", "status", "error", "lesions")
    assert [[r[k] for k in same] for r in on_ray] == [[r[k] for k in same] for r in rows]
    assert float(on_ray[0]["max_score_hu"]) == pytest.approx(
        float(rows[0]["max_score_hu"]), abs=SAME_HU + 1e-3
    )
    assert {e["case"] for e in ray_events if e["event"] == "case_done"} == {"a_good", "b_broken"}
    assert_same_detection(tmp_path / "out" / "a_good", tmp_path / "on_ray" / "a_good")


def test_devices_are_listed_by_a_worker_not_in_slicers_process(tmp_path):
    logic = DetectionLogic(slicer.vtkMRMLScene(), python=sys.executable, tempRoot=str(tmp_path))
    devices = logic.listDevices()
    assert devices[0]["id"] == "cpu" and all({"id", "name"} <= set(d) for d in devices)
    assert list(tmp_path.iterdir()) == []  # the worker's temporary folder is gone


# ---- results in the scene: tags, study, transforms, terminology ---------------------


def test_results_are_tagged_and_placed_in_the_cts_study(hcc_scene, labelmap_run):
    from GDPILiverAnomalyLib.slicer_side.display import (
        RESULT_ROLE_ATTRIBUTE,
        defaultCtNode,
        isResult,
    )

    scene, ct, labelmap, _, _ = hcc_scene
    _, outputs, events, _, _ = labelmap_run
    roles = {
        outputs.scoreVolume.GetAttribute(RESULT_ROLE_ATTRIBUTE),
        outputs.pseudoHealthyVolume.GetAttribute(RESULT_ROLE_ATTRIBUTE),
        outputs.lesionTable.GetAttribute(RESULT_ROLE_ATTRIBUTE),
    }
    assert roles == {"score", "pseudo-healthy", "lesions"}
    assert not isResult(ct) and isResult(outputs.scoreVolume)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(ct))
    for node in (outputs.scoreVolume, outputs.pseudoHealthyVolume, outputs.lesionTable):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
        assert node.GetNodeReference("gdpiInputVolume") is ct
    # a score volume knows its own run's table and pseudo-healthy volume
    assert outputs.scoreVolume.GetNodeReference("gdpiLesionTable") is outputs.lesionTable
    pseudo = outputs.scoreVolume.GetNodeReference("gdpiPseudoHealthyVolume")
    assert pseudo is outputs.pseudoHealthyVolume
    # the panel's default CT is never a labelmap or a result
    assert defaultCtNode(scene) is ct
    # readable log lines, and an estimate of the time before the long wait
    estimate = next(e for e in events if e["event"] == "estimate")
    assert estimate["seconds"] > 0 and estimate["device"] == "cpu"
    assert estimate["text"].startswith("Estimated time: about")
    start = next(e for e in events if e["event"] == "start")
    assert start["text"].startswith("Started: preset paper, repaint sampler, 10 steps")


def test_segmentation_follows_the_ct_for_dicom_export(hcc_scene, labelmap_run):
    from GDPILiverAnomalyLib.slicer_side.display import LESION_TERMINOLOGY

    scene, ct, _, _, _ = hcc_scene
    logic, outputs, _, _, _ = labelmap_run
    segmentation = logic.createSegmentation(outputs.scoreVolume, 5.0)
    assert segmentation.GetNodeReference("referenceImageGeometryRef") is ct
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() > 0
    for index in range(seg.GetNumberOfSegments()):
        tag = vtk.reference("")
        assert seg.GetNthSegment(index).GetTag("TerminologyEntry", tag)
        assert str(tag) == LESION_TERMINOLOGY
    assert LESION_TERMINOLOGY.count("~") == 6  # Slicer's 7-field serialisation
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(ct))
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    scene.RemoveNode(segmentation)


def test_transforms_move_the_segmentation_and_the_lesion_jump(hcc_scene, labelmap_run):
    scene, ct, _, _, _ = hcc_scene
    logic, outputs, _, _, _ = labelmap_run
    shift = (12.0, -7.0, 30.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    for axis, value in enumerate(shift):
        matrix.SetElement(axis, 3, value)
    transform.SetMatrixTransformToParent(matrix)
    try:
        for node in (ct, outputs.scoreVolume):
            node.SetAndObserveTransformNodeID(transform.GetID())
        local = logic.lesionCentroid(outputs.lesionTable, 0)
        world = logic.jumpToLesion(outputs.lesionTable, 0)
        np.testing.assert_allclose(world, np.add(local, shift), atol=1e-6)
        red = next(
            scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))
        )
        centre = red.GetSliceToRAS()
        assert centre.GetElement(2, 3) == pytest.approx(world[2], abs=1e-3)
        segmentation = logic.createSegmentation(outputs.scoreVolume, 5.0)
        assert segmentation.GetTransformNodeID() == transform.GetID()
        scene.RemoveNode(segmentation)
    finally:
        for node in (ct, outputs.scoreVolume):
            node.SetAndObserveTransformNodeID(None)
        scene.RemoveNode(transform)


def test_a_failure_while_loading_results_removes_every_node_it_made(
    hcc_scene, tiny_checkpoint, tmp_path, monkeypatch
):
    scene, ct, labelmap, _, _ = hcc_scene
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    state = _scene_state(scene)

    def broken_table(*args, **kwargs):  # fault injection: the last step of loading fails
        raise RuntimeError("table could not be filled")

    monkeypatch.setattr(logic, "updateLesionTable", broken_table)
    settings = DetectionSettings(checkpoint=str(tiny_checkpoint), **QUICK)
    with pytest.raises(GDPIError, match="Could not load the results: table could not"):
        logic.process(ct, labelmap, labelValue=0, settings=settings)
    assert _scene_state(scene) == state  # no score, pseudo-healthy or table left
    assert list(tmp_path.iterdir()) == [] and not logic._running


def test_lesion_table_works_with_the_slicer_56_table_api(labelmap_run):
    """Slicer 5.6 has no column titles (5.8+): the long-name API is used instead."""
    logic, outputs, _, _, _ = labelmap_run
    real = slicer.vtkMRMLTableNode()

    called: list[str] = []

    class Slicer56Table:
        def __getattr__(self, name):
            if name in ("SetColumnTitle", "SetUseColumnTitleAsColumnHeader"):
                raise AttributeError(name)
            called.append(name)
            return getattr(real, name)

    lesions = logic.lesionsAt(outputs.scoreVolume, 5.0)
    logic.updateLesionTable(Slicer56Table(), lesions)
    assert real.GetNumberOfRows() == len(lesions) and real.GetLocked()
    assert real.GetColumnLongName("volume_ml") == "Volume (mL)"
    # names stay the headers on 5.6 (turned off, its view shows them as row 0)
    assert "SetUseColumnNameAsColumnHeader" not in called


# ---- inputs ------------------------------------------------------------------------


def test_labelmap_checks_use_the_value_range(tmp_path):
    scene = slicer.vtkMRMLScene()
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(ct, np.zeros((4, 8, 8), np.int16))
    multi = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "totalseg")
    values = np.zeros((4, 8, 8), np.uint8)
    values[1, 2:5, 2:5] = 5
    values[2, 1, 1] = 1
    slicer.util.updateVolumeFromArray(multi, values)
    assert "several labels" in logic.inputProblem(ct, multi, labelValue=0)
    assert logic.inputProblem(ct, multi, labelValue=5) is None
    assert "no voxel with label 7" in logic.inputProblem(ct, multi, labelValue=7)
    empty = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "empty")
    slicer.util.updateVolumeFromArray(empty, np.zeros((4, 8, 8), np.uint8))
    assert "is empty" in logic.inputProblem(ct, empty, labelValue=0)


def test_the_liver_segment_is_chosen_by_name():
    from GDPILiverAnomalyLib.slicer_side.display import liverSegmentId

    scene = slicer.vtkMRMLScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    values = np.zeros((2, 4, 8), np.uint8)
    values[0, 0, :5] = [1, 2, 3, 4, 5]
    slicer.util.updateVolumeFromArray(labelmap, values)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(5)]
    names = ("spleen", "liver tumour", "Liver", "kidney_left", "Liver (auto)")
    for segment_id, name in zip(ids, names, strict=True):
        segmentation.GetSegment(segment_id).SetName(name)
    assert liverSegmentId(node) == ids[2]  # named liver (any case), not the first
    segmentation.GetSegment(ids[2]).SetName("liver vessels")
    assert liverSegmentId(node) == ids[4]  # contains liver; not the tumour, not vessels
    segmentation.GetSegment(ids[4]).SetName("stomach")
    assert liverSegmentId(node) == ids[0]  # no liver at all: the first, as before


def test_synthetic_sample_case_has_the_demo_geometry(tmp_path):
    from GDPILiverAnomalyLib.files.synthetic import synthetic_case

    scene = slicer.vtkMRMLScene()
    logic = DetectionLogic(scene, tempRoot=str(tmp_path))
    ct, liver = logic.loadSyntheticCase(seed=7)
    case = synthetic_case(seed=7)
    assert liver.IsA("vtkMRMLLabelMapVolumeNode") and not ct.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), case.ct)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(liver), case.liver)
    np.testing.assert_allclose(ct.GetSpacing(), case.spacing)
    assert logic.inputProblem(ct, liver, labelValue=0) is None


# TotalSegmentator's liver in the background: test_slicer_background.py


# ---- stopping everything -------------------------------------------------------------


def test_cancel_all_stops_a_blocking_folder_batch(tiny_checkpoint, tmp_path):
    """A console batch waits in ``idle`` (Slicer processes events there); whatever runs
    then, e.g. the panel's Cancel all or Slicer quitting, can stop it."""
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        (cases / name).mkdir(parents=True)
        for f in ("ct.nii.gz", "seg.nii.gz"):
            shutil.copy(shared("hcc_0697", f), cases / name / f)

    class Logic(DetectionLogic):
        calls = 0

        def idle(self, seconds):
            Logic.calls += 1
            if Logic.calls == 20:  # about 2 s into the batch
                assert self.cancelAll() == 1
            time.sleep(seconds)

    logic = Logic(slicer.vtkMRMLScene(), tempRoot=str(tmp_path))
    settings = DetectionSettings(checkpoint=str(tiny_checkpoint), **{**QUICK, "steps": 200})
    with pytest.raises(GDPIError, match="cancelled"):
        logic.processFolder(cases, tmp_path / "out", settings=settings)
    assert not logic._running
    assert not (tmp_path / "out" / "b").exists()
