"""objects/<id>/gaussians.pt: plain tensors, weights_only loading, clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from pipeline.core.errors import InputError
from pipeline.core.types import Gaussians, ObjectGaussians, Pose
from pipeline.objects.gaussians_pt import FORMAT_VERSION, load_object_pt, save_object_pt


def make_object(n: int = 50, seed: int = 0) -> ObjectGaussians:
    rng = np.random.default_rng(seed)
    g = Gaussians(
        rng.normal(size=(n, 3)).astype(np.float32),
        rng.normal(size=(n, 3)).astype(np.float32),
        rng.uniform(0, 1, (n, 1)).astype(np.float32),
        rng.uniform(0.01, 0.2, (n, 3)).astype(np.float32),
        Rotation.random(n, random_state=rng).as_quat(scalar_first=True).astype(np.float32),
    )
    pose = Pose(Rotation.random(random_state=rng).as_quat(scalar_first=True), rng.normal(size=3), np.full(3, 1.7))
    return ObjectGaussians(g, pose, source="test")


def test_round_trip_and_plain_tensors(tmp_path: Path) -> None:
    obj = make_object()
    path = save_object_pt(tmp_path / "obj_001" / "gaussians.pt", obj)
    raw = torch.load(path, weights_only=True)  # loads without any of our classes
    assert set(raw) == {"xyz", "features_dc", "opacity", "scale", "rotation", "pose", "format_version", "source"}
    assert raw["format_version"] == FORMAT_VERSION and raw["source"] == "test"
    assert raw["xyz"].shape == (50, 3) and raw["opacity"].shape == (50, 1) and raw["rotation"].shape == (50, 4)
    assert raw["xyz"].dtype == torch.float32 and raw["pose"]["rotation"].shape == (4,)
    back = load_object_pt(path)
    for name in ("xyz", "features_dc", "opacity", "scale", "rotation"):
        np.testing.assert_array_equal(getattr(back.gaussians, name), getattr(obj.gaussians, name))
    for name in ("rotation", "translation", "scale"):
        np.testing.assert_array_equal(getattr(back.pose, name), getattr(obj.pose, name))
    assert back.source == "test"
    assert [p.name for p in path.parent.iterdir()] == ["gaussians.pt"]  # atomic: no temporaries left


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    path = save_object_pt(tmp_path / "g.pt", make_object())
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_object_pt(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"hello")
    with pytest.raises(InputError, match="not a readable"):
        load_object_pt(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_object_pt(tmp_path / "nope.pt")


def test_missing_keys_and_bad_shapes(tmp_path: Path) -> None:
    raw = torch.load(save_object_pt(tmp_path / "g.pt", make_object()), weights_only=True)
    broken = dict(raw)
    del broken["scale"]
    torch.save(broken, tmp_path / "nokey.pt")
    with pytest.raises(InputError, match="lacks keys"):
        load_object_pt(tmp_path / "nokey.pt")
    broken = dict(raw, rotation=raw["rotation"][:, :3])
    torch.save(broken, tmp_path / "shape.pt")
    with pytest.raises(InputError, match="rotation"):
        load_object_pt(tmp_path / "shape.pt")
    broken = dict(raw, pose={"rotation": raw["pose"]["rotation"]})
    torch.save(broken, tmp_path / "pose.pt")
    with pytest.raises(InputError, match="pose"):
        load_object_pt(tmp_path / "pose.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="not a gaussians.pt dict"):
        load_object_pt(tmp_path / "list.pt")


def test_accepts_sam3d_style_features_dc(tmp_path: Path) -> None:
    raw = torch.load(save_object_pt(tmp_path / "g.pt", make_object(10)), weights_only=True)
    raw["features_dc"] = raw["features_dc"][:, None, :]  # (N, 1, 3) as SAM 3D keeps it
    torch.save(raw, tmp_path / "n13.pt")
    assert load_object_pt(tmp_path / "n13.pt").gaussians.features_dc.shape == (10, 3)
