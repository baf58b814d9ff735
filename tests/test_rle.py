"""COCO RLE: round trips, strings worked out by hand from the format, and pycocotools agreement."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.masks.rle import counts_to_string, mask_run_lengths, rle_decode, rle_encode, string_to_counts


def _mask_from_counts(h: int, w: int, counts: list[int]) -> np.ndarray:
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape((h, w), order="F")


def test_tiny_mask_counts_are_column_major_and_start_with_zeros() -> None:
    # 3x4 mask; reading down the columns: 0 0 1 | 1 1 0 | 1 1 1 | 1 1 1
    mask = np.array([[0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1]], dtype=bool)
    assert mask_run_lengths(mask).tolist() == [2, 3, 1, 6]
    # counts 2, 3, 1, then 6 - 3 = 3 (delta to two back for index > 2); each fits one char '0'+v
    assert rle_encode(mask) == {"size": [3, 4], "counts": "2313"}
    assert rle_decode({"size": [3, 4], "counts": "2313"}).tolist() == mask.tolist()


def test_known_string_with_multi_char_and_negative_values() -> None:
    # counts [20, 5, 3, 2, 18] on 6x8 -> values [20, 5, 3, 2-5=-3, 18-3=15]
    # 20 = 0b10100: its 0x10 bit would read as a sign, so it takes two groups:
    #   (20 | 0x20) + 48 = 'd', then 0 + 48 = '0'
    # -3: one group 0b11101 = 29 (sign bit set, nothing left): 29 + 48 = 'M'; 15: '?' (63)
    counts = [20, 5, 3, 2, 18]
    assert counts_to_string(np.array(counts)) == "d053M?"
    assert string_to_counts("d053M?").tolist() == counts
    mask = _mask_from_counts(6, 8, counts)
    assert rle_encode(mask)["counts"] == "d053M?"
    assert (rle_decode({"size": [6, 8], "counts": "d053M?"}) == mask).all()


def test_mask_starting_with_a_set_pixel_gets_a_zero_first_count() -> None:
    mask = np.zeros((2, 2), bool)
    mask[0, 0] = True
    assert mask_run_lengths(mask).tolist() == [0, 1, 3]


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (64, 48), (1, 300)])
@pytest.mark.parametrize("fill", ["empty", "full", "random", "sparse"])
def test_round_trip(shape: tuple[int, int], fill: str) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    mask = {
        "empty": np.zeros(shape, bool),
        "full": np.ones(shape, bool),
        "random": rng.random(shape) < 0.5,
        "sparse": rng.random(shape) < 0.02,
    }[fill]
    rle = rle_encode(mask)
    assert rle["size"] == list(shape)
    assert isinstance(rle["counts"], str)
    out = rle_decode(rle)
    assert out.dtype == bool and out.shape == shape
    assert (out == mask).all()


def test_large_counts_round_trip() -> None:
    # Long runs need several 5-bit groups, and big negative deltas need the sign bit.
    mask = np.zeros((4500, 600), bool)
    mask[:, 100:101] = True  # one full column: run of 4500
    mask[10:11, 400] = True  # then a 1-pixel run: delta 1 - 4500 < 0
    assert (rle_decode(rle_encode(mask)) == mask).all()


def test_decode_accepts_uncompressed_list_and_bytes() -> None:
    mask = np.array([[0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1]], dtype=bool)
    assert (rle_decode({"size": [3, 4], "counts": [2, 3, 1, 6]}) == mask).all()
    assert (rle_decode({"size": [3, 4], "counts": b"2313"}) == mask).all()


@pytest.mark.parametrize(
    "rle",
    [
        {"size": [3, 4], "counts": [2, 3]},  # sums to 5, not 12
        {"size": [3, 4], "counts": "2313d"},  # ends mid-value
        {"size": [3, 4], "counts": "23\x7f3"},  # character out of range
        {"counts": "2313"},  # no size
    ],
)
def test_decode_rejects_broken_rle(rle: dict) -> None:
    with pytest.raises(ValueError):
        rle_decode(rle)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy-2 warning
def test_agrees_with_pycocotools() -> None:
    mask_util = pytest.importorskip("pycocotools.mask", reason="pycocotools is only a cross-check")
    rng = np.random.default_rng(7)
    cases = [rng.random((37, 53)) < p for p in (0.0, 0.03, 0.5, 0.97, 1.0)]
    yy, xx = np.mgrid[:300, :400]
    cases.append((yy - 150) ** 2 + (xx - 200) ** 2 < 120**2)
    for mask in cases:
        ours = rle_encode(mask)
        theirs = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode("ascii")
        assert ours["size"] == list(theirs["size"])
        assert (mask_util.decode(ours) == mask).all()
        assert (rle_decode(theirs) == mask).all()
