"""The Slicer module's files, checked without Slicer: the .ui file against the widget code
and the parameter node, the module CMakeLists against the folder, dependency rules,
and the logic's pure helpers (hints, retry, status line)."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from GDPILiverAnomalyLib.method import parameters
from GDPILiverAnomalyLib.method.parameters import PRESETS
from GDPILiverAnomalyLib.slicer_side import settings
from GDPILiverAnomalyLib.slicer_side.settings import (
    AME_SIDES,
    BF16_CHOICES,
    PANEL_DEFAULTS,
    PANEL_FIELDS,
    PANEL_PRESETS,
    PRESET_PARAMETERS,
    RUN_OPTIONS,
    SCORE_WINDOW_HU,
    DetectionSettings,
)

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
    """Annotated fields of the parameter node class and their defaults (None if none),
    evaluated with what the module imports from ``method.parameters`` and
    ``slicer_side.settings``."""
    tree = ast.parse(MODULE_PY.read_text())
    cls = next(
        n
        for n in tree.body
        if isinstance(n, ast.ClassDef) and n.name == "GDPILiverAnomalyParameterNode"
    )
    fields = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign):
            value = None
            if node.value is not None:
                expression = ast.Expression(node.value)
                namespace = {**vars(parameters), **vars(settings)}
                value = eval(compile(expression, str(MODULE_PY), "eval"), namespace)
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
    """The panel and the console (DetectionSettings) start from the same settings: the
    parameter node holds every detection parameter (by its panel field) at the default
    preset's value, with the engine's range (the threshold: the colour window's)."""
    fields = _parameter_node_fields()
    defaults = DetectionSettings()
    assert fields["preset"] == defaults.preset and fields["customBase"] == defaults.preset
    assert fields["checkpointPath"] == defaults.checkpoint
    missing = sorted(set(PANEL_FIELDS.values()) - set(fields))
    assert not missing, f"detection parameters the parameter node lacks: {missing}"
    for field in PANEL_FIELDS.values():
        assert fields[field] == PANEL_DEFAULTS[field], field
    assert DetectionSettings.fromPanel(PANEL_DEFAULTS).params() == defaults.params()
    assert AME_SIDES[fields["ameSide"]] is defaults.params().two_sided is None
    assert BF16_CHOICES[fields["bf16"]] is defaults.params().bf16 is None
    assert fields["batch_size"] == 0 and defaults.params().batch_size is None  # 0 = automatic
    source = MODULE_PY.read_text()
    for name in PRESET_PARAMETERS:
        if parameters._FIELDS[name].metadata["range"] is not None:
            assert f'WithinRange(*value_range("{name}"))' in source, name
    assert "threshold_hu: Annotated[float, WithinRange(*SCORE_WINDOW_HU)]" in source


def test_ui_combo_boxes_offer_the_parameter_choices():
    root = ET.parse(UI).getroot()

    def items(name: str) -> list[str]:
        widget = next(w for w in root.iter("widget") if w.get("name") == name)
        return [i.find("property/string").text for i in widget.findall("item")]

    assert items("presetComboBox") == ["fast", "paper", "custom"] == list(PANEL_PRESETS)
    assert set(PRESETS) <= set(items("presetComboBox"))
    assert items("liverSourceComboBox") == ["Segmentation", "Labelmap"]
    assert items("ameSideComboBox") == list(AME_SIDES)
    assert items("samplerComboBox") == list(parameters.choices("sampler"))
    assert items("bf16ComboBox") == list(BF16_CHOICES)
    assert "Choice(list(AME_SIDES))" in MODULE_PY.read_text()
    source = MODULE_PY.read_text()
    assert "Choice(list(PANEL_PRESETS))" in source
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
    lib_dir = MODULE / "GDPILiverAnomalyLib"
    lib = {
        f"GDPILiverAnomalyLib/{p.relative_to(lib_dir).as_posix()}" for p in lib_dir.rglob("*.py")
    }
    assert scripts == lib | {"GDPILiverAnomaly.py"}
    models = {
        f"GDPILiverAnomalyLib/models/{p.name}"
        for p in (MODULE / "GDPILiverAnomalyLib" / "models").iterdir()
    }
    samples = {
        f"Resources/SampleData/{p.name}" for p in (MODULE / "Resources" / "SampleData").iterdir()
    }  # the sample data's files (SampleData.downloadSample loads them)
    assert resources == models | samples | {
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
        "import sys; import GDPILiverAnomalyLib.slicer_side.dependencies, GDPILiverAnomalyLib.running.worker, "
        "GDPILiverAnomalyLib.method.parameters, GDPILiverAnomalyLib.method.schedule, "
        "GDPILiverAnomalyLib.slicer_side.settings\n"
        "try:\n    import GDPILiverAnomalyLib.slicer_side.logic\nexcept ModuleNotFoundError as e:\n"
        "    assert e.name in ('slicer', 'vtk'), e\n"
        "bad = [m for m in ('torch', 'qt', 'PythonQt') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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


def test_self_test_skips_inference_without_dependencies_and_needs_no_scikit_learn():
    """In a Slicer before its first Detect the self-test checks the panel only; with
    torch it imports the demo model path, which must not pull scikit-learn (Slicer does
    not bundle it)."""
    import subprocess
    import sys

    tree = ast.parse(MODULE_PY.read_text())
    test = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Test"))
    run = next(f for f in test.body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    source = ast.unparse(run)
    assert "dependencies.missingModules()" in source
    assert source.index("missingModules") < source.index("test_detect_synthetic_case")
    # ctest runs each test_* method itself (unittest), not runTest: the detection test
    # skips (unittest.SkipTest) before it imports anything that needs torch or scipy
    detect = next(f for f in test.body if getattr(f, "name", "") == "test_detect_synthetic_case")
    skip = next(i for i, n in enumerate(detect.body) if "self.skipTest(" in ast.unparse(n))
    imports = [i for i, n in enumerate(detect.body) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert "dependencies.missingModules()" in ast.unparse(detect.body[skip - 1])
    assert skip < min(imports)
    panel = next(f for f in test.body if getattr(f, "name", "") == "test_panel_state")
    assert "_syntheticNodes" not in ast.unparse(panel)  # numpy only: nothing to install
    code = (
        "import sys, GDPILiverAnomalyLib.running.demo\n"
        "assert 'sklearn' not in sys.modules, 'the demo module imports scikit-learn'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_panel_never_imports_torch():
    """Device lists come from a worker (``logic.listDevices``): importing torch in
    Slicer's process would initialise CUDA in the GUI and lock torch's files."""
    tree = ast.parse(MODULE_PY.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}  # fmt: skip
    imported |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert "torch" not in imported
    assert "refreshDevicesButton" in _ui_widgets()


def _ui_widget(name: str):
    return next(w for w in ET.parse(UI).getroot().iter("widget") if w.get("name") == name)


def _module_constant(name: str):
    tree = ast.parse(MODULE_PY.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == name)
    return ast.literal_eval(node.value)


def test_every_detection_parameter_has_its_widget_bound_to_its_field():
    """The panel shows every value a detection runs with: each parameter's widget is
    bound (SlicerParameterName) to its parameter node field; those a preset fixes sit in
    the group that only the custom preset enables, the run options outside it."""
    widgets = _module_constant("PARAMETER_WIDGETS")
    assert set(widgets) == set(parameters.PARAMETER_NAMES)
    bound = _ui_parameter_names()
    group = _ui_widget("presetParametersGroupBox")
    inside = {w.get("name") for w in group.iter("widget")}
    for name, widget in widgets.items():
        if name != "device":  # filled with the worker's devices by the widget code
            assert bound.get(widget) == PANEL_FIELDS[name], (name, widget)
        assert (widget in inside) == (name in PRESET_PARAMETERS), name
    assert set(RUN_OPTIONS) | set(PRESET_PARAMETERS) == set(parameters.PARAMETER_NAMES)
    assert 'presetParametersGroupBox.setEnabled(p.preset == "custom")' in MODULE_PY.read_text()


def test_the_threshold_slider_spans_the_colour_window():
    """The slider, its parameter node field and the score's colour map share one range
    (before: a 0-500 HU slider over a 0-50 HU colour window)."""
    slider = _ui_widget("thresholdSliderWidget")
    limits = {
        p.get("name"): float(p.find("double").text)
        for p in slider.findall("property")
        if p.get("name") in ("minimum", "maximum")
    }
    assert (limits["minimum"], limits["maximum"]) == SCORE_WINDOW_HU
    source = MODULE_PY.read_text()
    assert "widget.minimum, widget.maximum = SCORE_WINDOW_HU" in source
    assert SCORE_WINDOW_HU[0] <= PANEL_DEFAULTS["threshold_hu"] <= SCORE_WINDOW_HU[1]


def test_panel_wiring_that_only_a_real_slicer_runs():
    """Static checks of what the Qt panel does (it cannot run without Slicer's GUI): the
    spin boxes get their ranges from the parameter definition, the result selector lists
    only score volumes and the CT selector hides results, the liver region is a
    multi-selection segment list, the synthetic case is a Sample Data entry generated on
    click, and Slicer quitting cancels running workers."""
    source = MODULE_PY.read_text()
    assert "widget.minimum, widget.maximum = value_range(name)" in source
    assert (
        'addAttribute(\n            "vtkMRMLScalarVolumeNode", RESULT_ROLE_ATTRIBUTE, "score"'
        in source
    )
    assert "proxy.hiddenNodeIDs = hidden" in source and "resultVolumeIds(" in source
    region = _ui_widget("liverRegionSelector")
    multi = next(p for p in region.findall("property") if p.get("name") == "multiSelection")
    assert multi.find("bool").text == "true"
    assert '"segmentSelectionChanged(QStringList)", self.onLiverRegionChanged' in source
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source
    assert "customDownloader=loadSyntheticSample" in source
    assert 'slicer.app.connect("aboutToQuit()", self.cancelAll)' in source
    assert 'torchVersionRequirement=f">={dependencies.MINIMUM_TORCH}"' in source
