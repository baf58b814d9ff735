"""Random Gaussians for format and geometry tests."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from pipeline.core.types import Gaussians, rgb_to_sh0


def random_gaussians(
    n: int,
    rng: np.random.Generator | int = 0,
    *,
    opacity: tuple[float, float] = (0.01, 0.99),
    scale: tuple[float, float] = (0.001, 0.5),
    rgb_colours: bool = False,
) -> Gaussians:
    """n Gaussians with uniform random rotations; colours as SH coefficients (normal) or from rgb in [0, 1]."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    colours = rgb_to_sh0(rng.uniform(0, 1, (n, 3))) if rgb_colours else rng.normal(size=(n, 3)).astype(np.float32)
    return Gaussians(
        rng.normal(size=(n, 3)).astype(np.float32),
        colours,
        rng.uniform(*opacity, (n, 1)).astype(np.float32),
        rng.uniform(*scale, (n, 3)).astype(np.float32),
        Rotation.random(n, random_state=rng).as_quat(scalar_first=True).astype(np.float32),
    )
