"""`export`: everything derived from objects/*/gaussians.pt, on CPU, on a tiny synthetic run folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from pipeline.core.config import ExportConfig
from pipeline.core.types import Gaussians, ObjectGaussians, Pose, rgb_to_sh0
from pipeline.objects.gaussians_pt import save_object_pt
from pipeline.scene.compose import compose_scene
from pipeline.scene.export import export_run
from pipeline.scene.ply import read_splat_ply
from pipeline.scene.render_cpu import render
from pipeline.scene.splat import read_splat
from pipeline.scene.turntable import scene_orbit_cameras


def blob(rng: np.random.Generator, n: int, rgb: tuple[float, float, float]) -> Gaussians:
    d = rng.normal(size=(n, 3))
    xyz = 0.5 * d / np.linalg.norm(d, axis=1, keepdims=True)
    return Gaussians(
        xyz.astype(np.float32),
        np.tile(rgb_to_sh0(np.array([rgb])), (n, 1)),
        np.full((n, 1), 0.9, np.float32),
        np.full((n, 3), 0.06, np.float32),
        Rotation.random(n, random_state=rng).as_quat(scalar_first=True).astype(np.float32),
    )


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    (run / "input").mkdir(parents=True)
    Image.new("RGB", (80, 60), "white").save(run / "input" / "image.png")
    colours = [(1.0, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 1.0)]
    for i, rgb in enumerate(colours):
        pose = Pose(
            Rotation.random(random_state=rng).as_quat(scalar_first=True),
            [0.6 * (i - 1), rng.uniform(-0.2, 0.2), rng.uniform(2.5, 3.5)],
            np.full(3, rng.uniform(0.3, 0.6)),
        )
        save_object_pt(run / "objects" / f"obj_00{i + 1}" / "gaussians.pt", ObjectGaussians(blob(rng, 200 + 50 * i, rgb), pose, "test"))
    (run / "objects" / "obj_004").mkdir()
    (run / "objects" / "obj_004" / "gaussians.pt").write_bytes(b"PK\x03\x04 truncated")
    (run / "objects" / "obj_005").mkdir()  # failed object: no gaussians.pt at all
    return run


def small_cfg(**kw) -> ExportConfig:
    return ExportConfig(renderer="cpu", gif_frames=3, gif_size=48, scene_gif_size=64, **kw)


def test_export_writes_every_file(run_dir: Path) -> None:
    summary = export_run(run_dir, small_cfg(), progress=False)
    objs = summary["objects"]
    assert summary["renderer"] == "cpu"
    assert objs["obj_001"]["n_gaussians"] == 200 and objs["obj_003"]["n_gaussians"] == 300
    assert "truncated or corrupt" in objs["obj_004"]["error"]
    assert "skipped" in objs["obj_005"]
    for oid in ("obj_001", "obj_002", "obj_003"):
        d = run_dir / "objects" / oid
        assert objs[oid]["files"] == [f"objects/{oid}/object.ply", f"objects/{oid}/object.splat", f"objects/{oid}/turntable.gif"]
        with Image.open(d / "turntable.gif") as im:
            assert im.n_frames == 3 and im.size == (48, 48)
    assert summary["scene"]["files"] == ["scene/scene.ply", "scene/scene.splat", "scene/scene.gif"]
    assert summary["scene"]["n_gaussians"] == 750 and summary["scene"]["objects"] == ["obj_001", "obj_002", "obj_003"]
    with Image.open(run_dir / "scene" / "scene.gif") as im:
        assert im.n_frames == 3 and im.size == (64, 48)  # the photo's 4:3 aspect
    assert summary["seconds"]["total"] >= summary["seconds"]["scene"] >= 0
    assert not list(run_dir.rglob(".tmp-*"))


def test_object_ply_is_local_and_scene_ply_is_posed(run_dir: Path) -> None:
    from pipeline.objects.gaussians_pt import load_object_pt

    export_run(run_dir, small_cfg(turntable=False), progress=False)
    objects = [load_object_pt(run_dir / "objects" / f"obj_00{i}" / "gaussians.pt") for i in (1, 2, 3)]
    local = read_splat_ply(run_dir / "objects" / "obj_002" / "object.ply")
    np.testing.assert_allclose(local.xyz, objects[1].gaussians.xyz, atol=1e-6)
    expected, _ = compose_scene(objects)
    scene = read_splat_ply(run_dir / "scene" / "scene.ply")
    np.testing.assert_allclose(scene.xyz, expected.xyz, atol=1e-5)
    np.testing.assert_allclose(scene.scale, expected.scale, rtol=1e-5)
    assert len(read_splat(run_dir / "scene" / "scene.splat")) == 750
    assert not (run_dir / "scene" / "scene.gif").exists()


def test_scene_gif_first_frame_is_the_photo_view(run_dir: Path) -> None:
    export_run(run_dir, small_cfg(), progress=False)
    scene = read_splat_ply(run_dir / "scene" / "scene.ply")
    direct = render(scene, scene_orbit_cameras(np.zeros(3), 1, 64, 48)[0]).astype(float)  # frame 0 = photo camera
    with Image.open(run_dir / "scene" / "scene.gif") as im:
        frame0 = np.asarray(im.convert("RGB"), dtype=float)
    assert np.abs(frame0 - direct).mean() < 4.0  # GIF palette quantization only
    # The three objects are where their poses put them: red (pose x < 0 is right in the photo), blue left.
    red = np.argwhere((frame0[..., 0] > 150) & (frame0[..., 1] < 100))
    blue = np.argwhere((frame0[..., 2] > 150) & (frame0[..., 0] < 100))
    assert len(red) and len(blue) and red[:, 1].mean() > blue[:, 1].mean()


def test_scene_glb_composes_meshes_with_their_poses(run_dir: Path) -> None:
    trimesh = pytest.importorskip("trimesh")
    from pipeline.objects.gaussians_pt import load_object_pt

    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    (run_dir / "objects" / "obj_001" / "mesh.glb").write_bytes(box.export(file_type="glb"))
    summary = export_run(run_dir, small_cfg(turntable=False), progress=False)
    assert "scene/scene.glb" in summary["scene"]["files"]
    loaded = trimesh.load(run_dir / "scene" / "scene.glb", force="mesh")
    pose = load_object_pt(run_dir / "objects" / "obj_001" / "gaussians.pt").pose
    R = Rotation.from_quat(pose.rotation, scalar_first=True).as_matrix()
    expected = (np.asarray(box.vertices) * pose.scale) @ R + pose.translation
    np.testing.assert_allclose(np.sort(loaded.vertices, axis=0), np.sort(np.unique(expected, axis=0), axis=0), atol=1e-5)


def test_missing_objects_folder_is_an_input_error(tmp_path: Path) -> None:
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="run stage 2 first"):
        export_run(tmp_path, small_cfg(), progress=False)


def test_nonfinite_gaussians_do_not_blank_the_scene_gif(tmp_path: Path) -> None:
    """One NaN position among thousands: dropped once, counted, and the scene still renders."""
    from PIL import Image

    from pipeline.core.config import ExportConfig
    from pipeline.core.types import Gaussians, ObjectGaussians, Pose, rgb_to_sh0
    from pipeline.objects.gaussians_pt import save_object_pt
    from pipeline.scene.export import export_run

    rng = np.random.default_rng(0)
    n = 2000
    xyz = rng.normal(scale=0.3, size=(n, 3)).astype(np.float32)
    xyz[5] = np.nan
    g = Gaussians(xyz, rgb_to_sh0(np.tile([[0.9, 0.1, 0.1]], (n, 1))), np.full((n, 1), 0.9, np.float32),
                  np.full((n, 3), 0.03, np.float32), np.tile(np.float32([[1, 0, 0, 0]]), (n, 1)))
    run = tmp_path / "run"
    save_object_pt(run / "objects/obj_001/gaussians.pt", ObjectGaussians(g, Pose(translation=[0, 0, 3]), "test"))
    summary = export_run(run, ExportConfig(gif_frames=2, gif_size=64, scene_gif_size=96), progress=False)
    assert summary["objects"]["obj_001"]["dropped_nonfinite"] == 1
    frame = np.asarray(Image.open(run / "scene/scene.gif").convert("RGB"))
    red = (frame[..., 0] > 150) & (frame[..., 1] < 100)
    assert red.sum() > 50, "the scene GIF lost the object"
