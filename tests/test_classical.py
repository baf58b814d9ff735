"""The classical segmenter: instances on the demo scene, box refinement, big photos, labels."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.core.types import Plan, PlanItem, mask_box_xyxy
from pipeline.demo import make_demo_scene
from pipeline.masks.classical import ClassicalSegmenter


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module", params=[0, 1])
def scene(request, tmp_path_factory):
    return make_demo_scene(tmp_path_factory.mktemp("demo"), seed=request.param)


def test_finds_every_demo_object_with_iou_at_least_0_9(scene):
    found = ClassicalSegmenter().segment(scene.image, None)
    assert len(found) == len(scene.objects) == 5
    for obj in scene.objects:
        best = max(found, key=lambda m: iou(m.mask, obj.mask))
        assert iou(best.mask, obj.mask) >= 0.9, obj.name
        assert best.label == f"{obj.colour_name} object"
        assert 0.5 <= best.score <= 1.0
        assert best.source == "classical" and best.id == ""
        assert best.mask.shape == obj.mask.shape and best.mask.dtype == bool
    # One mask per object: no two results match the same object.
    matches = {max(range(5), key=lambda k: iou(m.mask, scene.objects[k].mask)) for m in found}
    assert matches == set(range(5))


def test_empty_plan_finds_objects_too(scene):
    found = ClassicalSegmenter().segment(scene.image, Plan(items=[], mode="none"))
    assert len(found) == 5


def test_boxes_from_ground_truth_refine_to_iou_at_least_0_9(scene):
    boxes = [(*mask_box_xyxy(o.mask), o.name) for o in scene.objects]
    refined = ClassicalSegmenter(boxes=boxes).segment(scene.image)
    assert len(refined) == 5
    for obj, result in zip(scene.objects, refined):
        assert iou(result.mask, obj.mask) >= 0.9, obj.name
        assert result.label == obj.name


def test_plan_boxes_refine_and_loose_boxes_still_work(scene):
    items = []
    for obj in scene.objects:
        x0, y0, x1, y1 = mask_box_xyxy(obj.mask)
        items.append(PlanItem(phrase=obj.name, box_xyxy=(x0 - 12, y0 - 12, x1 + 12, y1 + 12)))  # a loose VLM-like box
    refined = ClassicalSegmenter().segment(scene.image, Plan(items=items))
    for obj, result in zip(scene.objects, refined):
        assert iou(result.mask, obj.mask) >= 0.9, obj.name


def test_label_text_only_ever_becomes_the_label():
    image = np.full((200, 300, 3), 235, np.uint8)
    image[50:150, 60:160] = (30, 160, 60)
    hostile = "../../etc/passwd; rm -rf ~ obj_007"
    result = ClassicalSegmenter(boxes=[(40, 30, 180, 170, hostile)]).segment(image)[0]
    assert result.label == hostile
    for value in (result.id, result.prompt, result.source):
        assert "passwd" not in value and "rm" not in value and "obj_007" not in value
    assert result.prompt == "box 40,30,180,170"
    assert iou(result.mask, np.pad(np.ones((100, 100), bool), ((50, 50), (60, 140)))) > 0.95


def test_touching_objects_of_different_colours_are_split():
    image = np.full((240, 320, 3), 240, np.uint8)
    image[60:180, 60:160] = (210, 30, 30)
    image[60:180, 160:260] = (30, 60, 210)
    found = ClassicalSegmenter().segment(image)
    assert sorted(m.label for m in found) == ["blue object", "red object"]
    for m in found:
        assert 0.95 * 12000 < m.area < 1.05 * 12000


def test_one_shaded_object_is_not_split():
    image = np.full((240, 320, 3), 240, np.uint8)
    image[60:180, 60:160] = (35, 80, 215)  # lit face
    image[60:180, 160:220] = (12, 28, 75)  # the same blue in shadow
    found = ClassicalSegmenter().segment(image)
    assert len(found) == 1 and found[0].label == "blue object"


def test_holes_are_filled_and_specks_dropped():
    import cv2

    image = np.full((300, 400, 3), 240, np.uint8)
    cv2.circle(image, (200, 150), 80, (200, 40, 190), 25)  # a ring
    image[10:13, 10:13] = (0, 0, 0)  # a 9-pixel speck, below the minimum area
    found = ClassicalSegmenter().segment(image)
    assert len(found) == 1
    ring = found[0]
    assert ring.mask[150, 200]  # the hole is filled
    assert abs(ring.area - np.pi * 92.5**2) < 0.05 * np.pi * 92.5**2
    assert ring.label == "magenta object"


def test_gradient_background_with_no_objects_gives_nothing():
    ramp = np.linspace(200, 245, 320)[None, :, None]
    image = np.broadcast_to(ramp, (240, 320, 3)).astype(np.uint8)
    assert ClassicalSegmenter().segment(np.ascontiguousarray(image)) == []


def test_big_photo_is_processed_at_working_resolution_within_memory():
    import cv2

    H, W = 4500, 6000
    image = np.full((H, W, 3), 232, np.uint8)
    cv2.circle(image, (1500, 2000), 700, (200, 30, 30), -1)
    cv2.rectangle(image, (3500, 1000), (4999, 3499), (30, 60, 200), -1)
    tracemalloc.start()
    try:
        found = ClassicalSegmenter().segment(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The photo itself is 77 MiB; two full-size bool masks are 26 MiB each. A full-resolution
    # float Lab copy alone would be 309 MiB, so staying under 250 MiB shows the working copy is used.
    assert peak < 250 * 2**20, peak / 2**20
    assert sorted(m.label for m in found) == ["blue object", "red object"]
    blue = next(m for m in found if m.label == "blue object")
    assert blue.mask.shape == (H, W)
    x0, y0, x1, y1 = blue.box_xyxy
    assert abs(x0 - 3500) <= 8 and abs(y0 - 1000) <= 8 and abs(x1 - 5000) <= 8 and abs(y1 - 3500) <= 8


@pytest.mark.parametrize("box", [(10, 10, 5, 50), (1, 2, 3), ("a", 0, 10, 10)])
def test_bad_boxes_raise_input_error(box):
    with pytest.raises(InputError):
        ClassicalSegmenter(boxes=[box])


def test_box_outside_the_image_raises_input_error():
    image = np.full((50, 50, 3), 200, np.uint8)
    with pytest.raises(InputError):
        ClassicalSegmenter(boxes=[(100, 100, 120, 120)]).segment(image)


def test_non_rgb_input_is_rejected():
    with pytest.raises(InputError):
        ClassicalSegmenter().segment(np.zeros((10, 10), np.uint8))
