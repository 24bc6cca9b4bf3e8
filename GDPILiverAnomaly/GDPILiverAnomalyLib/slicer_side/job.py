"""One detection running in the background for Slicer: the worker process, its
temporary folder, the streamed heatmap, the GPU out-of-memory retry, and the result
nodes it loads (or removes again when it fails or is cancelled).

Imports ``slicer`` (MRML) and ``vtk``, never ``qt`` or torch.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer

from ..errors import GDPIError
from ..method.parameters import PARAMETER_NAMES, PRESETS, DetectionParams, default_batch_size
from ..method.phase import PhaseEstimate
from ..running.worker import WorkerProcess
from .display import (
    LESION_TABLE_REFERENCE,
    PSEUDO_HEALTHY_REFERENCE,
    addResultNode,
    lesionRow,
    placeBeside,
    removeNodeAndDisplay,
    sliceCompositeNodes,
)
from .settings import PRESET_PARAMETERS, DetectionSettings

_OOM_MARKERS = ("out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED")


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
    if "Numpy is not available" in stderr or "compiled using NumPy 1" in stderr:
        return (
            "The installed PyTorch was built for NumPy 1 but this Slicer has NumPy 2: "
            "click Advanced > Install / upgrade (on a Mac with an Intel processor, use "
            "Slicer 5.8 or install numpy<2; see the documentation)."
        )
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
    if settings.value("device") == "cpu" or not any(m in stderr for m in _OOM_MARKERS):
        return None
    current = settings.value("batch_size") or default_batch_size("cuda")
    return current // 2 if current > 1 else None


def formatDuration(seconds: float) -> str:
    """``2 min 05 s`` or ``45 s``."""
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def formatProgress(event: dict) -> str:
    """Status line for a ``progress`` event: slices, network evaluations, ETA."""
    text = (
        f"Slices {event['slices_done']}/{event['slices_total']}, "
        f"network evaluations {event['nfe_done']}/{event['nfe_total']}"
    )
    if event.get("eta_s") is not None:
        text += f", about {formatDuration(event['eta_s'])} left"
    return text


def formatEvent(event: dict) -> str | None:
    """A readable log line for a worker event (None for events that only update the
    status line: progress and streamed heatmaps)."""
    kind = event.get("event")
    if kind == "start":
        p = event.get("parameters", {})
        return (
            f"Started: preset {p.get('preset')}, {p.get('sampler', 'repaint')} sampler, "
            f"{p.get('steps')} steps, jump length "
            f"{p.get('jump_length')}, {p.get('jump_n_sample')} resamplings = "
            f"{event.get('nfe_per_batch')} network evaluations per batch, device "
            f"{p.get('device')}"
        )
    if kind == "estimate":
        return (
            f"Estimated time: about {formatDuration(event['seconds'])} on {event['device']} "
            f"({event['nfe_total']} network evaluations, {event['slices_total']} liver slices)"
        )
    if kind == "done":
        line = f"Worker done: {event.get('lesions')} lesion(s), {event.get('seconds')} s"
        return line + (f"; {event['ame']}" if event.get("ame") else "")
    if kind == "error":
        return "Error: " + str(event.get("message", ""))
    if kind == "cancelled":
        return "Worker cancelled"
    if kind == "log":
        return str(event.get("message", ""))
    return None


def _amount(voxels: int, runInfo: dict) -> str:
    """``14.2 % of the liver (218 mL)`` for ``voxels`` liver voxels of a run."""
    inputs = runInfo.get("inputs", {})
    liver = int(inputs.get("liver_voxels") or 0)
    spacing = inputs.get("geometry", {}).get("spacing_mm")
    text = f"{100 * voxels / liver:.1f} % of the liver" if liver else f"{voxels} liver voxels"
    if spacing:
        ml = voxels * float(np.prod(spacing)) / 1000
        text += f" ({ml:.0f} mL)" if ml >= 10 else f" ({ml:.1f} mL)"
    return text


def coverageWarning(runInfo: dict) -> str | None:
    """In plain words, how much of the liver was not analysed (run.json's
    ``stats.liver_outside_grid_voxels``: liver outside the model's field of view, where
    the score is 0), or None when the whole liver was."""
    outside = int((runInfo.get("stats") or {}).get("liver_outside_grid_voxels") or 0)
    if outside <= 0:
        return None
    grid = (runInfo.get("checkpoint") or {}).get("input_grid") or {}
    fov = float(grid.get("size") or 0) * float(grid.get("spacing_mm") or 0)
    where = f"the model's {fov:g} mm field of view" if fov else "the model's field of view"
    return (
        f"Not analysed: {_amount(outside, runInfo)} lies outside {where}; its score is 0 "
        "there, so a tumour in that part would not be shown."
    )


def completionMessage(runInfo: dict, lesions: int, threshold: float, seconds: float) -> str:
    """The status line of a finished detection, ending with :func:`coverageWarning`."""
    text = (
        f"Done: {lesions} lesion(s) above {threshold:g} HU, {runInfo['nfe']} network "
        f"evaluations, {seconds:.0f} s on {runInfo['device']}"
    )
    warning = coverageWarning(runInfo)
    return f"{text}. {warning}" if warning else text


def presetDescription(parameters: dict) -> str:
    """``fast`` when a run's parameters are exactly a preset's, else ``custom (from
    fast: jump_n_sample 3 instead of 2, ...)``; the run options (device, batch size,
    threshold) are not part of a preset."""
    base = parameters.get("preset")
    if base not in PRESETS:
        return "custom"
    reference = DetectionParams.from_preset(base).to_dict()
    changed = [
        f"{name} {parameters[name]} instead of {reference[name]}"
        for name in PRESET_PARAMETERS
        if name in parameters and parameters[name] != reference[name]
    ]
    return f"custom (from {base}: {', '.join(changed)})" if changed else base


def formatRunDetails(runInfo: dict) -> str:
    """What the panel shows for a result: the model file and its sha256, the preset
    and every parameter, device, software versions and times (from its run.json)."""
    checkpoint = runInfo.get("checkpoint") or {}
    parameters = runInfo.get("parameters") or {}
    stats = runInfo.get("stats") or {}
    versions = runInfo.get("versions") or {}
    timings = runInfo.get("timings_s") or {}
    path = checkpoint.get("path")
    grid = checkpoint.get("input_grid") or {}
    model = Path(path).name if path else "(unknown)"
    if grid:
        model += f", {grid.get('size')} px grid at {grid.get('spacing_mm'):g} mm"
    values = ", ".join(f"{n} {parameters[n]}" for n in PARAMETER_NAMES if n in parameters)
    device = str(runInfo.get("device", stats.get("device", "?")))
    if stats.get("bf16") is not None:
        device += f" (bf16 {'on' if stats['bf16'] else 'off'})"
    if stats.get("batch_size"):
        device += f", batch {stats['batch_size']}"
    software = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "platform")
    lines = [
        f"Model: {model}",
        f"Model file: {path or '(unknown)'}",
        f"sha256: {checkpoint.get('sha256') or '(unknown)'}",
        f"Preset: {presetDescription(parameters)}",
        f"Parameters: {values}",
        f"Device: {device}; {runInfo.get('nfe', '?')} network evaluations",
        f"Versions: {software}" + (f"; {versions['platform']}" if versions.get("platform") else ""),
        f"Time: started {runInfo.get('started', '?')}, finished {runInfo.get('finished', '?')}"
        + (f", {timings['wall']:g} s" if timings.get("wall") is not None else ""),
    ]
    if stats.get("device_check"):
        lines.append(stats["device_check"])
    if stats.get("two_sided") is not None:
        side = "darker and brighter" if stats["two_sided"] else "darker"
        lines.append(f"Re-painted: {side} tissue ({stats.get('two_sided_from', 'setting')})")
        if stats.get("phase"):
            lines.append(f"Contrast phase: {PhaseEstimate.from_dict(stats['phase']).describe()}")
    lines.append(coverageWarning(runInfo) or "Liver analysed: all of it")
    return "\n".join(lines)


def loadPartial(path: Path) -> np.ndarray:
    """A streamed heatmap file of the worker (``partial-N.npy``)."""
    return np.load(path)


def waitForJob(job, what: str, pollInterval: float, timeout: float | None):
    """Poll ``job`` (``poll()`` True while running; ``cancel()``, ``state``, ``error``,
    ``outputs``, ``logic.idle``) until it ends; return its outputs or raise
    :class:`GDPIError` naming ``what``. Ctrl+C or the timeout (s) cancels it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while job.poll():
            if deadline is not None and time.monotonic() > deadline:
                job.cancel()
                raise GDPIError(f"{what} did not finish within {timeout} s; cancelled")
            job.logic.idle(pollInterval)
    except KeyboardInterrupt:
        job.cancel()
        raise
    if job.state != "completed":
        raise GDPIError(job.error or f"{what} {job.state}")
    return job.outputs


class DetectionJob:
    """One running detection: a worker process, its temporary folder, its nodes.

    ``state``: ``running``, ``completed``, ``failed`` or ``cancelled``. Call
    :meth:`poll` regularly (a GUI timer); it never blocks. Nodes shown while running
    (the streamed score) are removed again if the job fails or is cancelled, and the
    slice views get their previous layers back.
    """

    def __init__(
        self,
        logic,
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
        self._pendingPartial: tuple | None = None  # a streamed heatmap to read again
        self._created: list = []  # every node this job added (removed again on failure)
        self._savedLayers = [
            (c, c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
            for c in sliceCompositeNodes(self.scene)
        ]
        if (
            isinstance(segmentId, str)
            and liverNode is not None
            and liverNode.IsA("vtkMRMLSegmentationNode")
            and liverNode.GetSegmentation().GetSegment(segmentId) is not None
        ):
            # the liver segment with the tumours inside it or named as one (their union
            # is the mask: a tumour segment left out would score 0)
            segmentId = logic.liverRegionSegmentIds(liverNode, segmentId, ctNode)
            if len(segmentId) > 1:
                names = [liverNode.GetSegmentation().GetSegment(i).GetName() for i in segmentId]
                self._log("Liver region: segments " + ", ".join(names))
        self.folder = Path(tempfile.mkdtemp(prefix="GDPILiverAnomaly-", dir=logic.tempRoot))
        try:
            self._inputArgs = logic._writeInputs(
                self.folder, ctNode, liverNode, segmentId, labelValue
            )
            self._start()
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        logic._running.add(self)

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
        logging.info("GDPI: %s", text)  # Slicer's log: bug reports carry it
        if self.onEvent is not None:
            self.onEvent({"event": "log", "message": text})

    def poll(self) -> bool:
        """Handle what the worker reported since the last call; True while running."""
        if not self.running:
            return False
        code = self.worker.poll()
        pending, self._pendingPartial = self._pendingPartial, None
        if pending is not None and code is None:  # a heatmap file that was held open
            self._showPartial(*pending)
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
            current = self.settings.value("batch_size") or default_batch_size("cuda")
            self._log(f"GPU out of memory with batch {current}; retrying with batch {smaller}.")
            self.settings.parameters["batch_size"] = smaller
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
        elif kind == "start":
            self.message = f"Running ({event.get('nfe_per_batch')} network evaluations per batch)"
        elif kind == "estimate":
            self.message = f"Estimated time: about {formatDuration(event['seconds'])}"
        line = formatEvent(event)
        if line is not None:
            self.log.append(line)
            logging.info("GDPI worker: %s", line)
        if self.onEvent is not None:
            self.onEvent({**event, "text": line} if line is not None else event)

    def _ensureScoreNode(self):
        if self._scoreNode is None:
            node = addResultNode(
                self.scene, "vtkMRMLScalarVolumeNode", f"{self.ctNode.GetName()} GDPI score",
                "score",
            )  # fmt: skip
            self._created.append(node)
            node.SetAndObserveTransformNodeID(self.ctNode.GetTransformNodeID())
            shape = slicer.util.arrayFromVolume(self.ctNode).shape  # a view: no copy
            slicer.util.updateVolumeFromArray(node, np.zeros(shape, np.float32))  # once
            node.CopyOrientation(self.ctNode)
            placeBeside(self.scene, self.ctNode, node)
            self.logic.setupScoreDisplay(node, self.settings.value("threshold_hu"))
            if self.show:
                self.logic.showInSliceViews(self.ctNode, node)
            self._scoreNode = node
        return self._scoreNode

    def _showPartial(self, path: Path, offset: list[int]) -> None:
        try:
            part = loadPartial(path)
        except FileNotFoundError:  # replaced by a newer one meanwhile: wait for it
            return
        except OSError:  # still held open (Windows: the worker, a virus scanner): retried
            self._pendingPartial = (path, offset)  # at the next poll, unless a newer comes
            return
        self._pendingPartial = None
        node = self._ensureScoreNode()
        k, j, i = offset
        # in place, only the streamed box: no copy of the whole volume on the GUI thread
        array = slicer.util.arrayFromVolume(node)
        array[k : k + part.shape[0], j : j + part.shape[1], i : i + part.shape[2]] = part
        slicer.util.arrayFromVolumeModified(node)

    def _finish(self) -> None:
        import SimpleITK as sitk

        out = self.folder / "out"
        runInfo = json.loads((out / "run.json").read_text())
        score = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "score.nrrd")))
        pseudo = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pseudo_healthy.nrrd")))
        with open(out / "lesions.csv", newline="") as f:
            lesions = [lesionRow(row) for row in csv.DictReader(f)]
        scoreNode = self._ensureScoreNode()
        slicer.util.arrayFromVolume(scoreNode)[:] = score
        slicer.util.arrayFromVolumeModified(scoreNode)
        scoreNode.SetAttribute("GDPI.run", json.dumps(runInfo))
        pseudoNode = addResultNode(
            self.scene, "vtkMRMLScalarVolumeNode", f"{self.ctNode.GetName()} pseudo-healthy",
            "pseudo-healthy",
        )  # fmt: skip
        self._created.append(pseudoNode)
        slicer.util.updateVolumeFromArray(pseudoNode, pseudo.astype(np.float32))
        pseudoNode.CopyOrientation(self.ctNode)
        pseudoNode.SetAndObserveTransformNodeID(self.ctNode.GetTransformNodeID())
        pseudoNode.CreateDefaultDisplayNodes()
        ctDisplay = self.ctNode.GetDisplayNode()
        if ctDisplay is not None:
            pseudoNode.GetDisplayNode().AutoWindowLevelOff()
            pseudoNode.GetDisplayNode().SetWindowLevel(ctDisplay.GetWindow(), ctDisplay.GetLevel())
        placeBeside(self.scene, self.ctNode, pseudoNode)
        table = addResultNode(
            self.scene, "vtkMRMLTableNode", f"{self.ctNode.GetName()} GDPI lesions", "lesions"
        )
        self._created.append(table)
        placeBeside(self.scene, self.ctNode, table)
        scoreNode.SetNodeReferenceID(LESION_TABLE_REFERENCE, table.GetID())
        scoreNode.SetNodeReferenceID(PSEUDO_HEALTHY_REFERENCE, pseudoNode.GetID())
        self.logic.updateLesionTable(table, lesions)
        self.outputs = DetectionOutputs(scoreNode, pseudoNode, table, runInfo)
        seconds = time.monotonic() - self.startTime
        self.state = "completed"
        self.message = completionMessage(
            runInfo, len(lesions), self.settings.value("threshold_hu"), seconds
        )
        self._log(self.message)
        note = (runInfo.get("stats") or {}).get("device_check")
        if note:  # auto on a Mac: whether the Apple GPU passed its self-check
            self._log(note)
        warning = coverageWarning(runInfo)
        if warning:
            logging.warning("GDPI: %s", warning)
        self._end()

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
        for node in reversed(self._created):
            if self.scene.IsNodePresent(node):
                removeNodeAndDisplay(self.scene, node)
        self._created = []
        self._scoreNode = None
        for composite, background, foreground, opacity in self._savedLayers:
            with slicer.util.NodeModify(composite):
                composite.SetBackgroundVolumeID(background)
                composite.SetForegroundVolumeID(foreground)
                composite.SetForegroundOpacity(opacity)
        self._end()

    def _end(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.logic._running.discard(self)

    def wait(self, pollInterval: float = 0.1, timeout: float | None = None) -> DetectionOutputs:
        """Block until done; return the outputs or raise :class:`GDPIError`.

        Ctrl+C (KeyboardInterrupt), :meth:`DetectionLogic.cancelAll` or the timeout
        cancels the job. Between polls the logic's ``idle`` runs (in Slicer: the GUI
        keeps processing events, so it stays responsive while a console call waits).
        """
        return waitForJob(self, "detection", pollInterval, timeout)
