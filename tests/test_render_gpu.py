"""gsplat (CUDA) and the CPU renderer agree on the same Gaussians and cameras (run on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.core.types import Gaussians, Pose, rgb_to_sh0
from pipeline.scene.camera import photo_camera
from pipeline.scene.compose import apply_pose
from pipeline.scene.turntable import photo_view_axes, turntable_cameras

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("gsplat")


def object_gaussians(n: int = 6000, seed: int = 0) -> Gaussians:
    """A flattened-splat ellipsoid with smoothly varying colours, like a lifted object."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    xyz = d * np.array([0.5, 0.35, 0.3])
    rgb = 0.5 + 0.45 * np.c_[d[:, 0], d[:, 1], -d[:, 2]]
    scales = np.c_[np.full(n, 0.012), np.full(n, 0.012), np.full(n, 0.004)] * rng.uniform(0.7, 1.3, (n, 1))
    # Orient each splat's thin (z) axis along the surface normal: rotate +Z onto d.
    axis = np.cross([0.0, 0.0, 1.0], d)
    angle = np.arccos(np.clip(d[:, 2], -1.0, 1.0))
    axis /= np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-12)
    rots = Rotation.from_rotvec(axis * angle[:, None]).as_quat(scalar_first=True)
    return Gaussians(
        xyz.astype(np.float32), rgb_to_sh0(rgb), rng.uniform(0.6, 1.0, (n, 1)).astype(np.float32),
        scales.astype(np.float32), rots.astype(np.float32),
    )  # fmt: skip


def test_gsplat_and_cpu_turntables_agree() -> None:
    from pipeline.scene import render_cpu, render_gsplat

    g = object_gaussians()
    pose = Pose(Rotation.from_euler("xy", [20, 35], degrees=True).as_quat(scalar_first=True), [0.1, 0.0, 2.5], [0.8] * 3)
    up, toward = photo_view_axes(pose)
    diffs = []
    for cam in turntable_cameras(g, 8, 256, up=up, start_dir=toward):
        a = render_cpu.render(g, cam).astype(np.float64)
        b = render_gsplat.render(g, cam).astype(np.float64)
        diffs.append(np.abs(a - b).mean())
    scene = apply_pose(g, pose)
    cam = photo_camera(320, 240)
    a = render_cpu.render(scene, cam).astype(np.float64)
    b = render_gsplat.render(scene, cam).astype(np.float64)
    diffs.append(np.abs(a - b).mean())
    print(f"mean absolute difference gsplat vs CPU (0-255 scale): per frame {np.round(diffs, 3).tolist()}, max {max(diffs):.3f}")
    # Same algorithm; differences come from float32 vs float64 and gsplat's tile-level culling.
    assert max(diffs) < 1.5


def test_pick_renderer_prefers_gsplat_on_cuda() -> None:
    from pipeline.scene.render_gsplat import pick_renderer

    _fn, name, _why = pick_renderer("auto")
    assert name == "gsplat"


def test_frames_rendered_together_equal_frames_rendered_one_by_one(monkeypatch) -> None:
    from pipeline.scene import render_gsplat

    g = object_gaussians()
    cams = turntable_cameras(g, 24, 128)
    together = render_gsplat.render_frames(g, cams, batch=16)  # two calls: 16 + 8 cameras
    assert together.is_cuda and together.shape == (24, 128, 128, 3)
    one_by_one = np.stack([render_gsplat.render(g, cam) for cam in cams])
    diff = np.abs(together.cpu().numpy().astype(int) - one_by_one)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    # A big scene: cameras per call capped by Gaussians x cameras (here 5 per call).
    monkeypatch.setattr(render_gsplat, "GAUSSIAN_CAMERAS", 5 * len(g) + 1)
    capped = np.abs(render_gsplat.render_frames(g, cams).cpu().numpy().astype(int) - one_by_one)
    assert capped.max() <= 1 and capped.mean() < 0.01, (capped.max(), capped.mean())


def test_gsplat_export_writes_gifs_quantized_on_the_gpu(tmp_path) -> None:
    """export with gsplat: each GIF's one palette comes from the GPU; what a player shows is the
    rendered frames, about as close as Pillow's per-frame quantization of the same frames."""
    from PIL import Image
    from test_gif_palette import shown  # every frame as a player composes it

    from pipeline.core.config import ExportConfig
    from pipeline.core.types import ObjectGaussians
    from pipeline.objects.gaussians_pt import save_object_pt
    from pipeline.scene import render_gsplat
    from pipeline.scene.export import export_run
    from pipeline.scene.turntable import write_gif

    g = object_gaussians()
    pose = Pose(Rotation.from_euler("xy", [20, 35], degrees=True).as_quat(scalar_first=True), [0.1, 0.0, 2.5], [0.8] * 3)
    run = tmp_path / "run"
    (run / "input").mkdir(parents=True)
    Image.new("RGB", (320, 240), "white").save(run / "input" / "image.png")
    save_object_pt(run / "objects" / "obj_001" / "gaussians.pt", ObjectGaussians(g, pose, "test"))
    summary = export_run(run, ExportConfig(renderer="gsplat", gif_frames=12, gif_size=128), progress=False)
    assert summary["renderer"] == "gsplat" and not summary["objects"]["obj_001"].get("error"), summary
    up, toward = photo_view_axes(pose)
    frames = render_gsplat.render_frames(g, turntable_cameras(g, 12, 128, up=up, start_dir=toward)).cpu().numpy()

    ours = shown(run / "objects" / "obj_001" / "turntable.gif")
    pillow = shown(write_gif(tmp_path / "pillow.gif", list(frames)))
    err_ours, err_pillow = (np.abs(x.astype(int) - frames).mean() for x in (ours, pillow))
    print(f"turntable GIF mean abs error (0-255): GPU palette {err_ours:.3f}, Pillow per frame {err_pillow:.3f}")
    assert ours.shape == frames.shape and err_ours <= max(1.5 * err_pillow, 0.5)
    assert (run / "scene" / "scene.gif").is_file()


def test_stage2_warm_up_takes_the_gpu_gif_path() -> None:
    """A batch worker's warm-up writes one GIF the way a gsplat export does (render_frames, the GPU
    palette), so none of it is paid by the first photo."""
    from pipeline.stages import Configs, Stage2

    c = Configs()
    c.lifter.lifter = "inflate"
    c.export.renderer = "gsplat"
    c.run.progress = False
    report = Stage2(c, log=lambda m: None).warm_up()
    assert report["renderer"] == "gsplat", report
