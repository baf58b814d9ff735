"""find_masks reads our run folders, masks/ folders, SAM 3D Objects' flat folders and the reference's nested layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.core.types import ObjectMask
from pipeline.masks.layouts import find_masks, sanitize_label
from pipeline.masks.store import write_masks

H, W = 40, 50


def _photo() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)  # colourful: must never be taken for a mask


def _rect(i: int) -> np.ndarray:
    """A distinct rectangle per index, so the order of masks can be checked."""
    m = np.zeros((H, W), bool)
    m[2 + i : 6 + i, 3 * i : 3 * i + 4] = True
    return m


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def _which(masks: list[ObjectMask]) -> list[int]:
    """Recover the rectangle index of each mask."""
    out = []
    for m in masks:
        matches = [i for i in range(12) if (m.mask == _rect(i)).all()]
        assert len(matches) == 1
        out.append(matches[0])
    return out


def test_run_folder_and_masks_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    objs = [ObjectMask(_rect(i), label=f"thing {i}") for i in range(3)]
    write_masks(run / "masks", _photo(), objs)
    found = find_masks(run, (W, H))
    assert found.layout == "run"
    assert [m.id for m in found.masks] == ["obj_001", "obj_002", "obj_003"]
    assert _which(found.masks) == [0, 1, 2]
    assert found.sources == ["masks/obj_001.png", "masks/obj_002.png", "masks/obj_003.png"]
    assert [m.label for m in found.masks] == ["thing 0", "thing 1", "thing 2"]

    direct = find_masks(run / "masks", (W, H))
    assert direct.layout == "masks_json" and _which(direct.masks) == [0, 1, 2]
    assert find_masks(run / "masks" / "masks.json", (W, H)).layout == "masks_json"

    with pytest.raises(InputError, match=r"50x40 but the image is 60x40"):
        find_masks(run, (60, H))


def test_flat_rgba_alpha_like_sam3d_examples(tmp_path: Path) -> None:
    photo = _photo()
    _save(tmp_path / "image.png", photo)
    for i in range(3):
        rgba = np.dstack([photo, _rect(i).astype(np.uint8) * 255])  # the photo with the mask as alpha
        _save(tmp_path / f"{i}.png", rgba, "RGBA")
    (tmp_path / "notes.txt").write_text("not a mask")
    (tmp_path / "cam_K.txt").write_text("1 0 0")
    found = find_masks(tmp_path, (W, H))
    assert found.layout == "flat"
    assert found.sources == ["0.png", "1.png", "2.png"]  # image.png and text files ignored
    assert _which(found.masks) == [0, 1, 2]
    assert [m.id for m in found.masks] == ["obj_001", "obj_002", "obj_003"]
    assert [m.label for m in found.masks] == ["0", "1", "2"]


def test_flat_natural_sort_and_mask_encodings(tmp_path: Path) -> None:
    # 2 must come before 10; each file uses a different encoding of the same kind of mask.
    _save(tmp_path / "10.png", _rect(10).astype(np.uint8) * 255)  # 8-bit gray 0/255
    _save(tmp_path / "2.png", _rect(2))  # 1-bit
    _save(tmp_path / "1.png", _rect(1).astype(np.uint16) * 65535)  # 16-bit gray
    _save(tmp_path / "3.png", _rect(3).astype(np.uint8))  # 8-bit gray 0/1
    la = np.dstack([np.full((H, W), 128, np.uint8), _rect(4).astype(np.uint8) * 255])
    _save(tmp_path / "4.png", la, "LA")  # gray + alpha
    found = find_masks(tmp_path, (W, H))
    assert found.sources == ["1.png", "2.png", "3.png", "4.png", "10.png"]
    assert _which(found.masks) == [1, 2, 3, 4, 10]
    with Image.open(tmp_path / "1.png") as im:
        assert im.mode.startswith("I")  # the 16-bit file really is 16-bit


def test_flat_skips_the_photo_under_another_name(tmp_path: Path) -> None:
    _save(tmp_path / "kitchen.png", _photo())
    _save(tmp_path / "0.png", _rect(0).astype(np.uint8) * 255)
    found = find_masks(tmp_path, (W, H))
    assert found.sources == ["0.png"]
    assert found.skipped == [{"file": "kitchen.png", "reason": "a colour image, not a mask"}]
    # ... and `exclude` drops a named file outright
    excluded = find_masks(tmp_path, (W, H), exclude=[tmp_path / "kitchen.png"])
    assert excluded.skipped == []


def test_empty_masks_are_skipped_and_recorded(tmp_path: Path) -> None:
    _save(tmp_path / "0.png", _rect(0).astype(np.uint8) * 255)
    _save(tmp_path / "1.png", np.zeros((H, W), np.uint8))
    _save(tmp_path / "2.png", _rect(2).astype(np.uint8) * 255)
    found = find_masks(tmp_path, (W, H))
    assert [m.id for m in found.masks] == ["obj_001", "obj_002"]
    assert _which(found.masks) == [0, 2]
    assert found.sources == ["0.png", "2.png"]
    assert found.skipped == [{"file": "1.png", "reason": "empty mask"}]


def test_all_empty_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "0.png", np.zeros((H, W), np.uint8))
    with pytest.raises(InputError, match="empty mask"):
        find_masks(tmp_path, (W, H))


def test_reference_nested_layout(tmp_path: Path) -> None:
    masks = tmp_path / "ref_run" / "masks"
    layout = {
        "obj_10/wooden_chair.json/mask_0.png": 5,
        "obj_2/red_cup/mask_10.png": 2,
        "obj_2/red_cup/mask_2.png": 1,
        "obj_1/table\x07 top/mask_0.png": 0,
    }
    for rel, i in layout.items():
        _save(masks / rel, _rect(i).astype(np.uint8) * 255)
    (masks / "obj_1" / "table\x07 top" / "result.json").write_text("{}")
    for root in (tmp_path / "ref_run", masks):  # the run folder or its masks/ folder
        found = find_masks(root, (W, H))
        assert found.layout == "reference"
        assert _which(found.masks) == [0, 1, 2, 5]  # obj_1, obj_2/mask_2, obj_2/mask_10, obj_10
        assert [m.label for m in found.masks] == ["table top", "red cup", "red cup", "wooden chair"]
        assert [m.id for m in found.masks] == ["obj_001", "obj_002", "obj_003", "obj_004"]
    assert found.sources[0] == "obj_1/table\x07 top/mask_0.png"


def test_wrong_size_names_the_file_and_both_sizes(tmp_path: Path) -> None:
    _save(tmp_path / "0.png", _rect(0).astype(np.uint8) * 255)
    _save(tmp_path / "1.png", np.zeros((H * 2, W * 2), np.uint8))
    with pytest.raises(InputError) as info:
        find_masks(tmp_path, (W, H))
    message = str(info.value)
    assert "1.png" in message and "100x80" in message and "50x40" in message
    assert "resize" in message and "\n" not in message


def test_unreadable_mask(tmp_path: Path) -> None:
    (tmp_path / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="0.png"):
        find_masks(tmp_path, (W, H))


def test_no_masks_found_says_what_was_tried(tmp_path: Path) -> None:
    _save(tmp_path / "image.png", _photo())
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(InputError) as info:
        find_masks(tmp_path, (W, H))
    message = str(info.value)
    assert "No masks found" in message and "masks.json" in message and "mask_" in message and "0.png" in message
    with pytest.raises(InputError, match="does not exist"):
        find_masks(tmp_path / "missing", (W, H))


def test_sanitize_label() -> None:
    assert sanitize_label("red_chair.json") == "red chair"
    assert sanitize_label("a\x00b\nc") == "ab c"
    assert len(sanitize_label("x" * 500)) == 64
    assert sanitize_label("___") == "object"


def test_run_folder_without_masks_says_so(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    _save(tmp_path / "input" / "image.png", _photo())
    _save(tmp_path / "objects" / "obj_001" / "render.png", _rect(0).astype(np.uint8) * 255)
    with pytest.raises(InputError, match="no masks yet"):
        find_masks(tmp_path, (W, H))
