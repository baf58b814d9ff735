"""Load a photo as (H, W, 3) uint8 RGB, normalizing every common kind of image file.

Normalization rules (documented in docs/FORMATS.md):
- EXIF orientation is applied (the pixels are rotated/flipped; the tag is then dropped).
- Transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) is composited on white.
- Grayscale (1, L, I;16*, I, F) is replicated into three channels. 16-bit data is scaled to 8 bits
  (v * 255 / 65535, rounded); 16-bit RGB PNGs are reduced to 8 bits by Pillow itself.
  32-bit integer (I) and float (F) images are scaled by their own value range, see `_to_uint8`.
- CMYK (including Adobe's inverted CMYK JPEGs) goes through the embedded ICC profile when
  there is one and Pillow's ImageCms works, else through Pillow's plain CMYK->RGB conversion.
- Multi-frame files (GIF, TIFF, MPO) use their first frame.

Bad files raise InputError with one line: missing path, a folder, an empty file, a file that is
not an image, a truncated image (decoding is forced and truncated data is never accepted), or
an image over MAX_PHOTO_PIXELS.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline.core.atomic import write_with_atomic
from pipeline.core.errors import InputError

log = logging.getLogger(__name__)

MAX_PHOTO_PIXELS = 200_000_000
"""Largest photo accepted (pixels). 200 MP is ~600 MB as RGB uint8; a 6000x4500 photo is 27 MP.

Pillow's own decompression-bomb guard defaults to ~89 MP (error above twice that); we set
Image.MAX_IMAGE_PIXELS to this value so Pillow's guard and ours agree, and check it ourselves
before decoding so the user gets a clear message instead of a warning or a Pillow exception.
"""

Image.MAX_IMAGE_PIXELS = MAX_PHOTO_PIXELS

_FIX_PHOTO = "pass a readable photo (JPEG, PNG, WebP, TIFF, BMP ...) with --image."


def load_photo(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, EXIF-rotated, transparency on white."""
    path = Path(path)
    _check_file(path)
    # A truncated file must fail, never come back as a half-grey image.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS; _check_size turns that into a clear InputError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            _check_size(path, im.size)
            im.load()  # force decoding now so truncation and corrupt data show up here
            _apply_exif_orientation(im)
            rgb = _to_rgb(im)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"Photo {path} is too large to load safely ({exc}).", _FIX_SIZE) from exc
    except Image.UnidentifiedImageError as exc:
        raise InputError(f"{path} is not an image file Pillow can read.", _FIX_PHOTO) from exc
    except PermissionError as exc:
        raise InputError(f"Photo {path} cannot be read (permission denied).", "check the file's permissions.") from exc
    except MemoryError as exc:
        raise InputError(f"Not enough memory to load photo {path}.", "downscale the photo and try again.") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"),
        # SyntaxError (broken PNG chunks) or ValueError, depending on the format.
        raise InputError(f"Photo {path} is truncated or corrupt ({_one_line(exc)}).", _FIX_PHOTO) from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InputError(f"Photo {path} has no pixels ({rgb.shape[1]}x{rgb.shape[0]}).", _FIX_PHOTO)
    return rgb


_FIX_SIZE = f"downscale it to at most {MAX_PHOTO_PIXELS // 1_000_000} MP (e.g. 6000x4500 = 27 MP works)."


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"Photo {path} does not exist.", "check the path given with --image.")
    if path.is_dir():
        raise InputError(f"Photo path {path} is a folder, not an image file.", "pass the image file itself with --image.")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"Photo {path} cannot be read ({_one_line(exc)}).", "check the file's permissions.") from exc
    if size == 0:
        raise InputError(f"Photo {path} is an empty file (0 bytes).", _FIX_PHOTO)


def _check_size(path: Path, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_PHOTO_PIXELS:
        raise InputError(f"Photo {path} is {w}x{h} = {w * h / 1e6:.0f} MP, over the {MAX_PHOTO_PIXELS // 1_000_000} MP limit.", _FIX_SIZE)


def _apply_exif_orientation(im: Image.Image) -> None:
    """Rotate/flip `im` in place by its EXIF orientation (in place: no second full-size copy)."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError) as exc:
        # A broken EXIF block should not make the photo unusable; the pixels are still fine.
        log.warning("ignoring unreadable EXIF orientation: %s", _one_line(exc))


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return _as_array(im)
    if mode == "CMYK":
        return _as_array(_cmyk_to_rgb(im))
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _to_uint8(np.asarray(im))  # (H, W) uint8
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")  # also resolves palette / colour-key transparency
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))  # alpha-composite on white
        return _as_array(white)
    try:
        return _as_array(im.convert("RGB"))  # 1, L, P, YCbCr, RGBX, LAB, HSV ...
    except ValueError as exc:
        raise InputError(
            f"Images of Pillow mode {mode!r} are not supported.", "convert the photo to RGB (e.g. PNG or JPEG) first."
        ) from exc


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception as exc:  # noqa: BLE001 - any colour-management failure falls back to plain conversion
            log.warning("CMYK ICC conversion failed (%s); using plain CMYK->RGB", _one_line(exc))
    return im.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale a single-channel 16-bit, 32-bit integer or float image to uint8.

    - uint16 (modes I;16*): v * 255 / 65535, rounded.
    - int32 (mode I): kept when within 0..255, scaled as 16-bit when within 0..65535, else by min..max.
    - float (mode F): x255 when within 0..1, kept when within 0..255, else by min..max; NaN -> 0.
    """
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    arr = values.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0).astype(np.float32)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if values.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif values.dtype.kind in "iu" and lo >= 0.0 and hi <= 65535.0:
        arr = arr / 257.0
    else:
        arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


_STRIP_PIXELS = 1_000_000  # convert big images in strips of about this many pixels


def _as_array(im: Image.Image) -> np.ndarray:
    """Pillow image -> writable numpy array, converted in row strips.

    np.asarray(im) goes through im.tobytes(), which builds the bytes in chunks and joins them,
    so it briefly holds two copies beside Pillow's own; strips keep the peak at Pillow's image
    plus the output array (measured: ~195 MB instead of ~260 MB for a 6000x4500 RGB JPEG).
    """
    w, h = im.size
    rows = max(1, _STRIP_PIXELS // max(w, 1))
    if rows >= h:
        return np.array(im)
    first = np.asarray(im.crop((0, 0, w, rows)))
    out = np.empty((h, *first.shape[1:]), dtype=first.dtype)  # (H, W[, C])
    out[:rows] = first
    for y in range(rows, h, rows):
        out[y : y + rows] = np.asarray(im.crop((0, y, w, min(y + rows, h))))
    return out


def save_png(path: Path, rgb_or_gray: np.ndarray, *, compress_level: int = 6) -> Path:
    """Write a uint8 (H, W), (H, W, 3) or (H, W, 4) array as a PNG, atomically. Returns `path`.

    Only uint8 is accepted: silently casting bool/float/uint16 data is how masks end up as 0/1
    images that look black, so other dtypes raise TypeError.
    """
    arr = np.asarray(rgb_or_gray)
    if arr.dtype != np.uint8:
        raise TypeError(f"save_png needs a uint8 array, got {arr.dtype}; convert explicitly (e.g. mask.astype(np.uint8) * 255)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"save_png needs shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    image = Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA
    return write_with_atomic(Path(path), lambda tmp: image.save(tmp, format="PNG", compress_level=compress_level))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__
