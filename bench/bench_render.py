"""CPU splat renderer: seconds per frame at a few sizes, on the demo scene's inflate objects.

Run: .venv/bin/python bench/bench_render.py   (prints a markdown table for docs/PERFORMANCE.md)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import best_of, machine_line  # bench/timing.py (the bench folder is on sys.path when run as a script)

from pipeline.core.types import ObjectGaussians, ObjectMask  # noqa: E402
from pipeline.scene.compose import compose_scene  # noqa: E402
from pipeline.scene.render_cpu import render  # noqa: E402
from pipeline.scene.turntable import gaussian_bounds, photo_view_axes, scene_orbit_cameras, turntable_cameras  # noqa: E402


def demo_objects() -> list[ObjectGaussians]:
    """The built-in lifter's output on the bundled demo scene (what `--demo` renders)."""
    from pipeline.demo.scene import make_demo_scene
    from pipeline.objects.inflate import InflateLifter

    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo_scene(Path(tmp))
        lifter = InflateLifter()
        ctx = lifter.prepare(demo.image)
        return [lifter.lift(ctx, ObjectMask(o.mask, o.name), seed=0) for o in demo.objects]



def main() -> None:
    objects = demo_objects()
    obj = max(objects, key=lambda o: len(o.gaussians))
    up, toward = photo_view_axes(obj.pose)
    scene, _ = compose_scene(objects)
    rows = []
    for size in (128, 256, 512):
        cams = turntable_cameras(obj.gaussians, 8, size, up=up, start_dir=toward)
        per_frame = [best_of(lambda c=c: render(obj.gaussians, c), 3) for c in cams]
        rows.append((f"object turntable {size}x{size}", len(obj.gaussians), float(np.median(per_frame)), max(per_frame)))
    for longest in (384, 640):
        w, h = longest, longest * 3 // 4
        cams = scene_orbit_cameras(gaussian_bounds(scene).mean(0), 8, w, h)
        per_frame = [best_of(lambda c=c: render(scene, c), 2) for c in cams]
        rows.append((f"scene orbit {w}x{h}", len(scene), float(np.median(per_frame)), max(per_frame)))

    print(machine_line())
    print(f"Demo scene, inflate lifter: {len(objects)} objects, {len(scene)} Gaussians in the scene.\n")
    print("| frame | Gaussians | median s/frame | worst s/frame |")
    print("|---|---:|---:|---:|")
    for name, n, med, worst in rows:
        print(f"| {name} | {n} | {med:.3f} | {worst:.3f} |")


if __name__ == "__main__":
    main()
