import json
import struct

import pytest
import torch
from GDPILiverAnomalyLib.errors import CheckpointError, ParameterError
from GDPILiverAnomalyLib.files.checkpoint import (
    Intensity,
    init_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from GDPILiverAnomalyLib.method.unet import UNet, UNetConfig
from safetensors.torch import save_file


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    ckpt = init_checkpoint("tiny", seed=3)
    path = save_checkpoint(ckpt, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.model.config == ckpt.model.config
    assert loaded.grid == ckpt.grid and loaded.diffusion == ckpt.diffusion
    assert loaded.intensity == ckpt.intensity
    for (k, a), (_, b) in zip(
        ckpt.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert len(loaded.sha256) == 64
    x = torch.randn(2, 1, 64, 64)
    t = torch.tensor([5, 900])
    assert torch.equal(ckpt.model.eval()(x, t), loaded.model(x, t))


def test_random_model_output_is_not_zero():
    ckpt = init_checkpoint("tiny")
    out = ckpt.model(torch.randn(1, 1, 64, 64), torch.tensor([10]))
    assert out.shape == (1, 2, 64, 64) and out.abs().mean() > 1e-3


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a GDPI checkpoint"):
        load_checkpoint(tmp_path / "junk.safetensors")
    good = save_checkpoint(init_checkpoint("tiny"), tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.safetensors")
    # a pickle (what torch.save writes) is refused without being unpickled
    torch.save({"a": torch.zeros(1)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "pickle.pt")


def _write(path, tensors, meta, fmt="gdpi-checkpoint", version="1"):
    save_file(
        tensors,
        str(path),
        metadata={"format": fmt, "format_version": version, "meta": json.dumps(meta)},
    )


def test_mismatched_metadata_is_refused(tmp_path):
    ckpt = init_checkpoint("tiny")
    tensors = {k: v.contiguous() for k, v in ckpt.model.state_dict().items()}
    meta = ckpt.metadata()
    wrong = json.loads(json.dumps(meta))
    wrong["model"]["model_channels"] = 64
    _write(tmp_path / "a.safetensors", tensors, wrong)
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_checkpoint(tmp_path / "a.safetensors")
    wrong = json.loads(json.dumps(meta))
    wrong["diffusion"]["learn_sigma"] = False
    _write(tmp_path / "b.safetensors", tensors, wrong)
    with pytest.raises(CheckpointError, match="learn_sigma"):
        load_checkpoint(tmp_path / "b.safetensors")
    wrong = json.loads(json.dumps(meta))
    wrong["input_grid"]["size"] = 128
    _write(tmp_path / "c.safetensors", tensors, wrong)
    with pytest.raises(CheckpointError, match="input grid"):
        load_checkpoint(tmp_path / "c.safetensors")
    _write(tmp_path / "d.safetensors", tensors, meta, version="99")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "d.safetensors")
    _write(tmp_path / "e.safetensors", tensors, {"model": meta["model"]})
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "e.safetensors")
    # a plain safetensors file from another project
    save_file({"w": torch.zeros(2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match="not a GDPI checkpoint"):
        load_checkpoint(tmp_path / "f.safetensors")


def test_header_length_garbage(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="not a GDPI checkpoint"):
        load_checkpoint(tmp_path / "g.safetensors")


def test_intensity_window_round_trip():
    window = Intensity(-200, 300)
    hu = torch.tensor([-1000.0, -200.0, 50.0, 300.0, 2000.0])
    x = window.normalize(hu)
    assert torch.allclose(x, torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(window.to_hu(x[1:4]), hu[1:4])
    assert window.hu_per_unit == 250


def test_unet_shapes_and_config_validation():
    cfg = UNetConfig(
        image_size=32,
        model_channels=16,
        channel_mult=[1, 2, 2],
        num_res_blocks=1,
        attention_resolutions=[16, 8],
        num_heads=2,
        learn_sigma=False,
    )
    net = UNet(cfg)
    assert net(torch.zeros(3, 1, 32, 32), torch.tensor([0, 1, 999])).shape == (3, 1, 32, 32)
    with pytest.raises(ParameterError, match="divisible"):
        UNet(UNetConfig(image_size=30, channel_mult=[1, 2, 2]))
