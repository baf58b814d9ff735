"""Scene composition on CPU: 20 objects x 100k Gaussians posed into the camera frame (target <= 1 s).

Run: .venv/bin/python bench/bench_compose.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import best_of, machine_line  # bench/timing.py (the bench folder is on sys.path when run as a script)

from pipeline.core.types import Gaussians, ObjectGaussians, Pose  # noqa: E402
from pipeline.scene.compose import compose_scene, quat_normalize  # noqa: E402


def make_objects(n_objects: int, n_gaussians: int, *, uniform: bool = True) -> list[ObjectGaussians]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_objects):
        g = Gaussians(
            rng.normal(size=(n_gaussians, 3)).astype(np.float32),
            rng.normal(size=(n_gaussians, 3)).astype(np.float32),
            rng.uniform(0, 1, (n_gaussians, 1)).astype(np.float32),
            rng.uniform(0.001, 0.05, (n_gaussians, 3)).astype(np.float32),
            quat_normalize(rng.normal(size=(n_gaussians, 4)).astype(np.float32)),
        )
        scale = np.full(3, rng.uniform(0.2, 2)) if uniform else rng.uniform(0.2, 2, 3)
        out.append(ObjectGaussians(g, Pose(quat_normalize(rng.normal(size=4)), rng.normal(size=3), scale), "bench"))
    return out



def main() -> None:
    rows = []
    for n_obj, n_g, uniform in ((20, 100_000, True), (20, 100_000, False), (5, 6_000, True)):
        objects = make_objects(n_obj, n_g, uniform=uniform)
        seconds = best_of(lambda o=objects: compose_scene(o))
        label = "uniform" if uniform else "non-uniform (exact, eigh)"
        rows.append((f"{n_obj} x {n_g:,}", label, seconds, n_obj * n_g / seconds))
    print(machine_line() + "\n")
    print("| objects x Gaussians | pose scale | seconds | Gaussians/s |")
    print("|---|---|---:|---:|")
    for name, label, s, rate in rows:
        print(f"| {name} | {label} | {s:.3f} | {rate / 1e6:.1f} M |")


if __name__ == "__main__":
    main()
