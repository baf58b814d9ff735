"""One palette for all frames of a GIF, computed with torch where the frames were rendered (the GPU
for gsplat), so writing the GIF leaves Pillow only its LZW encoding.

Pillow quantizes every RGB frame itself (median cut, on the CPU, one palette per frame): on the
H200 machine that was 0.78 s of a photo's 2.4 s in a batch's stage 2 (6 GIFs x 24 frames), the
largest single cost of the built-in lifter's stage 2 (docs/PERFORMANCE.md).

The palette: the frames' distinct colours as they are when there are at most `colors` of them
(lossless); otherwise a weighted k-means over the distinct colours (each weighted by its pixel
count), started from the means of the most populated 5-bit-per-channel colour cells. No sampling:
on the CPU the same frames give the same palette; on a GPU the order of its float additions may
move a palette colour by one level between runs. Pixels map to the nearest palette colour, without
dithering (as Pillow's ADAPTIVE conversion for GIFs). One palette for the whole GIF also keeps
colours from flickering between frames, and delta frames compress better (a turntable of 24
frames, 256 px: 164 kB against 280 kB).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# 255, not 256: the GIF writer then has a free index for the transparent pixels of its delta frames.
GIF_COLORS = 255


def palette_indices(frames: Any, colors: int = GIF_COLORS, iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """frames: a (F, H, W, 3) uint8 torch tensor on any device. Returns (indices (F, H, W) uint8,
    palette (K, 3) uint8) as numpy arrays, K <= colors."""
    import torch

    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
    if not 1 <= colors <= 256:
        raise ValueError(f"colors must be 1..256, got {colors}")
    f, h, w, _ = frames.shape
    rgb = frames.reshape(-1, 3).to(torch.int32)
    key = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    distinct, inverse = torch.unique(key, return_inverse=True)
    points = torch.stack([(distinct >> 16) & 255, (distinct >> 8) & 255, distinct & 255], dim=1)
    if len(distinct) <= colors:
        return _to_numpy(inverse.reshape(f, h, w), points)

    weight = torch.bincount(inverse, minlength=len(distinct)).to(torch.float32)
    pts = points.to(torch.float32)
    # Start: the weighted mean colour of each of the `colors` most populated 5-bit cells.
    cell = ((points[:, 0] >> 3) << 10) | ((points[:, 1] >> 3) << 5) | (points[:, 2] >> 3)
    cells, cell_of = torch.unique(cell, return_inverse=True)
    cell_weight = torch.zeros(len(cells), device=pts.device).index_add_(0, cell_of, weight)
    cell_sum = torch.zeros(len(cells), 3, device=pts.device).index_add_(0, cell_of, pts * weight[:, None])
    top = torch.argsort(cell_weight, descending=True, stable=True)[:colors]
    centres = cell_sum[top] / cell_weight[top, None]
    for _ in range(iterations):
        nearest = _nearest(pts, centres)
        mass = torch.zeros(len(centres), device=pts.device).index_add_(0, nearest, weight)
        total = torch.zeros(len(centres), 3, device=pts.device).index_add_(0, nearest, pts * weight[:, None])
        used = mass > 0
        centres[used] = total[used] / mass[used, None]  # an emptied cluster keeps its centre
    palette = centres.round().clamp(0, 255)
    return _to_numpy(_nearest(pts, palette)[inverse].reshape(f, h, w), palette)


def _nearest(points: Any, centres: Any, chunk: int = 1 << 16) -> Any:
    """Index of the nearest centre (squared RGB distance) for each point, in chunks of points."""
    import torch

    out = torch.empty(len(points), dtype=torch.long, device=points.device)
    for i in range(0, len(points), chunk):
        out[i : i + chunk] = torch.cdist(points[i : i + chunk], centres).argmin(dim=1)
    return out


def _to_numpy(indices: Any, palette: Any) -> tuple[np.ndarray, np.ndarray]:
    import torch

    return indices.to(torch.uint8).cpu().numpy(), palette.to(torch.uint8).cpu().numpy()
