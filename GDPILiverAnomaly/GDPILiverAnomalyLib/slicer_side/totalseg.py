"""The liver from the TotalSegmentator extension, made in the background.

The extension's ``TotalSegmentatorLogic.process`` blocks Slicer until it ends (it reads
its program's output line by line on the GUI thread, silent for minutes while the
network runs) and gives no handle to stop it. So the module runs TotalSegmentator's own
command-line program, as that logic launches it (``PythonSlicer <Python
scripts>/TotalSegmentator -i ct.nii -o folder ...``), through its own job runner: a
process group polled from a timer, its log lines to the panel, cancel kills the tree.
It asks for the liver only (``--roi_subset liver``) in fast mode (3 mm model).

Imports ``slicer`` (MRML) and ``vtk``, never ``qt`` or torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import slicer

from ..errors import GDPIError
from ..running.worker import WorkerProcess, default_python
from .display import placeBeside, removeNodeAndDisplay
from .job import waitForJob

#: TotalSegmentator's class name of the liver (its file in the output folder).
LIVER_CLASS = "liver"
#: DICOM terminology of the new liver segment (SCT 10200004 Liver, category Anatomical
#: Structure), Slicer's serialisation.
LIVER_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)
LIVER_COLOR = (221 / 255, 130 / 255, 101 / 255)  # Slicer's liver colour


def totalSegmentatorCommand(
    scriptsDir: str | None = None, python: str | None = None, osName: str = os.name
) -> list[str]:
    """How the TotalSegmentator extension starts its program: ``PythonSlicer`` and the
    ``TotalSegmentator`` script (``.exe`` on Windows) in Slicer's Python scripts folder."""
    name = "TotalSegmentator.exe" if osName == "nt" else "TotalSegmentator"
    folder = scriptsDir or sysconfig.get_path("scripts")
    return [python or default_python(), os.path.join(folder, name)]


def totalSegmentatorArguments(ctPath: str, outputDir: str, cpu: bool) -> list[str]:
    """The liver only (``--roi_subset liver``), fast mode, on the CPU or a GPU
    (TotalSegmentator itself falls back to the CPU when it finds no GPU)."""
    return [
        "-i", ctPath, "-o", outputDir, "--roi_subset", LIVER_CLASS, "--fast",
        "--device", "cpu" if cpu else "gpu",
    ]  # fmt: skip


#: Lines of a failed download of TotalSegmentator's weights (not a URL in its citation).
_NETWORK_ERRORS = (
    "urlopen error", "connectionerror", "connection refused", "connection reset",
    "max retries exceeded", "name resolution", "failed to establish", "timed out",
    "ssl", "proxy",
)  # fmt: skip


def failureMessage(code: int, lines: list[str]) -> str:
    """What went wrong, in plain words, from TotalSegmentator's exit status and last
    lines; the lines follow for the details."""
    text = "\n".join(lines)
    lowered = text.lower()
    if "out of memory" in lowered:
        advice = (
            "The GPU ran out of memory: choose CPU as the device (Model and settings) "
            "and try again."
        )
    elif "no module named" in lowered:
        advice = (
            "TotalSegmentator's Python packages are not complete: open the "
            "TotalSegmentator module once, click Apply on any CT (it installs what is "
            "missing), then try again."
        )
    elif any(w in lowered for w in _NETWORK_ERRORS):
        advice = (
            "TotalSegmentator downloads its model the first time it runs and could not: "
            "check the internet connection or proxy, then try again."
        )
    elif "no space" in lowered:
        advice = "The disk is full: free a few GB and try again."
    else:
        advice = "Its last messages are below."
    return f"TotalSegmentator could not segment the liver (exit status {code}). {advice}"


class LiverSegmentationJob:
    """TotalSegmentator segmenting the liver of one CT, in the background.

    ``state``: ``running``, ``completed``, ``failed`` or ``cancelled``; call
    :meth:`poll` from a timer (never blocks). Its output lines go to ``onEvent`` as
    ``{"event": "log", "message": line}`` and to Slicer's log. When it completes,
    ``outputs`` is ``(segmentationNode, liverSegmentId)``: a new segmentation with one
    segment ``liver``, under the CT's parent transform (the CT goes to
    TotalSegmentator in its own coordinates), the CT as its reference geometry, beside
    the CT in the subject hierarchy. Failure or cancel leaves the scene as it was.
    """

    def __init__(
        self, logic, ctNode, command: list[str], cpu: bool = False, onEvent=None,
        env: dict | None = None,
    ):  # fmt: skip
        from .logic import _writeVolume

        if ctNode is None or ctNode.GetImageData() is None:
            raise GDPIError("Select the CT first: TotalSegmentator needs a CT volume.")
        self.logic, self.scene, self.ctNode = logic, logic.scene, ctNode
        self.onEvent = onEvent
        self.state = "running"
        self.message = "TotalSegmentator is segmenting the liver"
        self.log: list[str] = []
        self.error: str | None = None
        self.outputs: tuple | None = None
        self.startTime = time.monotonic()
        self._tail: deque[str] = deque(maxlen=15)
        self.folder = Path(tempfile.mkdtemp(prefix="GDPILiverAnomaly-TS-", dir=logic.tempRoot))
        try:
            ctPath = self.folder / "ct.nii"
            _writeVolume(ctNode, ctPath)
            self.args = [*command, *totalSegmentatorArguments(
                str(ctPath), str(self.folder / "segmentation"), cpu)]  # fmt: skip
            self._log(
                f"TotalSegmentator: segmenting the liver of {ctNode.GetName()!r} (liver "
                f"only, fast mode, {'CPU' if cpu else 'GPU if there is one'}); this takes "
                "about a minute on a GPU and a few minutes on a CPU."
            )
            logging.info("GDPI: TotalSegmentator command: %s", " ".join(self.args))
            self.worker = WorkerProcess([], None, env=env, command=self.args)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        logic._running.add(self)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def _log(self, text: str) -> None:
        self.log.append(text)
        logging.info("GDPI: %s", text)
        if self.onEvent is not None:
            self.onEvent({"event": "log", "message": text})

    def poll(self) -> bool:
        """Handle TotalSegmentator's output since the last call; True while running."""
        if not self.running:
            return False
        code = self.worker.poll()
        for event in self.worker.events():
            line = event.get("message") if event.get("event") == "log" else str(event)
            if line:
                self._tail.append(line)
                self._log(line)
        if code is None:
            seconds = time.monotonic() - self.startTime
            self.message = f"TotalSegmentator is segmenting the liver ({seconds:.0f} s)"
            return True
        if code != 0:
            self._fail(failureMessage(code, list(self._tail)))
            return False
        try:
            self._finish()
        except GDPIError as exc:
            self._fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - shown to the user, the scene restored
            self._fail(f"Could not load TotalSegmentator's liver: {exc}")
        return False

    def _finish(self) -> None:
        path = self.folder / "segmentation" / f"{LIVER_CLASS}.nii.gz"
        if not path.exists():
            raise GDPIError(
                "TotalSegmentator wrote no liver for this CT: is the liver in the scan?"
            )
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gdpi_temp__")
        segmentation = None
        try:
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            if not storage.ReadData(labelmap):
                raise GDPIError(f"could not read TotalSegmentator's output {path.name}")
            values = slicer.util.arrayFromVolume(labelmap)
            if not np.any(values):
                raise GDPIError(
                    "TotalSegmentator found no liver in this CT: check that the scan "
                    "covers the upper abdomen, or draw the liver in Segment Editor."
                )
            values[values != 0] = 1
            slicer.util.arrayFromVolumeModified(labelmap)
            segmentation = self.scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{self.ctNode.GetName()} liver (TotalSegmentator)"
            )
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(self.ctNode)
            segmentation.SetNodeReferenceID(
                segmentation.GetReferenceImageGeometryReferenceRole(), self.ctNode.GetID()
            )
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentation
            ):
                raise GDPIError("could not import TotalSegmentator's liver as a segment")
            # the same coordinates as the CT: under the CT's transform (DICOM import adds
            # one for irregular slice spacing), so Detect takes them as they are
            segmentation.SetAndObserveTransformNodeID(self.ctNode.GetTransformNodeID())
            placeBeside(self.scene, self.ctNode, segmentation)
            segment = segmentation.GetSegmentation().GetNthSegment(0)
            segment.SetName(LIVER_CLASS)
            segment.SetColor(*LIVER_COLOR)
            segment.SetTag("TerminologyEntry", LIVER_TERMINOLOGY)
        except BaseException:
            if segmentation is not None:
                removeNodeAndDisplay(self.scene, segmentation)
            raise
        finally:
            removeNodeAndDisplay(self.scene, labelmap)
        segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
        self.outputs = (segmentation, segmentId)
        self.state = "completed"
        seconds = time.monotonic() - self.startTime
        self.message = f"Liver segment ready: {segmentation.GetName()} ({seconds:.0f} s)"
        self._log(self.message)
        self._end()

    def _fail(self, error: str) -> None:
        self.state = "failed"
        tail = "\n".join(self._tail)
        self.error = error + (f"\n\n{tail}" if tail else "")
        self.message = error
        self._log(error)
        self._end()

    def cancel(self) -> None:
        """Kill TotalSegmentator's process tree and delete its temporary folder; the
        scene is left as it was."""
        if not self.running:
            return
        self.worker.cancel()
        self.state = "cancelled"
        self.message = "TotalSegmentator cancelled"
        self._log("TotalSegmentator cancelled by the user")
        self._end()

    def _end(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.logic._running.discard(self)

    def wait(self, pollInterval: float = 0.2, timeout: float | None = None) -> tuple:
        """Block (the logic's ``idle`` between polls: Slicer keeps handling events) until
        done; return ``(segmentationNode, liverSegmentId)`` or raise :class:`GDPIError`."""
        return waitForJob(self, "TotalSegmentator", pollInterval, timeout)


def totalSegmentatorEnvironment(totalSegmentatorLogic=None) -> dict:
    """The program's environment: Slicer's, with the weights folder the extension's
    logic was told to use (``totalSegmentatorWeightsPath``), as its ``process`` does."""
    env = dict(os.environ)
    weights = getattr(totalSegmentatorLogic, "totalSegmentatorWeightsPath", None)
    if weights:
        env["TOTALSEG_WEIGHTS_PATH"] = str(weights)
    return env


def totalSegmentatorInstalled(command: list[str]) -> bool:
    """True when TotalSegmentator's program is there (pip writes it with the Python
    package, which the extension installs on first use)."""
    return Path(command[-1]).exists()
