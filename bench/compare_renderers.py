"""gsplat (CUDA) against our CPU splat renderer on the demo scene: image difference and time per frame.

Renders the composed demo scene (inflate lifter) from the photo camera and along the scene orbit with
both renderers, prints the mean/max absolute difference (0-255) and seconds per frame, and saves a
side-by-side PNG (CPU | gsplat | 4x difference) to --out. Needs CUDA and gsplat.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.types import ObjectMask  # noqa: E402
from pipeline.demo.scene import make_demo_scene  # noqa: E402
from pipeline.objects.inflate import InflateLifter  # noqa: E402
from pipeline.scene import render_cpu, render_gsplat  # noqa: E402
from pipeline.scene.camera import photo_camera  # noqa: E402
from pipeline.scene.compose import compose_scene  # noqa: E402
from pipeline.scene.turntable import scene_orbit_cameras  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo_scene(Path(tmp))
    lifter = InflateLifter()
    ctx = lifter.prepare(demo.image)
    objects = [lifter.lift(ctx, ObjectMask(o.mask, o.name), seed=0) for o in demo.objects]
    scene, _ = compose_scene(objects)
    h, w = demo.image.shape[:2]
    centre = scene.xyz.mean(axis=0)
    cams = [photo_camera(w, h)] + list(scene_orbit_cameras(centre, args.frames, w, h))[1:]
    render_gsplat.render(scene, cams[0])  # warm-up (and the JIT build on first use)
    rows, pairs = [], []
    for i, cam in enumerate(cams):
        t = time.perf_counter()
        a = render_cpu.render(scene, cam)
        t_cpu = time.perf_counter() - t
        torch.cuda.synchronize()
        t = time.perf_counter()
        b = render_gsplat.render(scene, cam)
        torch.cuda.synchronize()
        t_gs = time.perf_counter() - t
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        rows.append((i, float(diff.mean()), int(diff.max()), float((diff.max(axis=2) > 16).mean()), t_cpu, t_gs))
        if i in (0, len(cams) // 2):
            pairs.append(np.concatenate([a, b, np.clip(diff * 4, 0, 255).astype(np.uint8)], axis=1))
    print(f"machine: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {platform.platform()}")
    print(f"demo scene, {len(scene)} Gaussians, {w}x{h}\n")
    print("| frame | mean abs diff (0-255) | max abs diff | pixels off by > 16 | CPU s | gsplat s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, mad, mx, frac, tc, tg in rows:
        print(f"| {i}{' (photo camera)' if i == 0 else ''} | {mad:.2f} | {mx} | {frac * 100:.2f} % | {tc:.3f} | {tg:.4f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(pairs, axis=0)).save(args.out / "renderer_comparison.png")
    print(f"\nmean over frames: {np.mean([r[1] for r in rows]):.2f}; side by side: {args.out / 'renderer_comparison.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
