"""The CPU splat renderer against a per-pixel reference loop and analytic cases; turntable cameras and GIFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from pipeline.core.types import SH_C0, Gaussians, Pose, rgb_to_sh0
from pipeline.scene import render_cpu
from pipeline.scene.camera import Camera, default_intrinsics, photo_camera
from pipeline.scene.render_cpu import render, render_float
from pipeline.scene.turntable import photo_view_axes, scene_orbit_cameras, turntable_cameras, write_gif


def reference_render(g: Gaussians, cam: Camera, background: np.ndarray) -> np.ndarray:
    """Slow, obvious 3DGS forward pass: one Gaussian and one pixel at a time (the test oracle)."""
    H, W = cam.height, cam.width
    fx, fy, cx, cy = cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2]
    items = []
    for i in range(len(g)):
        p = cam.viewmat[:3, :3].astype(np.float64) @ g.xyz[i] + cam.viewmat[:3, 3]
        if p[2] <= 0.01:
            continue
        Rg = Rotation.from_quat(g.rotation[i], scalar_first=True).as_matrix()
        cov_world = Rg @ np.diag(g.scale[i].astype(np.float64) ** 2) @ Rg.T
        Rv = cam.viewmat[:3, :3].astype(np.float64)
        cov = Rv @ cov_world @ Rv.T
        lim_x = 1.3 * 0.5 * W / fx  # our test Gaussians stay in view, where the clamp is inactive
        assert abs(p[0] / p[2]) < lim_x
        J = np.array([[fx / p[2], 0, -fx * p[0] / p[2] ** 2], [0, fy / p[2], -fy * p[1] / p[2] ** 2]])
        cov2 = J @ cov @ J.T + 0.3 * np.eye(2)
        mean = np.array([fx * p[0] / p[2] + cx, fy * p[1] / p[2] + cy])
        color = np.maximum(0.5 + SH_C0 * g.features_dc[i].astype(np.float64), 0)
        items.append((p[2], mean, np.linalg.inv(cov2), float(g.opacity[i, 0]), color))
    items.sort(key=lambda t: t[0])
    out = np.zeros((H, W, 3))
    for y in range(H):
        for x in range(W):
            T, c = 1.0, np.zeros(3)
            for _, mean, inv, opacity, color in items:
                d = np.array([x + 0.5, y + 0.5]) - mean
                alpha = min(0.99, opacity * np.exp(-0.5 * d @ inv @ d))
                if alpha < 1 / 255:
                    continue
                c += T * alpha * color
                T *= 1 - alpha
            out[y, x] = c + T * background
    return out


def random_scene(n: int, seed: int) -> Gaussians:
    rng = np.random.default_rng(seed)
    xyz = np.c_[rng.uniform(-0.4, 0.4, (n, 2)), rng.uniform(1.5, 3.0, n)]
    return Gaussians(
        xyz.astype(np.float32),
        rgb_to_sh0(rng.uniform(0, 1, (n, 3))),
        rng.uniform(0.2, 1.0, (n, 1)).astype(np.float32),
        rng.uniform(0.01, 0.15, (n, 3)).astype(np.float32),
        Rotation.random(n, random_state=rng).as_quat(scalar_first=True).astype(np.float32),
    )


@pytest.mark.parametrize("budget", [1 << 19, 300])
def test_matches_reference_loop(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """Also with a tiny pair budget, which splits the work into many depth-ordered chunks."""
    monkeypatch.setattr(render_cpu, "PAIR_BUDGET", budget)
    g = random_scene(25, seed=3)
    cam = photo_camera(40, 30)
    bg = np.array([0.2, 0.4, 0.9])
    ours = render_float(g, cam, tuple(bg))
    ref = reference_render(g, cam, bg)
    # Pixels whose transmittance fell below 1e-4 may skip the rest (as gsplat does): < 1e-4 difference.
    assert np.abs(ours - ref).max() < 2e-4


def test_single_gaussian_matches_the_analytic_profile() -> None:
    sigma, z, opacity = 0.05, 2.0, 0.8
    g = Gaussians(
        np.array([[0.0, 0.0, z]], np.float32),
        rgb_to_sh0(np.zeros((1, 3))),  # black on white
        np.array([[opacity]], np.float32),
        np.full((1, 3), sigma, np.float32),
        np.array([[1.0, 0, 0, 0]], np.float32),
    )
    cam = photo_camera(64, 64)
    img = render_float(g, cam)
    f = cam.K[0, 0]
    var2d = (f * sigma / z) ** 2 + 0.3
    for dx in (0.5, 3.5, 6.5):  # pixel centres at (32 + dx - 0.5) + 0.5 from the image centre (32, 32)
        alpha = opacity * np.exp(-0.5 * (dx**2 + 0.5**2) / var2d)
        expected = 1.0 - alpha if alpha >= 1 / 255 else 1.0
        assert img[32, 32 + int(dx - 0.5), 0] == pytest.approx(expected, abs=1e-5)


def test_depth_order_decides_what_is_seen_and_input_order_does_not() -> None:
    def pair(red_z: float, blue_z: float) -> Gaussians:
        return Gaussians(
            np.array([[0, 0, red_z], [0, 0, blue_z]], np.float32),
            rgb_to_sh0(np.array([[1.0, 0, 0], [0, 0, 1.0]])),
            np.full((2, 1), 0.99, np.float32),
            np.full((2, 3), 0.2, np.float32),
            np.tile(np.array([1.0, 0, 0, 0], np.float32), (2, 1)),
        )

    cam = photo_camera(32, 32)
    red_front = render(pair(1.0, 2.0), cam)
    blue_front = render(pair(2.0, 1.0), cam)
    assert red_front[16, 16, 0] > 240 and red_front[16, 16, 2] < 15
    assert blue_front[16, 16, 2] > 240 and blue_front[16, 16, 0] < 15
    g = random_scene(60, seed=9)
    perm = np.random.default_rng(0).permutation(60)
    np.testing.assert_array_equal(render(g, cam), render(g.take(perm), cam))


def test_axis_convention_and_culling_behind_the_camera() -> None:
    """Scene frame is pytorch3d's camera frame: +X is left and +Y is up in the photo."""
    cam = photo_camera(64, 64)
    one = lambda xyz: Gaussians(  # noqa: E731
        np.array([xyz], np.float32), rgb_to_sh0(np.zeros((1, 3))), np.ones((1, 1), np.float32),
        np.full((1, 3), 0.05, np.float32), np.array([[1.0, 0, 0, 0]], np.float32),
    )  # fmt: skip
    img = render(one([0.5, 0.0, 2.0]), cam)
    dark = np.argwhere(img[..., 0] < 128)
    assert dark[:, 1].mean() < 20  # +X -> left side of the image
    img = render(one([0.0, 0.5, 2.0]), cam)
    assert np.argwhere(img[..., 0] < 128)[:, 0].mean() < 20  # +Y -> top of the image
    assert np.all(render(one([0.0, 0.0, -2.0]), cam) == 255)  # behind the camera: dropped
    assert np.all(render(Gaussians.empty(), cam, background=(0, 0, 0)) == 0)


def test_anisotropic_gaussian_orientation() -> None:
    """A needle along scene X, rotated 90 degrees about the viewing axis, stands vertical."""
    q_z90 = Rotation.from_euler("z", 90, degrees=True).as_quat(scalar_first=True)
    needle = lambda q: Gaussians(  # noqa: E731
        np.array([[0, 0, 2.0]], np.float32), rgb_to_sh0(np.zeros((1, 3))), np.ones((1, 1), np.float32),
        np.array([[0.3, 0.02, 0.02]], np.float32), np.array([q], np.float32),
    )  # fmt: skip
    cam = photo_camera(64, 64)
    flat = np.argwhere(render(needle([1.0, 0, 0, 0]), cam)[..., 0] < 128)
    tall = np.argwhere(render(needle(q_z90), cam)[..., 0] < 128)
    assert np.ptp(flat[:, 1]) > 3 * np.ptp(flat[:, 0])
    assert np.ptp(tall[:, 0]) > 3 * np.ptp(tall[:, 1])


def test_scene_orbit_starts_at_the_photo_and_keeps_the_centre_in_place() -> None:
    centre = np.array([0.3, -0.2, 2.5])
    cams = scene_orbit_cameras(centre, 8, 64, 48)
    np.testing.assert_allclose(cams[0].viewmat, photo_camera(64, 48).viewmat, atol=1e-6)
    for cam in cams:
        p = cam.viewmat[:3, :3] @ centre + cam.viewmat[:3, 3]
        np.testing.assert_allclose(p, cams[0].viewmat[:3, :3] @ centre + cams[0].viewmat[:3, 3], atol=1e-5)
    # Half way round, the camera stands on the far side of the centre.
    eye = lambda c: -c.viewmat[:3, :3].T @ c.viewmat[:3, 3]  # noqa: E731
    np.testing.assert_allclose(eye(cams[4]), 2 * centre * np.array([1, 0, 1]), atol=1e-5)


def test_turntable_frames_the_object_from_the_photo_direction() -> None:
    pose = Pose(Rotation.from_euler("y", 70, degrees=True).as_quat(scalar_first=True), [0, 0, 2], [1, 1, 1])
    up, toward = photo_view_axes(pose)
    bounds = np.array([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]])
    cams = turntable_cameras(bounds, 6, 64, up=up, start_dir=toward, elevation_deg=0.0)
    assert len(cams) == 6
    K = default_intrinsics(64, 64, 40.0)
    for cam in cams:
        np.testing.assert_allclose(cam.K, K)
        p = cam.viewmat[:3, :3] @ np.zeros(3) + cam.viewmat[:3, 3]
        assert p[0] == pytest.approx(0, abs=1e-5) and p[1] == pytest.approx(0, abs=1e-5) and p[2] > 0.87 / np.sin(np.radians(20))
        # `up` of the object's frame is up (OpenCV -Y) in every frame.
        np.testing.assert_allclose(cam.viewmat[1, :3], -up / np.linalg.norm(up), atol=1e-5)
    # Frame 0 looks from the photo's direction: the camera sits along `toward` from the centre.
    eye0 = -cams[0].viewmat[:3, :3].T @ cams[0].viewmat[:3, 3]
    assert eye0 @ toward / np.linalg.norm(eye0) == pytest.approx(1.0, abs=1e-5)


def test_write_gif(tmp_path: Path) -> None:
    frames = [np.full((16, 20, 3), v, np.uint8) for v in (0, 128, 255)]
    path = write_gif(tmp_path / "t.gif", frames, fps=10)
    with Image.open(path) as im:
        assert im.n_frames == 3 and im.size == (20, 16)
        im.seek(2)
        assert np.asarray(im.convert("RGB"))[0, 0, 0] == 255
    assert [p.name for p in tmp_path.iterdir()] == ["t.gif"]
