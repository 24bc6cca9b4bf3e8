"""Property-based tests of the geometry path (hypothesis): random sizes, spacings, origins
and axis permutations/flips either round-trip exactly through the LPS processing
orientation, or are refused with a clear error, always within a time bound."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import SimpleITK as sitk
from GDPILiverAnomalyLib.errors import InputError
from GDPILiverAnomalyLib.files.checks import PLAUSIBLE_SPACING_MM
from GDPILiverAnomalyLib.files.volumes import OrientedCase, read_ct, read_liver_mask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

#: Every signed permutation of the axes: the 48 orthonormal grids a CT can be stored in.
SIGNED_PERMUTATIONS = [
    tuple((np.eye(3)[list(p)] * np.array(s)[:, None]).T.ravel())
    for p in itertools.permutations(range(3))
    for s in itertools.product((1.0, -1.0), repeat=3)
]
SETTINGS = settings(
    max_examples=40,
    deadline=5000,  # ms per example: geometry checks must never hang
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
spacing = st.one_of(
    st.floats(0.05, 50.0),
    st.floats(1e-7, 1e7),  # mostly plausible, sometimes absurd
).map(lambda v: float(f"{v:.6g}"))


def _images(size, spacing_xyz, origin, direction, seed):
    rng = np.random.default_rng(seed)
    array = rng.integers(-200, 300, size=size[::-1]).astype(np.int16)
    liver = np.zeros(size[::-1], np.uint8)
    liver[tuple(slice(0, max(1, n // 2)) for n in size[::-1])] = 1
    images = []
    for values in (array, liver):
        image = sitk.GetImageFromArray(values)
        image.SetSpacing(spacing_xyz)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        images.append(image)
    return images


@SETTINGS
# the round-trip branch runs whatever hypothesis draws: typical CT grids, one per family
@example(size=(5, 6, 7), spacing_xyz=(0.7, 0.7, 5.0), origin=(-180.0, 20.0, 300.0),
         direction=SIGNED_PERMUTATIONS[0], seed=1)  # fmt: skip
@example(size=(9, 4, 3), spacing_xyz=(1.5, 0.8, 2.5), origin=(0.0, 0.0, 0.0),
         direction=SIGNED_PERMUTATIONS[13], seed=2)  # fmt: skip
@example(size=(3, 8, 2), spacing_xyz=(3.0, 3.0, 3.0), origin=(10.0, -5.0, 7.0),
         direction=SIGNED_PERMUTATIONS[47], seed=3)  # fmt: skip
@given(
    size=st.tuples(*[st.integers(2, 9)] * 3),
    spacing_xyz=st.tuples(spacing, spacing, spacing),
    origin=st.tuples(*[st.floats(-1e4, 1e4, allow_nan=False)] * 3),
    direction=st.sampled_from(SIGNED_PERMUTATIONS),
    seed=st.integers(0, 2**16),
)
def test_geometry_round_trips_or_is_refused(tmp_path, size, spacing_xyz, origin, direction, seed):
    ct_image, liver_image = _images(size, spacing_xyz, origin, direction, seed)
    ct_path, liver_path = tmp_path / "ct.nrrd", tmp_path / "liver.nrrd"
    sitk.WriteImage(ct_image, str(ct_path))
    sitk.WriteImage(liver_image, str(liver_path))
    low, high = PLAUSIBLE_SPACING_MM
    plausible = all(low <= s <= high for s in spacing_xyz)
    started = time.monotonic()
    if not plausible:
        with pytest.raises(InputError, match="voxel spacing"):
            read_ct(ct_path)
        return
    ct = read_ct(ct_path)
    try:
        liver = read_liver_mask(liver_path, ct)
    except InputError as exc:  # a big liver at coarse spacing: refused, with a reason
        assert "more than any liver" in str(exc)
        return
    case = OrientedCase.from_arrays(ct, liver)
    np.testing.assert_array_equal(case.ct, sitk.GetArrayFromImage(sitk.DICOMOrient(ct, "LPS")))
    np.testing.assert_array_equal(case.to_original(case.ct), sitk.GetArrayFromImage(ct))
    np.testing.assert_array_equal(case.to_original(case.liver), liver)
    np.testing.assert_array_equal(liver, sitk.GetArrayFromImage(liver_image))  # same grid
    assert time.monotonic() - started < 5


@SETTINGS
@given(
    shear=st.floats(0.01, 0.9),
    position=st.sampled_from([(0, 1), (1, 0), (0, 2), (2, 1)]),
)
def test_non_orthonormal_directions_are_refused(tmp_path, shear, position):
    ct_image, _ = _images((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), SIGNED_PERMUTATIONS[0], 0)
    direction = np.eye(3)
    direction[position] = shear
    ct_image.SetDirection(tuple(direction.ravel()))
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(ct_image, str(path))
    with pytest.raises(InputError, match="not orthonormal"):
        read_ct(path)
