"""How the ``gdpi`` command is composed: the engine's commands ship with the Slicer
extension (``python -m GDPILiverAnomalyLib``), the training commands are added by
``GDPITraining`` (the ``gdpi`` console script and ``python -m GDPITraining``)."""

import subprocess
import sys

import pytest
from GDPILiverAnomalyLib.running import cli as engine_cli
from GDPITraining import cli as training_cli

ENGINE = {"detect", "demo", "init-model", "devices"}
TRAINING = {"prepare", "train", "evaluate", "synth-tumours"}


def test_engine_and_training_commands():
    _, engine = engine_cli.build_parser()
    _, everything = engine_cli.build_parser(training_cli.add_commands)
    assert set(engine) == ENGINE
    assert set(everything) == ENGINE | TRAINING
    cooperative = {name for name, (_, stops) in everything.items() if stops}
    assert cooperative == {"detect", "demo"}


def test_engine_module_never_imports_training():
    code = (
        "import sys, GDPILiverAnomalyLib.running.cli\n"
        "assert not [m for m in sys.modules if m.startswith('GDPITraining')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("module", "present", "absent"),
    [("GDPILiverAnomalyLib", ENGINE, TRAINING), ("GDPITraining", ENGINE | TRAINING, set())],
)
def test_python_m_lists_its_commands(module, present, absent):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
    )
    for name in present:
        assert name in proc.stdout
    for name in absent:
        assert name not in proc.stdout
    engine_only = subprocess.run(
        [sys.executable, "-m", "GDPILiverAnomalyLib", "train", "--data", "x", "--out", "y"],
        capture_output=True,
        text=True,
    )
    assert engine_only.returncode == 2 and "invalid choice" in engine_only.stderr


def test_detect_options_come_from_the_parameter_definition():
    parser, _ = engine_cli.build_parser()
    args = parser.parse_args(
        ["detect", "--ct", "c", "--liver", "l", "--checkpoint", "k", "--out", "o",
         "--jump-n-sample", "4", "--threshold", "12.5", "--two-sided"]
    )  # fmt: skip
    assert (args.jump_n_sample, args.threshold_hu, args.two_sided) == (4, 12.5, True)
    assert args.steps is None  # the preset decides


def test_out_of_range_option_is_one_clean_error_line(tmp_path, capsys):
    code = training_cli.main(
        ["detect", "--ct", "c", "--liver", "l", "--checkpoint", str(tmp_path / "none"),
         "--out", str(tmp_path / "o"), "--steps", "-5"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0] == "gdpi: error: steps must be in 1..1000, got -5"
    assert not (tmp_path / "o").exists()
