"""Slicer logic: MRML nodes -> temporary NRRD files -> background ``gdpi detect`` -> MRML nodes.

Imports ``slicer`` (MRML) and ``vtk`` but never ``qt`` and never torch, so it runs in
Slicer's GUI process before torch is installed, and in plain Python on the
``slicer-core`` wheel (the tests). Every method works on an explicit scene. The
running job is :mod:`.job`, the display of results :mod:`.display`.

Conventions: the score volume is in HU (inpainted - CT; positive = darker than the
healthy re-painting); lesion centroids in the table are RAS millimetres (Slicer's
convention; the worker's ``lesions.csv`` uses LPS).
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import slicer
import vtk

from ..errors import GDPIError, InputError
from ..running.worker import WorkerProcess
from .display import ResultDisplay, removeNodeAndDisplay
from .job import DetectionJob, formatRunDetails
from .settings import DetectionSettings

#: Segment names that belong to the liver region when they touch the liver segment
#: (case-insensitive): lesion, tumour/tumor, mass, cyst, metastasis/metastases.
LESION_NAME = re.compile(r"lesion|tumou?r|mass|cyst|metasta", re.IGNORECASE)
#: A segment lies inside the liver when at least this fraction of its voxels is in the
#: liver segment with its in-slice holes filled.
INSIDE_FRACTION = 0.5


class DetectionLogic(ResultDisplay):
    """Detection on MRML nodes, without any GUI.

    ``process(...)`` runs one case (``wait=True`` blocks and returns the output nodes;
    ``wait=False`` returns a :class:`DetectionJob` to :meth:`DetectionJob.poll` from a
    timer). ``processFolder(...)`` runs every case of a folder into an output folder.
    :meth:`cancelAll` stops every running worker (the module calls it when Slicer quits).
    """

    def __init__(self, scene=None, python: str | None = None, tempRoot: str | None = None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.python = python
        self.tempRoot = tempRoot
        #: Seconds between heatmap updates streamed from a running worker.
        self.streamEvery = 2.0
        #: Running jobs and folder workers (anything with ``cancel()``).
        self._running: set = set()

    def idle(self, seconds: float) -> None:
        """What a blocking call does between polls of its worker. Plain Python sleeps;
        the Slicer module processes GUI events instead, so Slicer stays responsive (and
        its Cancel button and ``cancelAll`` work) while a console call waits."""
        time.sleep(seconds)

    def cancelAll(self) -> int:
        """Cancel every running detection and folder batch of this logic (process trees
        killed, scenes restored); returns how many were running."""
        running = list(self._running)
        for item in running:
            item.cancel()
        self._running.clear()
        return len(running)

    # ---- inputs -------------------------------------------------------------------

    def inputProblem(
        self, ctNode, liverNode, segmentId: str | list[str] | None = None, labelValue: int = 0
    ):
        """Why Detect cannot run on these inputs (one sentence), or None when it can.
        ``segmentId``: the liver segment, or the list of segments of the liver region."""
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
            ids = [segmentId] if isinstance(segmentId, str) else list(segmentId or [])
            if not ids:
                return f"Select the liver segment of {liverNode.GetName()!r}."
            missing = [i for i in ids if segmentation.GetSegment(i) is None]
            if missing:
                return f"{liverNode.GetName()!r} has no segment {missing[0]!r}: select the liver."
            return None
        if liverNode.IsA("vtkMRMLLabelMapVolumeNode") or liverNode.IsA("vtkMRMLScalarVolumeNode"):
            if liverNode.GetImageData() is None:
                return f"The labelmap {liverNode.GetName()!r} has no image data."
            # the scalar range is computed once by VTK and cached (no full-volume numpy
            # pass on every change); the worker checks the exact label again
            low, high = liverNode.GetImageData().GetScalarRange()
            if labelValue == 0:  # the engine's default: binary (0/1, 0/255) or LiTS map
                if low < 0 or (high > 2 and high != 255):
                    return (
                        f"The labelmap {liverNode.GetName()!r} holds several labels: "
                        "choose the liver's label value (TotalSegmentator: 5)."
                    )
                if high == 0:
                    return f"The labelmap {liverNode.GetName()!r} is empty."
            elif not low <= labelValue <= high:
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
            ids = (
                self.liverRegionSegmentIds(liverNode, segmentId, ctNode)
                if isinstance(segmentId, str)
                else list(segmentId)
            )
            self._writeSegments(liverNode, ids, ctNode, liverPath)
            return ["--ct", str(ctPath), "--liver", str(liverPath), "--liver-label", "1"]
        _writeVolume(liverNode, liverPath)
        args = ["--ct", str(ctPath), "--liver", str(liverPath)]
        return args + (["--liver-label", str(labelValue)] if labelValue else [])

    def liverRegionSegmentIds(
        self, segmentationNode, liverSegmentId: str, referenceVolume=None
    ) -> list[str]:
        """The segments that form the liver region, the liver segment first: with it
        every segment named as a lesion, tumour/tumor, mass, cyst or metastasis
        (:data:`LESION_NAME`, any case) that touches it, and every other segment lying
        inside it (at least :data:`INSIDE_FRACTION` of its voxels in the liver with its
        in-slice holes filled: an unnamed tumour segment). The detection's liver mask is
        their union: a tumour segment left out would score 0. Computed on
        ``referenceVolume``'s grid (the CT; None: the segmentation's own)."""
        segmentation = segmentationNode.GetSegmentation()
        others = [
            segmentation.GetNthSegmentID(i)
            for i in range(segmentation.GetNumberOfSegments())
            if segmentation.GetNthSegmentID(i) != liverSegmentId
        ]
        if not others or segmentation.GetSegment(liverSegmentId) is None:
            return [liverSegmentId]
        liver = self._segmentArray(segmentationNode, [liverSegmentId], referenceVolume) > 0
        if not liver.any():
            return [liverSegmentId]
        labels = self._segmentArray(segmentationNode, others, referenceVolume)
        size = len(others) + 1
        voxels = np.bincount(labels.ravel(), minlength=size)
        inside = np.bincount(labels[_fillHolesInSlices(liver)], minlength=size)
        touching = np.bincount(labels[_grow(liver)], minlength=size)
        region = [liverSegmentId]
        for label, segmentId in enumerate(others, start=1):
            if not voxels[label]:
                continue
            named = LESION_NAME.search(segmentation.GetSegment(segmentId).GetName())
            if (named and touching[label]) or inside[label] >= INSIDE_FRACTION * voxels[label]:
                region.append(segmentId)
        return region

    def _segmentArray(self, segmentationNode, segmentIds: list[str], referenceVolume):
        """The segments as one label array (k, j, i) on ``referenceVolume``'s grid (None:
        the segmentation's own): value n+1 = ``segmentIds[n]``, a later one winning where
        they overlap."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gdpi_temp__")
        try:
            ids = vtk.vtkStringArray()
            for segmentId in segmentIds:
                ids.InsertNextValue(segmentId)
            reference = (referenceVolume,) if referenceVolume is not None else ()
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelmap, *reference
            ):
                raise InputError(f"could not export the segments {segmentIds}")
            return slicer.util.arrayFromVolume(labelmap).astype(np.int32)
        finally:
            removeNodeAndDisplay(self.scene, labelmap)

    def _writeSegments(self, segmentationNode, segmentIds: list[str], ctNode, path: Path) -> None:
        """The union of segments as a 0/1 labelmap on the CT's grid."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gdpi_temp__")
        try:
            ids = vtk.vtkStringArray()
            for segmentId in segmentIds:
                ids.InsertNextValue(segmentId)
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if not logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, ctNode):
                raise InputError(f"could not export the segments {segmentIds} on the CT's grid")
            values = slicer.util.arrayFromVolume(labelmap)
            if not values.any():
                names = ", ".join(repr(i) for i in segmentIds)
                raise InputError(f"the liver segment(s) {names} are empty")
            values[values != 0] = 1  # in place: one liver label, whatever the segments
            slicer.util.arrayFromVolumeModified(labelmap)
            _writeVolume(labelmap, path)
        finally:
            removeNodeAndDisplay(self.scene, labelmap)

    # ---- one case -----------------------------------------------------------------

    def process(
        self,
        ctNode,
        liverNode,
        segmentId: str | list[str] | None = None,
        labelValue: int = 0,
        settings: DetectionSettings | None = None,
        wait: bool = True,
        onEvent: Callable[[dict], None] | None = None,
        stream: bool = True,
        show: bool = True,
    ):
        """Detect anomalies in ``ctNode`` inside the liver.

        The liver is a segmentation node plus ``segmentId`` or a labelmap volume plus
        ``labelValue`` (0 = every nonzero voxel of a binary or LiTS map: liver + tumour).
        ``segmentId`` is the liver segment, to which the segments inside it or named as a
        lesion are added (:meth:`liverRegionSegmentIds`; the log names them), or a list
        of segment IDs: exactly the segments of the liver region. With ``wait`` (console use) blocks and returns
        :class:`DetectionOutputs`; otherwise returns the running :class:`DetectionJob`.
        ``onEvent`` receives every worker event (``progress``, ``partial``, ...).
        """
        from .dependencies import numpyTorchProblem

        problem = numpyTorchProblem()  # macOS on Intel: torch for NumPy 1, Slicer's NumPy 2
        if problem:
            raise GDPIError(problem)
        job = DetectionJob(
            self, ctNode, liverNode, segmentId, labelValue, settings or DetectionSettings(),
            onEvent, stream, show,
        )  # fmt: skip
        if wait:
            return job.wait()
        return job

    def runDetails(self, scoreNode) -> str:
        """The run details the panel shows for a result: model file and sha256, preset,
        parameters, device, versions, times (from its run.json, kept on the score
        volume as the ``GDPI.run`` attribute)."""
        text = scoreNode.GetAttribute("GDPI.run") if scoreNode is not None else None
        if not text:
            return "No run details: this volume was not made by a detection of this module."
        return formatRunDetails(json.loads(text))

    # ---- inputs a new user does not have yet ---------------------------------------

    def loadSyntheticCase(self, seed: int = 7, name: str = "GDPI synthetic"):
        """The demo's synthetic abdominal CT (HU, with lesions) and its liver labelmap as
        new nodes; returns ``(ctNode, liverNode)``. Slicer's Sample Data module offers it
        as *GDPI synthetic liver CT*, so Detect can be tried without data of one's own."""
        from ..files.synthetic import synthetic_case

        case = synthetic_case(seed=seed)
        sx, sy, sz = case.spacing
        ijkToRas = vtk.vtkMatrix4x4()
        for axis, value in enumerate((-sx, -sy, sz)):  # LPS arrays -> RAS
            ijkToRas.SetElement(axis, axis, value)
        nodes = []
        for array, suffix, cls in (
            (case.ct, "CT", "vtkMRMLScalarVolumeNode"),
            (case.liver, "liver", "vtkMRMLLabelMapVolumeNode"),
        ):
            node = self.scene.AddNewNodeByClass(cls, f"{name} {suffix}")
            slicer.util.updateVolumeFromArray(node, array)
            node.SetIJKToRASMatrix(ijkToRas)
            node.CreateDefaultDisplayNodes()
            nodes.append(node)
        ctDisplay = nodes[0].GetDisplayNode()
        ctDisplay.AutoWindowLevelOff()
        ctDisplay.SetWindowLevel(350, 50)  # abdomen
        return nodes[0], nodes[1]

    def makeLiverSegmentation(
        self,
        ctNode,
        totalSegmentatorLogic=None,
        cpu: bool = False,
        wait: bool = True,
        onEvent: Callable[[dict], None] | None = None,
        command: list[str] | None = None,
    ):
        """Segment the liver of ``ctNode`` with the TotalSegmentator extension: the liver
        only, fast mode, in a background process (:class:`.totalseg.LiverSegmentationJob`:
        its log lines to ``onEvent``, cancel with ``job.cancel()`` or :meth:`cancelAll`).

        ``wait`` (console use) blocks, Slicer processing events, and returns
        ``(segmentationNode, liverSegmentId)``; otherwise returns the running job. The
        new segmentation is under the CT's parent transform. ``totalSegmentatorLogic``
        (a ``TotalSegmentator.TotalSegmentatorLogic``) installs TotalSegmentator's Python
        packages the first time (its ``setupPythonRequirements``, which asks the user)
        and names its weights folder; ``command`` is the program to run (default: as
        that extension starts it, :func:`.totalseg.totalSegmentatorCommand`)."""
        from .totalseg import (
            LiverSegmentationJob,
            totalSegmentatorCommand,
            totalSegmentatorEnvironment,
            totalSegmentatorInstalled,
        )

        if command is None:
            command = totalSegmentatorCommand()
            if not totalSegmentatorInstalled(command):
                setup = getattr(totalSegmentatorLogic, "setupPythonRequirements", None)
                if setup is None:
                    raise GDPIError(
                        "TotalSegmentator is not installed: install the 'TotalSegmentator' "
                        "extension from the Extensions Manager and restart Slicer."
                    )
                setup()  # TotalSegmentator's own installer (asks, then installs)
                if not totalSegmentatorInstalled(command):
                    raise GDPIError(
                        f"TotalSegmentator's program was not found at {command[-1]}: open "
                        "the TotalSegmentator module once, then try again."
                    )
        job = LiverSegmentationJob(
            self, ctNode, command, cpu=cpu, onEvent=onEvent,
            env=totalSegmentatorEnvironment(totalSegmentatorLogic),
        )  # fmt: skip
        return job.wait() if wait else job

    # ---- devices ------------------------------------------------------------------

    def listDevices(self, timeout: float = 120.0) -> list[dict]:
        """The devices the worker's PyTorch can use (CPU, each CUDA GPU, Apple MPS), as
        ``{"id", "name"}`` dicts (``id`` is a ``device`` setting). Asked from a worker
        process (``gdpi devices --json``): Slicer's own process never imports torch, so
        CUDA is not initialised in the GUI and torch's files stay unlocked. Blocks for
        the worker's start-up (seconds)."""
        events: list[dict] = []
        code, stderr = self._runWorker(["devices", "--json"], events.append, timeout)
        found = [e for e in events if e.get("event") == "devices"]
        if code != 0 or not found:
            raise GDPIError(f"could not list the devices:\n{stderr}")
        return found[-1]["devices"]

    def _runWorker(
        self,
        args: list[str],
        onEvent: Callable[[dict], None] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, str]:
        """Run a worker to its end (``idle`` between polls, events to ``onEvent``); it is
        cancelled by :meth:`cancelAll`, an exception or ``timeout`` seconds. Returns the
        exit status and the tail of its standard error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with tempfile.TemporaryDirectory(prefix="GDPILiverAnomaly-", dir=self.tempRoot) as tmp:
            worker = WorkerProcess(args, Path(tmp) / "stderr.txt", self.python)
            self._running.add(worker)
            try:
                while True:
                    code = worker.poll()
                    for event in worker.events():
                        if onEvent is not None:
                            onEvent(event)
                    if code is not None:
                        return code, worker.stderr_tail()
                    if deadline is not None and time.monotonic() > deadline:
                        raise GDPIError(f"the worker took more than {timeout:g} s: stopped")
                    self.idle(0.05)
            except BaseException:
                worker.cancel()
                raise
            finally:
                self._running.discard(worker)

    # ---- folders ------------------------------------------------------------------

    def processFolder(
        self,
        inputDir: str | Path,
        outputDir: str | Path,
        liverDir: str | Path | None = None,
        settings: DetectionSettings | None = None,
        liverLabel: int | None = None,
        onEvent: Callable[[dict], None] | None = None,
        overwrite: bool = False,
        engine: str = "local",
        address: str | None = None,
        workers: int | None = None,
        gpusPerWorker: float | None = None,
    ) -> list[dict]:
        """Every case of a folder (the pairing rules of ``gdpi detect``) into ``outputDir``.

        ``liverDir`` defaults to ``inputDir`` (LiTS names or case subfolders). A broken
        case is recorded in ``outputDir/summary.csv`` and skipped. ``outputDir`` must be
        new or empty, hold an earlier batch of the same settings (resumed: its finished
        cases are kept), or an earlier batch with ``overwrite`` (``gdpi detect
        --overwrite``). ``engine="ray"`` runs it on Ray (``gdpi detect --engine ray``;
        Ray must be installed in the worker's Python): a local Ray instance, or the
        cluster at ``address`` (``"auto"`` or ``HOST:PORT``), with ``workers`` model
        workers of ``gpusPerWorker`` GPUs each. Blocks; returns the summary rows. Raises
        :class:`GDPIError` when nothing could run at all, or when the batch was cancelled
        (:meth:`cancelAll`, Ctrl+C, Slicer quitting); cases finished before that keep
        their outputs and summary rows.
        """
        if engine not in ("local", "ray"):
            raise GDPIError(f"unknown engine {engine!r}: local or ray")
        settings = settings or DetectionSettings()
        args = ["detect", "--ct", str(inputDir), "--liver", str(liverDir or inputDir)]
        args += ["--out", str(outputDir), "--progress", "json", *settings.workerArguments()]
        if liverLabel is not None:
            args += ["--liver-label", str(liverLabel)]
        if overwrite:
            args.append("--overwrite")
        args += ["--engine", engine]
        for flag, value in (("--address", address), ("--workers", workers),
                            ("--gpus-per-worker", gpusPerWorker)):  # fmt: skip
            if value is not None:
                args += [flag, str(value)]
        code, stderr = self._runWorker(args, onEvent)
        if code in (130, -15, -9):
            raise GDPIError("folder processing was cancelled")
        if code not in (0, 3):
            raise GDPIError(f"folder processing failed (exit {code}):\n{stderr}")
        with open(Path(outputDir) / "summary.csv", newline="") as f:
            return list(csv.DictReader(f))


def _fillHolesInSlices(mask: np.ndarray) -> np.ndarray:
    """``mask`` (k, j, i) with the holes of each axial slice filled (SimpleITK, which
    Slicer always bundles)."""
    import SimpleITK as sitk

    filled = mask.copy()
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        image = sitk.GetImageFromArray(mask[k].astype(np.uint8))
        filled[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(image)) > 0
    return filled


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its face neighbours (6-connected dilation by one voxel)."""
    grown = mask.copy()
    for axis in range(3):
        for shift in (1, -1):
            grown |= np.roll(mask, shift, axis=axis) & _notWrapped(mask.shape, axis, shift)
    return grown


def _notWrapped(shape: tuple, axis: int, shift: int) -> np.ndarray:
    """False on the slab that ``np.roll`` by ``shift`` along ``axis`` wrapped around."""
    keep = np.ones(shape[axis], bool)
    keep[0 if shift > 0 else -1] = False
    view = [1, 1, 1]
    view[axis] = shape[axis]
    return keep.reshape(view)


def _writeVolume(node, path: Path) -> None:
    """Write a volume node (its own IJK-to-RAS geometry) without touching the node."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(node):
        raise InputError(f"could not write {node.GetName()!r} to {path}")
