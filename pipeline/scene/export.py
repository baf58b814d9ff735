"""`python -m pipeline export RUN_DIR`: every file derived from objects/*/gaussians.pt, on CPU.

Needs only numpy, Pillow and torch (to read the .pt files): no SAM 3D env, no GPU.

Per object (objects/<id>/): object.ply and object.splat in the object's local frame, and
turntable.gif. For the scene (scene/): scene.ply and scene.splat with every object posed in the
photo's camera frame, scene.gif orbiting from the photo's viewpoint, and scene.glb when
objects/<id>/mesh.glb files exist.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ExportConfig
from pipeline.core.errors import InputError, describe
from pipeline.core.progress import progress as show_progress
from pipeline.core.runfolder import OBJECT_ID_RE, RunPaths, sha256_file
from pipeline.core.types import GAUSSIAN_FIELDS, ObjectGaussians
from pipeline.objects.gaussians_pt import load_object_pt
from pipeline.scene.compose import compose_scene, pose_to_matrix
from pipeline.scene.ply import write_splat_ply
from pipeline.scene.render_gsplat import pick_renderer
from pipeline.scene.splat import write_splat
from pipeline.scene.turntable import (
    gaussian_bounds,
    photo_view_axes,
    scene_orbit_cameras,
    turntable_cameras,
    write_gif,
    write_gif_indexed,
)


def _photo_size(paths: RunPaths) -> tuple[int, int] | None:
    if not paths.input_image.is_file():
        return None
    try:
        from PIL import Image

        with Image.open(paths.input_image) as im:
            return im.size
    except OSError:
        return None


def _scene_gif_size(photo: tuple[int, int] | None, longest: int) -> tuple[int, int]:
    """Scene GIF keeps the photo's aspect, its longer side `longest` pixels (even numbers)."""
    w, h = photo if photo else (4, 3)
    s = longest / max(w, h)
    return max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def _input_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_present(record: dict[str, Any] | None, run_dir: Path) -> bool:
    return bool(record) and all((run_dir / f).is_file() for f in record.get("files", []))


def export_run(
    run_dir: Path,
    cfg: ExportConfig,
    *,
    progress: bool = True,
    intrinsics: np.ndarray | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the per-object and scene files of a run folder. Returns a JSON-able summary.

    `intrinsics` is the photo's 3x3 K at its full resolution, when a lifter recorded it; otherwise
    the scene GIF uses `default_intrinsics` (the same assumption as `photo_camera`).
    Unreadable gaussians.pt files are reported under their object, never fatal.

    `previous`: the summary an earlier export returned (run.json's "export"). An object whose files
    are all there and whose input key (the sha256 of its gaussians.pt and the settings its files
    depend on) is unchanged is not written again; the scene likewise, from the keys of its objects.
    A rerun of a finished photo therefore renders nothing.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    if not paths.objects_dir.is_dir():
        raise InputError(f"{paths.objects_dir} does not exist.", "run stage 2 first, or pass the run folder itself.")
    fps = float(cfg.gif_fps)
    before = previous if isinstance(previous, dict) else {}
    before_objects = before.get("objects") if isinstance(before.get("objects"), dict) else {}

    summary: dict[str, Any] = {
        "objects": {},
        "scene": {"files": [], "notes": []},
        "renderer": before.get("renderer"),
        "renderer_reason": before.get("renderer_reason"),
        "seconds": {},
    }
    # The renderer asked for, not the one picked: picking imports torch and gsplat, which a rerun
    # with nothing to render must not pay for.
    object_cfg = (cfg.renderer, cfg.turntable, cfg.gif_frames, cfg.gif_size, cfg.gif_fps)
    keys: dict[str, str] = {}
    pending: list[tuple[str, Path, str]] = []
    object_dirs = sorted(d for d in paths.objects_dir.iterdir() if d.is_dir() and OBJECT_ID_RE.match(d.name))
    for obj_dir in object_dirs:
        oid = obj_dir.name
        pt = obj_dir / "gaussians.pt"
        if not pt.is_file():
            summary["objects"][oid] = {"skipped": "no gaussians.pt (stage 2 did not finish this object)"}
            continue
        keys[oid] = key = _input_key(sha256_file(pt), object_cfg)
        old = before_objects.get(oid)
        # Reused: files written for this very gaussians.pt and settings, or the same unreadable file.
        if isinstance(old, dict) and old.get("key") == key and (old.get("unreadable") or (not old.get("error") and _files_present(old, run_dir))):
            summary["objects"][oid] = {**old, "resumed": True}
        pending.append((oid, pt, key))
    meshes = {oid: sha256_file(p) for oid in keys if (p := paths.object_dir(oid) / "mesh.glb").is_file()}
    K_key = None if intrinsics is None else np.asarray(intrinsics, np.float64).round(6).tolist()
    scene_key = _input_key(sorted(keys.items()), meshes, cfg.renderer, cfg.turntable, cfg.gif_frames, cfg.scene_gif_size, cfg.gif_fps, K_key, _photo_size(paths))
    old_scene = before.get("scene") if isinstance(before.get("scene"), dict) else None
    scene_done = bool(keys) and old_scene is not None and old_scene.get("key") == scene_key and _files_present(old_scene, run_dir)
    objects_done = all(summary["objects"].get(oid, {}).get("resumed") for oid in keys)
    if scene_done and objects_done:
        summary["scene"] = {**old_scene, "resumed": True}
        summary["seconds"] = {"objects": 0.0, "scene": 0.0, "total": round(time.perf_counter() - t_start, 3)}
        return summary
    render_fn, renderer, renderer_reason = pick_renderer(cfg.renderer) if cfg.turntable else (None, "none", "turntable off")
    summary.update(renderer=renderer, renderer_reason=renderer_reason)

    loaded: list[tuple[str, ObjectGaussians]] = []
    for oid, pt, key in show_progress(pending, progress, "export objects"):
        obj_dir = pt.parent
        resumed = summary["objects"].get(oid, {})
        if resumed.get("unreadable") or (scene_done and resumed.get("resumed")):
            continue  # neither its files nor the scene need it
        try:
            obj = load_object_pt(pt)
        except InputError as exc:
            summary["objects"][oid] = {"error": str(exc), "unreadable": True, "key": key}
            continue
        t0 = time.perf_counter()
        # Non-finite Gaussians are dropped once here, so bounds, cameras and renders stay finite too.
        finite = np.ones(len(obj.gaussians), dtype=bool)
        for name in GAUSSIAN_FIELDS:
            finite &= np.isfinite(getattr(obj.gaussians, name)).all(axis=1)
        obj.gaussians = g = obj.gaussians.take(finite)
        loaded.append((oid, obj))
        if summary["objects"].get(oid, {}).get("resumed"):
            continue  # its files are already written for these inputs; it is loaded for the scene only
        record: dict[str, Any] = {"n_gaussians": len(g), "source": obj.source, "files": [], "dropped_nonfinite": int((~finite).sum()), "key": key}
        try:
            write_splat_ply(obj_dir / "object.ply", g)
            write_splat(obj_dir / "object.splat", g)
            record["files"] += [_rel(obj_dir / "object.ply", run_dir), _rel(obj_dir / "object.splat", run_dir)]
            if render_fn is not None and len(g):
                up, toward = photo_view_axes(obj.pose)
                cams = turntable_cameras(g, cfg.gif_frames, cfg.gif_size, up=up, start_dir=toward)
                write_frames(obj_dir / "turntable.gif", g, cams, fps, render_fn, renderer)
                record["files"].append(_rel(obj_dir / "turntable.gif", run_dir))
        except Exception as exc:  # one object's failure never stops the others or the scene
            record["error"] = describe(exc, with_type=True)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        summary["objects"][oid] = record
    summary["seconds"]["objects"] = round(time.perf_counter() - t_start, 3)

    t_scene = time.perf_counter()
    scene = summary["scene"]
    if scene_done:
        summary["scene"] = {**old_scene, "resumed": True}  # type: ignore[dict-item]
    elif not loaded:
        scene["notes"].append("no readable objects: scene files not written")
    else:
        scene_g, object_index = compose_scene([obj for _, obj in loaded])
        scene["n_gaussians"] = len(scene_g)
        scene["n_objects"] = len(loaded)
        scene["objects"] = [oid for oid, _ in loaded]
        ply = write_splat_ply(paths.scene_dir / "scene.ply", scene_g)
        write_splat(paths.scene_dir / "scene.splat", scene_g)
        scene["dropped_nonfinite"] = ply["dropped_nonfinite"]
        scene["files"] += [_rel(paths.scene_dir / "scene.ply", run_dir), _rel(paths.scene_dir / "scene.splat", run_dir)]
        if render_fn is not None:
            photo = _photo_size(paths)
            width, height = _scene_gif_size(photo, int(cfg.scene_gif_size))
            K = None
            if intrinsics is not None and photo is not None:
                K = np.asarray(intrinsics, np.float64).copy()
                K[:2] *= width / photo[0]
            centre = gaussian_bounds(scene_g).mean(axis=0)
            cams = scene_orbit_cameras(centre, cfg.gif_frames, width, height, K=K)
            write_frames(paths.scene_dir / "scene.gif", scene_g, cams, fps, render_fn, renderer)
            scene["files"].append(_rel(paths.scene_dir / "scene.gif", run_dir))
        glb = _compose_meshes(paths, loaded, scene["notes"])
        if glb is not None:
            scene["files"].append(_rel(glb, run_dir))
        scene["key"] = scene_key  # later runs with the same objects and settings reuse these files
    summary["seconds"]["scene"] = round(time.perf_counter() - t_scene, 3)
    summary["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    return summary


def write_frames(path: Path, g: Any, cams: list, fps: float, render_fn: Any, renderer: str) -> None:
    """A turntable or scene GIF. With gsplat the frames stay on the GPU, which also picks their one
    palette (pipeline/scene/gif_palette.py): Pillow then only encodes. Otherwise Pillow quantizes
    each frame on the CPU."""
    if renderer == "gsplat":
        from pipeline.scene.gif_palette import palette_indices
        from pipeline.scene.render_gsplat import render_frames

        write_gif_indexed(path, *palette_indices(render_frames(g, cams)), fps)
    else:
        write_gif(path, [render_fn(g, cam) for cam in cams], fps)


def _compose_meshes(paths: RunPaths, loaded: list[tuple[str, ObjectGaussians]], notes: list[str]) -> Path | None:
    """scene/scene.glb from objects/<id>/mesh.glb, each moved by its pose (same local frame as its Gaussians)."""
    meshes = [(oid, obj, paths.object_dir(oid) / "mesh.glb") for oid, obj in loaded]
    meshes = [m for m in meshes if m[2].is_file()]
    if not meshes:
        return None
    try:
        import trimesh
    except ImportError:
        notes.append("scene.glb skipped: trimesh is not installed (pip install trimesh)")
        return None
    from pipeline.core.atomic import write_bytes_atomic

    scene = trimesh.Scene()
    for oid, obj, glb in meshes:
        try:
            part = trimesh.load(glb, force="scene")
        except Exception as exc:  # trimesh raises many types on bad files
            notes.append(f"{oid}/mesh.glb unreadable ({type(exc).__name__}); left out of scene.glb")
            continue
        transform = pose_to_matrix(obj.pose)
        for name, geom in part.geometry.items():
            for node in part.graph.geometry_nodes.get(name, []):
                local, _ = part.graph.get(node)
                scene.add_geometry(geom.copy(), node_name=f"{oid}_{node}", geom_name=f"{oid}_{name}", transform=transform @ local)
    if not scene.geometry:
        return None
    target = paths.scene_dir / "scene.glb"
    write_bytes_atomic(target, scene.export(file_type="glb"))
    return target
