"""Pinhole cameras for rendering, in the convention gsplat's `rasterization` takes.

`viewmat` maps scene points (the photo's pytorch3d camera frame: +X left, +Y up, +Z forward)
to an OpenCV camera (+X right, +Y down, +Z forward); `K` is the 3x3 intrinsic matrix in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

P3D_TO_OPENCV = np.diag([-1.0, -1.0, 1.0]).astype(np.float32)
"""pytorch3d camera axes -> OpenCV camera axes (flip X and Y)."""


@dataclass
class Camera:
    viewmat: np.ndarray  # (4, 4) float32 scene -> OpenCV camera
    K: np.ndarray  # (3, 3) float32 intrinsics in pixels
    width: int
    height: int


def default_intrinsics(width: int, height: int, fov_deg: float = 55.0) -> np.ndarray:
    """Intrinsics assumed for a photo without metadata: horizontal field of view `fov_deg`, centred."""
    f = 0.5 * width / np.tan(np.radians(fov_deg) / 2.0)
    return np.array([[f, 0, width / 2.0], [0, f, height / 2.0], [0, 0, 1]], dtype=np.float32)


def photo_camera(width: int, height: int, K: np.ndarray | None = None) -> Camera:
    """The camera that took the photo: identity pose in the scene frame."""
    viewmat = np.eye(4, dtype=np.float32)
    viewmat[:3, :3] = P3D_TO_OPENCV
    return Camera(viewmat, default_intrinsics(width, height) if K is None else np.asarray(K, np.float32), width, height)
