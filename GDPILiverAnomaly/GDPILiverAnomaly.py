"""GDPI Liver Anomaly: unsupervised liver tumour detection in CT (Slicer scripted module).

The widget is thin: settings live in a parameter node, every action goes to
``GDPILiverAnomalyLib.slicer_side.logic.DetectionLogic`` (importable and tested without Qt),
and detection runs in a background ``PythonSlicer`` process polled from a timer.
"""

import logging
import os
import sys
import tempfile
import time
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from GDPILiverAnomalyLib.errors import GDPIError
from GDPILiverAnomalyLib.method.parameters import PRESETS, choices, help_text, value_range
from GDPILiverAnomalyLib.slicer_side import dependencies, sample
from GDPILiverAnomalyLib.slicer_side.display import (
    LESION_TABLE_REFERENCE,
    PSEUDO_HEALTHY_REFERENCE,
    RESULT_ROLE_ATTRIBUTE,
    defaultCtNode,
    liverSegmentId,
    resultVolumeIds,
)
from GDPILiverAnomalyLib.slicer_side.logic import DetectionLogic
from GDPILiverAnomalyLib.slicer_side.settings import (
    AME_SIDES,
    BF16_CHOICES,
    PANEL_DEFAULTS,
    PANEL_FIELDS,
    PANEL_PRESETS,
    RESEARCH_NOTICE,
    SCORE_WINDOW_HU,
    DetectionSettings,
    presetUpdates,
)
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: The extension's homepage (EXTENSION_HOMEPAGE in the top-level CMakeLists.txt) and
#: this module's documentation there.
HOMEPAGE = "https://github.com/GDPILiverAnomaly/GDPILiverAnomaly"
DOCUMENTATION_URL = HOMEPAGE + "/blob/main/docs/slicer.md"
#: The method's paper (README, "How to cite"; no venue or DOI known to this project).
PAPER_CITATION = (
    "Y. Shi, C. Niu, A. L. Simpson, B. De Man, R. Do, G. Wang, \u201cCT-based Anomaly "
    "Detection of Liver Tumors Using Generative Diffusion Prior\u201d"
)

#: The widget of each detection parameter, bound to its parameter node field
#: (``PANEL_FIELDS``) in the .ui. Those a preset fixes sit in
#: ``presetParametersGroupBox``, editable only in ``custom``; the device combo box is
#: filled by the widget, the threshold slider is in Results.
PARAMETER_WIDGETS = {
    "steps": "stepsSpinBox",
    "jump_length": "jumpLengthSpinBox",
    "jump_n_sample": "resamplingsSpinBox",
    "sampler": "samplerComboBox",
    "eta": "etaSpinBox",
    "samples": "samplesSpinBox",
    "offset_hu": "offsetSpinBox",
    "ame_sigma_mm": "ameSigmaSpinBox",
    "two_sided": "ameSideComboBox",
    "min_candidate_mm2": "minCandidateSpinBox",
    "calibrate": "calibrateCheckBox",
    "depth_sigma_mm": "depthSigmaSpinBox",
    "depth_spacing_mm": "depthSpacingSpinBox",
    "median_size": "medianSizeSpinBox",
    "seed": "seedSpinBox",
    "bf16": "bf16ComboBox",
    "batch_size": "batchSizeSpinBox",
    "device": "deviceComboBox",
    "threshold_hu": "thresholdSliderWidget",
}


class GDPILiverAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GDPI Liver Anomaly")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["GDPILiverAnomaly developers"]
        self.parent.helpText = _(
            "Finds liver tumours in CT without tumour labels: darker regions inside the "
            "liver are re-painted as healthy tissue by a diffusion model, and the "
            "difference (HU) is the anomaly heatmap. Pick a CT and a liver segmentation "
            "or labelmap, then click Detect. Research software, not a medical device."
        )
        self.parent.helpText += (
            f'<p><a href="{DOCUMENTATION_URL}">'
            + _("Documentation: the panel, the Python console, batch processing")
            + "</a></p><p>"
            + _("Method")
            + f": {PAPER_CITATION}</p>"
        )
        self.parent.acknowledgementText = _(
            "The bundled real-CT model was trained on HCC-TACE-Seg (Moawad et al., The "
            "Cancer Imaging Archive, doi:10.7937/TCIA.5FNA-0924, CC BY 4.0), CHAOS CT set 3 "
            "(Kavur et al., Medical Image Analysis 69 (2021) 101950, "
            "doi:10.5281/zenodo.3431873, CC BY-SA 4.0), the TotalSegmentator test data "
            "(Wasserthal et al., Apache-2.0) and dcmqi test data (QIICR, Brigham and "
            "Women's Hospital, BSD-style). Because it learnt from CHAOS, the real-CT "
            "weights are shared under CC BY-SA 4.0; the code is Apache-2.0. Method: "
            "Shi et al., CT-based Anomaly Detection of Liver Tumors Using Generative "
            "Diffusion Prior (GDPI)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: the demo's synthetic case, generated locally on click (no download)
#


def registerSampleData():
    """Offer the synthetic case in the Sample Data module (category GDPI Liver Anomaly):
    files shipped with the module, so ``SampleData.downloadSample("GDPISyntheticLiverCT")``
    works from the Python console too (it loads a source's files, never a custom
    downloader); a click in the panel also selects them here."""
    try:
        import SampleData
    except ImportError:  # Sample Data module disabled
        return
    import inspect

    register = SampleData.SampleDataLogic.registerCustomSampleDataSource
    keyword = (
        "loadFileTypes" if "loadFileTypes" in inspect.signature(register).parameters
        else "loadFileType"  # Slicer 5.6
    )  # fmt: skip
    moduleDir = os.path.dirname(__file__)
    thumbnail = os.path.join(moduleDir, "Resources", "Icons", "GDPILiverAnomaly.png")
    register(
        **sample.sampleDataSource(moduleDir, thumbnail, keyword),
        customDownloader=loadSyntheticSample,
    )


def loadSyntheticSample(source):
    """The Sample Data panel's click: load the shipped files as the console's
    ``SampleData.downloadSample`` does, then select them in the module."""
    import SampleData

    nodes = SampleData.SampleDataLogic().downloadFromSource(source)
    if len(nodes) != 2 or isinstance(nodes[0], str):
        slicer.util.errorDisplay(_("Could not load the GDPI sample data (see the log)."))
        return nodes
    ct, segmentation = nodes
    parameterNode = slicer.util.getModuleLogic("GDPILiverAnomaly").getParameterNode()
    parameterNode.inputVolume = ct
    parameterNode.liverSource = "Segmentation"
    parameterNode.liverSegmentation = segmentation
    parameterNode.liverSegmentId = liverSegmentId(segmentation) or ""
    return nodes


#
# Parameter node
#


@parameterNodeWrapper
class GDPILiverAnomalyParameterNode:
    """Panel settings; saved with the scene. Every detection parameter of
    ``GDPILiverAnomalyLib.method.parameters`` is here by name and range (HU for
    intensities, mm for the smoothing sigmas, model-grid pixels for the median filter;
    ``ameSide`` is ``two_sided``, batch size 0 = automatic), starting at the default
    preset's values. Under ``fast`` and ``paper`` the node shows that preset's values
    (the widget writes them, ``presetUpdates``) and only the run options are sent;
    ``custom`` sends every value (``DetectionSettings.fromPanel``). The threshold's range
    is the score colour window (``SCORE_WINDOW_HU``): the slider shows what the colours
    can show."""

    inputVolume: vtkMRMLScalarVolumeNode
    liverSource: Annotated[str, Choice(["Segmentation", "Labelmap"])] = "Segmentation"
    liverSegmentation: vtkMRMLSegmentationNode
    liverSegmentId: str = ""
    # the segments that form the liver region (liver + tumours inside it); empty = the
    # liver segment and what the logic finds with it (liverRegionSegmentIds)
    liverRegionSegmentIds: list[str]
    liverLabelmap: vtkMRMLLabelMapVolumeNode
    liverLabelValue: Annotated[int, WithinRange(0, 65535)] = 0
    checkpointPath: str = ""
    preset: Annotated[str, Choice(list(PANEL_PRESETS))] = "fast"
    customBase: Annotated[str, Choice(sorted(PRESETS))] = "fast"  # what custom started from
    steps: Annotated[int, WithinRange(*value_range("steps"))] = PANEL_DEFAULTS["steps"]
    jump_length: Annotated[int, WithinRange(*value_range("jump_length"))] = PANEL_DEFAULTS[
        "jump_length"
    ]
    jump_n_sample: Annotated[int, WithinRange(*value_range("jump_n_sample"))] = PANEL_DEFAULTS[
        "jump_n_sample"
    ]
    sampler: Annotated[str, Choice(list(choices("sampler")))] = PANEL_DEFAULTS["sampler"]
    eta: Annotated[float, WithinRange(*value_range("eta"))] = PANEL_DEFAULTS["eta"]
    samples: Annotated[int, WithinRange(*value_range("samples"))] = PANEL_DEFAULTS["samples"]
    offset_hu: Annotated[float, WithinRange(*value_range("offset_hu"))] = PANEL_DEFAULTS[
        "offset_hu"
    ]
    ame_sigma_mm: Annotated[float, WithinRange(*value_range("ame_sigma_mm"))] = PANEL_DEFAULTS[
        "ame_sigma_mm"
    ]
    ameSide: Annotated[str, Choice(list(AME_SIDES))] = PANEL_DEFAULTS["ameSide"]
    min_candidate_mm2: Annotated[float, WithinRange(*value_range("min_candidate_mm2"))] = (
        PANEL_DEFAULTS["min_candidate_mm2"]
    )
    calibrate: bool = PANEL_DEFAULTS["calibrate"]
    depth_sigma_mm: Annotated[float, WithinRange(*value_range("depth_sigma_mm"))] = PANEL_DEFAULTS[
        "depth_sigma_mm"
    ]
    depth_spacing_mm: Annotated[float, WithinRange(*value_range("depth_spacing_mm"))] = (
        PANEL_DEFAULTS["depth_spacing_mm"]
    )
    median_size: Annotated[int, WithinRange(*value_range("median_size"))] = PANEL_DEFAULTS[
        "median_size"
    ]
    seed: Annotated[int, WithinRange(*value_range("seed"))] = PANEL_DEFAULTS["seed"]
    bf16: Annotated[str, Choice(list(BF16_CHOICES))] = PANEL_DEFAULTS["bf16"]
    batch_size: Annotated[int, WithinRange(0, value_range("batch_size")[1])] = PANEL_DEFAULTS[
        "batch_size"
    ]
    device: str = PANEL_DEFAULTS["device"]
    threshold_hu: Annotated[float, WithinRange(*SCORE_WINDOW_HU)] = PANEL_DEFAULTS["threshold_hu"]
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    perLesionSegments: bool = True
    scoreVolume: vtkMRMLScalarVolumeNode
    pseudoHealthyVolume: vtkMRMLScalarVolumeNode
    lesionTable: vtkMRMLTableNode


#
# Widget
#


class GDPILiverAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._pollJob)
        self._lesionTimer = qt.QTimer()
        self._lesionTimer.setSingleShot(True)
        self._lesionTimer.setInterval(400)
        self._lesionTimer.timeout.connect(self.updateLesionTable)
        self._liverJob = None  # TotalSegmentator making the liver segment
        self._liverTimer = qt.QTimer()
        self._liverTimer.setInterval(200)
        self._liverTimer.timeout.connect(self._pollLiverJob)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GDPILiverAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GDPILiverAnomalyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.liverSegmentSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onLiverSegmentationChanged
        )
        self.ui.liverSegmentSelector.connect(
            "currentSegmentChanged(QString)", self.onLiverSegmentChanged
        )
        self.ui.checkpointPathLineEdit.connect(
            "currentPathChanged(QString)", self.onCheckpointChanged
        )
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.refreshDevicesButton.connect("clicked(bool)", self.onRefreshDevices)
        self.ui.totalSegmentatorButton.connect("clicked(bool)", self.onTotalSegmentator)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.showVersionsButton.connect("clicked(bool)", self.onShowVersions)
        self.ui.cancelAllButton.connect("clicked(bool)", self.onCancelAll)
        # ranges and tooltips from GDPILiverAnomalyLib.method.parameters (batch size 0 =
        # automatic); the threshold slider spans the score's colour window, so every
        # position shows a difference
        for name, widgetName in PARAMETER_WIDGETS.items():
            widget = getattr(self.ui, widgetName)
            if not widget.toolTip:
                widget.toolTip = help_text(name)
            if name == "threshold_hu":
                widget.minimum, widget.maximum = SCORE_WINDOW_HU
            elif name == "batch_size":
                widget.minimum, widget.maximum = 0, value_range("batch_size")[1]
            elif hasattr(widget, "minimum"):
                widget.minimum, widget.maximum = value_range(name)
        # the segments that form the liver region: ticked in a list of the same segmentation
        self.ui.liverRegionSelector.connect(
            "segmentSelectionChanged(QStringList)", self.onLiverRegionChanged
        )
        # the CT selector never offers the module's own outputs (score, pseudo-healthy)
        self._hideResultsTimer = qt.QTimer()
        self._hideResultsTimer.setSingleShot(True)
        self._hideResultsTimer.setInterval(0)
        self._hideResultsTimer.timeout.connect(self.hideResultsFromInputs)
        self.addObserver(
            slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent,
            lambda caller, event: self._hideResultsTimer.start(),
        )  # fmt: skip
        self.hideResultsFromInputs()
        self.ui.researchNoticeLabel.text = RESEARCH_NOTICE
        # only score volumes of earlier detections, never the CT itself
        self.ui.resultScoreSelector.addAttribute(
            "vtkMRMLScalarVolumeNode", RESULT_ROLE_ATTRIBUTE, "score"
        )
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.createSegmentationButton.connect("clicked(bool)", self.onCreateSegmentation)
        self.ui.lesionTableView.connect("clicked(QModelIndex)", self.onLesionClicked)
        self.ui.resultScoreSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onResultChanged
        )
        self._fillDevices()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for job in (self._job, self._liverJob):
            if job is not None and job.running:
                job.cancel()
        self._timer.stop()
        self._liverTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        for job in (self._job, self._liverJob):
            if job is not None and job.running:
                job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            node = defaultCtNode(slicer.mrmlScene)  # not a labelmap, not an earlier result
            if node:
                self._parameterNode.inputVolume = node

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    # ---- GUI state ----------------------------------------------------------------

    def _fillDevices(self, devices=None) -> None:
        """Auto, CPU, and the GPUs a worker found (``logic.listDevices``); the panel never
        imports torch itself. A saved device that is not offered falls back to Auto."""
        combo = self.ui.deviceComboBox
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Auto (GPU if available)"), "auto")
        combo.addItem(_("CPU"), "cpu")
        for device in devices or []:
            if device["id"] != "cpu":
                combo.addItem(f"{device['id']} - {device['name']}", device["id"])
        combo.blockSignals(False)
        p = self._parameterNode
        if p is not None and devices is not None and combo.findData(p.device) < 0:
            p.device = "auto"

    def onRefreshDevices(self) -> None:
        """Ask a worker which GPUs its PyTorch sees (needs the dependencies)."""
        if not self.ensureDependencies():
            return
        self._showStatus(_("Asking PyTorch which GPUs it can use (a few seconds)..."))
        try:
            with slicer.util.WaitCursor():  # Slicer keeps handling events (logic.idle)
                devices = self.logic.listDevices()
        except GDPIError as exc:
            slicer.util.errorDisplay(str(exc).splitlines()[0], detailedText=str(exc))
            return
        self._fillDevices(devices)
        self.ui.statusLabel.text = _("Devices: {names}").format(
            names=", ".join(d["id"] for d in devices)
        )

    def _liverInputs(self):
        p = self._parameterNode
        if p.liverSource == "Segmentation":
            # the ticked liver region; none ticked: the liver segment, to which the logic
            # adds the segments inside it or named as a lesion (liverRegionSegmentIds)
            region = list(p.liverRegionSegmentIds)
            return p.liverSegmentation, region or (p.liverSegmentId or None), 0
        return p.liverLabelmap, None, p.liverLabelValue

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        segmentationMode = p.liverSource == "Segmentation"
        for widget in (
            self.ui.liverSegmentSelector, self.ui.liverSegmentLabel,
            self.ui.liverRegionSelector, self.ui.liverRegionLabel,
        ):  # fmt: skip
            widget.setVisible(segmentationMode)
        for widget in (
            self.ui.liverLabelmapSelector, self.ui.liverLabelmapLabel,
            self.ui.liverLabelSpinBox, self.ui.liverLabelLabel,
        ):  # fmt: skip
            widget.setVisible(not segmentationMode)
        if self.ui.liverSegmentSelector.currentNode() != p.liverSegmentation:
            self.ui.liverSegmentSelector.setCurrentNode(p.liverSegmentation)
        if p.liverSegmentId and self.ui.liverSegmentSelector.currentSegmentID() != p.liverSegmentId:
            self.ui.liverSegmentSelector.setCurrentSegmentID(p.liverSegmentId)
        if self.ui.checkpointPathLineEdit.currentPath != p.checkpointPath:
            self.ui.checkpointPathLineEdit.currentPath = p.checkpointPath
        index = self.ui.deviceComboBox.findData(p.device)
        if index < 0 and p.device:  # saved with the scene, not (yet) seen on this machine
            self.ui.deviceComboBox.addItem(
                _("{device} (saved; Find GPUs checks it)").format(device=p.device), p.device
            )
            index = self.ui.deviceComboBox.findData(p.device)
        if index >= 0 and index != self.ui.deviceComboBox.currentIndex:
            self.ui.deviceComboBox.setCurrentIndex(index)
        # fast and paper show exactly their values; custom keeps what was shown (and
        # records which preset that was); a saved scene's stray values are corrected
        values = dict(self._panelValues(), customBase=p.customBase)
        updates = presetUpdates(p.preset, getattr(self, "_shownPreset", None), values)
        self._shownPreset = p.preset
        if updates:  # only values that differ: the Modified event this causes ends here
            with slicer.util.NodeModify(p.parameterNode):
                for name, value in updates.items():
                    setattr(p, name, value)
        self.ui.presetParametersGroupBox.setEnabled(p.preset == "custom")
        if segmentationMode and self.ui.liverRegionSelector.currentNode() != p.liverSegmentation:
            self.ui.liverRegionSelector.setCurrentNode(p.liverSegmentation)
        region = list(p.liverRegionSegmentIds)
        if list(self.ui.liverRegionSelector.selectedSegmentIDs()) != region:
            self.ui.liverRegionSelector.setSelectedSegmentIDs(region)

        running = self._job is not None and self._job.running
        if running:
            self.ui.detectButton.text = _("Cancel")
            self.ui.detectButton.toolTip = _("Stop the detection; the scene is left as before.")
            self.ui.detectButton.enabled = True
        else:
            self.ui.detectButton.text = _("Detect")
            problem = self._inputProblem()
            self.ui.detectButton.enabled = problem is None
            self.ui.detectButton.toolTip = problem or _("Detect anomalies in the liver.")
        segmenting = self._liverJob is not None and self._liverJob.running
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton):
            widget.setEnabled(not running)
        if segmenting:
            # only the Cancel of TotalSegmentator (and the log) while it runs
            self.ui.detectButton.enabled = False
            self.ui.detectButton.toolTip = _("TotalSegmentator is making the liver segment.")
            for widget in (self.ui.inputVolumeSelector, self.ui.liverSegmentSelector,
                           self.ui.liverRegionSelector, self.ui.liverLabelmapSelector):  # fmt: skip
                widget.setEnabled(False)
        else:
            for widget in (self.ui.inputVolumeSelector, self.ui.liverSegmentSelector,
                           self.ui.liverRegionSelector, self.ui.liverLabelmapSelector):  # fmt: skip
                widget.setEnabled(True)
        self.ui.totalSegmentatorButton.text = (
            _("Cancel TotalSegmentator") if segmenting
            else _("Make liver segment with TotalSegmentator")
        )  # fmt: skip
        self.ui.totalSegmentatorButton.enabled = not running
        hasResult = p.scoreVolume is not None
        self.ui.createSegmentationButton.enabled = hasResult and not running
        if (
            self.ui.lesionTableView.mrmlTableNode() != p.lesionTable
        ):  # rebuilding drops the selection
            self.ui.lesionTableView.setMRMLTableNode(p.lesionTable)

    def _inputProblem(self):
        """The logic's input check, cached until an input node or choice changes (it scans
        the labelmap, too slow to repeat on every slider move)."""
        p = self._parameterNode
        liverNode, segmentId, labelValue = self._liverInputs()
        key = tuple(
            (node.GetID(), node.GetMTime()) if node is not None else None
            for node in (p.inputVolume, liverNode)
        ) + (segmentId, labelValue)
        if getattr(self, "_problemKey", None) != key:
            self._problemKey = key
            self._problem = self.logic.inputProblem(p.inputVolume, liverNode, segmentId, labelValue)
        return self._problem

    def _panelValues(self) -> dict:
        """The parameter node's detection values by field name."""
        p = self._parameterNode
        return {field: getattr(p, field) for field in PANEL_FIELDS.values()}

    def _settings(self) -> DetectionSettings:
        """The panel's settings: fast and paper exactly (plus device, batch size and
        threshold), custom with every value (``DetectionSettings.fromPanel``)."""
        p = self._parameterNode
        return DetectionSettings.fromPanel(
            self._panelValues(), p.checkpointPath, p.preset, p.customBase
        )

    # ---- actions --------------------------------------------------------------------

    def onLiverSegmentationChanged(self, node) -> None:
        if self._parameterNode and self._parameterNode.liverSegmentation != node:
            self._parameterNode.liverSegmentation = node
            segmentId = liverSegmentId(node) if node is not None else None
            if segmentId:  # the segment named liver, not the first one (spleen)
                self._parameterNode.liverSegmentId = segmentId
                self.ui.liverSegmentSelector.setCurrentSegmentID(segmentId)
            self._suggestLiverRegion()

    def onLiverSegmentChanged(self, segmentId) -> None:
        if self._parameterNode and self._parameterNode.liverSegmentId != segmentId:
            self._parameterNode.liverSegmentId = segmentId or ""
            self._suggestLiverRegion()

    def _suggestLiverRegion(self) -> None:
        """Tick the liver segment and the segments that belong with it (inside it, or
        named as a lesion, tumour, mass, cyst or metastasis); the user may change the
        ticks."""
        p = self._parameterNode
        segmentation, liverId = p.liverSegmentation, p.liverSegmentId
        region = []
        if segmentation is not None and liverId:
            if segmentation.GetSegmentation().GetSegment(liverId) is not None:
                with slicer.util.WaitCursor():
                    region = self.logic.liverRegionSegmentIds(segmentation, liverId, p.inputVolume)
        p.liverRegionSegmentIds = region

    def onLiverRegionChanged(self, segmentIds) -> None:
        p = self._parameterNode
        if p is not None and list(p.liverRegionSegmentIds) != list(segmentIds):
            p.liverRegionSegmentIds = list(segmentIds)

    def hideResultsFromInputs(self) -> None:
        """The CT selector hides the score and pseudo-healthy volumes of detections."""
        proxy = self.ui.inputVolumeSelector.sortFilterProxyModel()
        hidden = resultVolumeIds(slicer.mrmlScene)
        if list(proxy.hiddenNodeIDs) != hidden:
            proxy.hiddenNodeIDs = hidden

    def onCheckpointChanged(self, path) -> None:
        if self._parameterNode and self._parameterNode.checkpointPath != path:
            self._parameterNode.checkpointPath = path

    def onDeviceChanged(self, index) -> None:
        device = self.ui.deviceComboBox.itemData(index)
        if self._parameterNode and device and self._parameterNode.device != device:
            self._parameterNode.device = device

    def onDetectButton(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
            self._jobEnded()
            return
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        liverNode, segmentId, labelValue = self._liverInputs()
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        try:
            self._job = self.logic.process(
                p.inputVolume, liverNode, segmentId, labelValue, self._settings(),
                wait=False, onEvent=self._onWorkerEvent,
            )  # fmt: skip
        except GDPIError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        except Exception as exc:  # not ours: still a dialog, and the traceback in the log
            logging.exception("GDPI: could not start the detection")
            slicer.util.errorDisplay(
                _("Could not start the detection: {error}").format(error=exc),
                detailedText=traceback.format_exc(),
            )
            return
        self.ui.statusLabel.text = _("Starting the worker...")
        self._timer.start()
        self._updateGui()

    def _onWorkerEvent(self, event) -> None:
        """Progress bar, status line and readable log lines (the job also logs them to
        Slicer's log)."""
        kind = event.get("event")
        if kind == "progress":
            self.ui.progressBar.value = int(round(100 * event["fraction"]))
        elif kind == "log":
            self.ui.logTextEdit.appendPlainText(event.get("message", ""))
        elif event.get("text"):
            self.ui.logTextEdit.appendPlainText(event["text"])
        liverJob = self._liverJob if self._liverJob is not None and self._liverJob.running else None
        job = liverJob or self._job
        if job is not None:
            self.ui.statusLabel.text = job.message

    def _pollJob(self) -> None:
        if self._job is None or self._job.poll():
            return
        self._jobEnded()

    def _jobEnded(self) -> None:
        self._timer.stop()
        job = self._job
        self.ui.statusLabel.text = job.message
        if job.state == "completed":
            p = self._parameterNode
            p.scoreVolume = job.outputs.scoreVolume
            p.pseudoHealthyVolume = job.outputs.pseudoHealthyVolume
            p.lesionTable = job.outputs.lesionTable
            self.ui.progressBar.value = 100
            self.logic.showResult(p.scoreVolume, p.opacity)
            self.ui.runDetailsTextEdit.plainText = self.logic.runDetails(p.scoreVolume)
        elif job.state == "failed":
            self.ui.progressBar.value = 0
            slicer.util.errorDisplay(job.error.splitlines()[0], detailedText=job.error)
        else:
            self.ui.progressBar.value = 0
        self._updateGui()

    def ensureDependencies(self, upgrade: bool = False) -> bool:
        """Install missing packages after a confirmation (torch via the PyTorch extension,
        at least ``dependencies.MINIMUM_TORCH``); ``upgrade`` also reinstalls torch when
        it is too old. Then checks that torch and NumPy fit (macOS on Intel). Failures
        end in a dialog with advice and the details."""
        versions = dependencies.installedVersions()
        missing = dependencies.missingModules()
        oldTorch = dependencies.torchTooOld(versions.get("torch"))
        if missing or oldTorch or upgrade:
            if not self._installWithConfirmation(missing, oldTorch or upgrade):
                return False
        problem = dependencies.numpyTorchProblem()
        if problem:
            slicer.util.errorDisplay(problem, windowTitle=_("GDPI: PyTorch and NumPy"))
            return False
        return True

    def _installWithConfirmation(self, missing, torchToo: bool) -> bool:
        if not slicer.util.confirmOkCancelDisplay(
            _("GDPI needs these Python packages: {packages}. Install them now? This can take "
              "several minutes; Slicer's own numpy and SimpleITK are left untouched.").format(
                packages=", ".join(missing or [f"torch >= {dependencies.MINIMUM_TORCH}"])
            )
        ):  # fmt: skip
            return False
        torchInvolved = "torch" in missing or torchToo
        try:
            with slicer.util.WaitCursor():
                self._installDependencies(missing, torchToo)
        except Exception as exc:
            logging.exception("GDPI: installing the dependencies failed")
            self.ui.statusLabel.text = _("Installing the dependencies failed.")
            slicer.util.errorDisplay(
                _("Installing the dependencies failed. {advice}").format(
                    advice=dependencies.installFailureAdvice(
                        exc, torchInvolved=torchInvolved, torchLoaded="torch" in sys.modules
                    )
                ),
                detailedText=traceback.format_exc(),
            )
            return False
        self.ui.statusLabel.text = ""
        still = dependencies.missingModules()
        if still:
            slicer.util.errorDisplay(
                _("Still missing after the installation: {names}. Restart Slicer and try "
                  "again.").format(names=", ".join(still))
            )  # fmt: skip
            return False
        return True

    def _showStatus(self, text: str) -> None:
        """A progress message shown at once (before a step that may block Slicer)."""
        self.ui.statusLabel.text = text
        self.ui.logTextEdit.appendPlainText(text)
        slicer.app.processEvents()

    def _installDependencies(self, missing, torchToo: bool) -> None:
        if "torch" in missing or torchToo:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise GDPIError(
                    "This module needs the PyTorch extension (PyTorchUtils): install "
                    "'PyTorch' from the Extensions Manager and restart Slicer."
                ) from None
            self._showStatus(
                _("Installing PyTorch through the PyTorch extension: this can take several "
                  "minutes (about 2-5 GB to download).")
            )  # fmt: skip
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False,
                torchVersionRequirement=f">={dependencies.MINIMUM_TORCH}",
            )
            if torch is None:
                raise GDPIError("PyTorch was not installed (the installation was cancelled).")
        requirements = dependencies.pipRequirements(missing)
        if requirements:
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                f.write(dependencies.pinnedConstraints())
            try:
                # slicer.packaging.pip_ensure (Slicer 5.11+: progress dialog, Slicer
                # responsive), else slicer.util.pip_install after a progress message
                dependencies.installPipRequirements(
                    requirements, f.name, slicer.util.pip_install,
                    packaging=dependencies.slicerPackaging(), status=self._showStatus,
                )  # fmt: skip
            finally:
                os.unlink(f.name)

    def onInstallDependencies(self) -> None:
        if self.ensureDependencies(upgrade=True):
            self.ui.statusLabel.text = _("Dependencies are installed.")
            self.onShowVersions()

    def onShowVersions(self) -> None:
        versions = dependencies.installedVersions()
        lines = [f"{name}: {version or _('not installed')}" for name, version in versions.items()]
        if dependencies.torchTooOld(versions.get("torch")):
            lines.append(_("torch is older than {v}: click Install / upgrade.").format(
                v=dependencies.MINIMUM_TORCH))  # fmt: skip
        self.ui.logTextEdit.appendPlainText("\n".join(lines))
        slicer.util.infoDisplay("\n".join(lines), windowTitle=_("GDPI dependencies"))

    def onCancelAll(self) -> None:
        count = self.logic.cancelAll()
        if self._job is not None and self._job.running:
            self._job.cancel()
            count += 1
        self.ui.statusLabel.text = _("Cancelled {n} running detection(s).").format(n=count)
        self._updateGui()

    def onTotalSegmentator(self) -> None:
        """Make the liver segment with the TotalSegmentator extension in the background
        (liver only, fast mode); the button becomes Cancel while it runs."""
        if self._liverJob is not None and self._liverJob.running:
            self._liverJob.cancel()
            self._liverJobEnded()
            return
        p = self._parameterNode
        if p.inputVolume is None:
            slicer.util.errorDisplay(_("Select the CT first."))
            return
        if not hasattr(slicer.modules, "totalsegmentator"):
            slicer.util.errorDisplay(
                _("No liver mask yet? Install the 'TotalSegmentator' extension from the "
                  "Extensions Manager (then this button makes the liver segment), or draw "
                  "the liver in Segment Editor, or load a liver labelmap.")
            )  # fmt: skip
            return
        from TotalSegmentator import TotalSegmentatorLogic

        self.ui.logTextEdit.clear()
        self.ui.statusLabel.text = _("Starting TotalSegmentator...")
        try:
            self._liverJob = self.logic.makeLiverSegmentation(
                p.inputVolume, TotalSegmentatorLogic(), cpu=p.device == "cpu", wait=False,
                onEvent=self._onWorkerEvent,
            )  # fmt: skip
        except Exception as exc:  # its installer or the start: a dialog, not a traceback
            logging.exception("GDPI: TotalSegmentator could not start")
            slicer.util.errorDisplay(
                _("TotalSegmentator could not start: {error}").format(error=exc),
                detailedText=traceback.format_exc(),
            )
            return
        self.ui.statusLabel.text = self._liverJob.message
        self._liverTimer.start()
        self._updateGui()

    def _pollLiverJob(self) -> None:
        if self._liverJob is None or self._liverJob.poll():
            return
        self._liverJobEnded()

    def _liverJobEnded(self) -> None:
        self._liverTimer.stop()
        job = self._liverJob
        self.ui.statusLabel.text = job.message
        if job.state == "completed":
            segmentation, segmentId = job.outputs
            p = self._parameterNode
            p.liverSource = "Segmentation"
            p.liverSegmentation = segmentation
            p.liverSegmentId = segmentId
            self._suggestLiverRegion()
        elif job.state == "failed":
            slicer.util.errorDisplay(job.message, detailedText=job.error)
        self._updateGui()

    def onThresholdChanged(self, value) -> None:
        p = self._parameterNode
        if p is not None and p.scoreVolume is not None:
            self.logic.setDisplayThreshold(p.scoreVolume, value)
            self._lesionTimer.start()  # the lesion table follows once the slider rests

    def updateLesionTable(self) -> None:
        p = self._parameterNode
        if p is None or p.scoreVolume is None or p.lesionTable is None:
            return
        with slicer.util.WaitCursor():
            lesions = self.logic.lesionsAt(p.scoreVolume, p.threshold_hu)
            self.logic.updateLesionTable(p.lesionTable, lesions)
        self.ui.statusLabel.text = _("{n} lesion(s) above {t:g} HU").format(
            n=len(lesions), t=p.threshold_hu
        )

    def onOpacityChanged(self, value) -> None:
        self.logic.setOpacity(value)

    def onResultChanged(self, node) -> None:
        p = self._parameterNode
        self.ui.runDetailsTextEdit.plainText = self.logic.runDetails(node) if node else ""
        if p is None or node is None:
            return
        self.logic.setupScoreDisplay(node, p.threshold_hu)
        # over the CT it was computed from (its node reference), whatever CT is selected
        if self.logic.showResult(node, p.opacity) is None:
            self.ui.statusLabel.text = _(
                "The CT this result was computed from is no longer in the scene: the "
                "heatmap is shown without a background."
            )
        # the lesion table and pseudo-healthy volume of the same run, never another's
        p.lesionTable = node.GetNodeReference(LESION_TABLE_REFERENCE)
        p.pseudoHealthyVolume = node.GetNodeReference(PSEUDO_HEALTHY_REFERENCE)

    def onCreateSegmentation(self) -> None:
        p = self._parameterNode
        with slicer.util.WaitCursor():
            segmentation = self.logic.createSegmentation(
                p.scoreVolume, p.threshold_hu, p.perLesionSegments
            )
        self.ui.statusLabel.text = _("Created {name}").format(name=segmentation.GetName())

    def onLesionClicked(self, index) -> None:
        p = self._parameterNode
        if p is not None and p.lesionTable is not None and index.isValid():
            self.logic.jumpToLesion(p.lesionTable, index.row())  # follows the CT's transform


#
# Logic
#


class GDPILiverAnomalyLogic(ScriptedLoadableModuleLogic, DetectionLogic):
    """The module logic: Slicer's parameter node plus :class:`DetectionLogic`.

    From the Python console::

        logic = slicer.util.getModuleLogic("GDPILiverAnomaly")
        outputs = logic.process(ctNode, segmentationNode, segmentId)  # blocks
        rows = logic.processFolder("/data/cases", "/data/results")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        DetectionLogic.__init__(self, slicer.mrmlScene, tempRoot=slicer.app.temporaryPath)
        # no worker outlives Slicer (it would keep the GPU)
        slicer.app.connect("aboutToQuit()", self.cancelAll)

    def idle(self, seconds: float) -> None:
        """While a console call waits, Slicer keeps handling events (responsive; the
        panel's Advanced > Cancel all stops a batch)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)

    def getParameterNode(self):
        return GDPILiverAnomalyParameterNode(super().getParameterNode())


#
# Self-test (inside Slicer: Reload and Test). Set GDPI_SELFTEST_HEAVY=1 for full inference.
#


class GDPILiverAnomalyTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        missing = dependencies.missingModules()
        if missing:  # a Slicer before its first Detect: check the panel, skip inference
            self.delayDisplay(
                f"Detection self-test skipped: {', '.join(missing)} not installed yet "
                "(click Detect once to install them)"
            )
        else:
            self.test_detect_synthetic_case()
        self.setUp()
        self.test_panel_state()
        self.setUp()
        self.test_sample_data_from_console()

    def test_sample_data_from_console(self):
        # SampleData.downloadSample loads a source's files (never a custom downloader):
        # the module's sample must load from the console too
        import SampleData

        self.delayDisplay("Sample data: SampleData.downloadSamples from the console")
        if SampleData.SampleDataLogic().sourceForSampleName(sample.SAMPLE_NAME) is None:
            registerSampleData()  # ctest may run before startupCompleted registered it
        nodes = SampleData.downloadSamples(sample.SAMPLE_NAME)
        self.assertEqual(len(nodes), 2)
        ct, segmentation = nodes
        self.assertEqual(slicer.util.arrayFromVolume(ct).shape, (16, 192, 192))
        segmentId = liverSegmentId(segmentation)
        self.assertEqual(segmentation.GetSegmentation().GetSegment(segmentId).GetName(), "liver")
        self.assertIsNone(
            DetectionLogic(slicer.mrmlScene).inputProblem(ct, segmentation, segmentId)
        )
        self.delayDisplay("Sample data test passed")

    def _syntheticNodes(self):
        from GDPILiverAnomalyLib.files.synthetic import synthetic_case

        case = synthetic_case(seed=7)
        ct, liver = DetectionLogic(slicer.mrmlScene).loadSyntheticCase(seed=7)
        return case, ct, liver

    def test_detect_synthetic_case(self):
        # the build server's ctest (slicer_add_python_unittest: unittest runs each test_*
        # method, not runTest) has no torch: skip with the reason instead of failing
        missing = dependencies.missingModules()
        if missing:
            self.skipTest(
                f"detection skipped: {', '.join(missing)} not installed (a Slicer before "
                "the module's first Detect, or a build server)"
            )
        import numpy as np
        from GDPILiverAnomalyLib.running.demo import DEMO_MODEL
        from scipy.stats import rankdata

        self.delayDisplay("Detection on a synthetic case with the demo model")
        case, ct, liver = self._syntheticNodes()
        logic = GDPILiverAnomalyLogic()
        heavy = os.environ.get("GDPI_SELFTEST_HEAVY") == "1"
        settings = DetectionSettings(checkpoint=str(DEMO_MODEL), preset="fast", device="auto")
        if not heavy:
            settings = DetectionSettings(
                checkpoint=str(DEMO_MODEL), preset="custom", steps=10, jump_length=5,
                jump_n_sample=1, device="auto",
            )  # fmt: skip
        outputs = logic.process(ct, liver, labelValue=1, settings=settings)
        score = slicer.util.arrayFromVolume(outputs.scoreVolume)
        self.assertEqual(score.shape, case.ct.shape)
        m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        ct.GetIJKToRASMatrix(m1)
        outputs.scoreVolume.GetIJKToRASMatrix(m2)
        for r in range(4):
            for c in range(4):
                self.assertAlmostEqual(m1.GetElement(r, c), m2.GetElement(r, c), places=6)
        inside = case.liver > 0
        labels, values = case.tumour[inside].ravel() > 0, score[inside].ravel()
        ranks = rankdata(values)  # AUROC as the Mann-Whitney U statistic
        positives, negatives = labels.sum(), (~labels).sum()
        auroc = (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)
        logging.info(f"GDPI self-test AUROC {auroc:.3f} ({'fast' if heavy else 'quick'} schedule)")
        self.assertGreater(auroc, 0.85 if heavy else 0.6)
        self.assertTrue(np.all(score[~inside] == 0))
        self.delayDisplay(f"Synthetic case: pixel AUROC {auroc:.3f}")

    def test_panel_state(self):
        import numpy as np  # Slicer's own numpy: this test needs nothing installed

        self.delayDisplay("Panel: Detect is disabled with a reason until inputs are valid")
        widget = slicer.modules.gdpiliveranomaly.widgetRepresentation().self()
        widget.initializeParameterNode()  # the scene was cleared; the module may not be entered
        widget._parameterNode.inputVolume = None
        self.assertFalse(widget.ui.detectButton.enabled)
        self.assertIn("CT", widget.ui.detectButton.toolTip)
        array = np.full((8, 32, 32), 60, np.int16)
        mask = np.zeros(array.shape, np.uint8)
        mask[2:6, 8:24, 8:24] = 1
        ct = slicer.util.addVolumeFromArray(array, name="panel test CT")
        liver = slicer.util.addVolumeFromArray(
            mask, name="panel test liver", nodeClassName="vtkMRMLLabelMapVolumeNode"
        )
        widget._parameterNode.inputVolume = ct
        widget._parameterNode.liverSource = "Labelmap"
        widget._parameterNode.liverLabelmap = liver
        self.assertTrue(widget.ui.detectButton.enabled)
        self.delayDisplay("Panel test passed")
