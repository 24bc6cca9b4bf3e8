"""Slicer logic: MRML nodes -> temporary NRRD files -> background ``gdpi detect`` -> MRML nodes.

Imports ``slicer`` (MRML) and ``vtk`` but never ``qt`` and never torch, so it runs in
Slicer's GUI process before torch is installed, and in plain Python on the
``slicer-core`` wheel (the tests). Every method works on an explicit scene.

Conventions: the score volume is in HU (inpainted - CT; positive = darker than the
healthy re-painting); lesion centroids in the table are RAS millimetres (Slicer's
convention; the worker's ``lesions.csv`` uses LPS).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk

from .errors import GDPIError, InputError
from .presets import PRESETS
from .worker import WorkerProcess

#: The model used when no checkpoint is chosen: trained on real CT (see its model card).
DEFAULT_CHECKPOINT = Path(__file__).parent / "models" / "real_ct_tiny.safetensors"
#: Score display window (HU).
SCORE_WINDOW_HU = (0.0, 50.0)
SCORE_COLOR_NAME = "Inferno"
#: Inferno (matplotlib, CC0) at 0, 1/8, ..., 1; used where Slicer's own table is absent.
_INFERNO = [
    (0.0015, 0.0005, 0.0139),
    (0.1293, 0.0473, 0.2908),
    (0.3415, 0.0623, 0.4294),
    (0.5409, 0.1347, 0.4151),
    (0.7357, 0.2159, 0.3302),
    (0.8943, 0.3534, 0.1936),
    (0.9784, 0.5579, 0.0349),
    (0.9746, 0.7977, 0.2063),
    (0.9884, 0.9984, 0.6449),
]
LESION_COLUMNS = ("id", "volume_ml", "max_score_hu", "mean_score_hu", "r_mm", "a_mm", "s_mm")
_OOM_MARKERS = ("out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")


@dataclass
class DetectionSettings:
    """What the panel's Model section holds. ``checkpoint`` "" = the bundled model.

    ``preset``: ``paper``, ``fast`` or ``custom`` (``custom`` uses ``steps``,
    ``jumpLength`` and ``resamplings``). ``medianSize`` in model-grid pixels (0 = off),
    ``offsetHu`` and ``threshold`` in HU, ``batchSize`` 0 = automatic (8 on CUDA, 1 on CPU).
    """

    checkpoint: str = ""
    preset: str = "fast"
    steps: int = 250
    jumpLength: int = 10
    resamplings: int = 10
    batchSize: int = 0
    offsetHu: float = 20.0
    twoSided: bool = False
    medianSize: int = 5
    threshold: float = 20.0
    device: str = "auto"
    seed: int = 0

    def checkpointPath(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else DEFAULT_CHECKPOINT

    def workerArguments(self) -> list[str]:
        """``gdpi detect`` options for these settings."""
        if self.preset not in (*PRESETS, "custom"):
            raise InputError(f"unknown preset {self.preset!r} (paper, fast or custom)")
        args = ["--checkpoint", str(self.checkpointPath())]
        if self.preset == "custom":
            args += ["--preset", "paper", "--steps", str(self.steps)]
            args += [
                "--jump-length",
                str(self.jumpLength),
                "--jump-n-sample",
                str(self.resamplings),
            ]
        else:
            args += ["--preset", self.preset]
        args += ["--offset-hu", repr(float(self.offsetHu)), "--median-size", str(self.medianSize)]
        args += ["--threshold", repr(float(self.threshold)), "--device", self.device]
        args += ["--seed", str(self.seed)]
        if self.twoSided:
            args.append("--two-sided")
        if self.batchSize:
            args += ["--batch-size", str(self.batchSize)]
        return args


@dataclass
class DetectionOutputs:
    """Nodes a finished detection adds to the scene."""

    scoreVolume: object
    pseudoHealthyVolume: object
    lesionTable: object
    runInfo: dict = field(default_factory=dict)


def failureHint(stderr: str) -> str:
    """A user-facing hint for a failed worker, from its error output."""
    if any(marker in stderr for marker in _OOM_MARKERS):
        return "The GPU ran out of memory: choose a smaller batch size, or the CPU as device."
    if "No module named" in stderr:
        return "A Python package is missing: click Detect again to install the dependencies."
    if "CUDA" in stderr and ("not available" in stderr or "no kernel image" in stderr):
        return (
            "PyTorch cannot use this GPU (CUDA missing, or built for another CUDA "
            "version): choose CPU, or reinstall torch from the PyTorch extension."
        )
    if "does not look like HU" in stderr or "HU" in stderr and "median" in stderr:
        return "The CT values do not look like Hounsfield units: check the input volume."
    return "See the log for details."


def retryBatchSize(stderr: str, settings: DetectionSettings) -> int | None:
    """A smaller batch to retry with after a GPU out-of-memory failure, else None."""
    if settings.device == "cpu" or not any(m in stderr for m in _OOM_MARKERS):
        return None
    current = settings.batchSize or 8  # the worker's CUDA default
    return current // 2 if current > 1 else None


def formatProgress(event: dict) -> str:
    """Status line for a ``progress`` event: slices, network evaluations, ETA."""
    text = (
        f"Slices {event['slices_done']}/{event['slices_total']}, "
        f"network evaluations {event['nfe_done']}/{event['nfe_total']}"
    )
    eta = event.get("eta_s")
    if eta is not None:
        minutes, seconds = divmod(int(round(eta)), 60)
        text += (
            f", about {minutes} min {seconds:02d} s left"
            if minutes
            else f", about {seconds} s left"
        )
    return text


class DetectionLogic:
    """Detection on MRML nodes, without any GUI.

    ``process(...)`` runs one case (``wait=True`` blocks and returns the output nodes;
    ``wait=False`` returns a :class:`DetectionJob` to :meth:`DetectionJob.poll` from a
    timer). ``processFolder(...)`` runs every case of a folder into an output folder.
    """

    def __init__(self, scene=None, python: str | None = None, tempRoot: str | None = None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.python = python
        self.tempRoot = tempRoot
        #: Seconds between heatmap updates streamed from a running worker.
        self.streamEvery = 2.0

    # ---- inputs -------------------------------------------------------------------

    def inputProblem(self, ctNode, liverNode, segmentId: str | None = None, labelValue: int = 0):
        """Why Detect cannot run on these inputs (one sentence), or None when it can."""
        if ctNode is None:
            return "Select a CT volume."
        if ctNode.GetImageData() is None:
            return f"The CT volume {ctNode.GetName()!r} has no image data."
        if liverNode is None:
            return "Select the liver: a segmentation and segment, or a labelmap volume."
        if liverNode.GetTransformNodeID() != ctNode.GetTransformNodeID():
            return "The CT and the liver are under different transforms: harden them first."
        if liverNode.IsA("vtkMRMLSegmentationNode"):
            segmentation = liverNode.GetSegmentation()
            if not segmentId or segmentation.GetSegment(segmentId) is None:
                return f"Select the liver segment of {liverNode.GetName()!r}."
            return None
        if liverNode.IsA("vtkMRMLLabelMapVolumeNode") or liverNode.IsA("vtkMRMLScalarVolumeNode"):
            if liverNode.GetImageData() is None:
                return f"The labelmap {liverNode.GetName()!r} has no image data."
            values = slicer.util.arrayFromVolume(liverNode)
            if labelValue == 0:
                if not np.all(np.isin(np.unique(values), (0, 1, 2))):
                    return (
                        f"The labelmap {liverNode.GetName()!r} holds several labels: "
                        "choose the liver's label value (TotalSegmentator: 5)."
                    )
                if not values.any():
                    return f"The labelmap {liverNode.GetName()!r} is empty."
            elif not np.any(values == labelValue):
                return f"The labelmap {liverNode.GetName()!r} has no voxel with label {labelValue}."
            return None
        return "The liver must be a segmentation or a labelmap volume."

    def _writeInputs(self, folder: Path, ctNode, liverNode, segmentId, labelValue) -> list[str]:
        """CT and liver as NRRD files in ``folder``; returns the worker's input options."""
        problem = self.inputProblem(ctNode, liverNode, segmentId, labelValue)
        if problem:
            raise InputError(problem)
        ctPath = folder / "ct.nrrd"
        _writeVolume(ctNode, ctPath)
        liverPath = folder / "liver.nrrd"
        if liverNode.IsA("vtkMRMLSegmentationNode"):
            self._writeSegment(liverNode, segmentId, ctNode, liverPath)
            return ["--ct", str(ctPath), "--liver", str(liverPath), "--liver-label", "1"]
        _writeVolume(liverNode, liverPath)
        args = ["--ct", str(ctPath), "--liver", str(liverPath)]
        return args + (["--liver-label", str(labelValue)] if labelValue else [])

    def _writeSegment(self, segmentationNode, segmentId: str, ctNode, path: Path) -> None:
        """One segment as a 0/1 labelmap on the CT's grid (temporary nodes are removed)."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gdpi_temp__")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if not logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, ctNode):
                raise InputError(f"could not export segment {segmentId!r} on the CT's grid")
            values = slicer.util.arrayFromVolume(labelmap)
            if not values.any():
                raise InputError(f"the liver segment {segmentId!r} is empty")
            _writeVolume(labelmap, path)
        finally:
            _removeNodeAndDisplay(self.scene, labelmap)

    # ---- one case -----------------------------------------------------------------

    def process(
        self,
        ctNode,
        liverNode,
        segmentId: str | None = None,
        labelValue: int = 0,
        settings: DetectionSettings | None = None,
        wait: bool = True,
        onEvent: Callable[[dict], None] | None = None,
        stream: bool = True,
        show: bool = True,
    ):
        """Detect anomalies in ``ctNode`` inside the liver.

        The liver is a segmentation node plus ``segmentId`` or a labelmap volume plus
        ``labelValue`` (0 = every nonzero voxel of a binary or LiTS map: liver + tumour). With ``wait`` (console use) blocks and returns
        :class:`DetectionOutputs`; otherwise returns the running :class:`DetectionJob`.
        ``onEvent`` receives every worker event (``progress``, ``partial``, ...).
        """
        job = DetectionJob(
            self, ctNode, liverNode, segmentId, labelValue, settings or DetectionSettings(),
            onEvent, stream, show,
        )  # fmt: skip
        if wait:
            return job.wait()
        return job

    # ---- folders ------------------------------------------------------------------

    def processFolder(
        self,
        inputDir: str | Path,
        outputDir: str | Path,
        liverDir: str | Path | None = None,
        settings: DetectionSettings | None = None,
        liverLabel: int | None = None,
        onEvent: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """Every case of a folder (the pairing rules of ``gdpi detect``) into ``outputDir``.

        ``liverDir`` defaults to ``inputDir`` (LiTS names or case subfolders). A broken
        case is recorded in ``outputDir/summary.csv`` and skipped. Blocks; returns the
        summary rows. Raises :class:`GDPIError` when nothing could run at all.
        """
        settings = settings or DetectionSettings()
        args = ["detect", "--ct", str(inputDir), "--liver", str(liverDir or inputDir)]
        args += ["--out", str(outputDir), "--progress", "json", *settings.workerArguments()]
        if liverLabel is not None:
            args += ["--liver-label", str(liverLabel)]
        with tempfile.TemporaryDirectory(prefix="GDPILiverAnomaly-", dir=self.tempRoot) as tmp:
            worker = WorkerProcess(args, Path(tmp) / "stderr.txt", self.python)
            try:
                while True:
                    code = worker.poll()
                    for event in worker.events():
                        if onEvent is not None:
                            onEvent(event)
                    if code is not None:
                        break
                    time.sleep(0.1)
            except BaseException:
                worker.cancel()
                raise
            if code not in (0, 3):
                raise GDPIError(f"folder processing failed (exit {code}):\n{worker.stderr_tail()}")
        with open(Path(outputDir) / "summary.csv", newline="") as f:
            return list(csv.DictReader(f))

    # ---- display ------------------------------------------------------------------

    def scoreColorNode(self):
        """Slicer's perceptual ``Inferno`` table, or an equivalent made once per scene."""
        node = self.scene.GetFirstNodeByName(SCORE_COLOR_NAME)
        if node is not None and node.IsA("vtkMRMLColorNode"):
            return node
        name = "GDPI Inferno"
        node = self.scene.GetFirstNodeByName(name)
        if node is not None:
            return node
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(name)
        node.SetTypeToUser()
        node.SetNumberOfColors(256)
        points = np.asarray(_INFERNO)
        positions = np.linspace(0, 1, len(points))
        for index in range(256):
            rgb = [np.interp(index / 255, positions, points[:, c]) for c in range(3)]
            node.SetColor(index, f"{index}", *rgb, 1.0)
        node.SetAttribute("Category", "GDPILiverAnomaly")
        self.scene.AddNode(node)
        return node

    def setupScoreDisplay(self, scoreNode, threshold: float) -> None:
        """Inferno colours, window 0-50 HU, voxels at or below ``threshold`` transparent."""
        if scoreNode.GetDisplayNode() is None:
            scoreNode.CreateDefaultDisplayNodes()
        display = scoreNode.GetDisplayNode()
        with slicer.util.NodeModify(display):
            display.SetAndObserveColorNodeID(self.scoreColorNode().GetID())
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(*SCORE_WINDOW_HU)
            display.ApplyThresholdOn()
            display.SetThreshold(threshold, 1e6)
            display.SetInterpolate(False)

    def setDisplayThreshold(self, scoreNode, threshold: float) -> None:
        """Hide score voxels <= ``threshold`` HU (display only; nothing is recomputed)."""
        scoreNode.GetDisplayNode().SetLowerThreshold(threshold)

    def showInSliceViews(self, ctNode, scoreNode, opacity: float = 0.5) -> None:
        """CT as background, score as foreground in every slice view."""
        for composite in _sliceCompositeNodes(self.scene):
            with slicer.util.NodeModify(composite):
                composite.SetBackgroundVolumeID(ctNode.GetID())
                composite.SetForegroundVolumeID(scoreNode.GetID())
                composite.SetForegroundOpacity(opacity)

    def setOpacity(self, opacity: float) -> None:
        for composite in _sliceCompositeNodes(self.scene):
            composite.SetForegroundOpacity(opacity)

    # ---- lesions and segmentation -------------------------------------------------

    def lesionsAt(self, scoreNode, threshold: float) -> list[dict]:
        """Lesions (26-connected score > ``threshold``), largest first, centroids in RAS mm."""
        from .scoring import anomaly_mask, find_lesions

        score = slicer.util.arrayFromVolume(scoreNode)
        lesions = find_lesions(anomaly_mask(score, threshold), score, _sitkReference(scoreNode))
        return [_lesionRow(lesion.to_dict()) for lesion in lesions]

    def updateLesionTable(self, tableNode, lesions: list[dict]) -> None:
        """Fill a table node with one row per lesion (columns: :data:`LESION_COLUMNS`)."""
        table = vtk.vtkTable()
        for name in LESION_COLUMNS:
            column = vtk.vtkIntArray() if name == "id" else vtk.vtkDoubleArray()
            column.SetName(name)
            column.SetNumberOfValues(len(lesions))
            for row, lesion in enumerate(lesions):
                column.SetValue(row, lesion[name])
            table.AddColumn(column)
        with slicer.util.NodeModify(tableNode):
            tableNode.SetAndObserveTable(table)
            tableNode.SetUseColumnTitleAsColumnHeader(True)
            titles = {"id": "Lesion", "volume_ml": "Volume (mL)", "max_score_hu": "Max score (HU)",
                      "mean_score_hu": "Mean score (HU)", "r_mm": "R (mm)", "a_mm": "A (mm)",
                      "s_mm": "S (mm)"}  # fmt: skip
            for name, title in titles.items():
                tableNode.SetColumnTitle(name, title)
            tableNode.SetLocked(True)

    def lesionCentroid(self, tableNode, row: int) -> tuple[float, float, float]:
        """RAS centroid (mm) of the lesion in ``row`` of a lesion table."""
        table = tableNode.GetTable()
        if not 0 <= row < table.GetNumberOfRows():
            raise IndexError(f"no lesion in row {row}")
        return tuple(
            float(table.GetColumnByName(c).GetValue(row)) for c in ("r_mm", "a_mm", "s_mm")
        )

    def jumpToLesion(self, tableNode, row: int) -> tuple[float, float, float]:
        """Centre every slice view on the lesion in ``row``; returns its RAS centroid."""
        ras = self.lesionCentroid(tableNode, row)
        slicer.vtkMRMLSliceNode.JumpAllSlices(
            self.scene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice
        )
        return ras

    def createSegmentation(
        self, scoreNode, threshold: float, perLesion: bool = True, name: str | None = None
    ):
        """A segmentation of the anomalies (score > ``threshold`` HU): one segment per
        lesion (``Lesion N`` = row N of the lesion table) or one segment ``Anomaly``."""
        from .scoring import anomaly_mask, lesion_labels

        score = slicer.util.arrayFromVolume(scoreNode)
        mask = anomaly_mask(score, threshold)
        labels, count = lesion_labels(mask, score) if perLesion else (mask, int(mask.any()))
        segmentation = self.scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{scoreNode.GetName()} > {threshold:g} HU"
        )
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(scoreNode)
        if count == 0:
            return segmentation
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gdpi_temp__")
        try:
            labelmap.CopyOrientation(scoreNode)
            slicer.util.updateVolumeFromArray(labelmap, labels.astype(np.int16))
            slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentation
            )
        finally:
            _removeNodeAndDisplay(self.scene, labelmap)
        seg = segmentation.GetSegmentation()
        for index in range(seg.GetNumberOfSegments()):
            segment = seg.GetNthSegment(index)
            segment.SetName(f"Lesion {segment.GetLabelValue()}" if perLesion else "Anomaly")
        segmentation.SetAttribute("GDPI.threshold_hu", f"{threshold:g}")
        return segmentation


class DetectionJob:
    """One running detection: a worker process, its temporary folder, its nodes.

    ``state``: ``running``, ``completed``, ``failed`` or ``cancelled``. Call
    :meth:`poll` regularly (a GUI timer); it never blocks. Nodes shown while running
    (the streamed score) are removed again if the job fails or is cancelled, and the
    slice views get their previous layers back.
    """

    def __init__(
        self,
        logic: DetectionLogic,
        ctNode,
        liverNode,
        segmentId,
        labelValue,
        settings: DetectionSettings,
        onEvent=None,
        stream: bool = True,
        show: bool = True,
    ):
        self.logic, self.scene = logic, logic.scene
        self.ctNode = ctNode
        self.settings = settings
        self.onEvent = onEvent
        self.stream, self.show = stream, show
        self.state = "running"
        self.message = "Starting"
        self.progress: dict | None = None
        self.log: list[str] = []
        self.error: str | None = None
        self.outputs: DetectionOutputs | None = None
        self.startTime = time.monotonic()
        self._scoreNode = None
        self._scoreArray: np.ndarray | None = None
        self._savedLayers = [
            (c, c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
            for c in _sliceCompositeNodes(self.scene)
        ]
        self.folder = Path(tempfile.mkdtemp(prefix="GDPILiverAnomaly-", dir=logic.tempRoot))
        try:
            self._inputArgs = logic._writeInputs(
                self.folder, ctNode, liverNode, segmentId, labelValue
            )
            self._start()
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def _start(self) -> None:
        args = ["detect", *self._inputArgs, "--out", str(self.folder / "out")]
        args += ["--progress", "json", *self.settings.workerArguments()]
        if self.stream:
            args += ["--stream-dir", str(self.folder / "stream")]
            args += ["--stream-every", repr(float(self.logic.streamEvery))]
        self._log("Worker: " + " ".join(args))
        self.worker = WorkerProcess(args, self.folder / "stderr.txt", self.logic.python)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def _log(self, text: str) -> None:
        self.log.append(text)
        if self.onEvent is not None:
            self.onEvent({"event": "log", "message": text})

    def poll(self) -> bool:
        """Handle what the worker reported since the last call; True while running."""
        if not self.running:
            return False
        code = self.worker.poll()
        for event in self.worker.events():
            self._handle(event)
        if code is None:
            return True
        if code == 0:
            try:
                self._finish()
            except Exception as exc:
                self._fail(f"Could not load the results: {exc}")
            return False
        stderr = self.worker.stderr_tail()
        smaller = retryBatchSize(stderr, self.settings)
        if smaller is not None:
            self._log(f"GPU out of memory with batch {self.settings.batchSize or 8}; "
                      f"retrying with batch {smaller}.")  # fmt: skip
            self.settings.batchSize = smaller
            self._start()
            return True
        self._fail(f"Detection failed (exit status {code}). {failureHint(stderr)}\n\n{stderr}")
        return False

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.progress = event
            self.message = formatProgress(event)
        elif kind == "partial":
            self._showPartial(Path(event["path"]), event["offset"])
        elif kind == "log":
            self.log.append(event.get("message", ""))
        elif kind == "error":
            self.log.append("Error: " + event.get("message", ""))
        elif kind == "start":
            self.message = f"Running ({event.get('nfe_per_batch')} network evaluations per batch)"
        if self.onEvent is not None:
            self.onEvent(event)

    def _ensureScoreNode(self):
        if self._scoreNode is None:
            node = self.scene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", f"{self.ctNode.GetName()} GDPI score"
            )
            node.CopyOrientation(self.ctNode)
            node.SetAndObserveTransformNodeID(self.ctNode.GetTransformNodeID())
            self._scoreArray = np.zeros(slicer.util.arrayFromVolume(self.ctNode).shape, np.float32)
            slicer.util.updateVolumeFromArray(node, self._scoreArray)
            node.CopyOrientation(self.ctNode)
            self.logic.setupScoreDisplay(node, self.settings.threshold)
            if self.show:
                self.logic.showInSliceViews(self.ctNode, node)
            self._scoreNode = node
        return self._scoreNode

    def _showPartial(self, path: Path, offset: list[int]) -> None:
        try:
            part = np.load(path)
        except (OSError, ValueError):  # replaced by a newer one meanwhile: wait for it
            return
        node = self._ensureScoreNode()
        k, j, i = offset
        self._scoreArray[k : k + part.shape[0], j : j + part.shape[1], i : i + part.shape[2]] = part
        slicer.util.updateVolumeFromArray(node, self._scoreArray)
        node.CopyOrientation(self.ctNode)

    def _finish(self) -> None:
        import SimpleITK as sitk

        out = self.folder / "out"
        runInfo = json.loads((out / "run.json").read_text())
        score = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "score.nrrd")))
        pseudo = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pseudo_healthy.nrrd")))
        with open(out / "lesions.csv", newline="") as f:
            lesions = [_lesionRow(row) for row in csv.DictReader(f)]
        scoreNode = self._ensureScoreNode()
        self._scoreArray = score.astype(np.float32)
        slicer.util.updateVolumeFromArray(scoreNode, self._scoreArray)
        scoreNode.CopyOrientation(self.ctNode)
        scoreNode.SetAttribute("GDPI.run", json.dumps(runInfo))
        pseudoNode = self.scene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode", f"{self.ctNode.GetName()} pseudo-healthy"
        )
        slicer.util.updateVolumeFromArray(pseudoNode, pseudo.astype(np.float32))
        pseudoNode.CopyOrientation(self.ctNode)
        pseudoNode.SetAndObserveTransformNodeID(self.ctNode.GetTransformNodeID())
        pseudoNode.CreateDefaultDisplayNodes()
        ctDisplay = self.ctNode.GetDisplayNode()
        if ctDisplay is not None:
            pseudoNode.GetDisplayNode().AutoWindowLevelOff()
            pseudoNode.GetDisplayNode().SetWindowLevel(ctDisplay.GetWindow(), ctDisplay.GetLevel())
        table = self.scene.AddNewNodeByClass(
            "vtkMRMLTableNode", f"{self.ctNode.GetName()} GDPI lesions"
        )
        self.logic.updateLesionTable(table, lesions)
        self.outputs = DetectionOutputs(scoreNode, pseudoNode, table, runInfo)
        seconds = time.monotonic() - self.startTime
        self.state = "completed"
        self.message = (
            f"Done: {len(lesions)} lesion(s) above {self.settings.threshold:g} HU, "
            f"{runInfo['nfe']} network evaluations, {seconds:.0f} s on {runInfo['device']}"
        )
        self._log(self.message)
        self._cleanup()

    def _fail(self, error: str) -> None:
        self.state = "failed"
        self.error = error
        self.message = error.splitlines()[0]
        self._log(error)
        self._undo()

    def cancel(self) -> None:
        """Kill the worker's process tree, delete the temporary folder, undo scene changes."""
        if not self.running:
            return
        self.worker.cancel()
        self.state = "cancelled"
        self.message = "Cancelled"
        self._log("Cancelled by the user")
        self._undo()

    def _undo(self) -> None:
        if self._scoreNode is not None:
            _removeNodeAndDisplay(self.scene, self._scoreNode)
            self._scoreNode = None
        for composite, background, foreground, opacity in self._savedLayers:
            with slicer.util.NodeModify(composite):
                composite.SetBackgroundVolumeID(background)
                composite.SetForegroundVolumeID(foreground)
                composite.SetForegroundOpacity(opacity)
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait(self, pollInterval: float = 0.1, timeout: float | None = None) -> DetectionOutputs:
        """Block until done; return the outputs or raise :class:`GDPIError`.

        Ctrl+C (KeyboardInterrupt) or the timeout cancels the job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.poll():
                if deadline is not None and time.monotonic() > deadline:
                    self.cancel()
                    raise GDPIError(f"detection did not finish within {timeout} s; cancelled")
                time.sleep(pollInterval)
        except KeyboardInterrupt:
            self.cancel()
            raise
        if self.state != "completed":
            raise GDPIError(self.error or f"detection {self.state}")
        return self.outputs  # type: ignore[return-value]


def _writeVolume(node, path: Path) -> None:
    """Write a volume node (its own IJK-to-RAS geometry) without touching the node."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(node):
        raise InputError(f"could not write {node.GetName()!r} to {path}")


def _removeNodeAndDisplay(scene, node) -> None:
    for index in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(index)
        if display is not None:
            scene.RemoveNode(display)
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is not None:
        scene.RemoveNode(storage)
    scene.RemoveNode(node)


def _sliceCompositeNodes(scene) -> list:
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]


def _sitkReference(volumeNode):
    """A SimpleITK image with the node's geometry (LPS), for physical coordinates."""
    import SimpleITK as sitk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in ras_to_lps @ m[:3, 3]])
    image.SetDirection([float(v) for v in (ras_to_lps @ (m[:3, :3] / spacing)).ravel()])
    return image


def _lesionRow(lesion: dict) -> dict:
    """A worker lesion (LPS centroid) as a table row (RAS centroid)."""
    x, y, z = (float(lesion[f"centroid_{a}_mm"]) for a in "xyz")
    row = {
        "id": int(lesion["id"]),
        "volume_ml": float(lesion["volume_ml"]),
        "max_score_hu": float(lesion["max_score_hu"]),
        "mean_score_hu": float(lesion["mean_score_hu"]),
        "r_mm": -x if x else 0.0,
        "a_mm": -y if y else 0.0,
        "s_mm": z,
    }
    return {
        k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()
    }
