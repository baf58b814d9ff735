"""A small synthetic run folder for the report and viewer tests: real files in the documented layout.

Three objects: obj_001 (red ball) and obj_002 (green box, with an HTML-injection label) are done,
with gaussians.pt and turntable GIFs; obj_003 failed and has no files. The planner's answer holds
markup too, so the tests can check that nothing from a model reaches the page unescaped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core.runfolder import Manifest, RunPaths
from pipeline.core.types import Gaussians, ObjectGaussians, Pose, rgb_to_sh0
from pipeline.masks.rle import rle_encode

W, H = 200, 150
INJECTED = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
OBJECTS = [
    # id, label, colour (RGB 0-255), box in the photo, scene translation (camera frame: +X left)
    ("obj_001", "red ball", (220, 40, 40), (20, 40, 80, 100), (0.55, 0.0, 3.0)),
    ("obj_002", "green box " + INJECTED, (40, 190, 60), (120, 50, 175, 105), (-0.55, 0.0, 3.0)),
    ("obj_003", "blue thing", (40, 70, 220), (85, 105, 115, 140), (0.0, -0.5, 3.0)),
]
DONE = ("obj_001", "obj_002")


def _sphere_gaussians(color: tuple[int, int, int], n: int, seed: int) -> Gaussians:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    xyz = (v / np.linalg.norm(v, axis=1, keepdims=True) * rng.uniform(0.6, 1.0, (n, 1))).astype(np.float32)
    rgb = np.clip(np.array(color, np.float32) / 255.0 + rng.normal(0, 0.03, (n, 3)), 0, 1)
    q = rng.normal(size=(n, 4)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return Gaussians(
        xyz=xyz,
        features_dc=rgb_to_sh0(rgb),
        opacity=np.full((n, 1), 0.9, np.float32),
        scale=np.full((n, 3), 0.12, np.float32),
        rotation=q,
    )


def _turntable(color: tuple[int, int, int], frames: int = 6) -> list[Image.Image]:
    out = []
    for i in range(frames):
        im = Image.new("RGB", (64, 64), (255, 255, 255))
        d = ImageDraw.Draw(im)
        w = 10 + 18 * abs(np.cos(np.pi * i / frames))
        d.ellipse((32 - w, 12, 32 + w, 52), fill=color)
        out.append(im)
    return out


def make_run(run_dir: Path, *, n_gaussians: int = 600) -> RunPaths:
    """Write the synthetic run into `run_dir` and return its paths."""
    from pipeline.objects.gaussians_pt import save_object_pt

    paths = RunPaths(run_dir)
    photo = Image.new("RGB", (W, H), (235, 232, 225))
    masks = []
    for oid, label, color, box, _ in OBJECTS:
        m_im = Image.new("L", (W, H), 0)
        (ImageDraw.Draw(m_im).ellipse if oid == "obj_001" else ImageDraw.Draw(m_im).rectangle)(box, fill=255)
        m = np.asarray(m_im) > 127
        photo.paste(Image.new("RGB", (W, H), color), mask=m_im)
        masks.append((oid, label, m))
    paths.input_image.parent.mkdir(parents=True, exist_ok=True)
    photo.save(paths.input_image)

    paths.masks_dir.mkdir(parents=True, exist_ok=True)
    overlay = photo.copy()
    d = ImageDraw.Draw(overlay)
    entries = []
    for i, (oid, label, m) in enumerate(masks, start=1):
        Image.fromarray((m * 255).astype(np.uint8), "L").save(paths.masks_dir / f"{oid}.png")
        ys, xs = np.nonzero(m)
        d.rectangle((xs.min(), ys.min(), xs.max(), ys.max()), outline=(0, 0, 0), width=2)
        d.text((xs.min() + 3, ys.min() + 2), str(i), fill=(0, 0, 0))
        entries.append(
            {
                "id": oid,
                "label": label,
                "prompt": label,
                "score": 0.9 - 0.1 * i,
                "box_xyxy": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                "area": int(m.sum()),
                "mask": f"{oid}.png",
                "rle": rle_encode(m),
                "source": "test",
            }
        )
    overlay.save(paths.masks_dir / "overlay.png")
    paths.masks_json.write_text(json.dumps({"objects": entries}))

    paths.plan.parent.mkdir(parents=True, exist_ok=True)
    paths.plan.write_text(
        json.dumps(
            {
                "model": "qwen3-vl-8b-thinking",
                "mode": "scene",
                "items": [{"phrase": label, "box_xyxy": None} for _, label, *_ in OBJECTS],
                "raw_response": "<think>three things</think><prompt_list>['red ball', 'green box', 'blue thing']</prompt_list>",
                "reasoning": "I see a <b>red</b> ball. " + INJECTED,
                "warnings": [],
            }
        )
    )

    manifest = Manifest(paths)
    manifest.update(
        inputs={"image": {"path": "/tmp/photo.png", "sha256": "0" * 64}},
        config={"run": {"profile": "lite"}},
        backends={
            "planner": "none",
            "segmenter": "classical",
            "lifter": "inflate",
            "renderer": "cpu",
            "reasons": {"lifter": "no CUDA GPU: the built-in inflate lifter", "segmenter": "profile lite"},
        },
        versions={"python": "3.11", "numpy": np.__version__},
        timings={"stage1": 1.25, "stage2": 3.5, "export": 0.75},
    )
    for i, (oid, label, color, _, t) in enumerate(OBJECTS):
        m = masks[i][2]
        if oid in DONE:
            g = _sphere_gaussians(color, n_gaussians, seed=i)
            save_object_pt(paths.object_dir(oid) / "gaussians.pt", ObjectGaussians(g, Pose(translation=t, scale=[0.4] * 3), "test"))
            frames = _turntable(color)
            frames[0].save(paths.object_dir(oid) / "turntable.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
            manifest.set_object(
                oid, label=label, score=0.8, area=int(m.sum()), n_gaussians=n_gaussians, status="done", error=None, seconds=0.5 + i
            )
        else:
            manifest.set_object(
                oid,
                label=label,
                score=0.6,
                area=int(m.sum()),
                n_gaussians=None,
                status="failed",
                error="lifter failed: <mask too small> & empty",
                seconds=0.1,
            )
    paths.scene_dir.mkdir(parents=True, exist_ok=True)
    frames = _turntable((200, 120, 40))
    frames[0].save(paths.scene_dir / "scene.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return paths
