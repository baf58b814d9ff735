"""Photo discovery for `batch` and the photo -> run folder mapping (deterministic, unique, safe)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.batch.photos import find_photos, run_rel_for
from pipeline.core.errors import InputError

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def photo(path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), "red").save(path, format=fmt)
    return path


@pytest.fixture()
def user_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    photo(root / "IMG_0001.JPG", "JPEG")
    photo(root / "IMG_0001.png")  # same stem, other format
    photo(root / "trip 2024" / "IMG_0001.jpg")  # same stem, other folder
    photo(root / "trip 2024" / "café ☕" / "vue d'en haut.webp")
    photo(root / "scans" / "page.TIFF", "TIFF")
    (root / "copy.jpg").write_bytes((root / "IMG_0001.JPG").read_bytes())  # a duplicate: its own photo
    (root / "notes.txt").write_text("not a photo")
    (root / "README").write_text("no extension")
    photo(root / ".hidden.jpg", "JPEG")
    photo(root / ".thumbnails" / "x.jpg", "JPEG")
    photo(root / "trip 2024" / ".cache" / "y.png")
    return root


def test_folder_is_searched_recursively_sorted_without_hidden_or_non_images(user_folder: Path):
    photos = find_photos(user_folder)
    rels = [p.rel for p in photos]
    assert rels == sorted(rels)
    assert set(rels) == {
        "IMG_0001.JPG", "IMG_0001.png", "copy.jpg", "scans/page.TIFF", "trip 2024/IMG_0001.jpg", "trip 2024/café ☕/vue d'en haut.webp",
    }
    for p in photos:
        assert p.path.is_absolute() and p.path.is_file()
        assert p.path == (user_folder / p.rel).absolute()


def test_run_folders_are_unique_safe_and_stable(user_folder: Path):
    photos = find_photos(user_folder)
    runs = [p.run_rel for p in photos]
    assert len(set(runs)) == len(runs)  # same stem in two folders / two formats, a duplicate photo: all distinct
    for run in runs:
        for part in run.split("/"):
            assert SAFE.match(part) and not part.startswith(".") and len(part) <= 60 + 30
    assert runs == [p.run_rel for p in find_photos(user_folder)]  # stable across calls (and so across reruns)
    by_rel = {p.rel: p.run_rel for p in photos}
    assert by_rel["IMG_0001.JPG"] != by_rel["IMG_0001.png"]
    assert by_rel["trip 2024/IMG_0001.jpg"].startswith("trip_2024/IMG_0001-jpg-")


def test_run_rel_format():
    digest = hashlib.sha256("a b/ç.JPG".encode()).hexdigest()[:8]
    assert run_rel_for("a b/ç.JPG") == f"a_b/_-JPG-{digest}"
    assert run_rel_for("x.jpg") == "x-jpg-" + hashlib.sha256(b"x.jpg").hexdigest()[:8]
    long = run_rel_for("d" * 300 + "/" + "n" * 300 + ".png")
    assert all(len(part) <= 60 + len("-png-12345678") for part in long.split("/"))
    # Parent references and dot names never escape or hide: no component starts with '.'.
    assert not any(part.startswith(".") for part in run_rel_for("../../.secret/.x.jpg").split("/"))
    assert run_rel_for("noext") .startswith("noext-noext-")


def test_list_file(tmp_path: Path, user_folder: Path):
    listing = tmp_path / "list.txt"
    outside = photo(tmp_path / "elsewhere" / "far.png")
    listing.write_text(
        "# my photos\n\n"
        "photos/IMG_0001.JPG\n"
        f"{user_folder / 'trip 2024' / 'IMG_0001.jpg'}\n"
        "  photos/IMG_0001.JPG  \n"  # listed twice: one photo
        "photos/missing.jpg\n"  # kept: it fails with its own error instead of vanishing
        f"{outside}\n",
        encoding="utf-8",
    )
    photos = find_photos(listing)
    rels = [p.rel for p in photos]
    assert rels == sorted(["photos/IMG_0001.JPG", "photos/trip 2024/IMG_0001.jpg", "photos/missing.jpg", "elsewhere/far.png"])
    assert len({p.run_rel for p in photos}) == 4
    assert all(p.path.is_absolute() for p in photos)


def test_list_outside_its_folder_uses_the_absolute_path(tmp_path: Path):
    far = photo(tmp_path / "a" / "b.png")
    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    listing.write_text(f"{far}\n")
    [p] = find_photos(listing)
    assert p.path == far and p.rel == far.as_posix().lstrip("/")


def test_no_photos_is_an_input_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no photos found"):
        find_photos(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        find_photos(tmp_path / "nope")
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no photos"):
        find_photos(tmp_path / "blank.txt")


def test_output_inside_the_photo_folder_is_not_searched(user_folder: Path):
    """--out inside --images: the batch's own run folders (input/image.png, masks, GIFs) and any
    other run folder are never taken for photos."""
    root = user_folder / "runs"
    run = root / "IMG_0001-JPG-12345678"
    photo(run / "input" / "image.png")
    (run / "run.json").write_text("{}")
    photo(user_folder / "old run" / "masks" / "0.png")
    (user_folder / "old run" / "run.json").write_text("{}")
    photo(root / "stray.png")
    rels = {p.rel for p in find_photos(user_folder, exclude=[root])}
    assert not any(r.startswith(("runs/", "old run/")) for r in rels)
    assert "IMG_0001.JPG" in rels and len(rels) == 6
