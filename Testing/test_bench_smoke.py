"""The benchmark script runs (smoke mode: one small case, tiny model, 2 NFE) and prints its table."""

import subprocess
import sys

from conftest import REPO, shared


def test_bench_smoke(tmp_path):
    shared("ts_small")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_detect.py"),
            "--smoke",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ts_small |")]
    assert len(rows) == 2  # batched and one slice at a time
    assert "peak RAM" in proc.stdout
    import json

    data = json.loads((tmp_path / "b.json").read_text())
    assert data["rows"][0]["presets"]["paper"]["nfe_per_volume"] % 2410 == 0
