"""Pinhole helpers: fitting intrinsics back from a point map."""

from __future__ import annotations

import numpy as np

from pipeline.scene.camera import default_intrinsics, intrinsics_from_pointmap


def _pointmap(K: np.ndarray, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Back-project every pixel at a random depth into the pytorch3d camera frame (+X left, +Y up)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w] + 0.5
    z = rng.uniform(1.0, 5.0, (h, w))
    x = -(u - K[0, 2]) * z / K[0, 0]
    y = -(v - K[1, 2]) * z / K[1, 1]
    return np.dstack([x, y, z])


def test_fits_the_focal_lengths_and_scales_to_the_photo():
    K = default_intrinsics(160, 120, fov_deg=70.0)
    pm = _pointmap(K, 120, 160)
    pm[5, 7] = np.nan  # a hole in the map does not matter
    fitted = intrinsics_from_pointmap(pm, 160, 120)
    np.testing.assert_allclose(fitted, K, rtol=1e-4)
    # A half-resolution map of the same camera, for a full-size photo.
    half = intrinsics_from_pointmap(_pointmap(default_intrinsics(80, 60, fov_deg=70.0), 60, 80), 160, 120)
    np.testing.assert_allclose(half, K, rtol=1e-3)


def test_unusable_map_gives_none():
    assert intrinsics_from_pointmap(np.full((20, 20, 3), np.nan), 20, 20) is None
