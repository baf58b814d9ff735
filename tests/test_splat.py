"""The 32-byte .splat web format: exact byte layout, viewer order, round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gaussian_factory import random_gaussians as _random_gaussians

from pipeline.core.errors import InputError
from pipeline.core.types import SH_C0, Gaussians, rgb_to_sh0
from pipeline.scene.splat import read_splat, write_splat


def random_gaussians(n: int, seed: int = 0) -> Gaussians:
    return _random_gaussians(n, seed, opacity=(0.0, 1.0), rgb_colours=True)


def test_byte_layout_of_one_splat(tmp_path: Path) -> None:
    g = Gaussians(
        np.array([[1.0, -2.0, 3.5]], np.float32),
        rgb_to_sh0(np.array([[1.0, 0.5, 0.0]])),
        np.array([[0.25]], np.float32),
        np.array([[0.1, 0.2, 0.3]], np.float32),
        np.array([[0.5, -0.5, 0.5, 0.5]], np.float32),
    )
    assert write_splat(tmp_path / "one.splat", g) == {"written": 1, "dropped_nonfinite": 0}
    data = (tmp_path / "one.splat").read_bytes()
    assert len(data) == 32
    np.testing.assert_allclose(np.frombuffer(data[:12], "<f4"), [1.0, -2.0, 3.5])
    np.testing.assert_allclose(np.frombuffer(data[12:24], "<f4"), [0.1, 0.2, 0.3])  # linear, not log
    assert list(data[24:28]) == [255, 128, 0, 64]  # RGB from SH0, alpha = opacity
    assert list(data[28:32]) == [192, 64, 192, 192]  # w x y z, each * 128 + 128


def test_sorted_by_size_times_opacity_descending(tmp_path: Path) -> None:
    g = random_gaussians(200)
    write_splat(tmp_path / "a.splat", g)
    back = read_splat(tmp_path / "a.splat")
    src = {tuple(p): i for i, p in enumerate(g.xyz)}  # positions are stored exactly
    written_order = np.array([src[tuple(p)] for p in back.xyz])
    expected = np.argsort(-(np.prod(g.scale.astype(np.float64), axis=1) * g.opacity[:, 0]), kind="stable")
    np.testing.assert_array_equal(written_order, expected)


def test_round_trip_within_quantization(tmp_path: Path) -> None:
    g = random_gaussians(300, seed=4)
    write_splat(tmp_path / "a.splat", g)
    back = read_splat(tmp_path / "a.splat")
    # Match each read splat to its source by position (exact float32).
    src = {tuple(p): i for i, p in enumerate(g.xyz)}
    idx = np.array([src[tuple(p)] for p in back.xyz])
    assert sorted(idx) == list(range(300))
    np.testing.assert_array_equal(back.scale, g.scale[idx])
    np.testing.assert_allclose(back.opacity, g.opacity[idx], atol=0.5 / 255 + 1e-6)
    rgb = lambda f: 0.5 + SH_C0 * f  # noqa: E731
    np.testing.assert_allclose(rgb(back.features_dc), rgb(g.features_dc[idx]), atol=0.5 / 255 + 1e-6)
    # Rotations: same rotation up to sign, within 8-bit quantization.
    dots = np.abs((back.rotation * g.rotation[idx]).sum(1))
    assert np.all(dots > 0.995)


def test_nonfinite_dropped_and_bad_file(tmp_path: Path) -> None:
    g = random_gaussians(5)
    g.xyz[1, 1] = np.nan
    assert write_splat(tmp_path / "a.splat", g) == {"written": 4, "dropped_nonfinite": 1}
    (tmp_path / "bad.splat").write_bytes(b"\0" * 33)
    with pytest.raises(InputError, match="multiple of 32"):
        read_splat(tmp_path / "bad.splat")
