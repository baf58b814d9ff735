"""The bundled demo scene, rendered by our own small numpy ray-caster (no third-party images).

Five objects of different shapes and saturated colours rest on a ground plane, seen by a camera
`DEMO_CAMERA_HEIGHT_M` above the ground and pitched down by `DEMO_CAMERA_TILT_DEG` (the same
numbers the inflate lifter assumes, so its depth heuristic can be checked against the truth).
Shading is Lambert plus ambient, without shadows; the background is a plain light colour with a
soft ground tint that fades with distance. The image is rendered with 2x2 supersampling, and each
ground-truth mask holds the pixels that the object covers at least half of.

Frames: the scene frame is the camera frame of the photo (pytorch3d camera: +X left, +Y up,
+Z forward). Pixel (col, row) has its centre at (col + 0.5, row + 0.5), so a camera-frame point
(X, Y, Z) projects to u = cx - fx * X / Z, v = cy - fy * Y / Z.

Internally the renderer uses a "ground" frame: same X axis as the camera, Y up (normal of the
ground plane y = 0), Z forward along the ground; the camera sits at (0, height, 0).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.core.atomic import write_bytes_atomic, write_json_atomic
from pipeline.scene.camera import default_intrinsics

DEMO_VERSION = 1
DEMO_CAMERA_HEIGHT_M = 1.0
"""Height of the demo camera above the ground plane, in metres."""
DEMO_CAMERA_TILT_DEG = 20.0
"""How far the demo camera is pitched down from horizontal, in degrees."""

Shape = Literal["sphere", "cube", "cylinder", "cone", "ellipsoid"]

_SKY_RGB = np.array([0.93, 0.93, 0.92])  # the plain light background
_GROUND_RGB = np.array([0.86, 0.82, 0.76])  # a soft warm tint near the camera
_GROUND_FADE_M = 5.0  # the ground tint fades into the background over this distance
_LIGHT_DIR = np.array([0.45, 1.0, -0.55]) / np.linalg.norm([0.45, 1.0, -0.55])  # towards the light, ground frame
_AMBIENT = 0.35
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class _ObjectSpec:
    """One object in the ground frame: it rests on y = 0 at horizontal position (x, z)."""

    name: str
    shape: Shape
    colour_name: str
    rgb: tuple[int, int, int]
    x: float
    z: float
    size: tuple[float, float, float]  # shape parameters in metres (see _intersect)
    yaw_deg: float = 0.0


# The layout is fixed (the seed only jitters it slightly), chosen so that no two objects touch
# or overlap in the image and all of them sit well inside the frame.
_LAYOUT: tuple[_ObjectSpec, ...] = (
    _ObjectSpec("red sphere", "sphere", "red", (215, 35, 40), -0.55, 2.0, (0.18, 0.18, 0.18)),
    _ObjectSpec("blue cube", "cube", "blue", (35, 80, 215), 0.50, 1.9, (0.14, 0.14, 0.14), yaw_deg=30.0),
    _ObjectSpec("green cylinder", "cylinder", "green", (40, 165, 60), 0.02, 2.7, (0.13, 0.40, 0.13)),
    _ObjectSpec("yellow cone", "cone", "yellow", (235, 195, 25), -1.25, 3.6, (0.20, 0.45, 0.20)),
    _ObjectSpec("magenta ellipsoid", "ellipsoid", "magenta", (200, 40, 190), 1.05, 3.2, (0.26, 0.14, 0.16), yaw_deg=-25.0),
)


@dataclass
class DemoObject:
    name: str
    shape: Shape
    colour_name: str
    rgb: tuple[int, int, int]
    centre_camera: np.ndarray  # (3,) metres, pytorch3d camera frame (+X left, +Y up, +Z forward)
    radius: float  # metres, radius of the bounding sphere around centre_camera
    mask: np.ndarray  # (H, W) bool ground truth
    mask_path: Path


@dataclass
class DemoScene:
    root: Path
    image_path: Path
    scene_json: Path
    image: np.ndarray  # (H, W, 3) uint8 RGB
    intrinsics: np.ndarray  # (3, 3) float32
    objects: list[DemoObject]
    camera_height_m: float = DEMO_CAMERA_HEIGHT_M
    camera_tilt_deg: float = DEMO_CAMERA_TILT_DEG


def make_demo_scene(out_dir: Path, *, width: int = 640, height: int = 480, seed: int = 0) -> DemoScene:
    """Render the demo scene and write image.png, gt/<k>.png (0/255) and scene.json into `out_dir`.

    Deterministic for a given (width, height, seed); every file is written atomically.
    """
    out_dir = Path(out_dir)
    K = default_intrinsics(width, height)
    specs = _jittered_layout(seed)
    image, labels = _render(specs, width, height, K)

    # Camera axes expressed in the ground frame (columns: camera +X, +Y, +Z).
    cam_to_ground = _camera_to_ground_rotation()
    cam_origin = np.array([0.0, DEMO_CAMERA_HEIGHT_M, 0.0])

    objects: list[DemoObject] = []
    for k, spec in enumerate(specs):
        mask = labels == k
        centre_ground, radius = _bounding_sphere(spec)
        centre_camera = (centre_ground - cam_origin) @ cam_to_ground  # row vector: ground -> camera
        objects.append(
            DemoObject(spec.name, spec.shape, spec.colour_name, spec.rgb, centre_camera.astype(np.float32), radius, mask, out_dir / "gt" / f"{k}.png")
        )

    image_path = out_dir / "image.png"
    _write_png(image_path, image)
    for obj in objects:
        _write_png(obj.mask_path, obj.mask.astype(np.uint8) * 255)
    record = {
        "format_version": DEMO_VERSION,
        "width": width,
        "height": height,
        "seed": seed,
        "intrinsics": K.tolist(),
        "camera_frame": "pytorch3d camera: +X left, +Y up, +Z forward; pixel (col,row) centre at (col+0.5,row+0.5)",
        "camera_height_m": DEMO_CAMERA_HEIGHT_M,
        "camera_tilt_deg": DEMO_CAMERA_TILT_DEG,
        "objects": [
            {
                "index": k,
                "name": obj.name,
                "shape": obj.shape,
                "colour": obj.colour_name,
                "rgb": list(obj.rgb),
                "centre_camera": [round(float(c), 6) for c in obj.centre_camera],
                "radius": round(float(obj.radius), 6),
                "mask": f"gt/{k}.png",
                "area": int(obj.mask.sum()),
            }
            for k, obj in enumerate(objects)
        ],
    }
    scene_json = out_dir / "scene.json"
    write_json_atomic(scene_json, record)
    return DemoScene(out_dir, image_path, scene_json, image, K, objects)


def demo_scene_dir(root: Path | None = None) -> Path:
    """A folder holding the demo scene (image.png, gt/, scene.json), generated on demand.

    Default location: $XDG_CACHE_HOME/sam3d-gs/demo-v<version> (~/.cache when unset). The scene
    is regenerated when scene.json is missing or from another version; rendering takes well
    under a second.
    """
    import json
    import os

    if root is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        root = cache / "sam3d-gs" / f"demo-v{DEMO_VERSION}"
    root = Path(root)
    scene_json = root / "scene.json"
    try:
        record = json.loads(scene_json.read_text())
        fresh = record.get("format_version") == DEMO_VERSION and (root / "image.png").exists()
        fresh = fresh and all((root / o["mask"]).exists() for o in record["objects"])
    except (OSError, ValueError, KeyError, TypeError):
        fresh = False
    if not fresh:
        make_demo_scene(root)
    return root


# ----------------------------------------------------------------------------------------------
# Rendering


def _jittered_layout(seed: int) -> list[_ObjectSpec]:
    """The fixed layout; a non-zero seed moves each object by at most 5 cm and turns it a little."""
    if seed == 0:
        return list(_LAYOUT)
    rng = np.random.default_rng(seed)
    out = []
    for spec in _LAYOUT:
        dx, dz = rng.uniform(-0.05, 0.05, size=2)
        dyaw = rng.uniform(-10.0, 10.0)
        out.append(_ObjectSpec(spec.name, spec.shape, spec.colour_name, spec.rgb, spec.x + dx, spec.z + dz, spec.size, spec.yaw_deg + dyaw))
    return out


def _camera_to_ground_rotation() -> np.ndarray:
    """(3, 3) matrix whose columns are the camera's +X, +Y, +Z axes in the ground frame."""
    t = np.radians(DEMO_CAMERA_TILT_DEG)
    x_axis = np.array([1.0, 0.0, 0.0])
    y_axis = np.array([0.0, np.cos(t), np.sin(t)])  # camera up, leaning forward when pitched down
    z_axis = np.array([0.0, -np.sin(t), np.cos(t)])  # optical axis, pointing down at the ground
    return np.stack([x_axis, y_axis, z_axis], axis=1)


def _bounding_sphere(spec: _ObjectSpec) -> tuple[np.ndarray, float]:
    """Centre of the object's bounding box and the radius of the sphere around it, ground frame."""
    a, b, c = spec.size
    if spec.shape in ("sphere", "ellipsoid"):
        return np.array([spec.x, b, spec.z]), float(max(a, b, c))
    if spec.shape == "cube":
        return np.array([spec.x, b, spec.z]), float(np.sqrt(a * a + b * b + c * c))
    # cylinder / cone: radius a, height b
    return np.array([spec.x, b / 2.0, spec.z]), float(np.hypot(a, b / 2.0))


def _render(specs: list[_ObjectSpec], width: int, height: int, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the scene; returns the RGB image (H, W, 3) uint8 and a label map (H, W) int (-1 = none)."""
    ss = _SUPERSAMPLE
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    # Sub-pixel sample positions: pixel (col, row) spans [col, col+1) x [row, row+1).
    us = (np.arange(width * ss) + 0.5) / ss
    vs = (np.arange(height * ss) + 0.5) / ss
    # Camera-frame direction (-(u-cx)/fx, -(v-cy)/fy, 1) rotated into the ground frame, one
    # component array at a time (much faster than (N, 3) rows at a million rays).
    rot = _camera_to_ground_rotation()
    x_cam = np.broadcast_to(-(us - cx) / fx, (height * ss, width * ss)).ravel()
    y_cam = np.repeat(-(vs - cy) / fy, width * ss)
    dx = x_cam * rot[0, 0]  # rot[0, 1] = rot[0, 2] = 0: the tilt is about the X axis
    dy = y_cam * rot[1, 1] + rot[1, 2]
    dz = y_cam * rot[2, 1] + rot[2, 2]
    inv_len = 1.0 / np.sqrt(dx * dx + dy * dy + dz * dz)
    dx, dy, dz = dx * inv_len, dy * inv_len, dz * inv_len
    origin = np.array([0.0, DEMO_CAMERA_HEIGHT_M, 0.0])
    n_rays = dx.shape[0]

    best_t = np.full(n_rays, np.inf)
    best_label = np.full(n_rays, -1, dtype=np.int32)
    normals = np.zeros((n_rays, 3))
    for k, spec in enumerate(specs):
        centre, radius = _bounding_sphere(spec)
        # Cull with the bounding sphere first so the exact test runs on few rays.
        oc = origin - centre
        b = dx * oc[0] + dy * oc[1] + dz * oc[2]
        idx = np.flatnonzero(b * b > oc @ oc - radius * radius)
        if idx.size == 0:
            continue
        t, n = _intersect(spec, origin, np.stack([dx[idx], dy[idx], dz[idx]], axis=1))
        closer = t < best_t[idx]
        sel = idx[closer]
        best_t[sel] = t[closer]
        best_label[sel] = k
        normals[sel] = n[closer]

    # Background: light sky colour, ground tint fading with horizontal distance.
    down = dy < -1e-6
    with np.errstate(divide="ignore"):
        dist = np.where(down, origin[1] * np.sqrt(dx * dx + dz * dz) / -dy, np.inf)
    fade = np.exp(-np.maximum(dist - 1.0, 0.0) / _GROUND_FADE_M)[:, None]  # 0 above the horizon
    rgb = _SKY_RGB + (_GROUND_RGB - _SKY_RGB) * fade

    hit = best_label >= 0
    albedo = np.array([s.rgb for s in specs], dtype=np.float64) / 255.0
    lambert = np.clip(normals[hit] @ _LIGHT_DIR, 0.0, 1.0)
    rgb[hit] = albedo[best_label[hit]] * (_AMBIENT + (1.0 - _AMBIENT) * lambert)[:, None]

    rgb = rgb.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    image = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    # Ground truth: the object covering at least half of a pixel's samples.
    lab = best_label.reshape(height, ss, width, ss).transpose(0, 2, 1, 3).reshape(height, width, ss * ss)
    labels = np.full((height, width), -1, dtype=np.int32)
    for k in range(len(specs)):
        cover = (lab == k).sum(axis=-1)
        labels[cover * 2 >= ss * ss] = k
    return image, labels


def _yaw_matrix(deg: float) -> np.ndarray:
    """Rotation about the ground's +Y axis; columns are the object's local axes in the ground frame."""
    a = np.radians(deg)
    return np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])


def _intersect(spec: _ObjectSpec, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest positive hit distance (N,) (inf on a miss) and unit normal (N, 3) in the ground frame.

    size means: sphere (r, r, r); ellipsoid (semi-axes x, y, z); cube (half-extents); cylinder and
    cone (radius, height, radius). All rest on y = 0.
    """
    a, b, c = spec.size
    rot = _yaw_matrix(spec.yaw_deg)
    base = np.array([spec.x, 0.0, spec.z])
    o = (origin - base) @ rot  # (3,) object frame, origin at the foot of the object
    d = dirs @ rot  # (N, 3)
    n = len(d)
    t_hit = np.full(n, np.inf)
    normal = np.zeros((n, 3))

    if spec.shape in ("sphere", "ellipsoid"):
        radii = np.array([a, b, c])
        o_s = (o - np.array([0.0, b, 0.0])) / radii
        d_s = d / radii
        qa = np.einsum("ij,ij->i", d_s, d_s)
        qb = d_s @ o_s
        qc = o_s @ o_s - 1.0
        disc = qb * qb - qa * qc
        ok = disc >= 0
        t = (-qb - np.sqrt(np.where(ok, disc, 0.0))) / qa
        ok &= t > 0
        t_hit[ok] = t[ok]
        p = o_s + t[:, None] * d_s
        normal = p / radii  # gradient of |p/r|^2 in object coordinates
    elif spec.shape == "cube":
        lo = np.array([-a, 0.0, -c])
        hi = np.array([a, 2.0 * b, c])
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            t0 = (lo - o) * inv
            t1 = (hi - o) * inv
        tmin = np.minimum(t0, t1)
        tmax = np.maximum(t0, t1)
        t_near = np.nanmax(tmin, axis=1)
        t_far = np.nanmin(tmax, axis=1)
        ok = (t_near <= t_far) & (t_near > 0)
        t_hit[ok] = t_near[ok]
        axis = np.nanargmax(tmin, axis=1)
        normal[np.arange(n), axis] = -np.sign(d[np.arange(n), axis])
    else:  # cylinder or cone with a vertical axis; radius a, height b
        k2 = (a / b) ** 2 if spec.shape == "cone" else 0.0
        # Side: x^2 + z^2 = r(y)^2 with r(y) = a for the cylinder, a * (b - y) / b for the cone.
        if spec.shape == "cone":
            qa = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * d[:, 1] ** 2
            qb = o[0] * d[:, 0] + o[2] * d[:, 2] + k2 * (b - o[1]) * d[:, 1]
            qc = o[0] ** 2 + o[2] ** 2 - k2 * (b - o[1]) ** 2
        else:
            qa = d[:, 0] ** 2 + d[:, 2] ** 2
            qb = o[0] * d[:, 0] + o[2] * d[:, 2]
            qc = np.full(n, o[0] ** 2 + o[2] ** 2 - a * a)
        disc = qb * qb - qa * qc
        ok = (disc >= 0) & (np.abs(qa) > 1e-12)
        sq = np.sqrt(np.where(ok, disc, 0.0))
        safe_qa = np.where(ok, qa, 1.0)
        for root in ((-qb - sq) / safe_qa, (-qb + sq) / safe_qa):
            y = o[1] + root * d[:, 1]
            good = ok & (root > 0) & (y >= 0) & (y <= b) & (root < t_hit)
            p = o + root[:, None] * d
            side_n = np.stack([p[:, 0], k2 * (b - p[:, 1]), p[:, 2]], axis=1)
            t_hit = np.where(good, root, t_hit)
            normal = np.where(good[:, None], side_n, normal)
        # Caps: the top disc of the cylinder and the base disc of both (hidden from above, kept for exactness).
        caps = [(0.0, -1.0)] + ([(b, 1.0)] if spec.shape == "cylinder" else [])
        for y_cap, ny in caps:
            with np.errstate(divide="ignore", invalid="ignore"):
                tc = (y_cap - o[1]) / d[:, 1]
            p = o + np.nan_to_num(tc, nan=0.0, posinf=0.0, neginf=0.0)[:, None] * d
            good = (tc > 0) & (p[:, 0] ** 2 + p[:, 2] ** 2 <= a * a) & (tc < t_hit)
            t_hit = np.where(good, tc, t_hit)
            normal = np.where(good[:, None], np.array([0.0, ny, 0.0]), normal)

    normal = normal @ rot.T  # object -> ground frame
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    return t_hit, normal


def _write_png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
