"""3DGS .ply writer and reader: round trips, layout, foreign files, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gaussian_factory import random_gaussians
from plyfile import PlyData, PlyElement

from pipeline.core.errors import InputError
from pipeline.core.types import Gaussians
from pipeline.scene.ply import PLY_PROPERTIES, read_splat_ply, write_splat_ply


def assert_close(a: Gaussians, b: Gaussians) -> None:
    np.testing.assert_allclose(a.xyz, b.xyz, rtol=1e-6)
    np.testing.assert_allclose(a.features_dc, b.features_dc, rtol=1e-6)
    np.testing.assert_allclose(a.opacity, b.opacity, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-5)
    np.testing.assert_allclose(a.rotation, b.rotation, atol=1e-6)


def test_round_trip(tmp_path: Path) -> None:
    g = random_gaussians(500)
    info = write_splat_ply(tmp_path / "a.ply", g)
    assert info == {"written": 500, "dropped_nonfinite": 0}
    assert_close(read_splat_ply(tmp_path / "a.ply"), g)


def test_layout_is_standard_3dgs_as_plyfile_reads_it(tmp_path: Path) -> None:
    g = random_gaussians(20, 1)
    write_splat_ply(tmp_path / "a.ply", g)
    ply = PlyData.read(str(tmp_path / "a.ply"))
    assert ply.byte_order == "<" and not ply.text
    vertex = ply["vertex"]
    assert tuple(p.name for p in vertex.properties) == PLY_PROPERTIES
    assert all(vertex.data.dtype[name] == np.dtype("<f4") for name in PLY_PROPERTIES)
    # Opacity as a logit, scales as logs, rotation w first, normals zero.
    np.testing.assert_allclose(1 / (1 + np.exp(-vertex["opacity"])), g.opacity[:, 0], rtol=1e-5)
    np.testing.assert_allclose(np.exp(vertex["scale_1"]), g.scale[:, 1], rtol=1e-5)
    np.testing.assert_allclose(vertex["rot_0"], g.rotation[:, 0])
    assert np.all(vertex["nx"] == 0)
    assert (tmp_path / "a.ply").stat().st_size == len(ply.header) + 1 + 20 * 17 * 4


def test_nonfinite_rows_dropped_and_counted(tmp_path: Path) -> None:
    g = random_gaussians(10)
    g.xyz[2, 0] = np.nan
    g.scale[5, 1] = 0.0  # log(0) = -inf
    g.features_dc[7, 2] = np.inf
    info = write_splat_ply(tmp_path / "a.ply", g)
    assert info == {"written": 7, "dropped_nonfinite": 3}
    back = read_splat_ply(tmp_path / "a.ply")
    keep = np.setdiff1d(np.arange(10), [2, 5, 7])
    assert_close(back, g.take(keep))


def test_opacity_one_and_zero_survive(tmp_path: Path) -> None:
    g = random_gaussians(2)
    g.opacity[:, 0] = [0.0, 1.0]
    assert write_splat_ply(tmp_path / "a.ply", g)["dropped_nonfinite"] == 0
    np.testing.assert_allclose(read_splat_ply(tmp_path / "a.ply").opacity[:, 0], [0.0, 1.0], atol=1e-6)


def test_reads_foreign_file_with_extra_properties_and_other_order(tmp_path: Path) -> None:
    g = random_gaussians(30, 3)
    names = ["rot_3", "rot_2", "rot_1", "rot_0", "x", "y", "z", "opacity"] + [f"f_rest_{i}" for i in range(9)]
    names += ["scale_0", "scale_1", "scale_2", "f_dc_0", "f_dc_1", "f_dc_2", "red"]
    dtype = [(n, "f8" if n == "x" else ("u1" if n == "red" else "f4")) for n in names]
    rows = np.zeros(30, dtype=dtype)
    for i, c in enumerate("xyz"):
        rows[c] = g.xyz[:, i]
    for i in range(3):
        rows[f"f_dc_{i}"] = g.features_dc[:, i]
        rows[f"scale_{i}"] = np.log(g.scale[:, i])
    for i in range(4):
        rows[f"rot_{i}"] = g.rotation[:, i] * 3.0  # unnormalized, as trained files often are
    rows["opacity"] = np.log(g.opacity[:, 0] / (1 - g.opacity[:, 0]))
    rows["red"] = 200
    PlyData([PlyElement.describe(rows, "vertex"), PlyElement.describe(np.zeros(2, [("a", "i4")]), "extra")], byte_order=">").write(
        str(tmp_path / "foreign.ply")
    )
    assert_close(read_splat_ply(tmp_path / "foreign.ply"), g)
    PlyData([PlyElement.describe(rows[:5], "vertex")], text=True).write(str(tmp_path / "ascii.ply"))
    assert_close(read_splat_ply(tmp_path / "ascii.ply"), g.take(np.arange(5)))


def test_bad_files_raise_input_error(tmp_path: Path) -> None:
    write_splat_ply(tmp_path / "a.ply", random_gaussians(100))
    data = (tmp_path / "a.ply").read_bytes()
    (tmp_path / "trunc.ply").write_bytes(data[: len(data) - 10])
    with pytest.raises(InputError, match="truncated"):
        read_splat_ply(tmp_path / "trunc.ply")
    (tmp_path / "junk.ply").write_bytes(b"not a ply at all")
    with pytest.raises(InputError, match="not a PLY"):
        read_splat_ply(tmp_path / "junk.ply")
    PlyData([PlyElement.describe(np.zeros(3, [("x", "f4"), ("y", "f4"), ("z", "f4")]), "vertex")]).write(str(tmp_path / "points.ply"))
    with pytest.raises(InputError, match="lacks Gaussian properties"):
        read_splat_ply(tmp_path / "points.ply")
    with pytest.raises(InputError, match="not found"):
        read_splat_ply(tmp_path / "missing.ply")


def test_write_is_atomic_and_empty_is_fine(tmp_path: Path) -> None:
    info = write_splat_ply(tmp_path / "e.ply", Gaussians.empty())
    assert info["written"] == 0
    assert len(read_splat_ply(tmp_path / "e.ply")) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["e.ply"]  # no temporary left behind


def test_multi_chunk_write_drops_nonfinite_rows_and_fixes_the_count(tmp_path: Path) -> None:
    """Rows dropped in a later chunk: the zero-padded count in the header is rewritten in place."""
    from pipeline.scene.ply import PLY_CHUNK

    n = 2 * PLY_CHUNK + 5
    g = random_gaussians(n, 3)
    bad = np.array([PLY_CHUNK + 7, 2 * PLY_CHUNK + 1])
    g.xyz[bad[0], 1] = np.nan
    g.scale[bad[1], 0] = 0.0  # log(0) = -inf
    info = write_splat_ply(tmp_path / "c.ply", g)
    assert info == {"written": n - 2, "dropped_nonfinite": 2}
    back = read_splat_ply(tmp_path / "c.ply")
    keep = np.setdiff1d(np.arange(n), bad)
    assert len(back) == n - 2
    np.testing.assert_allclose(back.xyz, g.xyz[keep], rtol=0, atol=0)
    np.testing.assert_allclose(back.opacity, g.opacity[keep], rtol=1e-5)
