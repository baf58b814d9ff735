"""The built-in lifter `inflate`: a closed 3D shape from a mask by silhouette inflation (CPU, no weights).

Shape. Inside the mask a smooth height field is built from the distance transform d (pixels to
the mask's edge, D its maximum): h = sqrt(d * (2D - d)), the profile of a circle of radius D
(exactly a sphere for a round mask). h is 0 on the rim and D at the deepest point. The front
surface sits h in front of the object's depth and the back surface h behind it (mirrored), so
they meet at the rim; rim Gaussians standing along the viewing direction close the seam. One
Gaussian per sample: samples lie on a regular grid inside the mask (its offset jittered by the
seed), about `n_gaussians` in all, each coloured from the photo at its pixel (front and back take
the same colour), flattened along the surface normal, opacity `opacity`.

Placement (the depth heuristic). The photo's camera is assumed to stand `camera_height_m`
(default 1.0 m) above a horizontal ground plane, pitched down by `camera_tilt_deg` (default 20
degrees, no roll), with the intrinsics of `default_intrinsics` (55 degree horizontal field of
view, principal point at the image centre). Every object is assumed to rest on that ground: the
ray through the bottom edge of the mask, at the column of the mask's centroid, meets the ground
plane at depth Z, and Z is taken as the depth of the object's centre. The metric size follows
from the pixel size: metres per pixel = Z / f. When that ray does not meet the ground in front
of the camera (the mask's bottom is at or above the horizon) or meets it beyond `max_depth_m`,
a size prior is used instead: the object is assumed to be `fallback_size_m` (default 0.3 m)
across its larger mask side, so Z = f * fallback_size_m / size_in_pixels. Z is finally clamped
to [`min_depth_m`, `max_depth_m`].
On the bundled demo scene (rendered with the same camera height and tilt) this recovers every
object's true centre depth within 10% (tests/test_inflate.py asserts the tolerance and the
order of the depths).

Reprojection is exact by construction: every sample is placed on the camera ray through its own
pixel (pytorch3d camera, +X left, +Y up, +Z forward; pixel (col, row) has its centre at
(col + 0.5, row + 0.5)): X = -(u - cx) * Z / fx, Y = -(v - cy) * Z / fy. The pose translation is
the point at depth Z on the ray through the mask's centroid, so projecting it lands on the
centroid. Output: Gaussians in an object-local frame (centred near the origin, largest extent 1)
and Pose(rotation = identity, scale = the metric extent, translation = the centre), so that
p_scene = (p_local * scale) @ R(q) + t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.types import Gaussians, ObjectGaussians, ObjectMask, Pose, require_rgb_image, rgb_to_sh0
from pipeline.scene.camera import default_intrinsics

DEFAULT_CAMERA_HEIGHT_M = 1.0
"""Assumed height of the photo's camera above the ground plane, metres."""
DEFAULT_CAMERA_TILT_DEG = 20.0
"""Assumed downward pitch of the photo's camera, degrees."""
DEFAULT_FALLBACK_SIZE_M = 0.3
"""Assumed size of an object whose base is not on the visible ground, metres."""


@dataclass
class InflateContext:
    """Per-photo state: the photo and the intrinsics every object of it shares."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    intrinsics: np.ndarray  # (3, 3) float32


@dataclass(frozen=True)
class DepthEstimate:
    depth: float  # metres along the camera's +Z
    method: str  # 'ground-plane' or 'size-prior'


class InflateLifter:
    """Lifter `inflate`: silhouette inflation plus a ground-plane depth heuristic (module docstring)."""

    name = "inflate"

    def __init__(
        self,
        *,
        n_gaussians: int = 6000,
        opacity: float = 0.9,
        camera_height_m: float = DEFAULT_CAMERA_HEIGHT_M,
        camera_tilt_deg: float = DEFAULT_CAMERA_TILT_DEG,
        fallback_size_m: float = DEFAULT_FALLBACK_SIZE_M,
        min_depth_m: float = 0.2,
        max_depth_m: float = 50.0,
        max_side: int = 1024,
    ) -> None:
        """
        n_gaussians: about this many Gaussians per object (front, back and rim together).
        opacity: opacity of every Gaussian.
        camera_height_m, camera_tilt_deg: the assumed camera above the ground plane (depth heuristic).
        fallback_size_m: assumed object size when the ground plane cannot be used.
        min_depth_m, max_depth_m: the depth is clamped to this range.
        max_side: longest side of the working copy of the mask (big masks are processed downscaled).
        """
        if n_gaussians < 16:
            raise InputError(f"n_gaussians={n_gaussians} is too small for a closed shape.", "use at least 16 (default 6000).")
        self.n_gaussians = int(n_gaussians)
        self.opacity = float(opacity)
        self.camera_height_m = float(camera_height_m)
        self.camera_tilt_deg = float(camera_tilt_deg)
        self.fallback_size_m = float(fallback_size_m)
        self.min_depth_m = float(min_depth_m)
        self.max_depth_m = float(max_depth_m)
        self.max_side = int(max_side)

    def prepare(self, image: np.ndarray) -> InflateContext:
        image = require_rgb_image(image, "the inflate lifter")
        h, w = image.shape[:2]
        return InflateContext(image=image, intrinsics=default_intrinsics(w, h))

    def release(self) -> None:
        """Nothing is cached between objects."""

    def warm_up(self) -> None:
        """Import what a lift uses (OpenCV, scipy.ndimage), before a batch worker's first photo:
        scipy.ndimage alone took 0.63 s of the first photo on the H200 machine."""
        import cv2  # noqa: F401
        from scipy import ndimage  # noqa: F401

    def estimate_depth(self, mask: np.ndarray, K: np.ndarray) -> DepthEstimate:
        """Depth of the object's centre by the ground-plane heuristic (size prior as fallback)."""
        stats = _mask_stats(mask)
        return self._depth(stats, K)

    def lift(self, context: InflateContext, obj: ObjectMask, *, seed: int) -> ObjectGaussians:
        image, K = context.image, context.intrinsics
        mask = np.asarray(obj.mask, bool)
        if mask.shape != image.shape[:2]:
            raise InputError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the photo is {image.shape[1]}x{image.shape[0]}.", "give masks of the photo's size.")
        stats = _mask_stats(mask)
        if stats is None:
            raise InputError("the mask is empty.", "skip empty masks before lifting.")
        fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
        depth = self._depth(stats, K).depth
        field = _height_field(mask, stats, self.n_gaussians, self.max_side)
        samples = _sample(field, self.n_gaussians, seed)

        # Full-size continuous pixel coordinates of the samples and their half-thickness in pixels.
        u = stats.x0 + samples.a / field.kx
        v = stats.y0 + samples.b / field.ky
        half_px = samples.height / field.k  # (n,)
        f = 0.5 * (fx + fy)
        metres_per_px = depth / f
        spacing_m = samples.spacing / field.k * metres_per_px

        # Front (toward the camera, smaller Z), back (mirrored) and rim (Z offset 0).
        n_in, n_rim = samples.n_inside, len(samples.a) - samples.n_inside
        side = np.concatenate([-np.ones(n_in), np.ones(n_in), np.zeros(n_rim)])  # -1 front, +1 back, 0 rim
        inside = np.concatenate([np.arange(n_in), np.arange(n_in)])
        index = np.concatenate([inside, n_in + np.arange(n_rim)])
        z = depth + side * half_px[index] * metres_per_px
        uu, vv = u[index], v[index]
        points = np.stack([-(uu - cx) * z / fx, -(vv - cy) * z / fy, z], axis=1)  # (N, 3) camera frame

        normals, tangents, scales = _frames(samples, index, side, spacing_m, metres_per_px / field.k)
        rotation = _matrix_to_quaternion(np.stack([tangents, np.cross(normals, tangents), normals], axis=2))
        colours = _colours(image, mask, uu, vv, samples.inward[index])

        centre = np.array([-(stats.u_c - cx) * depth / fx, -(stats.v_c - cy) * depth / fy, depth])
        extent = float(np.ptp(points, axis=0).max())
        extent = extent if extent > 0 else metres_per_px
        gaussians = Gaussians(
            xyz=((points - centre) / extent).astype(np.float32),
            features_dc=rgb_to_sh0(colours),
            opacity=np.full((len(points), 1), self.opacity, np.float32),
            scale=(scales / extent).astype(np.float32),
            rotation=rotation.astype(np.float32),
        )
        pose = Pose(rotation=np.array([1.0, 0.0, 0.0, 0.0]), translation=centre, scale=np.full(3, extent))
        return ObjectGaussians(gaussians=gaussians, pose=pose, source=self.name)

    def _depth(self, stats: _MaskStats | None, K: np.ndarray) -> DepthEstimate:
        if stats is None:
            raise InputError("the mask is empty.", "skip empty masks before lifting.")
        fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
        tilt = np.radians(self.camera_tilt_deg)
        # Ray through the bottom edge of the mask at the centroid's column, camera frame, z = 1.
        ray = np.array([-(stats.u_c - cx) / fx, -(stats.v_bottom - cy) / fy, 1.0])
        up = np.array([0.0, np.cos(tilt), -np.sin(tilt)])  # the ground's normal in the camera frame
        along = float(ray @ up)
        if along < -1e-9:
            z = self.camera_height_m / -along  # ground plane: up . p = -camera_height
            if z <= self.max_depth_m:
                return DepthEstimate(float(np.clip(z, self.min_depth_m, self.max_depth_m)), "ground-plane")
        size_px = max(stats.width_px, stats.height_px, 1.0)
        z = 0.5 * (fx + fy) * self.fallback_size_m / size_px
        return DepthEstimate(float(np.clip(z, self.min_depth_m, self.max_depth_m)), "size-prior")


# ----------------------------------------------------------------------------------------------


@dataclass
class _MaskStats:
    u_c: float  # centroid, continuous pixel coordinates (pixel centres at +0.5)
    v_c: float
    v_bottom: float  # bottom edge of the lowest mask row
    x0: int  # bounding box, inclusive-exclusive
    y0: int
    x1: int
    y1: int
    area: int

    @property
    def width_px(self) -> float:
        return float(self.x1 - self.x0)

    @property
    def height_px(self) -> float:
        return float(self.y1 - self.y0)


def _mask_stats(mask: np.ndarray) -> _MaskStats | None:
    """Centroid and box from row and column counts (no coordinate lists: cheap on huge masks)."""
    rows = mask.sum(axis=1, dtype=np.int64)  # (H,)
    cols = mask.sum(axis=0, dtype=np.int64)  # (W,)
    area = int(rows.sum())
    if area == 0:
        return None
    ry, cx_ = np.flatnonzero(rows), np.flatnonzero(cols)
    v_c = float((rows * (np.arange(len(rows)) + 0.5)).sum() / area)
    u_c = float((cols * (np.arange(len(cols)) + 0.5)).sum() / area)
    return _MaskStats(u_c, v_c, float(ry[-1] + 1), int(cx_[0]), int(ry[0]), int(cx_[-1] + 1), int(ry[-1] + 1), area)


@dataclass
class _HeightField:
    """The mask crop at working resolution with its distance transform and height field (working px)."""

    inside: np.ndarray  # (h, w) bool
    distance: np.ndarray  # (h, w) float32, to the mask edge (0 outside)
    height: np.ndarray  # (h, w) float32, h = sqrt(d (2D - d))
    grad_u: np.ndarray  # (h, w) float32, d height / d column
    grad_v: np.ndarray  # (h, w) float32, d height / d row
    dist_grad: np.ndarray  # (h, w, 2) float32, unit gradient of the distance (points inward)
    kx: float  # working px per full px, horizontally
    ky: float  # vertically
    k: float  # their mean


def _height_field(mask: np.ndarray, stats: _MaskStats, n_gaussians: int, max_side: int) -> _HeightField:
    import cv2
    from scipy import ndimage

    crop = mask[stats.y0 : stats.y1, stats.x0 : stats.x1]
    bw, bh = stats.width_px, stats.height_px
    # Working scale: about 4 working pixels per sample (enough detail for the distance transform),
    # never more than max_side on the longest side. Small masks are upsampled, big ones reduced.
    k = min(np.sqrt(4.0 * n_gaussians / 2.0 / stats.area), max_side / max(bw, bh))
    w, h = max(1, round(bw * k)), max(1, round(bh * k))
    if (w, h) == (crop.shape[1], crop.shape[0]):
        inside = crop.copy()
    else:
        interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
        inside = cv2.resize(crop.astype(np.uint8) * 255, (w, h), interpolation=interp) >= 128
    if not inside.any():  # a sliver thinner than a working pixel: keep its thickest pixel
        inside = np.zeros((h, w), bool)
        inside[h // 2, w // 2] = True
    padded = np.pad(inside, 1)
    # Distance from a pixel centre to the mask's edge, which lies half a pixel beyond the last pixel.
    distance = np.where(padded, ndimage.distance_transform_edt(padded) - 0.5, 0.0).astype(np.float32)
    d_max = max(float(distance.max()), 0.5)
    height = np.sqrt(np.clip(distance * (2.0 * d_max - distance), 0.0, None)).astype(np.float32)
    grad_v, grad_u = np.gradient(height)
    dg_v, dg_u = np.gradient(distance)
    norm = np.maximum(np.hypot(dg_u, dg_v), 1e-6)
    dist_grad = np.stack([dg_u / norm, dg_v / norm], axis=-1).astype(np.float32)
    kx, ky = w / bw, h / bh
    return _HeightField(padded, distance, height, grad_u.astype(np.float32), grad_v.astype(np.float32), dist_grad, kx, ky, 0.5 * (kx + ky))


@dataclass
class _Samples:
    """Sample positions in the working crop's continuous coordinates (without the 1-px pad)."""

    a: np.ndarray  # (n,) column coordinate
    b: np.ndarray  # (n,) row coordinate
    height: np.ndarray  # (n,) working px; 0 for rim samples
    grad: np.ndarray  # (n, 2) height gradient (d/dcol, d/drow); rim: 0
    inward: np.ndarray  # (n, 2) unit direction into the mask (col, row)
    n_inside: int  # the first n_inside samples are interior, the rest rim
    spacing: float  # working px between neighbouring samples
    rim_height: float  # working px: half-height of the wall the rim Gaussians must cover


def _sample(field: _HeightField, n_gaussians: int, seed: int) -> _Samples:
    import cv2

    inside = field.inside
    area = float(inside.sum())
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = float(sum(len(c) for c in contours))
    # Budget: n = 2 * interior + rim, with the rim sampled at the interior spacing.
    spacing = np.sqrt(area / (n_gaussians / 2.0))
    for _ in range(2):
        n_rim = perimeter / spacing
        spacing = np.sqrt(area / max((n_gaussians - n_rim) / 2.0, 4.0))

    rng = np.random.default_rng(seed)
    off = rng.uniform(0.0, spacing, size=2)
    hgt, wid = inside.shape
    cols = np.arange(off[0], wid, spacing)
    rows = np.arange(off[1], hgt, spacing)
    gx, gy = np.meshgrid(cols, rows)
    gx, gy = gx.ravel(), gy.ravel()
    ix, iy = gx.astype(np.int64), gy.astype(np.int64)
    keep = inside[iy, ix]
    if not keep.any():  # tiny mask: one sample at its deepest pixel
        iy_, ix_ = np.unravel_index(np.argmax(field.distance), inside.shape)
        gx, gy, ix, iy = np.array([ix_ + 0.5]), np.array([iy_ + 0.5]), np.array([ix_]), np.array([iy_])
    else:
        gx, gy, ix, iy = gx[keep], gy[keep], ix[keep], iy[keep]

    # Rim: contour pixels every `spacing` steps along each contour.
    rim_x, rim_y = [], []
    for c in contours:
        pts = c[:, 0, :]  # (m, 2) (col, row)
        step = max(1, int(round(spacing)))
        pts = pts[:: step]
        rim_x.append(pts[:, 0])
        rim_y.append(pts[:, 1])
    rx = np.concatenate(rim_x) if rim_x else np.zeros(0, np.int64)
    ry = np.concatenate(rim_y) if rim_y else np.zeros(0, np.int64)

    all_ix, all_iy = np.concatenate([ix, rx]), np.concatenate([iy, ry])
    a = np.concatenate([gx, rx + 0.5]) - 1.0  # drop the 1-pixel pad
    b = np.concatenate([gy, ry + 0.5]) - 1.0
    height = field.height[all_iy, all_ix].copy()
    height[len(gx) :] = 0.0
    grad = np.stack([field.grad_u[all_iy, all_ix], field.grad_v[all_iy, all_ix]], axis=1)
    grad[len(gx) :] = 0.0
    inward = field.dist_grad[all_iy, all_ix]
    d_max = float(field.distance.max())
    # The first interior samples sit about half a spacing inside: that height is the wall to close.
    d1 = min(0.5 * spacing + 0.5, d_max)
    rim_height = float(np.sqrt(max(d1 * (2.0 * d_max - d1), 0.0)))
    return _Samples(a, b, height, grad, inward, len(gx), float(spacing), rim_height)


def _frames(samples: _Samples, index: np.ndarray, side: np.ndarray, spacing_m: float, metres_per_working_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-Gaussian unit normal (N, 3), a unit tangent (N, 3) and scales (N, 3) along (tangent, n x tangent, normal).

    Pixel axes (col right, row down) map to camera axes (+X left, +Y up): a pixel-space vector
    (du, dv) is (-du, -dv) in the camera frame.
    """
    g = samples.grad[index]  # (N, 2) in pixel axes
    rim = side == 0
    # Surface z = depth + side * h(u, v): normal (h_u, h_v, side) in camera axes, for front and back.
    normals = np.stack([g[:, 0], g[:, 1], side], axis=1).astype(np.float64)
    outward = -samples.inward[index]  # rim normal: outward in the image plane
    normals[rim] = np.stack([-outward[rim, 0], -outward[rim, 1], np.zeros(rim.sum())], axis=1)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-9)

    # Tangent: along the slope (steepest direction) for the surface; along the view axis for the rim.
    slope = np.stack([-g[:, 0], -g[:, 1], np.zeros(len(g))], axis=1)
    flat = np.linalg.norm(g, axis=1) < 1e-6
    slope[flat] = (1.0, 0.0, 0.0)
    slope[rim] = (0.0, 0.0, 1.0)
    tangents = slope - normals * np.sum(slope * normals, axis=1, keepdims=True)
    bad = np.linalg.norm(tangents, axis=1) < 1e-6  # slope parallel to the normal: pick any perpendicular
    tangents[bad] = np.cross(normals[bad], (0.0, 1.0, 0.0))
    tangents /= np.maximum(np.linalg.norm(tangents, axis=1, keepdims=True), 1e-9)

    sigma = 0.6 * spacing_m  # neighbours overlap smoothly at 0.6 x spacing
    # A sample on a steep slope covers a longer stretch of surface: stretch along the slope.
    stretch = np.clip(1.0 / np.maximum(np.abs(normals[:, 2]), 1e-3), 1.0, 4.0)
    scales = np.stack([sigma * stretch, np.full(len(g), sigma), np.full(len(g), 0.3 * sigma)], axis=1)
    wall = max(0.5 * samples.rim_height * metres_per_working_px, sigma)
    scales[rim, 0] = wall
    return normals, tangents, scales


def _colours(image: np.ndarray, mask: np.ndarray, u: np.ndarray, v: np.ndarray, inward: np.ndarray) -> np.ndarray:
    """(N, 3) colours in [0, 1] from the photo, read 1.5 px inside the mask to avoid edge blending."""
    H, W = mask.shape
    ix = np.clip((u + 1.5 * inward[:, 0]).astype(np.int64), 0, W - 1)
    iy = np.clip((v + 1.5 * inward[:, 1]).astype(np.int64), 0, H - 1)
    outside = ~mask[iy, ix]
    ix[outside] = np.clip(u[outside].astype(np.int64), 0, W - 1)
    iy[outside] = np.clip(v[outside].astype(np.int64), 0, H - 1)
    return image[iy, ix].astype(np.float32) / 255.0


def _matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotation matrices (columns = the Gaussian's axes) -> (N, 4) unit quaternions, w first."""
    m00, m11, m22 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    trace = m00 + m11 + m22
    q = np.empty((len(m), 4))
    # Pick, per matrix, the numerically safest of the four formulas (largest diagonal term).
    choice = np.argmax(np.stack([trace, m00, m11, m22], axis=1), axis=1)
    for c in range(4):
        sel = choice == c
        if not sel.any():
            continue
        a = m[sel]
        if c == 0:
            s = np.sqrt(1.0 + trace[sel]) * 2.0
            q[sel] = np.stack([0.25 * s, (a[:, 2, 1] - a[:, 1, 2]) / s, (a[:, 0, 2] - a[:, 2, 0]) / s, (a[:, 1, 0] - a[:, 0, 1]) / s], 1)
        elif c == 1:
            s = np.sqrt(1.0 + a[:, 0, 0] - a[:, 1, 1] - a[:, 2, 2]) * 2.0
            q[sel] = np.stack([(a[:, 2, 1] - a[:, 1, 2]) / s, 0.25 * s, (a[:, 0, 1] + a[:, 1, 0]) / s, (a[:, 0, 2] + a[:, 2, 0]) / s], 1)
        elif c == 2:
            s = np.sqrt(1.0 + a[:, 1, 1] - a[:, 0, 0] - a[:, 2, 2]) * 2.0
            q[sel] = np.stack([(a[:, 0, 2] - a[:, 2, 0]) / s, (a[:, 0, 1] + a[:, 1, 0]) / s, 0.25 * s, (a[:, 1, 2] + a[:, 2, 1]) / s], 1)
        else:
            s = np.sqrt(1.0 + a[:, 2, 2] - a[:, 0, 0] - a[:, 1, 1]) * 2.0
            q[sel] = np.stack([(a[:, 1, 0] - a[:, 0, 1]) / s, (a[:, 0, 2] + a[:, 2, 0]) / s, (a[:, 1, 2] + a[:, 2, 1]) / s, 0.25 * s], 1)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[q[:, 0] < 0] *= -1.0  # one of the two equivalent signs, for reproducible files
    return q
