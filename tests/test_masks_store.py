"""masks/ folder: write/read round trip, atomic replacement, ids from a counter only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.masks.store as store
from pipeline.core.errors import InputError
from pipeline.core.types import ObjectMask
from pipeline.masks.rle import rle_decode
from pipeline.masks.store import read_masks, write_masks

H, W = 48, 64


def _photo() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return np.stack([xx * 4, yy * 5, np.full_like(xx, 100)], axis=-1).astype(np.uint8)


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def _masks() -> list[ObjectMask]:
    return [
        ObjectMask(_disc(15, 15, 8), label="red cup", prompt="a red cup", score=0.93, source="test"),
        ObjectMask(np.zeros((H, W), bool), label="ghost", prompt="nothing", score=0.2, source="test"),
        ObjectMask(_disc(45, 30, 10), label="../evil/../../x", prompt="p", score=float("nan"), source="test"),
    ]


def test_round_trip(tmp_path: Path) -> None:
    masks_dir = tmp_path / "run" / "masks"
    written = write_masks(masks_dir, _photo(), _masks(), meta={"segmenter": "test"}, image_sha256="ab" * 32)
    assert [m.id for m in written] == ["obj_001", "obj_002"]  # the empty mask is skipped, ids stay contiguous
    assert [m.label for m in written] == ["red cup", "../evil/../../x"]
    assert sorted(p.name for p in masks_dir.iterdir()) == ["masks.json", "obj_001.png", "obj_002.png", "overlay.png"]
    assert not [p for p in masks_dir.parent.iterdir() if p.name.startswith(".tmp-")]

    doc = json.loads((masks_dir / "masks.json").read_text())
    assert doc["format_version"] == 1
    assert doc["image"] == {"width": W, "height": H, "sha256": "ab" * 32}
    assert doc["meta"]["segmenter"] == "test"
    assert doc["meta"]["skipped"] == [{"index": 1, "label": "ghost", "prompt": "nothing", "source": "test", "reason": "empty mask"}]
    first, second = doc["objects"]
    assert first["id"] == "obj_001" and first["mask"] == "obj_001.png"
    assert first["score"] == pytest.approx(0.93)
    assert second["score"] is None  # NaN is not valid JSON
    assert first["area"] == int(_disc(15, 15, 8).sum())
    assert first["box_xyxy"] == [8.0, 8.0, 23.0, 23.0]
    assert (rle_decode(first["rle"]) == _disc(15, 15, 8)).all()

    with Image.open(masks_dir / "obj_001.png") as im:
        assert im.mode == "L" and im.size == (W, H)
        values = np.asarray(im)
    assert set(np.unique(values).tolist()) == {0, 255}
    with Image.open(masks_dir / "overlay.png") as im:
        assert im.mode == "RGB" and im.size == (W, H)
        overlay = np.asarray(im)
    assert (overlay[0, 0] == _photo()[0, 0]).all()  # outside every mask: the photo
    assert (overlay[15, 4] != _photo()[15, 4]).any() or (overlay[15, 15] != _photo()[15, 15]).any()

    back = read_masks(masks_dir)
    assert [m.id for m in back] == ["obj_001", "obj_002"]
    assert (back[0].mask == _disc(15, 15, 8)).all() and (back[1].mask == _disc(45, 30, 10)).all()
    assert back[0].label == "red cup" and back[0].prompt == "a red cup" and back[0].source == "test"
    assert back[0].score == pytest.approx(0.93) and math.isnan(back[1].score)
    assert back[0].box_xyxy == (8.0, 8.0, 23.0, 23.0)


def test_labels_never_reach_file_names(tmp_path: Path) -> None:
    evil = ObjectMask(_disc(20, 20, 6), label="../../escape", prompt="../../escape")
    write_masks(tmp_path / "masks", _photo(), [evil])
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert names == {"masks", "masks/masks.json", "masks/obj_001.png", "masks/overlay.png"}


def test_rle_is_used_when_png_is_missing(tmp_path: Path) -> None:
    masks_dir = tmp_path / "masks"
    write_masks(masks_dir, _photo(), _masks())
    (masks_dir / "obj_002.png").unlink()
    back = read_masks(masks_dir)
    assert (back[1].mask == _disc(45, 30, 10)).all()


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_overlay(*args: object, **kwargs: object) -> np.ndarray:
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(store, "draw_overlay", broken_overlay)
    with pytest.raises(RuntimeError):
        write_masks(tmp_path / "masks", _photo(), _masks())
    assert list(tmp_path.iterdir()) == []  # no masks/ and no .tmp-* folder


def test_failure_keeps_the_old_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    masks_dir = tmp_path / "masks"
    write_masks(masks_dir, _photo(), _masks()[:1])
    before = (masks_dir / "masks.json").read_bytes()
    monkeypatch.setattr(store, "draw_overlay", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        write_masks(masks_dir, _photo(), _masks())
    assert (masks_dir / "masks.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]
    assert len(read_masks(masks_dir)) == 1


def test_rewrite_replaces_the_folder(tmp_path: Path) -> None:
    masks_dir = tmp_path / "masks"
    write_masks(masks_dir, _photo(), _masks())
    write_masks(masks_dir, _photo(), _masks()[:1])
    assert sorted(p.name for p in masks_dir.iterdir()) == ["masks.json", "obj_001.png", "overlay.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]


def test_wrong_size_mask_is_an_input_error(tmp_path: Path) -> None:
    bad = ObjectMask(np.ones((H + 1, W), bool), label="big")
    with pytest.raises(InputError, match=r"65|64x49"):
        write_masks(tmp_path / "masks", _photo(), [bad])
    assert not (tmp_path / "masks").exists()


def _broken(tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    masks_dir = tmp_path / "masks"
    write_masks(masks_dir, _photo(), _masks())
    doc = json.loads((masks_dir / "masks.json").read_text())
    edit(masks_dir, doc)
    (masks_dir / "masks.json").write_text(json.dumps(doc))
    return masks_dir


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d, doc: doc["objects"][0].update(id="../../etc"), "invalid id"),
        (lambda d, doc: doc["objects"][1].update(id="obj_001"), "duplicate"),
        (lambda d, doc: doc["objects"][0].update(mask="../outside.png"), "plain file name"),
        (lambda d, doc: doc.update(format_version=99), "format_version"),
        (lambda d, doc: doc.pop("objects"), "objects"),
        (lambda d, doc: ((d / "obj_001.png").unlink(), doc["objects"][0].pop("rle")), "missing"),
        (lambda d, doc: (d / "obj_001.png").write_bytes(b"not a png"), "unreadable"),
        (lambda d, doc: doc["image"].update(width=W + 5), "69x48"),
    ],
)
def test_broken_folders_give_one_line_errors(tmp_path: Path, edit, words: str) -> None:  # type: ignore[no-untyped-def]
    masks_dir = _broken(tmp_path, edit)
    with pytest.raises(InputError) as info:
        read_masks(masks_dir)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_folder_and_json(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_masks(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(InputError, match="masks.json"):
        read_masks(tmp_path / "half")
    (tmp_path / "half" / "masks.json").write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        read_masks(tmp_path / "half")
