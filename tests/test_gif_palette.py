"""One palette per GIF, picked with torch (pipeline/scene/gif_palette.py), written by
turntable.write_gif_indexed: what a player shows must be the frames, as close as Pillow's own
per-frame quantization gets, and exact when the frames have few colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from pipeline.core.types import Gaussians, rgb_to_sh0
from pipeline.scene import render_cpu
from pipeline.scene.gif_palette import GIF_COLORS, palette_indices
from pipeline.scene.turntable import turntable_cameras, write_gif, write_gif_indexed

torch = pytest.importorskip("torch")


def shown(path: Path) -> np.ndarray:
    """Every frame as a player composes it (delta frames over the previous one), RGB."""
    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def turntable_frames(n_frames: int = 12, size: int = 96) -> np.ndarray:
    """A shaded, many-coloured ellipsoid on white, the way a turntable GIF looks (thousands of colours)."""
    rng = np.random.default_rng(3)
    n = 3000
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    g = Gaussians(
        (d * [0.5, 0.35, 0.3]).astype(np.float32),
        rgb_to_sh0(0.5 + 0.45 * np.c_[d[:, 0], d[:, 1], -d[:, 2]]),
        np.full((n, 1), 0.9, np.float32),
        np.full((n, 3), 0.03, np.float32),
        np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
    )
    return np.stack([render_cpu.render(g, cam) for cam in turntable_cameras(g, n_frames, size)])


def test_few_colours_are_kept_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (40, 3), dtype=np.uint8)
    frames = colours[rng.integers(0, 40, (5, 24, 32))]  # 5 frames of 40 colours
    idx, pal = palette_indices(torch.from_numpy(frames))
    assert idx.shape == (5, 24, 32) and idx.dtype == np.uint8 and len(pal) == 40
    np.testing.assert_array_equal(pal[idx], frames)
    path = write_gif_indexed(tmp_path / "t.gif", idx, pal, fps=10)
    np.testing.assert_array_equal(shown(path), frames)
    assert [p.name for p in tmp_path.iterdir()] == ["t.gif"]  # atomic: no temporary left


def test_many_colours_as_close_as_pillow_per_frame(tmp_path: Path) -> None:
    frames = turntable_frames()
    distinct = len(np.unique(frames.reshape(-1, 3), axis=0))
    assert distinct > 4 * GIF_COLORS  # the case that needs a palette search
    idx, pal = palette_indices(torch.from_numpy(frames))
    assert len(pal) <= GIF_COLORS and int(idx.max()) < len(pal)
    ours = shown(write_gif_indexed(tmp_path / "ours.gif", idx, pal))
    pillow = shown(write_gif(tmp_path / "pillow.gif", list(frames)))
    err_ours = np.abs(ours.astype(int) - frames).mean()
    err_pillow = np.abs(pillow.astype(int) - frames).mean()
    print(f"mean abs error (0-255): one torch palette {err_ours:.3f}, Pillow per frame {err_pillow:.3f}; {distinct} colours")
    assert err_ours <= max(1.5 * err_pillow, 0.5)
    # The background (the most common colour) is a palette colour, exactly: no tinted backdrop.
    assert (pal == 255).all(axis=1).any()
    assert (ours[:, 0, 0] == 255).all()
    # The same frames give the same file: no sampling.
    idx2, pal2 = palette_indices(torch.from_numpy(frames))
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_array_equal(pal, pal2)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        palette_indices(torch.zeros(2, 4, 4, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="palette has 2"):
        write_gif_indexed(tmp_path / "x.gif", np.full((1, 4, 4), 5, np.uint8), np.zeros((2, 3), np.uint8))
    assert not list(tmp_path.iterdir())
