"""load_photo normalizes every common kind of photo and rejects bad files with one clear line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.image import MAX_PHOTO_PIXELS, load_photo, save_png

REPO = Path(__file__).resolve().parents[1]


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    """(H, W, 3) uint8 test picture whose rows and columns differ, so rotations are detectable."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 90)], axis=-1).astype(np.uint8)


def _check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags.writeable


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    rgb = _gradient()
    path = save_png(tmp_path / "photo.png", rgb)
    out = load_photo(path)
    _check_rgb(out, 40, 60)
    assert (out == rgb).all()


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = _gradient()[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_photo(tmp_path / "g.png")
    _check_rgb(out, 40, 60)
    assert (out[:, :, 0] == gray).all() and (out[:, :, 1] == gray).all() and (out[:, :, 2] == gray).all()


def test_one_bit_image(tmp_path: Path) -> None:
    bits = np.zeros((10, 12), bool)
    bits[2:5, 3:9] = True
    Image.fromarray(bits).save(tmp_path / "b.png")
    out = load_photo(tmp_path / "b.png")
    _check_rgb(out, 10, 12)
    assert (out[bits] == 255).all() and (out[~bits] == 0).all()


def test_la_and_rgba_are_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 0, 0)
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    rgba[4:6, :, 3] = 128  # half transparent band
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_photo(tmp_path / "rgba.png")
    _check_rgb(out, 8, 8)
    assert (out[:4] == (200, 0, 0)).all()
    assert (out[6:] == 255).all()  # transparent -> white, not black
    assert np.abs(out[4, 0].astype(int) - (228, 127, 127)).max() <= 2  # half red on white

    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 50
    la[:, :4, 1] = 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_photo(tmp_path / "la.png")
    assert (out[:, :4] == 50).all() and (out[:, 4:] == 255).all()


def test_palette_with_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (6, 4))
    pal.putpalette([0, 0, 255, 10, 200, 10] + [0] * 762)
    pal.putdata([0] * 12 + [1] * 12)  # top half index 0 (transparent), bottom half index 1 (green)
    pal.save(tmp_path / "p.png", transparency=0)
    out = load_photo(tmp_path / "p.png")
    _check_rgb(out, 4, 6)
    assert (out[:2] == 255).all()
    assert (out[2:] == (10, 200, 10)).all()
    # palette without transparency: plain colours
    pal.save(tmp_path / "p2.gif")
    out2 = load_photo(tmp_path / "p2.gif")
    assert (out2[:2] == (0, 0, 255)).all()


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(3, axis=0)  # (3, 4)
    Image.fromarray(values).save(tmp_path / "g16.png")  # 16-bit grayscale PNG
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really stored as 16-bit
    out = load_photo(tmp_path / "g16.png")
    _check_rgb(out, 3, 4)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    # big-endian I;16B goes the same way
    big = Image.frombytes("I;16B", (4, 3), values.astype(">u2").tobytes())
    big.save(tmp_path / "g16b.tif")
    assert load_photo(tmp_path / "g16b.tif")[0, :, 0].tolist() == [0, 1, 128, 255]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _rgb16_png(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def test_sixteen_bit_rgb_png(tmp_path: Path) -> None:
    values = np.zeros((2, 3, 3), np.uint16)
    values[0, 0] = (65535, 0, 32896)
    values[1, 2] = (1000, 50000, 65535)
    (tmp_path / "rgb16.png").write_bytes(_rgb16_png(values))
    out = load_photo(tmp_path / "rgb16.png")
    _check_rgb(out, 2, 3)
    expected = np.round(values / 257.0)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_float_and_int32_images(tmp_path: Path) -> None:
    f = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    assert load_photo(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255, 0]
    i = np.array([[0, 1000, 70000, -70000]], dtype=np.int32)  # outside 16-bit: min..max scaling
    Image.fromarray(i, "I").save(tmp_path / "i.tif")
    assert load_photo(tmp_path / "i.tif")[0, :, 0].tolist() == [128, 129, 255, 0]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (220, 30, 30)
    rgb[:, 8:] = (30, 30, 220)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    out = load_photo(tmp_path / "cmyk.jpg")
    _check_rgb(out, 16, 16)
    assert np.abs(out[4, 2].astype(int) - (220, 30, 30)).max() < 20
    assert np.abs(out[4, 13].astype(int) - (30, 30, 220)).max() < 20


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    rgb = _gradient(40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", quality=98, exif=exif)
    out = load_photo(tmp_path / "rot.jpg")
    _check_rgb(out, 60, 40)  # width and height swapped
    expected = np.rot90(rgb, k=-1)  # 90 degrees clockwise
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 4
    assert np.abs(out.astype(int) - np.rot90(rgb, k=1).astype(int)).mean() > 40  # not the other way


def _expect_input_error(path: Path, *words: str) -> str:
    with pytest.raises(InputError) as info:
        load_photo(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message.lower()
    assert info.value.fix  # every error says how to fix it
    return message


def test_missing_directory_and_empty(tmp_path: Path) -> None:
    _expect_input_error(tmp_path / "nope.jpg", "does not exist")
    _expect_input_error(tmp_path, "folder")
    (tmp_path / "empty.png").write_bytes(b"")
    _expect_input_error(tmp_path / "empty.png", "empty")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not a photo\n")
    _expect_input_error(tmp_path / "notes.jpg", "not an image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_rejected(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)  # noise: no short compressed stream
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    _expect_input_error(path, "truncated")


def test_truncated_is_rejected_even_if_someone_allowed_it(tmp_path: Path) -> None:
    from PIL import ImageFile

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:2000])
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # some other library flipped the global
    try:
        _expect_input_error(tmp_path / "cut.jpg", "truncated")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_absurd_size_is_refused_before_decoding(tmp_path: Path) -> None:
    import struct
    import zlib

    side = 20_000  # 400 MP, twice the limit
    assert side * side > MAX_PHOTO_PIXELS
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(data)
    message = _expect_input_error(tmp_path / "bomb.png", "mp")
    assert "20000x20000" in message


def test_large_photo_loads_with_bounded_memory(tmp_path: Path) -> None:
    """6000x4500 (27 MP) must load; peak memory is measured in a fresh process (ru_maxrss)."""
    im = Image.new("RGB", (6000, 4500), (200, 120, 40))
    im.paste((20, 60, 220), (1000, 800, 4000, 3000))
    im.save(tmp_path / "big.jpg", quality=85)
    del im
    script = (
        "import json, resource, sys\n"
        "from pipeline.image import load_photo\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "a = load_photo(sys.argv[1])\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base\n"
        "print(json.dumps({'shape': list(a.shape), 'peak_kib': peak, 'px': a[2000, 2000].tolist()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big.jpg")], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["shape"] == [4500, 6000, 3]
    assert np.abs(np.array(info["px"]) - (20, 60, 220)).max() < 10
    output_mib = 6000 * 4500 * 3 / 2**20  # 77 MiB
    # Pillow's decoded copy (4 bytes/pixel) + our array, plus slack: well under 3x the output.
    assert info["peak_kib"] / 1024 < 3 * output_mib, info


def test_save_png_is_strict_about_dtype_and_atomic(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_png(tmp_path / "m.png", np.ones((4, 4), bool))
    with pytest.raises(TypeError):
        save_png(tmp_path / "m.png", np.ones((4, 4), np.uint16))
    with pytest.raises(ValueError):
        save_png(tmp_path / "m.png", np.ones((4, 4, 2), np.uint8))
    assert not any(tmp_path.iterdir())  # nothing half-written
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = save_png(tmp_path / "sub" / "g.png", gray)
    with Image.open(path) as im:
        assert im.mode == "L"
        assert (np.asarray(im) == gray).all()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["g.png"]
