"""The Slicer module's files, checked without Slicer: the .ui file against the widget code
and the parameter node, the module CMakeLists against the folder, dependency rules,
and the logic's pure helpers (hints, retry, status line)."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from GDPILiverAnomalyLib import dependencies
from GDPILiverAnomalyLib.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "GDPILiverAnomaly"
MODULE_PY = MODULE / "GDPILiverAnomaly.py"
UI = MODULE / "Resources" / "UI" / "GDPILiverAnomaly.ui"


def _ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ET.parse(UI).getroot().iter("widget")}


def _ui_parameter_names() -> dict[str, str]:
    names = {}
    for widget in ET.parse(UI).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[widget.get("name")] = prop.find("string").text
    return names


def _parameter_node_fields() -> dict[str, object]:
    """Annotated fields of the parameter node class and their defaults (None if none)."""
    tree = ast.parse(MODULE_PY.read_text())
    cls = next(
        n
        for n in tree.body
        if isinstance(n, ast.ClassDef) and n.name == "GDPILiverAnomalyParameterNode"
    )
    fields = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign):
            value = ast.literal_eval(node.value) if node.value is not None else None
            fields[node.target.id] = value
    return fields


def test_every_widget_the_code_uses_is_in_the_ui_file():
    used = set(re.findall(r"\bui\.(\w+)", MODULE_PY.read_text()))
    widgets = _ui_widgets()
    assert used, "the widget code uses no ui widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used in GDPILiverAnomaly.py but absent from the .ui: {missing}"


def test_every_ui_parameter_name_exists_in_the_parameter_node():
    names = _ui_parameter_names()
    fields = _parameter_node_fields()
    assert len(names) >= 10
    unknown = sorted(set(names.values()) - set(fields))
    assert not unknown, f"SlicerParameterName without a parameter: {unknown}"
    assert len(set(names.values())) == len(names), "two widgets bound to one parameter"


def test_parameter_defaults_match_the_logic_defaults():
    """The panel and the console (DetectionSettings) start from the same settings."""
    pytest.importorskip("slicer")
    from GDPILiverAnomalyLib.slicer_logic import DetectionSettings

    fields = _parameter_node_fields()
    defaults = DetectionSettings()
    shared = {
        "preset": "preset",
        "steps": "steps",
        "jumpLength": "jumpLength",
        "resamplings": "resamplings",
        "batchSize": "batchSize",
        "offsetHu": "offsetHu",
        "twoSided": "twoSided",
        "medianSize": "medianSize",
        "threshold": "threshold",
        "device": "device",
        "checkpointPath": "checkpoint",
    }
    for field, attribute in shared.items():
        assert fields[field] == getattr(defaults, attribute), field
    assert fields["medianSize"] == PRESETS[fields["preset"]]["median_size"]


def test_ui_combo_boxes_offer_the_parameter_choices():
    root = ET.parse(UI).getroot()

    def items(name: str) -> list[str]:
        widget = next(w for w in root.iter("widget") if w.get("name") == name)
        return [i.find("property/string").text for i in widget.findall("item")]

    assert items("presetComboBox") == ["fast", "paper", "custom"]
    assert set(PRESETS) <= set(items("presetComboBox"))
    assert items("liverSourceComboBox") == ["Segmentation", "Labelmap"]
    source = MODULE_PY.read_text()
    assert 'Choice(["fast", "paper", "custom"])' in source
    assert 'Choice(["Segmentation", "Labelmap"])' in source


def _cmake_list(name: str) -> list[str]:
    text = (MODULE / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({name}\n(.*?)\n\s*\)", text, re.S).group(1)
    return [
        line.strip().replace("${MODULE_NAME}", "GDPILiverAnomaly") for line in block.splitlines()
    ]


def test_module_cmakelists_lists_every_file():
    scripts = set(_cmake_list("MODULE_PYTHON_SCRIPTS"))
    resources = set(_cmake_list("MODULE_PYTHON_RESOURCES"))
    lib = {f"GDPILiverAnomalyLib/{p.name}" for p in (MODULE / "GDPILiverAnomalyLib").glob("*.py")}
    assert scripts == lib | {"GDPILiverAnomaly.py"}
    models = {
        f"GDPILiverAnomalyLib/models/{p.name}"
        for p in (MODULE / "GDPILiverAnomalyLib" / "models").iterdir()
    }
    assert resources == models | {
        "Resources/Icons/GDPILiverAnomaly.png",
        "Resources/UI/GDPILiverAnomaly.ui",
    }
    for path in scripts | resources:
        assert (MODULE / path).is_file(), path
    top = (REPO / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(GDPILiverAnomaly)" in top and "Training" not in re.findall(
        r"add_subdirectory\((\w+)\)", top
    )
    assert "WITH_GENERIC_TESTS" in (MODULE / "CMakeLists.txt").read_text()


def test_logic_modules_import_without_qt_or_torch():
    """The panel imports them before torch is installed; they must not pull torch or qt."""
    import subprocess
    import sys

    code = (
        "import sys; import GDPILiverAnomalyLib.dependencies, GDPILiverAnomalyLib.worker, "
        "GDPILiverAnomalyLib.presets\n"
        "try:\n    import GDPILiverAnomalyLib.slicer_logic\nexcept ModuleNotFoundError as e:\n"
        "    assert e.name in ('slicer', 'vtk'), e\n"
        "bad = [m for m in ('torch', 'qt', 'PythonQt') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dependency_plan_never_touches_slicers_numpy_or_simpleitk():
    present = {"numpy", "SimpleITK", "tqdm"}
    missing = dependencies.missingModules(lambda name: object() if name in present else None)
    assert missing == ["torch", "scipy", "safetensors"]
    requirements = dependencies.pipRequirements(missing + ["numpy", "SimpleITK"])
    assert requirements == ["scipy>=1.10", "safetensors>=0.4"]
    assert not any(r.lower().startswith(("torch", "numpy", "simpleitk")) for r in requirements)
    versions = {"numpy": "1.26.4", "SimpleITK": "2.3.1"}
    assert dependencies.pinnedConstraints(versions.__getitem__) == (
        "numpy==1.26.4\nSimpleITK==2.3.1\n"
    )


def test_failure_hints_retry_and_status_line():
    pytest.importorskip("slicer")
    from GDPILiverAnomalyLib.slicer_logic import (
        DetectionSettings,
        failureHint,
        formatProgress,
        retryBatchSize,
    )

    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "smaller batch" in failureHint(oom)
    assert retryBatchSize(oom, DetectionSettings(device="auto")) == 4  # CUDA default 8 -> 4
    assert retryBatchSize(oom, DetectionSettings(device="cuda:0", batchSize=3)) == 1
    assert retryBatchSize(oom, DetectionSettings(device="cuda:0", batchSize=1)) is None
    assert retryBatchSize(oom, DetectionSettings(device="cpu")) is None
    assert retryBatchSize("gdpi: error: bad checkpoint", DetectionSettings()) is None
    assert "install" in failureHint("ModuleNotFoundError: No module named 'safetensors'")
    event = dict(slices_done=3, slices_total=40, nfe_done=420, nfe_total=5600, eta_s=125.4)
    assert formatProgress(event) == (
        "Slices 3/40, network evaluations 420/5600, about 2 min 05 s left"
    )
    assert formatProgress({**event, "eta_s": None}).endswith("5600")
    args = DetectionSettings(
        preset="custom", steps=30, jumpLength=3, resamplings=2
    ).workerArguments()
    assert args[args.index("--steps") + 1] == "30" and "--two-sided" not in args
    assert "--batch-size" not in args  # 0 = automatic
    assert DetectionSettings(twoSided=True, batchSize=2).workerArguments()[-3:] == [
        "--two-sided",
        "--batch-size",
        "2",
    ]


def test_module_self_test_exists_and_heavy_inference_is_opt_in():
    tree = ast.parse(MODULE_PY.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    test = classes["GDPILiverAnomalyTest"]
    assert [b.id for b in test.bases] == ["ScriptedLoadableModuleTest"]
    methods = {f.name for f in test.body if isinstance(f, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= methods
    assert "GDPI_SELFTEST_HEAVY" in MODULE_PY.read_text()
    for name, base in (
        ("GDPILiverAnomaly", "ScriptedLoadableModule"),
        ("GDPILiverAnomalyWidget", "ScriptedLoadableModuleWidget"),
        ("GDPILiverAnomalyLogic", "ScriptedLoadableModuleLogic"),
    ):
        assert base in [b.id for b in classes[name].bases]
