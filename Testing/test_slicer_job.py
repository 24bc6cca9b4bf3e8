"""The running job's pure helpers: failure hints, the out-of-memory retry, the status line,
and the worker command line built from the settings."""

import pytest


def test_failure_hints_retry_and_status_line():
    pytest.importorskip("slicer")
    from GDPILiverAnomalyLib.slicer_side.job import failureHint, formatProgress, retryBatchSize
    from GDPILiverAnomalyLib.slicer_side.settings import DetectionSettings

    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "smaller batch" in failureHint(oom)
    assert retryBatchSize(oom, DetectionSettings(device="auto")) == 4  # CUDA default 8 -> 4
    assert retryBatchSize(oom, DetectionSettings(device="cuda:0", batch_size=3)) == 1
    assert retryBatchSize(oom, DetectionSettings(device="cuda:0", batch_size=1)) is None
    assert retryBatchSize(oom, DetectionSettings(device="cpu")) is None
    assert retryBatchSize("gdpi: error: bad checkpoint", DetectionSettings()) is None
    assert "install" in failureHint("ModuleNotFoundError: No module named 'safetensors'")
    event = dict(slices_done=3, slices_total=40, nfe_done=420, nfe_total=5600, eta_s=125.4)
    assert formatProgress(event) == (
        "Slices 3/40, network evaluations 420/5600, about 2 min 05 s left"
    )
    assert formatProgress({**event, "eta_s": None}).endswith("5600")
    args = DetectionSettings(
        preset="custom", steps=30, jump_length=3, jump_n_sample=2
    ).workerArguments()
    assert args[args.index("--steps") + 1] == "30" and "--two-sided" not in args
    assert "--batch-size" not in args  # 0 = automatic
    assert DetectionSettings(two_sided=True, batch_size=2).workerArguments()[-3:] == [
        "--two-sided",
        "--batch-size",
        "2",
    ]


def test_worker_events_become_readable_log_lines():
    pytest.importorskip("slicer")
    from GDPILiverAnomalyLib.slicer_side.job import formatDuration, formatEvent

    assert formatDuration(125.4) == "2 min 05 s" and formatDuration(9) == "9 s"
    start = {
        "event": "start",
        "nfe_per_batch": 140,
        "parameters": {"preset": "fast", "sampler": "repaint", "steps": 50, "jump_length": 5,
                       "jump_n_sample": 3, "device": "auto"},
    }  # fmt: skip
    assert formatEvent(start) == (
        "Started: preset fast, repaint sampler, 50 steps, jump length 5, 3 resamplings = 140 "
        "network evaluations per batch, device auto"
    )
    estimate = {"event": "estimate", "seconds": 200.0, "device": "cpu", "nfe_total": 4200,
                "slices_total": 30}  # fmt: skip
    assert formatEvent(estimate) == (
        "Estimated time: about 3 min 20 s on cpu (4200 network evaluations, 30 liver slices)"
    )
    assert formatEvent({"event": "error", "message": "bad CT"}) == "Error: bad CT"
    assert formatEvent({"event": "progress", "fraction": 0.5}) is None
