"""Object-local Gaussians -> the scene (camera) frame, vectorized over every Gaussian of every object.

Pose convention (SAM 3D Objects, pytorch3d row vectors):

    p_scene = (p_local * scale) @ R(q) + translation,    R(q) = pytorch3d quaternion_to_matrix(q)

In column-vector form that is p_scene = R(q)^T diag(scale) p_local + t, so the rotation acting on
column vectors is R(q)^T = R(q^-1). A Gaussian's own rotation R(q_g) acts on column vectors too
(covariance = R(q_g) S^2 R(q_g)^T), hence its scene rotation is R(q^-1) R(q_g) = R(q^-1 (x) q_g),
which is what SAM 3D's notebook `make_scene` does. With M = diag(scale) @ R(q) the covariance
(as a row-vector quadratic form) becomes M^T cov_local M: exactly how the points move.

Scale: for a uniform pose scale s the Gaussian scales are multiplied by s. For a non-uniform pose
scale no per-axis multiplication is exact (the Gaussian's axes are not aligned with the pose axes),
so those Gaussians get the exact transformed covariance re-factored into scale and rotation by an
eigen-decomposition (slower, still vectorized).
"""

from __future__ import annotations

import numpy as np

from pipeline.core.types import Gaussians, ObjectGaussians, Pose

# ---------------------------------------------------------------------------------------------
# Quaternions, w first (pytorch3d's convention)
# ---------------------------------------------------------------------------------------------


def quat_normalize(q: np.ndarray) -> np.ndarray:
    """(..., 4) -> unit quaternions; zero-length ones become the identity."""
    q = np.asarray(q, dtype=np.float64 if np.asarray(q).dtype == np.float64 else np.float32)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    identity = np.zeros_like(q)
    identity[..., 0] = 1.0
    return np.where(norm > 1e-12, q / np.maximum(norm, 1e-12), identity)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a (x) b of (..., 4) quaternions (the rotation b first, then a)."""
    aw, ax, ay, az = np.moveaxis(np.asarray(a), -1, 0)
    bw, bx, by, bz = np.moveaxis(np.asarray(b), -1, 0)
    return np.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        axis=-1,
    )


def left_product_matrix(a: np.ndarray) -> np.ndarray:
    """(..., 4, 4) matrices L(a) with L(a) @ b = a (x) b for w-first quaternions."""
    w, x, y, z = np.moveaxis(np.asarray(a), -1, 0)
    rows = (
        (w, -x, -y, -z),
        (x, w, -z, y),
        (y, z, w, -x),
        (z, -y, x, w),
    )
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def quat_invert(q: np.ndarray) -> np.ndarray:
    """Inverse of unit quaternions (the conjugate)."""
    q = np.array(q, copy=True)
    q[..., 1:] *= -1
    return q


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) w-first -> (..., 3, 3), the same matrix as pytorch3d's quaternion_to_matrix.

    It rotates column vectors (v' = R @ v). Quaternions need not be unit length.
    """
    q = np.asarray(q)
    w, x, y, z = np.moveaxis(q, -1, 0)
    two_s = 2.0 / np.maximum((q * q).sum(-1), 1e-24)
    m = np.stack(
        (
            1 - two_s * (y * y + z * z),
            two_s * (x * y - z * w),
            two_s * (x * z + y * w),
            two_s * (x * y + z * w),
            1 - two_s * (x * x + z * z),
            two_s * (y * z - x * w),
            two_s * (x * z - y * w),
            two_s * (y * z + x * w),
            1 - two_s * (x * x + y * y),
        ),
        axis=-1,
    )
    return m.reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) proper rotation matrices -> (..., 4) unit quaternions, w first, w >= 0."""
    m = np.asarray(m, dtype=np.float64)
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # Four candidate solutions; the one with the largest denominator is numerically safe.
    cand = np.stack(
        (
            np.stack((1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01), -1),
            np.stack((m21 - m12, 1 + m00 - m11 - m22, m10 + m01, m02 + m20), -1),
            np.stack((m02 - m20, m10 + m01, 1 - m00 + m11 - m22, m21 + m12), -1),
            np.stack((m10 - m01, m20 + m02, m21 + m12, 1 - m00 - m11 + m22), -1),
        ),
        -2,
    )  # (..., 4 candidates, 4)
    diag = np.stack((1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), -1)
    best = np.argmax(diag, axis=-1)
    q = np.take_along_axis(cand, best[..., None, None], axis=-2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


# ---------------------------------------------------------------------------------------------
# Poses
# ---------------------------------------------------------------------------------------------


def pose_linear(pose: Pose) -> np.ndarray:
    """(3, 3) M = diag(scale) @ R(q): p_scene = p_local @ M + t (row vectors)."""
    return (pose.scale.astype(np.float64)[:, None] * quat_to_matrix(pose.rotation.astype(np.float64))).astype(np.float64)


def pose_to_matrix(pose: Pose) -> np.ndarray:
    """(4, 4) homogeneous matrix for COLUMN vectors: [p_scene; 1] = T @ [p_local; 1].

    This is the convention of trimesh and glTF; it is the transpose of pytorch3d's
    `Transform3d.get_matrix()` for the same pose.
    """
    T = np.eye(4)
    T[:3, :3] = pose_linear(pose).T
    T[:3, 3] = pose.translation
    return T


def is_uniform_scale(scale: np.ndarray, rtol: float = 1e-5) -> bool:
    scale = np.asarray(scale, dtype=np.float64)
    return bool(np.all(np.abs(scale - scale[0]) <= rtol * np.abs(scale[0])))


def apply_pose(g: Gaussians, pose: Pose) -> Gaussians:
    """One object's Gaussians moved from its local frame into the scene frame."""
    scene, _ = compose_scene([ObjectGaussians(g, pose, source="")])
    return scene


def compose_scene(objects: list[ObjectGaussians]) -> tuple[Gaussians, np.ndarray]:
    """All objects posed into the scene frame, in one vectorized pass.

    Returns the concatenated Gaussians and `object_index` (N,) int32: which object each came from.
    """
    if not objects:
        return Gaussians.empty(), np.zeros(0, np.int32)
    counts = np.array([len(o.gaussians) for o in objects], dtype=np.int64)  # (K,)
    g = Gaussians.concatenate([o.gaussians for o in objects])
    object_index = np.repeat(np.arange(len(objects), dtype=np.int32), counts)  # (N,)

    # Per-object pose arrays (K small), expanded to per-Gaussian arrays with np.repeat: objects are
    # contiguous blocks, and repeat is a sequential copy (cheaper than a gather by object_index).
    M = np.stack([pose_linear(o.pose) for o in objects]).astype(np.float32)  # (K, 3, 3)
    t = np.stack([o.pose.translation for o in objects]).astype(np.float32)  # (K, 3)
    q_inv = quat_invert(quat_normalize(np.stack([o.pose.rotation for o in objects]).astype(np.float64)))  # (K, 4)
    s = np.stack([o.pose.scale for o in objects]).astype(np.float32)  # (K, 3)
    uniform = np.array([is_uniform_scale(o.pose.scale) for o in objects])  # (K,)

    def per_gaussian(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, counts, axis=0)

    # p @ M + t as three broadcast multiply-adds: no (N, 3, 3) array.
    xyz = per_gaussian(t)  # (N, 3)
    for row in range(3):
        xyz += g.xyz[:, row : row + 1] * per_gaussian(M[:, row, :])
    # q_pose^-1 (x) q_gauss is linear in q_gauss: q_scene = q_gauss @ L^T, L the left-product matrix of q_pose^-1.
    L = left_product_matrix(q_inv).astype(np.float32)  # (K, 4, 4)
    rotation = g.rotation[:, 0:1] * per_gaussian(L[:, :, 0])  # (N, 4)
    for col in range(1, 4):
        rotation += g.rotation[:, col : col + 1] * per_gaussian(L[:, :, col])
    rotation /= np.sqrt(np.einsum("ij,ij->i", rotation, rotation))[:, None]
    scale = g.scale * per_gaussian(s[:, :1])  # (N, 3): uniform pose scale

    if not uniform.all():
        # Exact covariance for objects with a non-uniform pose scale, re-factored by eigh.
        sel = ~per_gaussian(uniform)
        R_g = quat_to_matrix(g.rotation[sel].astype(np.float64))  # (n, 3, 3) column-vector rotations
        A = np.swapaxes(M[object_index[sel]].astype(np.float64), 1, 2)  # (n, 3, 3): M^T, column form
        L = A @ R_g * g.scale[sel].astype(np.float64)[:, None, :]  # (n, 3, 3) = A R_g S
        cov = L @ np.swapaxes(L, 1, 2)
        eigval, eigvec = np.linalg.eigh(cov)
        det = np.linalg.det(eigvec)
        eigvec[:, :, 2] *= np.sign(det)[:, None]  # a proper rotation
        scale[sel] = np.sqrt(np.maximum(eigval, 0.0)).astype(np.float32)
        rotation[sel] = matrix_to_quat(eigvec).astype(np.float32)

    return Gaussians(xyz, g.features_dc, g.opacity, scale, rotation), object_index


def gaussian_covariances(g: Gaussians) -> np.ndarray:
    """(N, 3, 3) covariances R S^2 R^T (column-vector form; symmetric, so the same as row form)."""
    R = quat_to_matrix(g.rotation.astype(np.float64))
    L = R * g.scale.astype(np.float64)[:, None, :]
    return L @ np.swapaxes(L, 1, 2)
