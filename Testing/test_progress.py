"""Progress output: terminal bars on a terminal, periodic plain lines in logs."""

import io

from GDPILiverAnomalyLib.running.progress import LineProgress, Progress, Reporter, progress_bar


def test_line_progress_writes_plain_periodic_lines():
    out = io.StringIO()
    bar = LineProgress(total=100, desc="inpainting", unit="NFE", every_s=3600, file=out)
    bar.set_postfix_str("slices 1/4")
    for _ in range(100):
        bar.update(1)  # within the interval: only the first update prints
    bar.close()  # the end always prints
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("inpainting: 1% (1/100 NFE, slices 1/4)")
    assert lines[-1].startswith("inpainting: 100% (100/100 NFE, slices 1/4)")
    assert "s left" in lines[0] and "s left" not in lines[-1]


def test_logs_get_lines_not_carriage_returns(capsys):
    """stderr is not a terminal under pytest, as in a log file or the Slicer worker."""
    assert isinstance(progress_bar(10, "x", "it"), LineProgress)
    reporter = Reporter("text")
    for done in (0, 5, 10):
        reporter(Progress(done // 5, 2, done, 10, float(done), None))
    reporter.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") >= 2
    assert err.splitlines()[-1].startswith("inpainting: 100% (10/10 NFE")
