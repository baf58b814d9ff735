"""Scene composition against an independent implementation (scipy's Rotation, explicit matrices)."""

from __future__ import annotations

import numpy as np
import pytest
from gaussian_factory import random_gaussians
from scipy.spatial.transform import Rotation

from pipeline.core.types import ObjectGaussians, Pose
from pipeline.scene.compose import (
    apply_pose,
    compose_scene,
    gaussian_covariances,
    matrix_to_quat,
    pose_to_matrix,
    quat_multiply,
    quat_to_matrix,
)


def random_pose(rng: np.random.Generator, uniform: bool = True) -> Pose:
    s = rng.uniform(0.2, 3.0)
    scale = np.full(3, s) if uniform else rng.uniform(0.2, 3.0, 3)
    return Pose(Rotation.random(random_state=rng).as_quat(scalar_first=True), rng.normal(size=3) * 2, scale)


def scipy_matrix(q_wxyz: np.ndarray) -> np.ndarray:
    """Column-vector rotation matrix of a w-first quaternion, computed by scipy (= pytorch3d's matrix)."""
    return Rotation.from_quat(np.asarray(q_wxyz, np.float64), scalar_first=True).as_matrix()


def test_quaternion_helpers_match_scipy() -> None:
    rng = np.random.default_rng(0)
    q = Rotation.random(50, random_state=rng).as_quat(scalar_first=True)
    np.testing.assert_allclose(quat_to_matrix(q), scipy_matrix(q), atol=1e-12)
    # Hamilton product: R(a (x) b) = R(a) R(b)
    a, b = q[:25], q[25:]
    np.testing.assert_allclose(quat_to_matrix(quat_multiply(a, b)), scipy_matrix(a) @ scipy_matrix(b), atol=1e-12)
    back = matrix_to_quat(scipy_matrix(q))
    sign = np.sign((back * q).sum(1, keepdims=True))
    np.testing.assert_allclose(back * sign, q, atol=1e-9)
    assert np.all(back[:, 0] >= 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compose_matches_independent_implementation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    objects = [ObjectGaussians(random_gaussians(n, rng, opacity=(0.05, 1.0), scale=(0.01, 0.3)), random_pose(rng), "test") for n in (17, 1, 40, 0, 9)]
    scene, object_index = compose_scene(objects)

    assert len(scene) == sum(len(o.gaussians) for o in objects)
    start = 0
    for k, obj in enumerate(objects):
        g, pose = obj.gaussians, obj.pose
        sl = slice(start, start + len(g))
        start += len(g)
        assert np.all(object_index[sl] == k)
        R = scipy_matrix(pose.rotation)  # rotates column vectors
        M = np.diag(pose.scale.astype(np.float64)) @ R  # row-vector linear map of the pose
        # Positions: the SAM 3D row-vector convention, written out with scipy's matrix.
        expected_xyz = (g.xyz.astype(np.float64) * pose.scale) @ R + pose.translation
        np.testing.assert_allclose(scene.xyz[sl], expected_xyz, rtol=1e-5, atol=1e-5)
        # Covariances must move exactly as the points do: cov_scene = M^T cov_local M.
        R_g = Rotation.from_quat(g.rotation.astype(np.float64), scalar_first=True).as_matrix() if len(g) else np.zeros((0, 3, 3))
        cov_local = R_g @ (np.square(g.scale.astype(np.float64))[:, :, None] * np.swapaxes(R_g, 1, 2))
        expected_cov = M.T @ cov_local @ M
        got_cov = gaussian_covariances(scene.take(np.arange(sl.start, sl.stop)))
        np.testing.assert_allclose(got_cov, expected_cov, rtol=1e-4, atol=1e-6)
        # Orientation and scale separately: q_pose^-1 (x) q_gauss, scales times the pose scale.
        if len(g):
            expected_rot = (Rotation.from_quat(pose.rotation, scalar_first=True).inv() * Rotation.from_quat(g.rotation, scalar_first=True))
            np.testing.assert_allclose(
                Rotation.from_quat(scene.rotation[sl], scalar_first=True).as_matrix(), expected_rot.as_matrix(), atol=1e-5
            )
            np.testing.assert_allclose(scene.scale[sl], g.scale * pose.scale[0], rtol=1e-6)
        # Colours and opacities are untouched.
        np.testing.assert_array_equal(scene.features_dc[sl], g.features_dc)
        np.testing.assert_array_equal(scene.opacity[sl], g.opacity)


def test_covariance_of_a_posed_point_cloud_transforms_like_its_points() -> None:
    """Sample points from one Gaussian, move them by the pose: their covariance is the composed Gaussian's."""
    rng = np.random.default_rng(7)
    g = random_gaussians(1, rng, opacity=(0.05, 1.0), scale=(0.01, 0.3))
    pose = random_pose(rng)
    cov = gaussian_covariances(g)[0]
    samples = rng.multivariate_normal(g.xyz[0].astype(np.float64), cov, size=200_000)
    moved = (samples * pose.scale) @ scipy_matrix(pose.rotation) + pose.translation
    posed = apply_pose(g, pose)
    np.testing.assert_allclose(np.cov(moved.T), gaussian_covariances(posed)[0], rtol=0.03, atol=1e-4 * pose.scale[0] ** 2)
    np.testing.assert_allclose(moved.mean(0), posed.xyz[0], atol=0.01 * pose.scale[0])


def test_non_uniform_pose_scale_keeps_the_exact_covariance() -> None:
    rng = np.random.default_rng(11)
    g = random_gaussians(30, rng, opacity=(0.05, 1.0), scale=(0.01, 0.3))
    pose = random_pose(rng, uniform=False)
    posed = apply_pose(g, pose)
    M = np.diag(pose.scale.astype(np.float64)) @ scipy_matrix(pose.rotation)
    np.testing.assert_allclose(gaussian_covariances(posed), M.T @ gaussian_covariances(g) @ M, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(posed.rotation, axis=1), 1.0, atol=1e-5)


def test_pose_to_matrix_is_the_column_vector_form() -> None:
    rng = np.random.default_rng(5)
    pose = random_pose(rng, uniform=False)
    p = rng.normal(size=(10, 3))
    T = pose_to_matrix(pose)
    via_matrix = (T @ np.c_[p, np.ones(10)].T).T[:, :3]
    np.testing.assert_allclose(via_matrix, (p * pose.scale) @ scipy_matrix(pose.rotation) + pose.translation, atol=1e-5)


def test_compose_of_nothing_is_empty() -> None:
    scene, index = compose_scene([])
    assert len(scene) == 0 and index.shape == (0,)
