"""The shared training loop pieces: data order, augmentation, resume state."""

import numpy as np
import pytest
import torch
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.files.checkpoint import Intensity
from GDPITraining.loop import (
    STATE_VERSION,
    TrainConfig,
    augment,
    batch_indices,
    check_resume,
    load_state,
    save_state,
)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    steps = [batch_indices(10, 4, s, 0) for s in range(5)]  # 20 draws = two epochs
    flat = np.concatenate(steps)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert np.array_equal(batch_indices(10, 4, 3, 0), steps[3])


def test_augment_keeps_shape_range_and_is_the_identity_at_zero_draws():
    x = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    middle = torch.full((2, 5), 0.5)  # u = 0.5 -> no shift, rotation, scale or translation
    assert torch.allclose(augment(x, middle, Intensity()), x, atol=1e-5)
    moved = augment(x, torch.rand(2, 5, generator=torch.Generator().manual_seed(0)), Intensity())
    assert moved.shape == x.shape and moved.min() >= -1 and moved.max() <= 1
    assert not torch.allclose(moved, x)


def test_phase_augmentation_scales_contrast_around_40_hu_and_adds_noise():
    intensity = Intensity()
    hu = torch.tensor([40.0, 140.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous()
    x = intensity.normalize(hu)
    # draws: no geometry (0.5), gain at its maximum (u5 = 1 -> x1.25), no extra shift,
    # no noise (u7 = 0)
    u = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 0.5, 0.0]])
    out = intensity.to_hu(augment(x, u, intensity, torch.zeros_like(x)))
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([40.0, 40.0]), atol=0.5)
    assert torch.allclose(out[0, 0, :, 1], torch.tensor([165.0, 165.0]), atol=0.5)
    # largest noise: 6 HU standard deviation
    u[0, 7] = 1.0
    noise = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    flat = intensity.normalize(torch.full((1, 1, 64, 64), 40.0))
    noisy = intensity.to_hu(augment(flat, u, intensity, noise))
    assert 5.0 < float(noisy.std()) < 7.0


def test_state_round_trip_and_version_check(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    config = TrainConfig(data="store", out=str(tmp_path))
    path = tmp_path / "state.pt"
    save_state(path, 7, config, model=model, optimizer=opt)
    state = load_state(path)
    assert state["step"] == 7 and state["version"] == STATE_VERSION
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file
    torch.save({**state, "version": STATE_VERSION + 1}, path)
    with pytest.raises(ParameterError, match="resume state version"):
        load_state(path)


def test_resume_check_names_the_changed_setting(tmp_path):
    config = TrainConfig(data="store", out=str(tmp_path), batch_size=8)
    check_resume(tmp_path, {"batch_size": 8, "seed": 0}, config, ("batch_size", "seed"))
    with pytest.raises(ParameterError, match="batch_size was 4, now 8"):
        check_resume(tmp_path, {"batch_size": 4, "seed": 0}, config, ("batch_size", "seed"))


def test_a_damaged_state_falls_back_to_the_previous_one(tmp_path):
    from GDPITraining.loop import DamagedState, previous_state_path, resume_state

    model = torch.nn.Linear(3, 2)
    config = TrainConfig(data="store", out=str(tmp_path))
    path = tmp_path / "state.pt"
    save_state(path, 5, config, model=model)
    save_state(path, 10, config, model=model)
    assert load_state(previous_state_path(path))["step"] == 5
    assert resume_state(path)["step"] == 10
    path.write_bytes(path.read_bytes()[:100])  # cut short
    messages: list[str] = []
    state = resume_state(path, log=messages.append)
    assert state["step"] == 5 and "resuming from the previous state" in messages[0]
    assert (tmp_path / "state.pt.damaged").exists() and not path.exists()
    previous_state_path(path).write_bytes(b"garbage")
    with pytest.raises(DamagedState, match="--restart"):
        resume_state(path)


def test_restart_keeps_earlier_states_aside(tmp_path):
    from GDPITraining.loop import previous_state_path, resume_state

    model = torch.nn.Linear(3, 2)
    config = TrainConfig(data="store", out=str(tmp_path))
    path = tmp_path / "state.pt"
    save_state(path, 5, config, model=model)
    save_state(path, 6, config, model=model)
    assert resume_state(path, restart=True) is None
    assert not path.exists() and not previous_state_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state.prev.pt.restarted",
        "state.pt.restarted",
    ]
