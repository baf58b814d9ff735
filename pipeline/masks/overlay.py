"""A picture of the masks over the photo: tinted regions, contours and a number per object."""

from __future__ import annotations

import colorsys
import re
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.types import ObjectMask

_ID_NUMBER = re.compile(r"^obj_(\d+)$")


def mask_colors(n: int) -> np.ndarray:
    """`n` distinct saturated colours, (n, 3) uint8: hues spaced by the golden ratio."""
    hues = (np.arange(n) * 0.6180339887498949 + 0.05) % 1.0
    rgb = [colorsys.hsv_to_rgb(float(h), 0.85, 1.0 if i % 2 == 0 else 0.8) for i, h in enumerate(hues)]
    return np.round(np.array(rgb, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


def draw_overlay(image: np.ndarray, masks: list[ObjectMask], *, numbered: bool = True, alpha: float = 0.5) -> np.ndarray:
    """Photo (H, W, 3) uint8 with each mask tinted in its own colour, outlined, and numbered.

    The number is the one in the mask's id (obj_007 -> 7) or else its 1-based position. It sits
    at the mask pixel nearest to the mask's centroid, so it is on the object even for rings.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_overlay needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    out = image.copy()  # (H, W, 3) uint8
    colors = mask_colors(len(masks))
    thickness = max(1, round(min(h, w) / 400))
    labels: list[tuple[str, tuple[float, float], np.ndarray]] = []
    for i, obj in enumerate(masks):
        mask = np.asarray(obj.mask, dtype=bool)
        if mask.shape != (h, w):
            raise ValueError(f"mask {i} has shape {mask.shape}, the image is {(h, w)}")
        box = _bbox(mask)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        # Work on the mask's bounding box (plus the contour margin): cheap on large photos.
        y0, y1 = max(0, y0 - thickness), min(h, y1 + thickness)
        x0, x1 = max(0, x0 - thickness), min(w, x1 + thickness)
        crop = mask[y0:y1, x0:x1]
        region = out[y0:y1, x0:x1]
        _tint(region, crop, colors[i], alpha)
        edge = crop & ~_erode(crop, thickness)
        region[edge] = colors[i]
        labels.append((_number(obj, i), _anchor(crop, x0, y0), colors[i]))
    if numbered and labels:
        _draw_numbers(out, labels)
    return out


def _tint(region: np.ndarray, crop: np.ndarray, color: np.ndarray, alpha: float) -> None:
    """Blend `color` into region[crop] in place, in row strips with 8-bit fixed-point weights."""
    a = int(round(min(max(alpha, 0.0), 1.0) * 256))
    add = color.astype(np.uint16) * a + 128  # (3,)
    rows = max(1, 1_000_000 // max(region.shape[1], 1))
    for y in range(0, region.shape[0], rows):
        sub, sel = region[y : y + rows], crop[y : y + rows]
        blended = ((sub.astype(np.uint16) * (256 - a) + add) >> 8).astype(np.uint8)
        np.copyto(sub, blended, where=sel[:, :, None])


def _number(obj: ObjectMask, index: int) -> str:
    m = _ID_NUMBER.match(obj.id or "")
    return str(int(m.group(1))) if m else str(index + 1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)^2 square; pixels outside the array count as empty.

    Separable, with window doubling: about 0.25 s for a full 6000x4500 mask at r = 11.
    """
    return _window_all(_window_all(mask, radius, axis=0), radius, axis=1)


def _shift(a: np.ndarray, offset: int, axis: int) -> np.ndarray:
    """out[i] = a[i + offset] along `axis`, False where that falls outside."""
    out = np.zeros_like(a)
    n = a.shape[axis]
    if abs(offset) >= n:
        return out
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    if offset >= 0:
        src[axis], dst[axis] = slice(offset, n), slice(0, n - offset)
    else:
        src[axis], dst[axis] = slice(0, n + offset), slice(-offset, n)
    out[tuple(dst)] = a[tuple(src)]
    return out


def _window_all(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """out[i] = all(a[i - r : i + r + 1]) along `axis` (outside = False), in O(log r) array ops."""
    size = 2 * radius + 1
    result: np.ndarray | None = None  # covers [i, i + covered) once set
    covered = 0
    power, span = a, 1  # power covers [i, i + span)
    remaining = size
    while remaining:
        if remaining & 1:
            part = _shift(power, covered, axis)
            result = part if result is None else result & part
            covered += span
        remaining >>= 1
        if remaining:
            power = power & _shift(power, span, axis)
            span *= 2
    assert result is not None
    return _shift(result, -radius, axis)


def _anchor(crop: np.ndarray, x0: int, y0: int) -> tuple[float, float]:
    """Where the number goes: the centroid, or the mask pixel nearest to it when it is outside."""
    step = max(1, int(np.sqrt(crop.size / 1_000_000)))  # a subsample is plenty for a label position
    sample = crop[::step, ::step]
    ys, xs = np.nonzero(sample)
    if len(ys) == 0:
        ys, xs, step = *np.nonzero(crop), 1
        sample = crop
    cy, cx = ys.mean(), xs.mean()
    if not sample[int(cy), int(cx)]:
        k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        cy, cx = float(ys[k]), float(xs[k])
    return (x0 + float(cx) * step + 0.5, y0 + float(cy) * step + 0.5)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's built-in font (scalable when Pillow has FreeType): no font file to ship.
    return ImageFont.load_default(size=size)


def _draw_numbers(out: np.ndarray, labels: list[tuple[str, tuple[float, float], np.ndarray]]) -> None:
    h, w = out.shape[:2]
    size = max(12, round(min(h, w) / 25))
    font = _font(size)
    scalable = isinstance(font, ImageFont.FreeTypeFont)
    for text, (x, y), color in labels:
        tile = _number_tile(text, size, font, scalable, tuple(int(v) for v in color))  # (th, tw, 4) RGBA
        th, tw = tile.shape[:2]
        left, top = int(round(x - tw / 2)), int(round(y - th / 2))
        left, top = min(max(left, 0), max(w - tw, 0)), min(max(top, 0), max(h - th, 0))
        sub = out[top : top + th, left : left + tw]
        t = tile[: sub.shape[0], : sub.shape[1]]
        a = t[:, :, 3:4].astype(np.float32) / 255.0
        sub[...] = np.rint(sub * (1.0 - a) + t[:, :, :3] * a).astype(np.uint8)


def _number_tile(
    text: str, size: int, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, scalable: bool, color: tuple[int, ...]
) -> np.ndarray:
    """The number as white digits on a dark rounded box with a coloured rim, RGBA (th, tw, 4)."""
    if scalable:
        draw_font, scale = font, 1
    else:
        # Bitmap fallback (Pillow without FreeType): draw small, then scale up with nearest.
        draw_font, scale = ImageFont.load_default(), max(1, size // 11)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    bx0, by0, bx1, by1 = probe.textbbox((0, 0), text, font=draw_font)
    pad = max(2, (by1 - by0) // 4)
    tw, th = bx1 - bx0 + 2 * pad, by1 - by0 + 2 * pad
    tile = Image.new("RGBA", (tw, th), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    rim = max(1, pad // 2)
    draw.rounded_rectangle((0, 0, tw - 1, th - 1), radius=pad, fill=(20, 20, 20, 255), outline=(*color[:3], 255), width=rim)
    draw.text((pad - bx0, pad - by0), text, font=draw_font, fill=(255, 255, 255, 255))
    if scale > 1:
        tile = tile.resize((tw * scale, th * scale), Image.NEAREST)
    return np.asarray(tile)
