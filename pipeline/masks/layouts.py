"""Find the masks for stage 2 in any of the layouts people have on disk.

Tried in this order (the first that applies wins):
1. `run`:        a run folder of ours, PATH/masks/masks.json (ids kept as written).
2. `masks_json`: a masks/ folder of ours, PATH/masks.json (ids kept as written).
3. `flat`:       mask images directly in PATH, as in SAM 3D Objects' examples: `image.png`
                 beside `0.png`, `1.png`, ... (mask in the alpha channel of RGBA, or 8-bit
                 grayscale, 1-bit, 16-bit). Photos and non-mask files are ignored.
4. `reference`:  the reference system's nested layout, PATH/[masks/]obj_i/<json name>/mask_k.png,
                 walked recursively; each image file is one object.
For `flat` and `reference` the files are taken in natural order (2 before 10) and the non-empty
masks get ids obj_001, obj_002, ... in that order; empty masks are skipped and recorded.
Labels come from the file stem (flat) or the folder holding the file (reference); they are
sanitized text, never used in paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.core.runfolder import object_id
from pipeline.core.types import ObjectMask
from pipeline.masks.store import MASKS_JSON, OVERLAY_PNG, mask_from_pil, read_masks

Layout = Literal["run", "masks_json", "flat", "reference"]

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".webp", ".jpg", ".jpeg", ".pgm", ".pbm")  # not .gif: turntables
# File stems that are the photo or other per-scene images in mask folders (SAM 3D Objects' examples
# keep `image.png`, `rgb.png`, `depth.png` and `label.png` beside the masks), never masks.
NON_MASK_STEMS = frozenset({"image", "rgb", "depth", "label", "labels", "photo", "input", "overlay", "img", "color", "colour"})
LABEL_MAX_CHARS = 64


@dataclass
class MaskSet:
    """What find_masks found: the masks (ids set), the layout, skipped files, and each mask's file."""

    masks: list[ObjectMask]
    layout: Layout
    skipped: list[dict] = field(default_factory=list)  # {"file": relative path, "reason": str}
    sources: list[str] = field(default_factory=list)  # per mask, the file it came from, relative to PATH


def find_masks(path: Path, image_size: tuple[int, int], *, exclude: Iterable[Path] = ()) -> MaskSet:
    """Read the masks under `path` for a photo of `image_size` = (W, H). See the module docstring.

    `exclude` names files to ignore (e.g. the photo itself when it lies in the masks folder).
    Raises InputError: path missing, no masks found, a mask of another size, an unreadable mask.
    """
    path = Path(path)
    width, height = (int(v) for v in image_size)
    if not path.exists():
        raise InputError(f"Masks path {path} does not exist.", "check the path given with --masks.")
    excluded = {_resolved(p) for p in exclude}

    if path.is_file():
        if path.name == MASKS_JSON:
            return _from_store(path.parent, path.parent, "masks_json", width, height)
        if path.suffix.lower() in MASK_SUFFIXES:
            return _from_files(path.parent, [path], "flat", width, height)
        raise InputError(f"Masks path {path} is neither a folder nor a mask image.", "pass the folder holding the masks with --masks.")

    if (path / "masks" / MASKS_JSON).is_file():
        return _from_store(path / "masks", path, "run", width, height)
    if (path / MASKS_JSON).is_file():
        return _from_store(path, path, "masks_json", width, height)

    if (path / "run.json").is_file():
        # Our run folder without masks/masks.json: stage 1 has not finished; walking it would
        # pick up renders and inputs as "masks".
        raise InputError(
            f"Run folder {path} has no masks yet ({path}/masks/{MASKS_JSON} is missing).",
            "run stage 1 on it first, or pass a folder of mask images with --masks.",
        )

    flat = [p for p in _natural_sorted(path.iterdir()) if p.is_file() and _is_mask_candidate(p, excluded)]
    if flat:
        return _from_files(path, flat, "flat", width, height)

    root = path / "masks" if (path / "masks").is_dir() else path
    nested = [p for p in _walk(root) if _is_mask_candidate(p, excluded)]
    if nested:
        return _from_files(path, _natural_sorted(nested, relative_to=root), "reference", width, height)

    raise InputError(
        f"No masks found in {path} (tried: {path}/masks/{MASKS_JSON}, {path}/{MASKS_JSON}, "
        f"mask images directly in {path} such as 0.png, and nested {root}/obj_*/<name>/mask_*.png).",
        "pass a run folder, a masks/ folder, or a folder of mask PNGs (one object per file, image-sized).",
    )


def _from_store(masks_dir: Path, base: Path, layout: Layout, width: int, height: int) -> MaskSet:
    masks = read_masks(masks_dir)
    for obj in masks:
        if obj.mask.shape != (height, width):
            raise InputError(
                f"Masks in {masks_dir} are {obj.mask.shape[1]}x{obj.mask.shape[0]} but the image is {width}x{height}.",
                "pass the photo these masks were made from (the run's input/image.png).",
            )
    kept = [m for m in masks if m.mask.any()]
    skipped = [{"file": _rel(masks_dir / f"{m.id}.png", base), "reason": "empty mask"} for m in masks if not m.mask.any()]
    sources = [
        _rel(masks_dir / f"{m.id}.png", base) if (masks_dir / f"{m.id}.png").is_file() else _rel(masks_dir / MASKS_JSON, base) + f"#{m.id}"
        for m in kept
    ]
    _require_some(kept, skipped, masks_dir)
    return MaskSet(masks=kept, layout=layout, skipped=skipped, sources=sources)


def _from_files(base: Path, files: list[Path], layout: Layout, width: int, height: int) -> MaskSet:
    masks: list[ObjectMask] = []
    sources: list[str] = []
    skipped: list[dict] = []
    for file in files:
        rel = _rel(file, base)
        try:
            with Image.open(file) as im:
                im.load()
                size = im.size
                if size != (width, height):
                    raise InputError(
                        f"Mask {rel} is {size[0]}x{size[1]} but the image is {width}x{height}.",
                        f"pass the photo these masks were made from, or resize the masks to {width}x{height} (nearest-neighbour).",
                    )
                if layout == "flat" and _looks_like_photo(im):
                    skipped.append({"file": rel, "reason": "a colour image, not a mask"})
                    continue
                mask = mask_from_pil(im)
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(
                f"Mask file {file} is unreadable ({' '.join(str(exc).split())[:160]}).", "replace or remove that file."
            ) from exc
        if not mask.any():
            skipped.append({"file": rel, "reason": "empty mask"})
            continue
        label = _label_for(file, layout)
        prompt = label if layout == "reference" else ""  # the reference names its folders after the phrase
        masks.append(ObjectMask(mask=mask, label=label, prompt=prompt, score=1.0, source=f"{layout}:{rel}", id=object_id(len(masks))))
        sources.append(rel)
    _require_some(masks, skipped, base)
    return MaskSet(masks=masks, layout=layout, skipped=skipped, sources=sources)


def _require_some(masks: list[ObjectMask], skipped: list[dict], where: Path) -> None:
    if not masks:
        reasons = ", ".join(sorted({s["reason"] for s in skipped})) or "none found"
        raise InputError(
            f"No usable masks in {where}: all {len(skipped)} mask files were skipped ({reasons}).",
            "pass masks that mark at least one object.",
        )


def _looks_like_photo(im: Image.Image) -> bool:
    """A colour picture is the photo, not a mask: skip it in flat folders.

    Colourful (channels differ on > 1% of pixels) AND many distinct colours (> 64 in a 256x256
    sample); a mask in the alpha channel, or a binary mask drawn in one colour, is not a photo.
    """
    if im.mode not in ("RGB", "RGBA", "CMYK", "YCbCr"):
        return False
    if im.mode == "RGBA":
        lo, hi = im.getchannel("A").getextrema()
        if lo != hi:
            return False  # the mask is in the alpha channel
    small = np.asarray(im.convert("RGB").resize((min(256, im.width), min(256, im.height)), Image.NEAREST)).astype(np.int16)
    spread = small.max(axis=2) - small.min(axis=2)  # 0 for gray pixels
    if float((spread > 24).mean()) <= 0.01:
        return False
    packed = (small[..., 0].astype(np.int32) << 16) | (small[..., 1].astype(np.int32) << 8) | small[..., 2]
    return len(np.unique(packed)) > 64


def _label_for(file: Path, layout: Layout) -> str:
    raw = file.parent.name if layout == "reference" and file.parent.name else file.stem
    return sanitize_label(raw)


def sanitize_label(raw: str) -> str:
    """Text for a label: '.json' suffix dropped, '_' to spaces, printable only, <= 64 chars."""
    text = re.sub(r"\.json$", "", raw, flags=re.IGNORECASE)
    text = text.replace("_", " ")
    text = " ".join(text.split())  # newlines and tabs become single spaces
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:LABEL_MAX_CHARS].strip() or "object"


def _is_mask_candidate(p: Path, excluded: set[Path]) -> bool:
    name = p.name
    if name.startswith(".") or p.suffix.lower() not in MASK_SUFFIXES:
        return False  # hidden files, '.tmp-*' leftovers, JSON, text, PLY ...
    if p.stem.lower() in NON_MASK_STEMS or name == OVERLAY_PNG:
        return False
    return _resolved(p) not in excluded


def _walk(root: Path) -> list[Path]:
    files: list[Path] = []
    for p in root.rglob("*"):
        rel_parts = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel_parts):
            continue
        if p.is_file():
            files.append(p)
    return files


_DIGITS = re.compile(r"(\d+)")


def _natural_key(text: str) -> tuple:
    return tuple((0, int(part), part) if part.isdigit() else (1, part.lower(), part) for part in _DIGITS.split(text) if part != "")


def _natural_sorted(paths: Iterable[Path], relative_to: Path | None = None) -> list[Path]:
    """Natural order (2 before 10) over the path relative to `relative_to`, part by part."""

    def key(p: Path) -> tuple:
        parts = p.relative_to(relative_to).parts if relative_to is not None else (p.name,)
        return tuple(_natural_key(part) for part in parts)

    return sorted(paths, key=key)


def _rel(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return p.as_posix()


def _resolved(p: Path) -> Path:
    try:
        return Path(p).resolve()
    except OSError:
        return Path(p).absolute()
