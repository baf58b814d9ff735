"""The same `render` as render_cpu, through gsplat's CUDA rasterizer, plus renderer selection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from pipeline.core.errors import MissingDependencyError, missing_dependency
from pipeline.core.types import SH_C0, Gaussians
from pipeline.scene.camera import Camera

if TYPE_CHECKING:
    import torch

RenderFn = Callable[..., np.ndarray]
GAUSSIAN_CAMERAS = 4_000_000  # render_frames: Gaussians x cameras per gsplat call, at most


def _gsplat_and_torch():
    try:
        import torch
    except ImportError as exc:
        raise missing_dependency("torch", "sam3d-objects", "pip install torch") from exc
    try:
        import gsplat
    except ImportError as exc:
        raise missing_dependency("gsplat", "sam3d-objects", "pip install gsplat") from exc
    if not torch.cuda.is_available():
        raise MissingDependencyError(
            "gsplat needs a CUDA GPU and none is visible.", "use --renderer cpu (or auto), or run on a machine with CUDA."
        )
    return gsplat, torch


def render(
    g: Gaussians,
    camera: Camera,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    device: str = "cuda",
) -> np.ndarray:
    """Render with gsplat.rasterization (classic 3DGS, eps2d 0.3). Returns (H, W, 3) uint8."""
    return render_frames(g, [camera], background, device=device)[0].cpu().numpy()


def render_frames(
    g: Gaussians,
    cameras: Sequence[Camera],
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    device: str = "cuda",
    batch: int = 32,
) -> torch.Tensor:
    """Every camera's frame (all of one size) as an (F, H, W, 3) uint8 tensor left on the GPU: the
    Gaussians are uploaded once and gsplat rasterizes up to `batch` cameras per call (its
    viewmats/Ks take a camera axis, gsplat/rendering.py:39-40), instead of once per frame.

    gsplat's memory grows with Gaussians x cameras per call, and beside SAM 3D Objects the GPU has
    little to spare: cameras per call are capped so that product stays under GAUSSIAN_CAMERAS (a
    scene of 4 M Gaussians or more renders one camera per call, as before batching)."""
    gsplat, torch = _gsplat_and_torch()
    if not cameras:
        raise ValueError("render_frames needs at least one camera")
    W, H = int(cameras[0].width), int(cameras[0].height)
    if any((int(c.width), int(c.height)) != (W, H) for c in cameras):
        raise ValueError("render_frames renders cameras of one size only")
    if len(g) == 0:
        bg = torch.tensor(np.rint(np.clip(background, 0, 1) * 255), dtype=torch.uint8, device=device)
        return bg.expand(len(cameras), H, W, 3).clone()

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

    # Colours as gsplat computes them for SH degree 0: 0.5 + C0 * f_dc, clamped at 0.
    colors = np.maximum(0.5 + SH_C0 * g.features_dc, 0.0)
    means, quats, scales, opacities, cols = t(g.xyz), t(g.rotation), t(g.scale), t(g.opacity[:, 0]), t(colors)  # quats: w first, as gsplat expects
    bg = t(np.asarray(background, np.float32))
    out = []
    with torch.no_grad():
        per_call = max(1, min(batch, GAUSSIAN_CAMERAS // len(g)))
        for i in range(0, len(cameras), per_call):
            part = cameras[i : i + per_call]
            image, alpha, _meta = gsplat.rasterization(
                means=means, quats=quats, scales=scales, opacities=opacities, colors=cols,
                viewmats=t(np.stack([c.viewmat for c in part])), Ks=t(np.stack([c.K for c in part])),
                width=W, height=H, near_plane=0.01, eps2d=0.3, rasterize_mode="classic",
            )  # fmt: skip
            # Background composited here: gsplat's `backgrounds` shape rules differ between its packed
            # and unpacked paths and across versions; (1 - alpha) * background is the same everywhere.
            image = image + (1.0 - alpha) * bg
            out.append(image.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8))
    return torch.cat(out)


def gsplat_available() -> tuple[bool, str]:
    """(usable, reason): whether gsplat imports and CUDA is visible."""
    try:
        _gsplat_and_torch()
    except MissingDependencyError as exc:
        return False, exc.problem
    return True, "gsplat and a CUDA GPU are available"


def pick_renderer(name: Literal["auto", "cpu", "gsplat"] = "auto") -> tuple[RenderFn, str, str]:
    """Choose the turntable renderer: (render_fn, chosen name, why).

    'gsplat' raises MissingDependencyError when it cannot run; 'auto' falls back to the CPU one.
    """
    from pipeline.scene import render_cpu

    if name == "cpu":
        return render_cpu.render, "cpu", "requested"
    if name == "gsplat":
        _gsplat_and_torch()
        return render, "gsplat", "requested"
    if name != "auto":
        raise ValueError(f"unknown renderer {name!r}")
    ok, reason = gsplat_available()
    if ok:
        return render, "gsplat", reason
    return render_cpu.render, "cpu", f"gsplat not used: {reason}"
