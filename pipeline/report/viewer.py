"""Interactive 3D viewer of a run's scene in the browser, served by viser on 127.0.0.1.

Every reconstructed object is posed into the scene frame (the photo's pytorch3d camera frame:
+X left, +Y up, +Z forward) and added as Gaussian splats, with a checkbox per object, the
photo's camera frustum showing the photo, and an initial view from just behind the photo's
camera. viser renders splats in the browser (WebGL2), so the server needs no GPU.

viser and torch (through the .pt loader) are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.errors import InputError, missing_dependency
from pipeline.core.runfolder import RunPaths
from pipeline.core.types import Gaussians, sh0_to_rgb
from pipeline.report.html import load_run_view
from pipeline.scene.camera import default_intrinsics

FRUSTUM_IMAGE_MAX_SIDE = 512
"""The photo on the frustum is sent to every browser; a small copy is enough to recognize it."""
OPENCV_IN_SCENE_WXYZ = (0.0, 0.0, 0.0, 1.0)
"""Rotation of an OpenCV camera (+X right, +Y down) in the scene frame (+X left, +Y up): 180 deg about Z."""
LABEL_MAX_CHARS = 40


@dataclass
class SceneObject:
    """One object ready to show: its Gaussians already posed in the scene frame."""

    id: str
    label: str
    gaussians: Gaussians

    @property
    def center(self) -> np.ndarray:
        """(3,) median position: robust to a few stray Gaussians."""
        return np.median(self.gaussians.xyz, axis=0)


@dataclass
class ViewerSession:
    """A running viser server showing one run. `stop()` shuts it down."""

    server: Any  # viser.ViserServer
    url: str
    objects: list[SceneObject]
    splats: dict[str, Any] = field(default_factory=dict)  # object id -> GaussianSplatHandle
    toggles: dict[str, Any] = field(default_factory=dict)  # object id -> GuiCheckboxHandle

    def stop(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # viser's "Server stopped" banner
            self.server.stop()


def _display_label(oid: str, label: str) -> str:
    """GUI text for an object: printable characters only, short (labels come from a model)."""
    clean = "".join(ch if ch.isprintable() else " " for ch in label).strip()
    if len(clean) > LABEL_MAX_CHARS:
        clean = clean[: LABEL_MAX_CHARS - 1] + "…"
    return f"{oid} {clean}" if clean else oid


def load_scene_objects(run_dir: Path) -> list[SceneObject]:
    """Every object of the run that has objects/<id>/gaussians.pt, posed in the scene frame."""
    from pipeline.objects.gaussians_pt import load_object_pt
    from pipeline.scene.compose import apply_pose

    view = load_run_view(Path(run_dir))
    objects = []
    for row in view.objects:
        pt = row.files.get("gaussians.pt")
        if pt is None:
            continue
        obj = load_object_pt(pt)
        g = apply_pose(obj.gaussians, obj.pose)
        finite = np.isfinite(g.xyz).all(1) & np.isfinite(g.scale).all(1) & np.isfinite(g.rotation).all(1)
        if not finite.all():
            g = g.take(finite)
        if len(g) == 0:
            continue
        objects.append(SceneObject(row.id, row.label, g))
    if not objects:
        raise InputError(
            f"No reconstructed objects to show in {run_dir} (no objects/<id>/gaussians.pt).",
            "run stage 2 on this folder first (./run_sam3d_from_masks.sh or python -m pipeline stage2).",
        )
    return objects


def splat_arrays(g: Gaussians) -> dict[str, np.ndarray]:
    """The arrays viser's add_gaussian_splats takes: centers, covariances, rgbs, opacities."""
    from pipeline.scene.compose import gaussian_covariances

    return {
        "centers": g.xyz.astype(np.float32),  # (N, 3)
        "covariances": gaussian_covariances(g).astype(np.float32),  # (N, 3, 3)
        "rgbs": sh0_to_rgb(g.features_dc),  # (N, 3) in [0, 1]
        "opacities": np.clip(g.opacity, 0.0, 1.0).astype(np.float32),  # (N, 1)
    }


def _photo_for_frustum(paths: RunPaths) -> tuple[np.ndarray | None, int, int]:
    """(small RGB photo or None, original width, original height)."""
    if not paths.input_image.exists():
        return None, 0, 0
    try:
        with Image.open(paths.input_image) as im:
            width, height = im.size
            small = im.convert("RGB")
            small.thumbnail((FRUSTUM_IMAGE_MAX_SIDE, FRUSTUM_IMAGE_MAX_SIDE))
            return np.asarray(small), width, height
    except OSError:
        return None, 0, 0


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("127.0.0.1", "0.0.0.0", "localhost", "") else host
    if ":" in shown:  # IPv6 literal
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def start_viewer(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8080) -> ViewerSession:
    """Load the run and start serving it; returns at once. `port=0` picks a free port."""
    run_dir = Path(run_dir)
    objects = load_scene_objects(run_dir)
    try:
        import viser
    except ImportError as exc:
        raise missing_dependency("viser", "light", "python -m pip install viser") from exc

    paths = RunPaths(run_dir)
    # viser prints its own banner whatever `verbose` says; view_run prints the one line that matters.
    with contextlib.redirect_stdout(io.StringIO()):
        server = viser.ViserServer(host=host, port=port, label=f"sam3d-gs · {run_dir.name}", verbose=False)
    try:
        session = ViewerSession(server, _url(host, server.get_port()), objects)
        _populate(session, paths)
    except BaseException:
        with contextlib.redirect_stdout(io.StringIO()):
            server.stop()
        raise
    return session


def _populate(session: ViewerSession, paths: RunPaths) -> None:
    server = session.server
    server.scene.set_up_direction("+y")  # the scene frame is the photo's camera frame, +Y up

    centers = np.stack([o.center for o in session.objects])  # (K, 3)
    target = centers.mean(axis=0)
    depth = float(np.linalg.norm(target)) or 1.0

    with server.atomic():
        for obj in session.objects:
            session.splats[obj.id] = server.scene.add_gaussian_splats(f"/objects/{obj.id}", **splat_arrays(obj.gaussians))

        photo, width, height = _photo_for_frustum(paths)
        if photo is not None:
            fy = float(default_intrinsics(width, height)[1, 1])
            fov_y = 2.0 * float(np.arctan(0.5 * height / fy))
            aspect = width / height
        else:
            fov_y, aspect = np.radians(45.0), 4.0 / 3.0
        frustum = server.scene.add_camera_frustum(
            "/photo_camera",
            fov=fov_y,
            aspect=aspect,
            scale=0.06 * depth,
            thickness=0.003 * depth,
            image=photo,
            wxyz=OPENCV_IN_SCENE_WXYZ,
            position=(0.0, 0.0, 0.0),
        )

        # Just behind and above the photo's camera, so the frustum sits below the line of sight
        # instead of covering the view with the photo.
        eye = np.array([0.0, 0.2 * depth, -0.4 * depth])
        server.initial_camera.position = tuple(eye)
        server.initial_camera.look_at = tuple(target)
        server.initial_camera.up = (0.0, 1.0, 0.0)
        server.initial_camera.fov = float(min(max(fov_y * 1.1, np.radians(30.0)), np.radians(90.0)))

    with server.gui.add_folder("Objects"):
        for obj in session.objects:
            checkbox = server.gui.add_checkbox(_display_label(obj.id, obj.label), True, hint=f"{len(obj.gaussians):,} Gaussians")
            session.toggles[obj.id] = checkbox
            _bind_visibility(checkbox, session.splats[obj.id])
    with server.gui.add_folder("Photo"):
        frustum_toggle = server.gui.add_checkbox("Camera frustum", True)
        _bind_visibility(frustum_toggle, frustum)
        view_button = server.gui.add_button("View from the photo")

    @view_button.on_click
    def _(event: Any) -> None:
        # The photo's own viewpoint: at the camera, looking down +Z; hide the frustum that would cover it.
        frustum_toggle.value = False
        frustum.visible = False
        client = event.client
        if client is None:
            return
        with client.atomic():
            client.camera.up_direction = (0.0, 1.0, 0.0)
            client.camera.position = (0.0, 0.0, 0.0)
            client.camera.look_at = (0.0, 0.0, depth)
            client.camera.fov = fov_y


def _bind_visibility(checkbox: Any, node: Any) -> None:
    @checkbox.on_update
    def _(_: Any) -> None:
        node.visible = bool(checkbox.value)


def _print_flushed(message: str) -> None:
    print(message, flush=True)  # the URL must show up at once, also when stdout is a pipe or a log


def view_run(
    run_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    open_browser: bool = False,
    stop_event: threading.Event | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Serve the run's scene until Ctrl-C (or SIGTERM, or `stop_event` is set), then stop cleanly.

    Prints the URL to open. Serves on 127.0.0.1 unless `host` says otherwise; port 0 picks a free one.
    """
    log = log or _print_flushed
    session = start_viewer(run_dir, host=host, port=port)
    stop = stop_event if stop_event is not None else threading.Event()
    # Ctrl-C and SIGTERM set the stop flag. Installed explicitly because a process started in the
    # background by a non-interactive shell inherits SIGINT as ignored and would never stop on it.
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        n = sum(len(o.gaussians) for o in session.objects)
        log(f"Viewer: {session.url}  ({len(session.objects)} objects, {n:,} Gaussians; Ctrl-C stops it)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            log(f"Note: serving on {host}, reachable from other machines.")
        if open_browser:
            webbrowser.open(session.url)
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        session.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        log("Viewer stopped.")
