"""The masks/ folder of a run: masks.json, one 0/255 PNG per object, and overlay.png.

    masks/masks.json     {format_version, image: {width, height, sha256?}, meta, objects: [...]}
    masks/obj_001.png    8-bit single-channel, 0 = background, 255 = object, image-sized
    masks/overlay.png    the photo with every mask tinted, outlined and numbered

Each object entry: id, label, prompt, score (null when not finite), box_xyxy (pixels, exclusive
max), area (pixels), mask (file name), rle (COCO compressed RLE of the same mask), source.
The whole folder is written under a temporary name and swapped in at once, so a reader sees
the complete old folder or the complete new one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.atomic import atomic_dir, write_json_atomic
from pipeline.core.errors import InputError
from pipeline.core.runfolder import OBJECT_ID_RE, object_id
from pipeline.core.types import ObjectMask, mask_box_xyxy
from pipeline.image.load import save_png
from pipeline.masks.overlay import draw_overlay
from pipeline.masks.rle import rle_decode, rle_encode

MASKS_FORMAT_VERSION = 1
MASKS_JSON = "masks.json"
OVERLAY_PNG = "overlay.png"


def write_masks(
    masks_dir: Path,
    image: np.ndarray,
    masks: list[ObjectMask],
    *,
    meta: dict | None = None,
    image_sha256: str | None = None,
) -> list[ObjectMask]:
    """Write `masks` as a complete masks/ folder; return the written masks with ids obj_001, ...

    Ids follow the order of `masks`, counting only the masks that are written: empty masks
    (area 0) are skipped and listed in masks.json's meta['skipped'] as {index, label, prompt,
    source, reason}. Labels and prompts are stored as text only, never used in file names.
    Raises InputError when a mask is not image-sized.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"write_masks needs the (H, W, 3) uint8 photo, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    kept: list[ObjectMask] = []
    skipped: list[dict[str, Any]] = []
    for index, obj in enumerate(masks):
        mask = np.asarray(obj.mask, dtype=bool)
        if mask.shape != (h, w):
            raise InputError(
                f"Mask {index + 1} ({obj.label!r}) is {_wh(mask.shape)} but the image is {w}x{h}.",
                "masks must be made from this photo at its full size.",
            )
        if not mask.any():
            skipped.append(
                {"index": index, "label": str(obj.label), "prompt": str(obj.prompt), "source": str(obj.source), "reason": "empty mask"}
            )
            continue
        box = _finite_box(obj.box_xyxy) or mask_box_xyxy(mask)
        kept.append(dataclasses.replace(obj, mask=mask, id=object_id(len(kept)), box_xyxy=box))

    meta_out = dict(meta or {})
    meta_out["skipped"] = list(meta_out.get("skipped", [])) + skipped
    image_info: dict[str, Any] = {"width": int(w), "height": int(h)}
    if image_sha256:
        image_info["sha256"] = image_sha256
    document = {
        "format_version": MASKS_FORMAT_VERSION,
        "image": image_info,
        "meta": meta_out,
        "objects": [_entry(obj) for obj in kept],
    }
    with atomic_dir(masks_dir) as tmp:
        for obj in kept:
            save_png(tmp / f"{obj.id}.png", obj.mask.view(np.uint8) * np.uint8(255), compress_level=1)
        save_png(tmp / OVERLAY_PNG, draw_overlay(image, kept), compress_level=1)
        write_json_atomic(tmp / MASKS_JSON, document)  # last: its presence marks a finished folder
    return kept


def _entry(obj: ObjectMask) -> dict[str, Any]:
    score = float(obj.score) if obj.score is not None else math.nan
    return {
        "id": obj.id,
        "label": str(obj.label),
        "prompt": str(obj.prompt),
        "score": score if math.isfinite(score) else None,
        "box_xyxy": [round(float(v), 2) for v in obj.box_xyxy],
        "area": obj.area,
        "mask": f"{obj.id}.png",
        "rle": rle_encode(obj.mask),
        "source": str(obj.source),
    }


def _finite_box(box: Any) -> tuple[float, float, float, float] | None:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or values[2] <= values[0] or values[3] <= values[1]:
        return None
    return values  # type: ignore[return-value]


def _wh(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}" if len(shape) >= 2 else str(shape)


def read_masks_document(masks_dir: Path) -> dict[str, Any]:
    """masks.json parsed and checked for its top-level shape (InputError when broken)."""
    masks_dir = Path(masks_dir)
    path = masks_dir / MASKS_JSON
    fix = "re-run stage 1 to write the masks again, or pass a folder of mask PNGs."
    if not masks_dir.is_dir():
        raise InputError(f"Masks folder {masks_dir} does not exist.", "check the path given with --masks.")
    if not path.is_file():
        raise InputError(f"{path} is missing, so {masks_dir} is not a finished masks folder.", fix)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}).", fix) from exc
    if not isinstance(document, dict) or not isinstance(document.get("objects"), list):
        raise InputError(f"{path} has no 'objects' list.", fix)
    version = document.get("format_version")
    if not isinstance(version, int) or version > MASKS_FORMAT_VERSION:
        raise InputError(
            f"{path} has format_version {version!r}; this version reads up to {MASKS_FORMAT_VERSION}.", "update sam3d-gs or re-run stage 1."
        )
    image = document.get("image")
    if not isinstance(image, dict) or not all(isinstance(image.get(k), int) and image[k] > 0 for k in ("width", "height")):
        raise InputError(f"{path} has no valid image width/height.", fix)
    return document


def read_masks(masks_dir: Path) -> list[ObjectMask]:
    """Read a masks/ folder written by write_masks. Each mask comes from its PNG, or from its
    RLE in masks.json when the PNG is missing. Raises InputError for a broken folder."""
    masks_dir = Path(masks_dir)
    document = read_masks_document(masks_dir)
    path = masks_dir / MASKS_JSON
    w, h = document["image"]["width"], document["image"]["height"]
    seen: set[str] = set()
    out: list[ObjectMask] = []
    for n, entry in enumerate(document["objects"]):
        if not isinstance(entry, dict):
            raise InputError(f"{path}: object {n + 1} is not a JSON object.", "re-run stage 1 to write the masks again.")
        oid = entry.get("id")
        # The id names folders later (objects/<id>/), so only our own counter format is accepted.
        if not isinstance(oid, str) or not OBJECT_ID_RE.match(oid) or oid in seen:
            raise InputError(
                f"{path}: object {n + 1} has a missing, duplicate or invalid id {oid!r} (expected obj_001 ...).",
                "re-run stage 1 to write the masks again.",
            )
        seen.add(oid)
        mask = _read_entry_mask(masks_dir, entry, oid, w, h)
        score = entry.get("score")
        box = _finite_box(entry.get("box_xyxy"))
        out.append(
            ObjectMask(
                mask=mask,
                label=str(entry.get("label", "")),
                prompt=str(entry.get("prompt", "")),
                score=float(score) if isinstance(score, (int, float)) else math.nan,
                source=str(entry.get("source", "")),
                id=oid,
                box_xyxy=box,
            )
        )
    return out


def _read_entry_mask(masks_dir: Path, entry: dict[str, Any], oid: str, w: int, h: int) -> np.ndarray:
    name = entry.get("mask") or f"{oid}.png"
    # Only a plain file name inside masks_dir: a path from JSON must not point elsewhere.
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise InputError(
            f"{masks_dir / MASKS_JSON}: {oid} names mask file {name!r}, which is not a plain file name.",
            "re-run stage 1 to write the masks again.",
        )
    png = masks_dir / name
    if png.is_file():
        try:
            with Image.open(png) as im:
                im.load()
                mask = mask_from_pil(im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"Mask file {png} is unreadable ({exc}).", "re-run stage 1 to write the masks again.") from exc
        source = str(png)
    elif isinstance(entry.get("rle"), dict):
        try:
            mask = rle_decode(entry["rle"])
        except ValueError as exc:
            raise InputError(
                f"{png} is missing and the RLE of {oid} in masks.json is invalid ({exc}).", "re-run stage 1 to write the masks again."
            ) from exc
        source = f"{masks_dir / MASKS_JSON} ({oid} rle)"
    else:
        raise InputError(f"Mask of {oid} is missing: no {png} and no 'rle' in masks.json.", "re-run stage 1 to write the masks again.")
    if mask.shape != (h, w):
        raise InputError(
            f"Mask {source} is {_wh(mask.shape)} but masks.json says the image is {w}x{h}.", "re-run stage 1 to write the masks again."
        )
    return mask


def mask_from_pil(im: Image.Image) -> np.ndarray:
    """Any mask image -> (H, W) bool.

    - Alpha (RGBA, LA, PA, or a palette/grayscale with a transparent colour): alpha > 0, as SAM 3D
      Objects reads its example masks; when the alpha is constant the other channels decide.
    - Palette without transparency: the palette index (0 = background).
    - Anything else (1-bit, 8/16/32-bit gray, float, RGB): gray value > half of the image's max,
      so 0/1, 0/255 and 0/65535 masks all work; RGB goes through luminance.
    """
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA") if mode not in ("RGBA", "LA") else im
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.size and alpha.min() != alpha.max():
            return alpha > 0
        im = rgba.convert("L")
        mode = "L"
    if mode == "1":
        return np.asarray(im, dtype=bool)
    if mode == "P":
        values = np.asarray(im)
    elif mode in ("L", "I", "F") or mode.startswith("I;16"):
        values = np.asarray(im)
    else:
        values = np.asarray(im.convert("L"))
    return threshold_mask(values)


def threshold_mask(values: np.ndarray) -> np.ndarray:
    """Single-channel values -> bool: > max/2 (so any binary {0, k} mask is exact); NaN -> False."""
    if values.size == 0:
        return np.zeros(values.shape, dtype=bool)
    if values.dtype.kind == "f":
        values = np.where(np.isfinite(values), values, 0)
    top = values.max()
    if top <= 0:
        return np.zeros(values.shape, dtype=bool)
    return values > top / 2
