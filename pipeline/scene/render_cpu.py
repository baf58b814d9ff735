"""A CPU Gaussian splatting renderer in plain numpy (no GPU, no compiled extension).

It follows gsplat's classic 3DGS forward pass so both renderers give the same picture:
EWA projection of each 3D covariance to 2D (Jacobian of the pinhole projection, with gsplat's
clamp of off-screen means, plus a 0.3 px^2 low-pass), pixel centres at (i + 0.5, j + 0.5),
alpha = min(0.99, opacity * exp(-d^T Sigma^-1 d / 2)), contributions below 1/255 skipped,
front-to-back compositing that stops once transmittance would fall to 1e-4, colour from SH
degree 0 (0.5 + C0 * f_dc, clamped at 0), and the background weighted by what light is left.

Vectorized: every Gaussian gets a bounded pixel footprint (opacity-aware 3.33 sigma box, clipped to
the image); the (gaussian, pixel) pairs are generated in depth order, stably sorted by pixel, and a
segmented cumulative sum of log(1 - alpha) gives each pair's transmittance; colours are summed per
pixel with bincount. Pairs are processed in depth-ordered chunks with the per-pixel transmittance
carried over, so memory stays bounded whatever the footprints.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.types import SH_C0, Gaussians
from pipeline.scene.camera import Camera
from pipeline.scene.compose import quat_to_matrix

NEAR_PLANE = 0.01
LOW_PASS = 0.3  # px^2 added to the 2D covariance (EWA anti-aliasing filter)
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4  # transmittance below which a pixel is finished (as gsplat)
EXTEND = 3.33  # footprint half-size in standard deviations (gsplat's GAUSSIAN_EXTEND)
PAIR_BUDGET = 1 << 19  # box pixels (candidate pairs) per chunk


def project(g: Gaussians, camera: Camera) -> dict[str, np.ndarray]:
    """Project Gaussians to the image. Returns per-visible-Gaussian arrays sorted front to back.

    Keys: index (M,) into g, depth (M,), mean (M, 2) px, conic (M, 3) = (a, b, c) of the inverse
    2D covariance [[a, b], [b, c]], radius (M, 2) px half-extent in x and y, opacity (M,), color (M, 3).
    """
    W, H = int(camera.width), int(camera.height)
    view = np.asarray(camera.viewmat, np.float64)
    K = np.asarray(camera.K, np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    Rv, tv = view[:3, :3], view[:3, 3]

    p_cam = g.xyz.astype(np.float64) @ Rv.T + tv  # (N, 3) OpenCV camera frame
    opacity = g.opacity[:, 0].astype(np.float64)
    keep = (p_cam[:, 2] > NEAR_PLANE) & (opacity >= ALPHA_MIN) & np.isfinite(p_cam).all(1)
    index = np.flatnonzero(keep)
    p_cam, opacity = p_cam[index], opacity[index]
    x, y, z = p_cam[:, 0], p_cam[:, 1], p_cam[:, 2]

    # Covariance in the camera frame: (Rv R_g S)(Rv R_g S)^T.
    L = Rv @ quat_to_matrix(g.rotation[index].astype(np.float64)) * g.scale[index].astype(np.float64)[:, None, :]
    cov = L @ np.swapaxes(L, 1, 2)  # (M, 3, 3)

    # Jacobian of the projection, evaluated at a mean clamped to 1.3x the field of view (as gsplat).
    tan_x, tan_y = 0.5 * W / fx, 0.5 * H / fy
    tx = z * np.clip(x / z, -(cx / fx + 0.3 * tan_x), (W - cx) / fx + 0.3 * tan_x)
    ty = z * np.clip(y / z, -(cy / fy + 0.3 * tan_y), (H - cy) / fy + 0.3 * tan_y)
    J = np.zeros((len(index), 2, 3))
    J[:, 0, 0] = fx / z
    J[:, 0, 2] = -fx * tx / (z * z)
    J[:, 1, 1] = fy / z
    J[:, 1, 2] = -fy * ty / (z * z)
    cov2d = J @ cov @ np.swapaxes(J, 1, 2)  # (M, 2, 2)
    a = cov2d[:, 0, 0] + LOW_PASS
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + LOW_PASS
    det = a * c - b * b
    ok = det > 0
    mean = np.stack((fx * x / z + cx, fy * y / z + cy), axis=1)  # (M, 2)

    extend = np.minimum(EXTEND, np.sqrt(2.0 * np.log(np.maximum(opacity / ALPHA_MIN, 1.0))))
    radius = np.ceil(extend[:, None] * np.sqrt(np.maximum(np.stack((a, c), 1), 0.0)))  # (M, 2)
    on_screen = (
        (mean[:, 0] + radius[:, 0] > 0)
        & (mean[:, 0] - radius[:, 0] < W)
        & (mean[:, 1] + radius[:, 1] > 0)
        & (mean[:, 1] - radius[:, 1] < H)
    )
    ok &= on_screen & (radius.max(1) > 0)
    det_safe = np.where(ok, det, 1.0)
    conic = np.stack((c / det_safe, -b / det_safe, a / det_safe), axis=1)

    color = np.maximum(0.5 + SH_C0 * g.features_dc[index].astype(np.float64), 0.0)
    order = np.argsort(z[ok], kind="stable")
    sel = np.flatnonzero(ok)[order]
    return {
        "index": index[sel],
        "depth": z[sel],
        "mean": mean[sel],
        "conic": conic[sel],
        "radius": radius[sel],
        "opacity": opacity[sel],
        "color": color[sel],
    }


def _stable_argsort_u32(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """Stable argsort of non-negative int keys < n_keys via 16-bit radix passes.

    numpy's stable sort of uint16 is a counting (radix) sort: linear time, and fast on our pairs
    because they arrive in runs of nearby keys (one Gaussian's footprint at a time).
    """
    if n_keys <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    low_order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    high_order = np.argsort((keys[low_order] >> 16).astype(np.uint16), kind="stable")
    return low_order[high_order]


def _box_ladder(limit: int) -> np.ndarray:
    """Footprint side lengths that boxes are rounded up to: exact up to 16, then ~20% steps."""
    sizes = list(range(1, 17))
    while sizes[-1] < limit:
        sizes.append(int(np.ceil(sizes[-1] * 1.2)))
    return np.array(sizes, dtype=np.int64)


def render(
    g: Gaussians,
    camera: Camera,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    max_radius_px: int | None = None,
) -> np.ndarray:
    """Render Gaussians seen by `camera` into an (H, W, 3) uint8 image.

    `max_radius_px` caps a footprint's half-size (default: the image's longer side, which only
    matters for Gaussians that fill the view); chunking keeps memory bounded either way.
    """
    return to_uint8(render_float(g, camera, background, max_radius_px=max_radius_px))


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _footprint_pairs(
    proj: dict[str, np.ndarray], members: np.ndarray, x0: np.ndarray, y0: np.ndarray, bw: int, bh: int, W: int, H: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense (n, bh, bw) evaluation of the Gaussians `members`, all with a bw x bh box.

    Returns the kept pairs, Gaussian-major: pixel id (P,) int32, alpha (P,) float32, and the
    number of kept pairs of each member (n,). Broadcasting per-Gaussian rows and columns avoids
    per-pair gathers.
    """
    mean = proj["mean"][members].astype(np.float32)
    conic = proj["conic"][members].astype(np.float32)
    xs = x0[members][:, None] + np.arange(bw)  # (n, bw) pixel columns
    ys = y0[members][:, None] + np.arange(bh)  # (n, bh) pixel rows
    dx = xs.astype(np.float32) + 0.5 - mean[:, :1]
    dy = ys.astype(np.float32) + 0.5 - mean[:, 1:]
    dx[xs >= W] = 1e4  # outside the image: alpha underflows to 0 and the pair is dropped
    dy[ys >= H] = 1e4
    # -sigma = -(a dx^2 + c dy^2)/2 - b dx dy, split into per-row, per-column and cross terms.
    neg_x = -0.5 * conic[:, 0:1] * dx * dx  # (n, bw)
    neg_y = -0.5 * conic[:, 2:3] * dy * dy  # (n, bh)
    neg_sigma = (-conic[:, 1:2] * dy)[:, :, None] * dx[:, None, :]
    neg_sigma += neg_x[:, None, :]
    neg_sigma += neg_y[:, :, None]
    alpha = np.exp(neg_sigma, out=neg_sigma)
    alpha *= proj["opacity"][members].astype(np.float32)[:, None, None]
    np.minimum(alpha, ALPHA_MAX, out=alpha)
    keep = alpha >= ALPHA_MIN  # (n, bh, bw)
    pix = (ys.astype(np.int32) * W)[:, :, None] + xs.astype(np.int32)[:, None, :]
    kept = np.flatnonzero(keep)
    return pix.ravel().take(kept), alpha.ravel().take(kept), keep.reshape(len(members), -1).sum(axis=1)


def render_float(
    g: Gaussians,
    camera: Camera,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    max_radius_px: int | None = None,
) -> np.ndarray:
    """As `render`, but returns the (H, W, 3) float image before clipping and quantization."""
    W, H = int(camera.width), int(camera.height)
    n_pix = W * H
    proj = project(g, camera)
    cap = max(W, H) if max_radius_px is None else int(max_radius_px)
    radius = np.minimum(proj["radius"], cap)
    mean = proj["mean"]
    x0 = np.clip(np.floor(mean[:, 0] - radius[:, 0]), 0, W).astype(np.int64)
    x1 = np.clip(np.ceil(mean[:, 0] + radius[:, 0]) + 1, 0, W).astype(np.int64)
    y0 = np.clip(np.floor(mean[:, 1] - radius[:, 1]), 0, H).astype(np.int64)
    y1 = np.clip(np.ceil(mean[:, 1] + radius[:, 1]) + 1, 0, H).astype(np.int64)
    # Boxes rounded up to a few standard sizes so Gaussians can be evaluated in dense groups.
    ladder = _box_ladder(max(W, H))
    bw = ladder[np.searchsorted(ladder, np.maximum(x1 - x0, 1))]
    bh = ladder[np.searchsorted(ladder, np.maximum(y1 - y0, 1))]
    code_base = int(ladder[-1]) + 1
    box_code = bw * code_base + bh
    area = bw * bh  # (M,)

    color_planes = np.ascontiguousarray(proj["color"].T)  # (3, M): 1-D gathers are the fastest
    color_sum = np.zeros((3, n_pix))
    log_T = np.zeros(n_pix)  # log transmittance so far, per pixel
    log_T_min = np.log(T_MIN)

    # Depth-ordered chunks of about PAIR_BUDGET box pixels. Between chunks, pixels that are
    # already opaque (T < T_MIN, where gsplat stops too) drop their later pairs before sorting.
    chunk_of = np.cumsum(area) // PAIR_BUDGET
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(chunk_of)) + 1, [len(area)]))
    for g0, g1 in zip(bounds[:-1], bounds[1:]):
        if g1 <= g0:
            continue
        codes, inverse = np.unique(box_code[g0:g1], return_inverse=True)
        groups = [np.flatnonzero(inverse == k) for k in range(len(codes))]  # chunk-relative members
        parts = [
            _footprint_pairs(proj, g0 + m, x0, y0, int(c // code_base), int(c % code_base), W, H)
            for m, c in zip(groups, codes)
        ]
        counts = np.zeros(g1 - g0, dtype=np.int64)
        for m, part in zip(groups, parts):
            counts[m] = part[2]
        total = int(counts.sum())
        if total == 0:
            continue
        # Place every group's pairs at their depth-ordered position (a scatter, instead of a sort).
        offsets = np.cumsum(counts) - counts
        pix = np.empty(total, dtype=np.int32)
        alpha = np.empty(total, dtype=np.float32)
        for m, (p_pix, p_alpha, p_counts) in zip(groups, parts):
            if not len(p_pix):
                continue
            dest = np.repeat(offsets[m] - (np.cumsum(p_counts) - p_counts), p_counts) + np.arange(len(p_pix))
            pix[dest] = p_pix
            alpha[dest] = p_alpha
        rank = np.repeat(np.arange(g0, g1, dtype=np.int32), counts)

        visible = log_T[pix] > log_T_min if g0 > 0 else None
        if visible is not None and not visible.all():
            pix, alpha, rank = pix[visible], alpha[visible], rank[visible]
            if not len(pix):
                continue

        # Stable sort by pixel keeps each pixel's pairs front to back.
        order = _stable_argsort_u32(pix, n_pix)
        pix, alpha, rank = pix[order], alpha[order], rank[order]

        # Segmented exclusive cumulative sum of log(1 - alpha) over each pixel's run of pairs.
        log_1ma = np.log1p(-alpha).astype(np.float64)  # float64: the running sum spans many pixels
        excl = np.cumsum(log_1ma)
        seg_start = np.empty(len(pix), dtype=bool)
        seg_start[0] = True
        np.not_equal(pix[1:], pix[:-1], out=seg_start[1:])
        start_idx = np.flatnonzero(seg_start)
        run_length = np.diff(np.append(start_idx, len(pix)))
        seg_pix = pix[start_idx]
        run_total = np.add.reduceat(log_1ma, start_idx)
        excl -= log_1ma
        excl -= np.repeat(excl[start_idx] - log_T[seg_pix], run_length)
        weight = alpha * np.exp(excl)
        for k in range(3):
            color_sum[k] += np.bincount(pix, weight * color_planes[k].take(rank), minlength=n_pix)
        log_T[seg_pix] += run_total

    T = np.exp(log_T)
    image = color_sum.T + T[:, None] * np.asarray(background, np.float64)[None, :]
    return image.reshape(H, W, 3)
