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


def intrinsics_from_pointmap(pointmap: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """Fit the pinhole focal lengths of a point map (H, W, 3) in the scene frame, centred principal
    point, and scale them to a width x height photo. None when too few points are usable.

    Each pixel's point satisfies |u - cx| = fx * |X| / Z (and likewise for y), whatever the sign
    convention, so the median of |u - cx| * Z / |X| over pixels away from the centre is robust.
    """
    pm = np.asarray(pointmap, dtype=np.float64)
    ph, pw = pm.shape[:2]
    v, u = np.mgrid[0:ph, 0:pw]
    du, dv = (u + 0.5) - pw / 2.0, (v + 0.5) - ph / 2.0
    x, y, z = pm[..., 0], pm[..., 1], pm[..., 2]
    ok = np.isfinite(pm).all(axis=-1) & (z > 1e-6)
    fx_ok = ok & (np.abs(du) > pw * 0.05) & (np.abs(x) > 1e-9)
    fy_ok = ok & (np.abs(dv) > ph * 0.05) & (np.abs(y) > 1e-9)
    if fx_ok.sum() < 16 or fy_ok.sum() < 16:
        return None
    fx = float(np.median(np.abs(du[fx_ok]) * z[fx_ok] / np.abs(x[fx_ok]))) * width / pw
    fy = float(np.median(np.abs(dv[fy_ok]) * z[fy_ok] / np.abs(y[fy_ok]))) * height / ph
    return np.array([[fx, 0, width / 2.0], [0, fy, height / 2.0], [0, 0, 1]], dtype=np.float32)
