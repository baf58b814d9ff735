"""Orbiting cameras for turntable GIFs, and the GIF writer.

Two kinds of orbit:
- `turntable_cameras`: around an object's centre, the camera framing its bounds. For objects we
  orbit in the object's local frame, about the axis that is "up" in the photo and starting from
  the direction the photo saw it from (`photo_view_axes`), so frame 0 matches the photo's view.
- `scene_orbit_cameras`: the photo's own camera swung about a vertical axis through the scene
  centre. Frame 0 is exactly the photo's viewpoint and intrinsics.

Cameras use the gsplat convention of `pipeline.scene.camera` (viewmat: scene -> OpenCV camera).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.atomic import atomic_path
from pipeline.core.types import Gaussians, Pose
from pipeline.scene.camera import Camera, default_intrinsics, photo_camera
from pipeline.scene.compose import quat_to_matrix

SCENE_UP = np.array([0.0, 1.0, 0.0])  # pytorch3d camera frame: +Y up
SCENE_TOWARD_CAMERA = np.array([0.0, 0.0, -1.0])  # objects sit at +Z; the photo camera looks from -Z


def gaussian_bounds(g: Gaussians, quantile: float = 0.01) -> np.ndarray:
    """(2, 3) [min, max] of the visible Gaussians, ignoring the outer `quantile` as outliers."""
    if len(g) == 0:
        return np.array([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]])
    visible = g.opacity[:, 0] > 0.1
    xyz = g.xyz[visible] if visible.sum() >= 8 else g.xyz
    lo = np.quantile(xyz, quantile, axis=0)
    hi = np.quantile(xyz, 1.0 - quantile, axis=0)
    return np.stack((lo, hi)).astype(np.float64)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(4, 4) viewmat: scene -> OpenCV camera at `eye` looking at `target`, `up` up in the image."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)  # OpenCV +X; right-handed with +Y down and +Z forward
    if np.linalg.norm(right) < 1e-8:  # looking straight along `up`: pick any perpendicular
        right = np.cross(forward, np.array([1.0, 0.0, 0.0]) if abs(forward[0]) < 0.9 else np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack((right, down, forward))  # rows: camera axes in scene coordinates
    view = np.eye(4)
    view[:3, :3] = R
    view[:3, 3] = -R @ eye
    return view.astype(np.float32)


def photo_view_axes(pose: Pose) -> tuple[np.ndarray, np.ndarray]:
    """(up, toward_camera) of the photo expressed in the object's local frame.

    Row vectors map local -> scene by v @ (scale * R); directions go back through R^T.
    """
    R = quat_to_matrix(pose.rotation.astype(np.float64))
    up_local = SCENE_UP @ R.T
    toward_local = SCENE_TOWARD_CAMERA @ R.T
    return up_local, toward_local


def _rodrigues(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * (K @ K)


def turntable_cameras(
    target: Gaussians | np.ndarray,
    n_frames: int,
    size: int | tuple[int, int],
    *,
    up: Sequence[float] = (0.0, 1.0, 0.0),
    start_dir: Sequence[float] = (0.0, 0.0, -1.0),
    elevation_deg: float = 15.0,
    fov_deg: float = 40.0,
    margin: float = 1.1,
) -> list[Camera]:
    """Cameras circling `target` (Gaussians, or (2, 3) bounds) once about `up`.

    Frame 0 looks from `start_dir` (a direction from the centre towards the camera), raised by
    `elevation_deg`; the distance frames the bounding sphere with the given field of view.
    """
    bounds = gaussian_bounds(target) if isinstance(target, Gaussians) else np.asarray(target, np.float64)
    centre = bounds.mean(axis=0)
    radius = max(0.5 * float(np.linalg.norm(bounds[1] - bounds[0])), 1e-6)
    width, height = (size, size) if isinstance(size, int) else size
    K = default_intrinsics(width, height, fov_deg)
    fov_min = 2 * np.arctan(0.5 * min(width, height) / K[0, 0])
    distance = margin * radius / np.sin(fov_min / 2)

    up_v = np.asarray(up, np.float64)
    up_v /= np.linalg.norm(up_v)
    start = np.asarray(start_dir, np.float64)
    start = start - up_v * (start @ up_v)  # horizontal part of the start direction
    if np.linalg.norm(start) < 1e-8:
        start = np.cross(up_v, [1.0, 0.0, 0.0]) if abs(up_v[0]) < 0.9 else np.cross(up_v, [0.0, 0.0, 1.0])
    start /= np.linalg.norm(start)
    elev = np.radians(elevation_deg)
    cameras = []
    for i in range(n_frames):
        direction = _rodrigues(up_v, 2 * np.pi * i / n_frames) @ start
        eye = centre + distance * (np.cos(elev) * direction + np.sin(elev) * up_v)
        cameras.append(Camera(look_at(eye, centre, up_v), K.copy(), width, height))
    return cameras


def scene_orbit_cameras(
    centre: Sequence[float],
    n_frames: int,
    width: int,
    height: int,
    *,
    K: np.ndarray | None = None,
    sweep_deg: float = 360.0,
) -> list[Camera]:
    """The photo camera rotated about the scene's vertical axis through `centre`; frame 0 is the photo."""
    base = photo_camera(width, height, K)
    c = np.asarray(centre, np.float64)
    cameras = []
    for i in range(n_frames):
        angle = np.radians(sweep_deg) * i / n_frames
        # Moving the camera by +angle about the axis equals moving the world by -angle.
        world = np.eye(4)
        world[:3, :3] = _rodrigues(SCENE_UP, -angle)
        world[:3, 3] = c - world[:3, :3] @ c
        cameras.append(Camera((base.viewmat.astype(np.float64) @ world).astype(np.float32), base.K.copy(), width, height))
    return cameras


def write_gif(path: str | os.PathLike[str], frames: Sequence[np.ndarray], fps: float = 12.0) -> Path:
    """Write (H, W, 3) uint8 frames as a looping GIF, atomically (Pillow quantizes each frame)."""
    if not frames:
        raise ValueError("write_gif needs at least one frame")
    return _save_gif(path, [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames], fps)


def write_gif_indexed(path: str | os.PathLike[str], indices: np.ndarray, palette: np.ndarray, fps: float = 12.0) -> Path:
    """Write (F, H, W) uint8 palette indices with one (K, 3) uint8 palette (pipeline.scene.gif_palette)
    as a looping GIF, atomically: the frames are already quantized, Pillow only encodes them."""
    indices = np.asarray(indices, dtype=np.uint8)
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if indices.ndim != 3 or not len(indices):
        raise ValueError(f"write_gif_indexed needs (F, H, W) indices, got shape {indices.shape}")
    if not 1 <= len(palette) <= 256 or int(indices.max()) >= len(palette):
        raise ValueError(f"indices reach {int(indices.max())} but the palette has {len(palette)} colours")
    flat = palette.tobytes()
    images = []
    for frame in indices:
        im = Image.frombytes("P", (frame.shape[1], frame.shape[0]), np.ascontiguousarray(frame).tobytes())
        im.putpalette(flat, "RGB")
        images.append(im)
    return _save_gif(path, images, fps)


def _save_gif(path: str | os.PathLike[str], images: list[Image.Image], fps: float) -> Path:
    with atomic_path(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(int(round(1000.0 / fps)), 20),
            loop=0,
            disposal=1,
        )
    return Path(path)
