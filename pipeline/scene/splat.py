"""The `.splat` web format that browser splat viewers open directly.

32 bytes per Gaussian, no header, little-endian:

    offset  0: position      3 x float32
    offset 12: scale         3 x float32, linear (not log)
    offset 24: colour        4 x uint8   R G B from SH degree 0, A = opacity, each * 255
    offset 28: rotation      4 x uint8   unit quaternion w x y z, each component * 128 + 128

Gaussians are sorted by descending scale_x * scale_y * scale_z * opacity, as common viewers expect
(they stream the file and show the biggest, most opaque splats first).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.core.atomic import write_bytes_atomic
from pipeline.core.errors import InputError
from pipeline.core.types import Gaussians, rgb_to_sh0, sh0_to_rgb

SPLAT_DTYPE = np.dtype([("position", "<f4", (3,)), ("scale", "<f4", (3,)), ("rgba", "u1", (4,)), ("rot", "u1", (4,))])
assert SPLAT_DTYPE.itemsize == 32


def encode_splat(g: Gaussians) -> tuple[np.ndarray, int]:
    """(N',) SPLAT_DTYPE records, sorted for viewers, non-finite Gaussians dropped; returns (records, dropped)."""
    finite = (
        np.isfinite(g.xyz).all(1)
        & np.isfinite(g.scale).all(1)
        & np.isfinite(g.features_dc).all(1)
        & np.isfinite(g.opacity[:, 0])
        & np.isfinite(g.rotation).all(1)
    )
    dropped = int(len(g) - finite.sum())
    if dropped:
        g = g.take(finite)
    opacity = np.clip(g.opacity[:, 0], 0.0, 1.0)
    order = np.argsort(-(np.prod(g.scale.astype(np.float64), axis=1) * opacity), kind="stable")

    rgba = np.empty((len(g), 4), dtype=np.float32)
    rgba[:, :3] = sh0_to_rgb(g.features_dc)
    rgba[:, 3] = opacity
    norm = np.linalg.norm(g.rotation, axis=1, keepdims=True)
    q = np.where(norm > 0, g.rotation / np.maximum(norm, 1e-12), np.array([1, 0, 0, 0], np.float32))

    out = np.empty(len(g), dtype=SPLAT_DTYPE)
    out["position"] = g.xyz[order]
    out["scale"] = g.scale[order]
    out["rgba"] = np.clip(np.rint(rgba[order] * 255.0), 0, 255).astype(np.uint8)
    out["rot"] = np.clip(np.rint(q[order] * 128.0 + 128.0), 0, 255).astype(np.uint8)
    return out, dropped


def write_splat(path: str | os.PathLike[str], g: Gaussians) -> dict[str, int]:
    """Write a .splat file atomically. Returns {'written': n, 'dropped_nonfinite': k}."""
    records, dropped = encode_splat(g)
    write_bytes_atomic(path, records.tobytes())
    return {"written": int(len(records)), "dropped_nonfinite": dropped}


def read_splat(path: str | os.PathLike[str]) -> Gaussians:
    """Read a .splat file back into Gaussians (colours and rotations are 8-bit quantized)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f".splat file not found: {path}.", "check the path.")
    data = path.read_bytes()
    if len(data) % SPLAT_DTYPE.itemsize:
        raise InputError(
            f"{path} is not a .splat file or is truncated ({len(data)} bytes, not a multiple of 32).", "re-export it."
        )
    rec = np.frombuffer(data, dtype=SPLAT_DTYPE)
    rgba = rec["rgba"].astype(np.float32) / 255.0
    q = (rec["rot"].astype(np.float32) - 128.0) / 128.0
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    q = np.where(norm > 0, q / np.maximum(norm, 1e-12), np.array([1, 0, 0, 0], np.float32))
    return Gaussians(
        rec["position"].astype(np.float32),
        rgb_to_sh0(rgba[:, :3]),
        rgba[:, 3:4],
        rec["scale"].astype(np.float32),
        q,
    )
