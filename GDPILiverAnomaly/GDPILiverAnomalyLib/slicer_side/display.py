"""Showing detection results in a Slicer scene: score colours and window, slice-view
layers, the lesion table (RAS mm), segmentations at a threshold.

Imports ``slicer`` (MRML) and ``vtk``, never ``qt`` or torch. Works on an explicit scene
(:attr:`ResultDisplay.scene`). Lesion centroids in tables are RAS millimetres (Slicer's
convention); the worker's ``lesions.csv`` uses LPS.
"""

from __future__ import annotations

import math

import numpy as np
import slicer
import vtk

from .settings import SCORE_WINDOW_HU  # the colour window, also the threshold slider's range

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
#: Attribute that marks the nodes a detection made: ``score``, ``pseudo-healthy``,
#: ``lesions`` (the panel's result selector lists only ``score`` volumes).
RESULT_ROLE_ATTRIBUTE = "GDPI.role"
#: Node reference from a result node to the CT it was computed from.
INPUT_VOLUME_REFERENCE = "gdpiInputVolume"
#: Node references from a score volume to the lesion table and pseudo-healthy volume of
#: the same run (the panel's result selector switches all three together).
LESION_TABLE_REFERENCE = "gdpiLesionTable"
PSEUDO_HEALTHY_REFERENCE = "gdpiPseudoHealthyVolume"
#: DICOM terminology of the anomaly segments: a mass (SCT 4147007) in the liver
#: (SCT 10200004), category Morphologically Altered Structure (Slicer's serialisation).
LESION_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^4147007^Mass~^^"
    "~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^"
)
LESION_COLUMNS = (
    "id", "lesion_score", "volume_ml", "max_score_hu", "mean_score_hu", "r_mm", "a_mm", "s_mm"
)  # fmt: skip


class ResultDisplay:
    """Display of score volumes and lesions in :attr:`scene` (a ``vtkMRMLScene``)."""

    scene = None

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

    def showResult(self, scoreNode, opacity: float = 0.5):
        """Show an earlier result over the CT it was computed from (its
        :data:`INPUT_VOLUME_REFERENCE`), switching the slice views' background to that
        CT whatever volume is selected elsewhere; returns that CT. When the CT is no
        longer in the scene the score is shown without a background (never over
        another CT) and None is returned."""
        ctNode = resultCtNode(scoreNode)
        self.showInSliceViews(ctNode, scoreNode, opacity)
        return ctNode

    def showInSliceViews(self, ctNode, scoreNode, opacity: float = 0.5) -> None:
        """CT as background (None: no background), score as foreground in every slice
        view."""
        for composite in sliceCompositeNodes(self.scene):
            with slicer.util.NodeModify(composite):
                composite.SetBackgroundVolumeID(ctNode.GetID() if ctNode is not None else None)
                composite.SetForegroundVolumeID(scoreNode.GetID())
                composite.SetForegroundOpacity(opacity)

    def setOpacity(self, opacity: float) -> None:
        for composite in sliceCompositeNodes(self.scene):
            composite.SetForegroundOpacity(opacity)

    # ---- lesions and segmentation -------------------------------------------------

    def lesionsAt(self, scoreNode, threshold: float) -> list[dict]:
        """Lesions (26-connected score > ``threshold``), highest lesion score first
        (``scoring.lesion_scores``), centroids in RAS mm."""
        from ..method.scoring import anomaly_mask, find_lesions

        score = slicer.util.arrayFromVolume(scoreNode)
        lesions = find_lesions(anomaly_mask(score, threshold), score, _sitkReference(scoreNode))
        return [lesionRow(lesion.to_dict()) for lesion in lesions]

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
        titles = {"id": "Lesion", "lesion_score": "Lesion score (HU)",
                  "volume_ml": "Volume (mL)", "max_score_hu": "Max score (HU)",
                  "mean_score_hu": "Mean score (HU)", "r_mm": "R (mm)", "a_mm": "A (mm)",
                  "s_mm": "S (mm)"}  # fmt: skip
        # Slicer 5.6 has only the older "long name" API (titles came in 5.8); there the
        # names stay the headers (turning that off makes the model show the names as a
        # first row, shifting every clicked row by one) and the long names are tooltips
        modern = hasattr(tableNode, "SetColumnTitle")
        with slicer.util.NodeModify(tableNode):
            tableNode.SetAndObserveTable(table)
            if modern:
                tableNode.SetUseColumnTitleAsColumnHeader(True)
            for name, title in titles.items():
                if modern:
                    tableNode.SetColumnTitle(name, title)
                else:
                    tableNode.SetColumnLongName(name, title)
            tableNode.SetLocked(True)

    def lesionCentroid(self, tableNode, row: int) -> tuple[float, float, float]:
        """RAS centroid (mm) of the lesion in ``row`` of a lesion table."""
        table = tableNode.GetTable()
        if not 0 <= row < table.GetNumberOfRows():
            raise IndexError(f"no lesion in row {row}")
        return tuple(
            float(table.GetColumnByName(c).GetValue(row)) for c in ("r_mm", "a_mm", "s_mm")
        )

    def jumpToLesion(self, tableNode, row: int, volumeNode=None) -> tuple[float, float, float]:
        """Centre every slice view on the lesion in ``row``; returns the world RAS point.

        Centroids are in the volume's own (local) RAS; when ``volumeNode`` (default: the
        score volume the table was made from) is under a transform, the point is moved
        to world coordinates, where the slice views are."""
        local = self.lesionCentroid(tableNode, row)
        volumeNode = volumeNode or tableNode.GetNodeReference(INPUT_VOLUME_REFERENCE)
        ras = toWorld(volumeNode, local) if volumeNode is not None else local
        slicer.vtkMRMLSliceNode.JumpAllSlices(
            self.scene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice
        )
        return ras

    def createSegmentation(
        self, scoreNode, threshold: float, perLesion: bool = True, name: str | None = None
    ):
        """A segmentation of the anomalies (score > ``threshold`` HU): one segment per
        lesion (``Lesion N`` = row N of the lesion table) or one segment ``Anomaly``.

        Placed like the CT the score came from: same transform, same study in the
        subject hierarchy, the CT as reference geometry (so DICOM SEG export works),
        segments with the DICOM terminology of a liver mass."""
        from ..method.scoring import anomaly_mask, lesion_labels

        score = slicer.util.arrayFromVolume(scoreNode)
        mask = anomaly_mask(score, threshold)
        labels, count = lesion_labels(mask, score) if perLesion else (mask, int(mask.any()))
        segmentation = self.scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{scoreNode.GetName()} > {threshold:g} HU"
        )
        segmentation.CreateDefaultDisplayNodes()
        ct = scoreNode.GetNodeReference(INPUT_VOLUME_REFERENCE) or scoreNode
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
        segmentation.SetAndObserveTransformNodeID(scoreNode.GetTransformNodeID())
        placeBeside(self.scene, ct, segmentation)
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
            removeNodeAndDisplay(self.scene, labelmap)
        seg = segmentation.GetSegmentation()
        for index in range(seg.GetNumberOfSegments()):
            segment = seg.GetNthSegment(index)
            segment.SetName(f"Lesion {segment.GetLabelValue()}" if perLesion else "Anomaly")
            segment.SetTag("TerminologyEntry", LESION_TERMINOLOGY)
        segmentation.SetAttribute("GDPI.threshold_hu", f"{threshold:g}")
        return segmentation


def toWorld(node, ras: tuple[float, float, float]) -> tuple[float, float, float]:
    """A point in ``node``'s local RAS (mm) in world RAS, through its transforms."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return tuple(float(v) for v in ras)
    transform = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(transform)
    return tuple(float(v) for v in transform.TransformPoint(ras))


def placeBeside(scene, reference, node) -> None:
    """Put ``node`` under ``reference``'s parent (its study) in the subject hierarchy."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(reference))
    item = hierarchy.GetItemByDataNode(node)
    if parent and item:
        hierarchy.SetItemParent(item, parent)
    elif parent:  # plain MRML has no plugin that makes the item when a node is added
        hierarchy.CreateItem(parent, node)
    if node.IsA("vtkMRMLTableNode") or node.IsA("vtkMRMLVolumeNode"):
        node.SetNodeReferenceID(INPUT_VOLUME_REFERENCE, reference.GetID())


def addResultNode(scene, className: str, name: str, role: str):
    """A new node of ``className`` marked with :data:`RESULT_ROLE_ATTRIBUTE` ``role``
    before it enters the scene, so observers of the scene's NodeAddedEvent (the panel's
    CT selector filter) already see what it is."""
    node = getattr(slicer, className)()
    node.SetName(name)
    node.SetAttribute(RESULT_ROLE_ATTRIBUTE, role)
    return scene.AddNode(node)


def resultCtNode(scoreNode):
    """The CT a result was computed from (its node reference), or None when it is gone."""
    return scoreNode.GetNodeReference(INPUT_VOLUME_REFERENCE)


def resultVolumeIds(scene) -> list[str]:
    """IDs of the volumes detections made (score, pseudo-healthy): the panel's CT
    selector hides them, so an output is never taken for an input."""
    ids = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLVolumeNode")
        if isResult(node):
            ids.append(node.GetID())
    return ids


def isResult(node) -> bool:
    """True for nodes a detection made (score, pseudo-healthy, lesion table)."""
    return node is not None and bool(node.GetAttribute(RESULT_ROLE_ATTRIBUTE))


def liverSegmentId(segmentationNode) -> str | None:
    """The segment named ``liver`` (any case; TotalSegmentator, MONAI Auto3DSeg), else a
    segment whose name contains ``liver`` (not a lesion or tumour), else the first."""
    segmentation = segmentationNode.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    names = {i: segmentation.GetSegment(i).GetName().strip().lower() for i in ids}
    for segment_id in ids:
        if names[segment_id] == "liver":
            return segment_id
    for segment_id in ids:
        name = names[segment_id]
        if "liver" in name and not any(w in name for w in ("lesion", "tumo", "vessel", "cyst")):
            return segment_id
    return ids[0] if ids else None


def defaultCtNode(scene):
    """The first scalar volume that is neither a labelmap nor a detection result."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode") and not isResult(node):
            return node
    return None


def removeNodeAndDisplay(scene, node) -> None:
    """Remove a node with its display and storage nodes and its subject hierarchy item."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node) if hierarchy is not None else 0
    if item:
        hierarchy.RemoveItem(item, False, False)  # keep the data node: removed below
    displayable = hasattr(node, "GetNumberOfDisplayNodes")
    for index in range(node.GetNumberOfDisplayNodes() if displayable else 0):
        display = node.GetNthDisplayNode(index)
        if display is not None:
            scene.RemoveNode(display)
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is not None:
        scene.RemoveNode(storage)
    scene.RemoveNode(node)


def sliceCompositeNodes(scene) -> list:
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


def lesionRow(lesion: dict) -> dict:
    """A worker lesion (LPS centroid) as a table row (RAS centroid)."""
    x, y, z = (float(lesion[f"centroid_{a}_mm"]) for a in "xyz")
    row = {
        "id": int(lesion["id"]),
        # a lesions.csv written before the column: its score is the maximum, as now
        "lesion_score": float(lesion.get("lesion_score", lesion["max_score_hu"])),
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
