"""The demo scene: files on disk, determinism, ground truth consistent with the camera model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.demo import demo_scene_dir, make_demo_scene
from pipeline.scene.camera import default_intrinsics


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_demo_scene(tmp_path_factory.mktemp("demo"))


def test_files_match_the_returned_scene(scene):
    image = np.asarray(Image.open(scene.image_path))
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    assert np.array_equal(image, scene.image)
    record = json.loads(scene.scene_json.read_text())
    assert np.allclose(record["intrinsics"], default_intrinsics(640, 480))
    assert len(record["objects"]) == len(scene.objects) == 5
    for entry, obj in zip(record["objects"], scene.objects):
        gt = np.asarray(Image.open(scene.root / entry["mask"]))
        assert gt.dtype == np.uint8 and set(np.unique(gt)) == {0, 255}
        assert np.array_equal(gt == 255, obj.mask)
        assert entry["area"] == int(obj.mask.sum())
        assert np.allclose(entry["centre_camera"], obj.centre_camera, atol=1e-5)
    # No temporary files left behind by the atomic writes.
    assert not [p for p in scene.root.rglob(".tmp-*")]


def test_objects_have_distinct_shapes_and_colours_and_do_not_touch(scene):
    from scipy import ndimage

    assert len({o.shape for o in scene.objects}) == 5
    assert len({o.colour_name for o in scene.objects}) == 5
    for i, a in enumerate(scene.objects):
        assert a.mask.sum() > 2000  # clearly visible
        gap = ndimage.distance_transform_edt(~a.mask)
        for b in scene.objects[i + 1 :]:
            assert gap[b.mask].min() > 10, (a.name, b.name)
        ys, xs = np.nonzero(a.mask)
        assert ys.min() > 20 and xs.min() > 20 and ys.max() < 460 and xs.max() < 620  # inside the frame


def test_objects_are_saturated_on_a_light_background(scene):
    background = ~np.any([o.mask for o in scene.objects], axis=0)
    assert scene.image[background].mean() > 200
    for obj in scene.objects:
        rgb = np.median(scene.image[obj.mask].astype(float), axis=0)
        assert rgb.max() - rgb.min() > 80, obj.name  # a clearly saturated colour


def test_centres_project_into_their_masks(scene):
    K = scene.intrinsics
    for obj in scene.objects:
        X, Y, Z = obj.centre_camera
        assert Z > 1.0 and 0.05 < obj.radius < 0.5
        # pytorch3d camera: +X left, +Y up, so u = cx - fx X / Z and v = cy - fy Y / Z.
        u, v = K[0, 2] - K[0, 0] * X / Z, K[1, 2] - K[1, 1] * Y / Z
        assert obj.mask[int(v), int(u)], obj.name
        # The bounding sphere's projected radius is close to the mask's size.
        r_px = K[0, 0] * obj.radius / Z
        ys, xs = np.nonzero(obj.mask)
        assert 0.4 * r_px < 0.5 * max(np.ptp(xs), np.ptp(ys)) < 1.3 * r_px, obj.name


def test_deterministic_and_seed_changes_layout(tmp_path):
    a = make_demo_scene(tmp_path / "a")
    make_demo_scene(tmp_path / "b")
    c = make_demo_scene(tmp_path / "c", seed=3)
    assert (tmp_path / "a/image.png").read_bytes() == (tmp_path / "b/image.png").read_bytes()
    assert (tmp_path / "a/scene.json").read_text() == (tmp_path / "b/scene.json").read_text()
    assert not np.array_equal(a.image, c.image)
    assert len(c.objects) == 5


def test_other_sizes_keep_the_scene(tmp_path):
    small = make_demo_scene(tmp_path, width=320, height=240)
    assert small.image.shape == (240, 320, 3)
    assert all(o.mask.shape == (240, 320) and o.mask.sum() > 400 for o in small.objects)


def test_demo_scene_dir_generates_on_demand_and_reuses(tmp_path):
    root = demo_scene_dir(tmp_path / "cache")
    assert (root / "image.png").is_file() and (root / "scene.json").is_file()
    first = (root / "image.png").stat().st_mtime_ns
    assert demo_scene_dir(tmp_path / "cache") == root
    assert (root / "image.png").stat().st_mtime_ns == first  # reused, not rewritten
    (root / "gt/2.png").unlink()
    demo_scene_dir(tmp_path / "cache")
    assert (root / "gt/2.png").is_file()  # an incomplete copy is regenerated


def test_no_bundled_copy_in_the_package():
    assert not (Path(__file__).resolve().parent.parent / "pipeline/demo/data").exists()
