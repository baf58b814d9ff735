"""objects/<id>/gaussians.pt: one object's Gaussians as plain tensors, readable without SAM 3D.

Keys (all tensors float32 on CPU, so `torch.load(path, weights_only=True)` reads it anywhere):

    xyz (N, 3)           object-local positions
    features_dc (N, 3)   SH degree-0 colour coefficients
    opacity (N, 1)       in [0, 1] (activated, not a logit)
    scale (N, 3)         > 0 (activated, not a log)
    rotation (N, 4)      unit quaternions, w first
    pose                 {"rotation" (4,) w first, "translation" (3,), "scale" (3,)}:
                         p_scene = (p_local * scale) @ R(rotation) + translation
    format_version       int (1)
    source               str, the lifter that made it
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import InputError, missing_dependency
from pipeline.core.types import GAUSSIAN_FIELDS, Gaussians, ObjectGaussians, Pose

FORMAT_VERSION = 1
_POSE_FIELDS = ("rotation", "translation", "scale")
_FIX = "re-run stage 2 for this object (add --force) or delete the file."


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise missing_dependency("torch", "light (.venv)", "pip install torch") from exc
    return torch


def object_to_dict(obj: ObjectGaussians) -> dict[str, Any]:
    """The plain-tensor dict stored in gaussians.pt."""
    torch = _torch()

    def tensor(a: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())

    g = obj.gaussians
    out: dict[str, Any] = {name: tensor(getattr(g, name)) for name in GAUSSIAN_FIELDS}
    out["pose"] = {name: tensor(getattr(obj.pose, name)) for name in _POSE_FIELDS}
    out["format_version"] = FORMAT_VERSION
    out["source"] = str(obj.source)
    return out


def save_object_pt(path: str | os.PathLike[str], obj: ObjectGaussians) -> Path:
    """Write gaussians.pt atomically (temp file, then rename)."""
    torch = _torch()
    data = object_to_dict(obj)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return Path(path)


def load_object_pt(path: str | os.PathLike[str]) -> ObjectGaussians:
    """Read gaussians.pt with weights_only=True; InputError on a missing, truncated or malformed file."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist.", "run stage 2 first, or check the run folder.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on bad files
        raise InputError(f"{path} is not a readable gaussians.pt ({type(exc).__name__}: truncated or corrupt).", _FIX) from exc
    return object_from_dict(data, path)


def object_from_dict(data: Any, path: str | os.PathLike[str] = "<dict>") -> ObjectGaussians:
    """Validate and convert a gaussians.pt dict (tensors or arrays) into ObjectGaussians."""
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}, not a gaussians.pt dict.", _FIX)
    missing = [k for k in (*GAUSSIAN_FIELDS, "pose") if k not in data]
    if missing:
        raise InputError(f"{path} lacks keys {missing}.", _FIX)
    version = data.get("format_version", FORMAT_VERSION)
    if int(version) > FORMAT_VERSION:
        raise InputError(f"{path} has format_version {version}; this code reads {FORMAT_VERSION}.", "update sam3d-gs.")
    pose = data["pose"]
    if not isinstance(pose, dict) or any(k not in pose for k in _POSE_FIELDS):
        raise InputError(f"{path}: 'pose' must be a dict with {list(_POSE_FIELDS)}.", _FIX)

    def array(value: Any, name: str) -> np.ndarray:
        if hasattr(value, "detach"):
            value = value.detach().cpu().float().numpy()
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: '{name}' is not numeric.", _FIX) from exc

    fields = {k: array(data[k], k) for k in GAUSSIAN_FIELDS}
    if fields["features_dc"].ndim == 3:  # (N, 1, 3), as SAM 3D keeps it internally
        fields["features_dc"] = fields["features_dc"].reshape(len(fields["features_dc"]), -1)
    try:
        gaussians = Gaussians(**fields)
        pose_obj = Pose(**{k: array(pose[k], f"pose.{k}").reshape(-1) for k in _POSE_FIELDS})
    except ValueError as exc:
        raise InputError(f"{path}: {exc}.", _FIX) from exc
    return ObjectGaussians(gaussians, pose_obj, source=str(data.get("source", "")))
