"""Cross-case packing (the Ray engine's batches): full batches, every slice back in its
case, and results identical to each case batched on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_hu
from GDPILiverAnomalyLib.files.checkpoint import load_checkpoint
from GDPILiverAnomalyLib.running.packing import CaseSlices, Packer, batch_fill
from GDPILiverAnomalyLib.running.pipeline import inpaint_grid


def _case(name: str, slices: int, n: int = 4, seed: int = 0) -> CaseSlices:
    rng = np.random.default_rng(seed)
    ct = rng.normal(100, 20, (slices, n, n)).astype(np.float32)
    mask = np.zeros((slices, n, n), np.uint8)
    mask[:, 1:3, 1:3] = 1
    seeds = [[1000 * seed + i for i in range(slices)]]
    return CaseSlices(name, ct, mask, seeds, list(range(slices)))


def test_batches_are_full_across_cases_and_every_slice_returns_to_its_case():
    packer = Packer(4)
    a, b, c = _case("a", 3), _case("b", 6, seed=1), _case("c", 2, seed=2)
    for case in (a, b, c):
        packer.add(case)
    batches = []
    while (batch := packer.next_batch()) is not None:
        batches.append(batch)
    assert [len(b.jobs) for b in batches] == [4, 4] and len(packer) == 3
    assert batches[0].jobs == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]  # first come first served
    last = packer.next_batch(flush=True)
    assert len(last.jobs) == 3 and packer.next_batch(flush=True) is None
    assert packer.fill == pytest.approx(11 / 12)
    done = []
    for batch in [*batches, last]:
        # the "network" returns each slice's own values, tagged by its seed
        diff = batch.ct + np.asarray(batch.seeds[0], np.float32)[:, None, None]
        done += [case.name for case in packer.receive(batch, diff, "w1")]
    assert done == ["a", "b", "c"]
    for case in (a, b, c):
        expected = case.ct + np.asarray(case.seeds[0], np.float32)[:, None, None]
        np.testing.assert_array_equal(case.diff, expected)
        assert case.complete and case.workers == {"w1"}
    assert (a.batches, b.batches, c.batches) == (1, 3, 1)  # b: 1 + 4 + 1 slices


def test_model_workers_batch_64_px_slices_by_64_on_a_gpu():
    from GDPILiverAnomalyLib.method.parameters import default_batch_size
    from GDPILiverAnomalyLib.running.ray_engine import worker_batch_size

    assert worker_batch_size(gpu=True, image_size=64) == 64  # packing keeps them full
    assert worker_batch_size(gpu=True, image_size=128) == default_batch_size("cuda", 128)
    assert worker_batch_size(gpu=False, image_size=64) == default_batch_size("cpu", 64) == 8
    assert worker_batch_size(gpu=False, image_size=128) == 2


def test_batch_fill_of_per_case_and_packed_batching():
    assert batch_fill([9, 9, 9], 8, packed=False) == pytest.approx(27 / 48)
    assert batch_fill([9, 9, 9], 8, packed=True) == pytest.approx(27 / 32)
    assert batch_fill([], 8, packed=True) == 0.0
    with pytest.raises(ValueError):
        Packer(0)


def test_packed_inpainting_equals_each_case_on_its_own(tiny_checkpoint, quick_params):
    """What the Ray engine's workers do with packed batches gives, slice for slice, what
    the local engine gives batching each case alone (seeded noise per slice)."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    n = checkpoint.grid.size
    cases = [_case(name, k, n, seed) for name, k, seed in (("a", 5, 1), ("b", 3, 2), ("c", 4, 3))]
    device = torch.device("cpu")
    alone = {
        c.name: inpaint_grid(
            c.ct,
            c.mask,
            checkpoint,
            quick_params,
            device,
            [list(range(len(c.work)))[i : i + 4] for i in range(0, len(c.work), 4)],
            c.seeds,
        )  # fmt: skip
        for c in cases
    }
    packer = Packer(4)
    for case in cases:
        packer.add(case)
    while (batch := packer.next_batch(flush=True)) is not None:
        diff = inpaint_grid(batch.ct, batch.mask, checkpoint, quick_params, device,
                            [list(range(len(batch.jobs)))], batch.seeds)  # fmt: skip
        packer.receive(batch, diff, "w")
    for case in cases:
        assert np.abs(case.diff).max() > 0
        assert_same_hu(case.diff, alone[case.name], case.name)
