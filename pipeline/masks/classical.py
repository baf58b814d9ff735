"""The built-in segmenter: object instances without any model, for plain or simple backgrounds.

Without boxes:
1. Work on a copy whose longest side is at most `max_side` (big photos stay cheap), in CIELAB.
2. Model the background from a band along the image border: a smooth quadratic surface per Lab
   channel, fitted robustly (outliers from objects that touch the border are dropped), so soft
   gradients such as a ground tint or vignetting count as background.
3. Foreground = pixels whose Lab distance to that surface exceeds a threshold picked by Otsu's
   method on the distance histogram (never below `min_contrast`).
4. Morphological opening and closing, connected components, components smaller than
   `min_area_fraction` of the image dropped, holes filled.
5. A component made of two clearly different hues that also form two coherent regions is split
   in two (touching objects of different colours).
6. Label = dominant colour name ('red object'); score = contrast to the background, in [0, 1].

With boxes (plan items with `box_xyxy`, or `boxes=` given to the constructor for `--box`): each box
is refined into a mask with GrabCut, seeded from the same background distance, and the largest
connected piece inside the box is kept.

Masks are computed at the working resolution and upsampled to the photo's size. Labels are text
only: nothing else (ids, file names, the prompt) is made from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.types import ObjectMask, Plan, require_rgb_image

BoxPrompt = tuple  # (x0, y0, x1, y1) or (x0, y0, x1, y1, label); pixels of the full-size photo


@dataclass
class _Work:
    """The photo at working resolution and its background model."""

    small: np.ndarray  # (h, w, 3) uint8 RGB
    lab: np.ndarray  # (h, w, 3) float32 CIELAB
    distance: np.ndarray  # (h, w) float32 Lab distance to the background model
    threshold: float  # foreground threshold on `distance`
    scale: float  # working size / full size
    full_shape: tuple[int, int]  # (H, W) of the photo


class ClassicalSegmenter:
    """Segmenter `classical`: background modelling + connected components, or GrabCut in boxes."""

    name = "classical"

    def __init__(
        self,
        *,
        boxes: Sequence[BoxPrompt] | None = None,
        max_side: int = 1024,
        min_area_fraction: float = 0.001,
        min_contrast: float = 10.0,
        split_colours: bool = True,
        grabcut_iterations: int = 5,
    ) -> None:
        """
        boxes: box prompts in full-size pixels, (x0, y0, x1, y1[, label]); when given, only these are segmented.
        max_side: longest side of the working copy; masks are upsampled to the photo's size.
        min_area_fraction: components smaller than this fraction of the image are dropped.
        min_contrast: lowest Lab distance to the background that can count as foreground.
        split_colours: split a component made of two clearly different hues into two objects.
        grabcut_iterations: GrabCut iterations per box.
        """
        self.boxes = [_parse_box(b) for b in (boxes or [])]
        self.max_side = int(max_side)
        self.min_area_fraction = float(min_area_fraction)
        self.min_contrast = float(min_contrast)
        self.split_colours = bool(split_colours)
        self.grabcut_iterations = int(grabcut_iterations)

    def segment(self, image: np.ndarray, plan: Plan | None = None) -> list[ObjectMask]:
        """One mask per object. Plan items with boxes are refined; phrases alone cannot be used
        without a model, so a plan without boxes means: find the objects automatically."""
        image = require_rgb_image(image, "the classical segmenter")
        boxes = list(self.boxes)
        if plan is not None:
            for item in plan.items:
                if item.box_xyxy is not None:
                    boxes.append(_parse_box((*item.box_xyxy, item.phrase)))
        work = self._prepare(image)
        if boxes:
            return [self._refine_box(work, box) for box in boxes]
        return self._find_objects(work)

    # ------------------------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray) -> _Work:
        import cv2

        H, W = image.shape[:2]
        scale = min(1.0, self.max_side / max(H, W))
        if scale < 1.0:
            size = (max(1, round(W * scale)), max(1, round(H * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        else:
            small = image
        lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
        background = _fit_background(lab)
        distance = np.linalg.norm(lab - background, axis=-1).astype(np.float32)
        threshold = max(self.min_contrast, _otsu_threshold(distance))
        return _Work(small, lab, distance, threshold, scale, (H, W))

    def _find_objects(self, work: _Work) -> list[ObjectMask]:
        import cv2

        h, w = work.distance.shape
        foreground = (work.distance > work.threshold).astype(np.uint8)
        k = max(3, (round(min(h, w) / 200) // 2) * 2 + 1)  # odd kernel, ~0.5% of the short side
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, kernel)
        foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, kernel)
        min_area = max(4, int(self.min_area_fraction * h * w))
        count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)

        pieces: list[tuple[np.ndarray, np.ndarray]] = []  # (part, part with holes filled), (h, w) bool
        for c in range(1, count):
            if stats[c, cv2.CC_STAT_AREA] < min_area:
                continue
            component = labels == c
            parts = _split_by_hue(work.small, component, min_area) if self.split_colours else [component]
            pieces.extend((p, _fill_holes(p)) for p in parts)

        results = []
        for part, piece in pieces:
            # Name the colour from the object's own pixels, not from background seen through holes.
            colour = _colour_name(work.small[part & (work.distance > work.threshold)])
            score = _contrast_score(work.distance[piece])
            mask = _upsample(piece, work)
            results.append(ObjectMask(mask=mask, label=f"{colour} object", prompt="", score=score, source=self.name))
        results.sort(key=lambda m: -m.area)
        return results

    def _refine_box(self, work: _Work, box: tuple[float, float, float, float, str | None]) -> ObjectMask:
        import cv2

        H, W = work.full_shape
        h, w = work.distance.shape
        x0, y0, x1, y1, label = box
        x0, x1 = np.clip([x0, x1], 0, W)
        y0, y1 = np.clip([y0, y1], 0, H)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise InputError(f"box {box[:4]} lies outside the {W}x{H} image.", "give x0,y0,x1,y1 in pixels inside the image.")
        # Box at working resolution (inclusive-exclusive integer pixel range).
        bx0, by0 = int(np.floor(x0 * work.scale)), int(np.floor(y0 * work.scale))
        bx1, by1 = max(bx0 + 1, int(np.ceil(x1 * work.scale))), max(by0 + 1, int(np.ceil(y1 * work.scale)))
        bx1, by1 = min(bx1, w), min(by1, h)
        margin = max(8, round(0.15 * max(bx1 - bx0, by1 - by0)))
        cx0, cy0, cx1, cy1 = max(0, bx0 - margin), max(0, by0 - margin), min(w, bx1 + margin), min(h, by1 + margin)

        crop = np.ascontiguousarray(work.small[cy0:cy1, cx0:cx1])
        inside = np.zeros(crop.shape[:2], bool)
        inside[by0 - cy0 : by1 - cy0, bx0 - cx0 : bx1 - cx0] = True
        likely_fg = inside & (work.distance[cy0:cy1, cx0:cx1] > work.threshold)

        gc = np.full(crop.shape[:2], cv2.GC_BGD, np.uint8)
        gc[inside] = cv2.GC_PR_BGD
        gc[likely_fg] = cv2.GC_PR_FGD
        bgd_model = np.zeros((1, 65), np.float64)
        fgd_model = np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's GMM initialisation uses OpenCV's RNG: keep results reproducible
        try:
            if likely_fg.any() and (gc != cv2.GC_PR_FGD).any():
                cv2.grabCut(crop, gc, None, bgd_model, fgd_model, self.grabcut_iterations, cv2.GC_INIT_WITH_MASK)
            else:
                rect = (bx0 - cx0, by0 - cy0, bx1 - bx0, by1 - by0)
                cv2.grabCut(crop, gc, rect, bgd_model, fgd_model, self.grabcut_iterations, cv2.GC_INIT_WITH_RECT)
            crop_fg = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)) & inside
        except cv2.error:
            # GrabCut refuses when a side has no samples (e.g. the box covers the whole image).
            crop_fg = likely_fg if likely_fg.any() else inside
        crop_fg = _fill_holes(_largest_component(crop_fg))

        piece = np.zeros((h, w), bool)
        piece[cy0:cy1, cx0:cx1] = crop_fg
        mask = _upsample(piece, work)
        # Keep the mask inside the box at full resolution too (upsampling can spill a pixel).
        clip = np.zeros((H, W), bool)
        clip[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
        mask &= clip
        colour = _colour_name(work.small[piece & (work.distance > work.threshold)])
        text = label if label else f"{colour} object"
        score = _contrast_score(work.distance[piece]) if piece.any() else 0.0
        prompt = f"box {x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}"
        return ObjectMask(mask=mask, label=text, prompt=prompt, score=score, source=self.name)


# ----------------------------------------------------------------------------------------------
# Helpers (working resolution unless said otherwise)


def _parse_box(box: Sequence) -> tuple[float, float, float, float, str | None]:
    if len(box) not in (4, 5):
        raise InputError(f"a box needs 4 numbers and an optional label, got {tuple(box)!r}.", "write it as x0,y0,x1,y1[,label].")
    try:
        x0, y0, x1, y1 = (float(v) for v in box[:4])
    except (TypeError, ValueError):
        raise InputError(f"box {tuple(box)!r} has a non-number coordinate.", "write it as x0,y0,x1,y1[,label] in pixels.") from None
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"box {tuple(box[:4])!r} is empty: x1 must exceed x0 and y1 must exceed y0.", "write it as x0,y0,x1,y1 (top-left, bottom-right).")
    label = str(box[4]).strip() if len(box) == 5 and box[4] is not None else None
    return (x0, y0, x1, y1, label or None)


def _fit_background(lab: np.ndarray, degree: int = 2, rounds: int = 3) -> np.ndarray:
    """A smooth (polynomial in x, y) background colour per pixel, fitted to the border band."""
    h, w = lab.shape[:2]
    band = max(2, round(0.02 * min(h, w)))
    border = np.zeros((h, w), bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    ys, xs = np.nonzero(border)
    step = max(1, len(ys) // 20000)  # a subsample is plenty for 6-10 coefficients
    ys, xs = ys[::step], xs[::step]

    def design(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        xn, yn = 2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0
        cols = [xn**i * yn**j for i in range(degree + 1) for j in range(degree + 1 - i)]
        return np.stack(cols, axis=-1).astype(np.float64)

    A = design(xs.astype(np.float64), ys.astype(np.float64))  # (n, terms)
    values = lab[ys, xs].astype(np.float64)  # (n, 3)
    keep = np.ones(len(values), bool)
    coef = np.zeros((A.shape[1], 3))
    for _ in range(rounds):
        coef, *_ = np.linalg.lstsq(A[keep], values[keep], rcond=None)
        residual = np.linalg.norm(values - A @ coef, axis=1)
        # Objects crossing the border are outliers: keep pixels near the fit (median-based scale).
        limit = max(3.0, 3.0 * 1.4826 * float(np.median(residual[keep])))
        keep = residual < limit
        if keep.sum() < A.shape[1] * 4:
            break
    yy, xx = np.mgrid[0:h, 0:w]
    return (design(xx.ravel().astype(np.float64), yy.ravel().astype(np.float64)) @ coef).reshape(h, w, 3).astype(np.float32)


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on a float array (between-class variance maximised over a histogram)."""
    top = float(np.percentile(values, 99.9))
    if top <= 0:
        return 0.0
    hist, edges = np.histogram(np.clip(values, 0, top), bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1e-12)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    if not mask.any():
        return mask
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    out = mask.copy()
    out[y0:y1, x0:x1] = ndimage.binary_fill_holes(mask[y0:y1, x0:x1])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask.astype(bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def _hsv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 3) uint8 RGB -> hue in degrees, saturation and value in [0, 1] (shading-invariant hue)."""
    rgb = pixels.astype(np.float32) / 255.0
    v = rgb.max(axis=1)
    c = v - rgb.min(axis=1)
    s = np.where(v > 0, c / np.maximum(v, 1e-6), 0.0)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    safe = np.maximum(c, 1e-6)
    hue = np.where(v == r, ((g - b) / safe) % 6.0, np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
    return hue, s, v


_HUE_NAMES = ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (195, "cyan"), (255, "blue"), (290, "purple"), (335, "magenta"), (361, "red"))


def _colour_name(pixels: np.ndarray) -> str:
    """Dominant colour of (n, 3) uint8 RGB pixels as a plain English word."""
    if len(pixels) == 0:
        return "unknown"
    hue, s, v = _hsv(pixels)
    if float(np.median(s)) < 0.2:
        value = float(np.median(v))
        return "white" if value > 0.8 else "black" if value < 0.25 else "gray"
    coloured = s >= 0.2
    angle = np.radians(hue[coloured])
    mean_hue = float(np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360.0)
    name = next(n for limit, n in _HUE_NAMES if mean_hue < limit)
    if name == "orange" and float(np.median(v[coloured])) < 0.55:
        return "brown"
    return name


def _split_by_hue(small: np.ndarray, component: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Split a component into two when it holds two clearly different hues in two coherent regions."""
    ys, xs = np.nonzero(component)
    hue, s, v = _hsv(small[ys, xs])
    coloured = (s > 0.25) & (v > 0.15)
    if coloured.sum() < 2 * min_area:
        return [component]
    angle = np.radians(hue[coloured])
    points = np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (n, 2) unit hue vectors
    # Two-means on the hue circle with a deterministic farthest-point start.
    c0 = points[np.argmax(np.linalg.norm(points - points.mean(axis=0), axis=1))]
    c1 = points[np.argmax(np.linalg.norm(points - c0, axis=1))]
    for _ in range(10):
        side = np.linalg.norm(points - c1, axis=1) < np.linalg.norm(points - c0, axis=1)
        if side.all() or not side.any():
            return [component]
        c0, c1 = points[~side].mean(axis=0), points[side].mean(axis=0)
    separation = np.degrees(np.arccos(np.clip(c0 @ c1 / max(np.linalg.norm(c0) * np.linalg.norm(c1), 1e-9), -1, 1)))
    if separation < 60.0 or min(side.sum(), (~side).sum()) < min_area:
        return [component]
    # Every pixel of the component (grey ones too) goes to the hue cluster of its nearest coloured pixel.
    from scipy import ndimage

    seeds = np.zeros(component.shape, np.int8)
    seeds[ys[coloured][~side], xs[coloured][~side]] = 1
    seeds[ys[coloured][side], xs[coloured][side]] = 2
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    assignment = np.where(component, seeds[iy, ix], 0)
    parts = []
    for k in (1, 2):
        part = _largest_component(assignment == k)
        # A split only counts when each hue forms one coherent region, not speckle.
        if part.sum() < 0.8 * (assignment == k).sum() or part.sum() < min_area:
            return [component]
        parts.append(part)
    return parts


def _contrast_score(distances: np.ndarray) -> float:
    """Confidence from the median Lab distance to the background: 20 units -> 0.63, 60 -> 0.95."""
    if distances.size == 0:
        return 0.0
    return float(np.clip(1.0 - np.exp(-float(np.median(distances)) / 20.0), 0.0, 1.0))


def _upsample(piece: np.ndarray, work: _Work) -> np.ndarray:
    """A working-resolution mask -> a full-size bool mask; only the object's bounding box is resized."""
    import cv2

    H, W = work.full_shape
    if work.scale >= 1.0:
        return piece.copy()
    out = np.zeros((H, W), bool)
    if not piece.any():
        return out
    h, w = piece.shape
    ys, xs = np.nonzero(piece)
    y0, y1 = max(0, ys.min() - 1), min(h, ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(w, xs.max() + 2)
    # Working pixel j covers full-size pixels [j / scale, (j + 1) / scale).
    fy0, fy1 = round(y0 * H / h), round(y1 * H / h)
    fx0, fx1 = round(x0 * W / w), round(x1 * W / w)
    crop = piece[y0:y1, x0:x1].astype(np.uint8) * 255
    big = cv2.resize(crop, (fx1 - fx0, fy1 - fy0), interpolation=cv2.INTER_LINEAR)
    out[fy0:fy1, fx0:fx1] = big >= 128
    return out
