"""The inflate lifter: closed shapes, photo colours, exact placement, the ground-plane depth heuristic."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.core.types import ObjectMask, sh0_to_rgb
from pipeline.demo import make_demo_scene
from pipeline.demo.scene import DEMO_CAMERA_HEIGHT_M, DEMO_CAMERA_TILT_DEG
from pipeline.objects.inflate import DEFAULT_CAMERA_HEIGHT_M, DEFAULT_CAMERA_TILT_DEG, InflateLifter

DEPTH_TOLERANCE = 0.10  # relative error allowed on the demo's true centre depths (documented in inflate.py)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_demo_scene(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def lifted(scene):
    lifter = InflateLifter()
    context = lifter.prepare(scene.image)
    return lifter, context, [lifter.lift(context, ObjectMask(o.mask, o.name), seed=0) for o in scene.objects]


def posed_points(result) -> np.ndarray:
    """p_scene = (p_local * scale) @ R(q) + t with R = identity (the inflate lifter's rotation)."""
    assert np.allclose(result.pose.rotation, [1, 0, 0, 0])
    return result.gaussians.xyz * result.pose.scale + result.pose.translation


def project(points: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pytorch3d camera (+X left, +Y up, +Z forward) -> continuous pixel coordinates."""
    return K[0, 2] - K[0, 0] * points[:, 0] / points[:, 2], K[1, 2] - K[1, 1] * points[:, 1] / points[:, 2]


def test_output_form_and_budget(lifted):
    lifter, _, results = lifted
    for result in results:
        g = result.gaussians
        assert result.source == "inflate"
        assert 0.9 * 6000 <= len(g) <= 1.1 * 6000
        assert np.isfinite(g.xyz).all() and np.isfinite(g.scale).all()
        assert (g.scale > 0).all() and np.allclose(g.opacity, 0.9)
        assert np.allclose(np.linalg.norm(g.rotation, axis=1), 1.0, atol=1e-5)
        # Object-local frame: centred near the origin, largest extent 1.
        assert np.ptp(g.xyz, axis=0).max() == pytest.approx(1.0, abs=1e-5)
        assert np.abs(g.xyz.mean(axis=0)).max() < 0.05
        assert np.allclose(result.pose.scale, result.pose.scale[0])


def test_shape_is_closed_front_and_back_meet_at_the_rim(lifted):
    _, _, results = lifted
    for result in results:
        z = result.gaussians.xyz[:, 2]
        front, back = z < -1e-6, z > 1e-6
        assert abs(front.sum() - back.sum()) <= 0.02 * len(z)  # mirrored halves
        assert np.allclose(np.sort(z[front]), -np.sort(z[back])[::-1], atol=1e-5)
        # The rim (z = 0) exists and the samples next to it are thin: the halves meet there.
        rim = np.abs(z) <= 1e-6
        assert rim.sum() > 50
        xy = result.gaussians.xyz[:, :2]
        radius = np.linalg.norm(xy - xy.mean(axis=0), axis=1)
        outer = radius > np.quantile(radius, 0.97)
        assert np.abs(z[outer]).mean() < 0.5 * np.abs(z).max()
        # Rim Gaussians reach far enough along the view axis to close the wall between the halves.
        first_ring = np.sort(np.abs(z[~rim]))[: max(10, rim.sum() // 4)].mean()
        wall_extent = 2.0 * result.gaussians.scale[rim].max(axis=1).mean()
        assert wall_extent >= 0.5 * first_ring


def test_colours_come_from_the_photo(scene, lifted):
    _, context, results = lifted
    K = context.intrinsics
    for obj, result in zip(scene.objects, results):
        rgb = sh0_to_rgb(result.gaussians.features_dc)
        expected = np.median(scene.image[obj.mask].astype(np.float32) / 255.0, axis=0)
        assert np.abs(np.median(rgb, axis=0) - expected).max() < 0.06, obj.name
        # Per Gaussian: its colour is the photo's colour near its own pixel.
        u, v = project(posed_points(result), K)
        pixel = scene.image[v.astype(int).clip(0, 479), u.astype(int).clip(0, 639)].astype(np.float32) / 255.0
        assert np.median(np.abs(rgb - pixel).max(axis=1)) < 0.05, obj.name


def test_posed_points_reproject_inside_the_mask_and_centre_onto_the_centroid(scene, lifted):
    _, context, results = lifted
    K = context.intrinsics
    for obj, result in zip(scene.objects, results):
        u, v = project(posed_points(result), K)
        inside = obj.mask[v.astype(int).clip(0, 479), u.astype(int).clip(0, 639)]
        assert inside.mean() > 0.98, obj.name
        ys, xs = np.nonzero(obj.mask)
        cu, cv = project(result.pose.translation[None].astype(np.float64), K)
        assert cu[0] == pytest.approx(xs.mean() + 0.5, abs=0.05)
        assert cv[0] == pytest.approx(ys.mean() + 0.5, abs=0.05)


def test_depth_heuristic_recovers_demo_depths_within_tolerance_and_order(scene, lifted):
    assert (DEFAULT_CAMERA_HEIGHT_M, DEFAULT_CAMERA_TILT_DEG) == (DEMO_CAMERA_HEIGHT_M, DEMO_CAMERA_TILT_DEG)
    lifter, context, results = lifted
    true_depth = np.array([o.centre_camera[2] for o in scene.objects])
    estimated = np.array([r.pose.translation[2] for r in results])
    for obj in scene.objects:
        assert lifter.estimate_depth(obj.mask, context.intrinsics).method == "ground-plane"
    assert np.all(np.abs(estimated / true_depth - 1.0) < DEPTH_TOLERANCE), estimated / true_depth
    assert list(np.argsort(estimated)) == list(np.argsort(true_depth))
    # Metric size follows: the posed object is about as large as the true one.
    for obj, result in zip(scene.objects, results):
        extent = float(result.pose.scale[0])
        assert 0.6 * obj.radius < extent < 2.2 * obj.radius, obj.name
        assert np.linalg.norm(result.pose.translation - obj.centre_camera) < 0.25, obj.name


def test_size_prior_when_the_base_is_above_the_horizon():
    lifter = InflateLifter()
    image = np.full((480, 640, 3), 200, np.uint8)
    context = lifter.prepare(image)
    mask = np.zeros((480, 640), bool)
    mask[0:10, 300:340] = True  # bottom edge above the horizon (row ~16 for a 20 degree tilt)
    estimate = lifter.estimate_depth(mask, context.intrinsics)
    assert estimate.method == "size-prior"
    f = float(context.intrinsics[0, 0])
    assert estimate.depth == pytest.approx(f * 0.3 / 40, rel=1e-6)


def test_deterministic_given_seed_and_seed_moves_the_grid(scene):
    lifter = InflateLifter(n_gaussians=2000)
    context = lifter.prepare(scene.image)
    obj = ObjectMask(scene.objects[0].mask, "x")
    a, b, c = (lifter.lift(context, obj, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.gaussians.xyz, b.gaussians.xyz) and np.array_equal(a.gaussians.rotation, b.gaussians.rotation)
    assert not np.array_equal(a.gaussians.xyz[: len(c.gaussians)], c.gaussians.xyz[: len(a.gaussians)])
    assert np.allclose(a.pose.translation, c.pose.translation)  # placement does not depend on the seed


def test_small_and_large_masks():
    lifter = InflateLifter(n_gaussians=3000)
    image = np.full((4500, 6000, 3), 220, np.uint8)
    context = lifter.prepare(image)
    big = np.zeros((4500, 6000), bool)
    big[1500:4300, 2000:4400] = True
    tiny = np.zeros((4500, 6000), bool)
    tiny[4000:4003, 100:104] = True
    for mask in (big, tiny):
        result = lifter.lift(context, ObjectMask(mask, "x"), seed=0)
        assert 0.8 * 3000 <= len(result.gaussians) <= 1.2 * 3000
        assert np.isfinite(result.gaussians.xyz).all() and np.isfinite(result.pose.translation).all()


def test_bad_masks_raise_input_error(scene):
    lifter = InflateLifter()
    context = lifter.prepare(scene.image)
    with pytest.raises(InputError):
        lifter.lift(context, ObjectMask(np.zeros((480, 640), bool), "x"), seed=0)
    with pytest.raises(InputError):
        lifter.lift(context, ObjectMask(np.ones((10, 10), bool), "x"), seed=0)
