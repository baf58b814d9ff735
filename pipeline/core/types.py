"""Data passed between stages. numpy only, so this module stays importable without torch.

Conventions (see docs/FORMATS.md):
- Images are RGB uint8 arrays of shape (H, W, 3).
- Masks are bool arrays of shape (H, W), image-sized.
- Boxes are `xyxy` in pixels, float, x1 > x0 and y1 > y0.
- Quaternions are (w, x, y, z), unit length.
- Poses follow SAM 3D Objects: p_scene = (p_local * scale) @ R(q) + translation, row vectors,
  where R(q) is pytorch3d's quaternion_to_matrix(q). The scene frame is the camera frame of the
  photo (pytorch3d camera: +X left, +Y up, +Z forward, away from the camera).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

SH_C0 = 0.28209479177387814
"""Degree-0 spherical-harmonic constant: rgb = 0.5 + SH_C0 * features_dc."""


def rgb_to_sh0(rgb: np.ndarray) -> np.ndarray:
    """Colours in [0, 1] -> SH degree-0 coefficients."""
    return (np.asarray(rgb, dtype=np.float32) - 0.5) / SH_C0


def sh0_to_rgb(features_dc: np.ndarray) -> np.ndarray:
    """SH degree-0 coefficients -> colours in [0, 1] (clipped)."""
    return np.clip(0.5 + SH_C0 * np.asarray(features_dc, dtype=np.float32), 0.0, 1.0)


@dataclass
class Gaussians:
    """A set of 3D Gaussians with activated parameters (no logits, no log-scales)."""

    xyz: np.ndarray  # (N, 3) float32 positions
    features_dc: np.ndarray  # (N, 3) float32 SH degree-0 coefficients
    opacity: np.ndarray  # (N, 1) float32 in [0, 1]
    scale: np.ndarray  # (N, 3) float32, > 0
    rotation: np.ndarray  # (N, 4) float32 unit quaternions, w first

    def __post_init__(self) -> None:
        n = self.xyz.shape[0]
        expected = {"xyz": 3, "features_dc": 3, "opacity": 1, "scale": 3, "rotation": 4}
        for name, cols in expected.items():
            arr = np.asarray(getattr(self, name), dtype=np.float32)
            if arr.ndim == 1 and cols == 1:
                arr = arr[:, None]
            if arr.shape != (n, cols):
                raise ValueError(f"Gaussians.{name} has shape {arr.shape}, expected ({n}, {cols})")
            setattr(self, name, arr)

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    def take(self, index: np.ndarray) -> Gaussians:
        return Gaussians(
            self.xyz[index], self.features_dc[index], self.opacity[index], self.scale[index], self.rotation[index]
        )

    @staticmethod
    def concatenate(parts: list[Gaussians]) -> Gaussians:
        if not parts:
            return Gaussians.empty()
        return Gaussians(*(np.concatenate([getattr(p, k) for p in parts]) for k in GAUSSIAN_FIELDS))

    @staticmethod
    def empty() -> Gaussians:
        return Gaussians(
            np.zeros((0, 3), np.float32),
            np.zeros((0, 3), np.float32),
            np.zeros((0, 1), np.float32),
            np.zeros((0, 3), np.float32),
            np.zeros((0, 4), np.float32),
        )


GAUSSIAN_FIELDS = ("xyz", "features_dc", "opacity", "scale", "rotation")


@dataclass
class Pose:
    """Object-local -> camera frame: p_scene = (p_local * scale) @ R(rotation) + translation."""

    rotation: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0, 0.0], np.float32))  # (4,) w first
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))  # (3,)
    scale: np.ndarray = field(default_factory=lambda: np.ones(3, np.float32))  # (3,)

    def __post_init__(self) -> None:
        self.rotation = np.asarray(self.rotation, np.float32).reshape(4)
        self.translation = np.asarray(self.translation, np.float32).reshape(3)
        self.scale = np.asarray(self.scale, np.float32).reshape(3)


@dataclass
class ObjectGaussians:
    """One reconstructed object: Gaussians in its local frame plus its pose in the camera frame."""

    gaussians: Gaussians
    pose: Pose
    source: str  # which lifter made it, e.g. "inflate" or "sam3d-objects"
    mesh_glb: bytes | None = None  # binary glTF of the object's mesh in the local frame, when the lifter has one


@dataclass
class PlanItem:
    """One thing the planner wants segmented."""

    phrase: str  # short English noun phrase, sanitized (never used in file names)
    box_xyxy: tuple[float, float, float, float] | None = None  # pixels, clamped to the image


@dataclass
class Plan:
    """What the planner proposed for one photo (written to stage1/plan.json)."""

    items: list[PlanItem]
    mode: Literal["scene", "query", "none"] = "scene"
    query: str | None = None
    raw_response: str = ""
    reasoning: str = ""
    warnings: list[str] = field(default_factory=list)
    model: str = ""


@dataclass
class ObjectMask:
    """One segmented object. `id` is assigned by the masks writer (obj_001, ...)."""

    mask: np.ndarray  # (H, W) bool
    label: str
    prompt: str = ""
    score: float = 1.0
    source: str = ""
    id: str = ""
    box_xyxy: tuple[float, float, float, float] | None = None  # derived from the mask when None

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask).astype(bool, copy=False)
        if self.box_xyxy is None:
            self.box_xyxy = mask_box_xyxy(self.mask)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def mask_box_xyxy(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight pixel box of a mask, xyxy with exclusive max (a 1-pixel mask at (x, y) -> (x, y, x+1, y+1))."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


def require_rgb_image(image: np.ndarray, who: str) -> np.ndarray:
    """The photo contract of every backend: an RGB uint8 (H, W, 3) array, else InputError."""
    from pipeline.core.errors import InputError

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(
            f"{who} needs an RGB uint8 (H, W, 3) photo, got {image.dtype} {image.shape}.",
            "load the photo with pipeline.image.load.load_photo, which normalizes it to RGB.",
        )
    return image
