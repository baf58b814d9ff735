"""Which photos a batch has, and where each one's run folder goes.

`find_photos(src)`: a folder (searched recursively) or a text file listing one photo per line.
Each photo gets `run_rel`, a run folder path relative to the batch root that is

- deterministic and stable across reruns (a rerun finds its own earlier work),
- unique: the same stem in two folders or two formats gives two folders (the extension and a
  hash of the whole relative path are part of the name),
- safe for any file name: only [A-Za-z0-9._-] survive, each component at most 60 characters,
  no component starts with '.' (so no '..' and no hidden folders).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from pipeline.core.errors import InputError

COMPONENT_MAX = 60
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Photo:
    path: Path  # absolute path of the file
    rel: str  # posix path relative to the folder (or list file's folder) it was found from
    run_rel: str  # its run folder, relative to the batch root


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format this Pillow can open."""
    from PIL import Image

    Image.init()
    # Stub formats open only with an extra handler registered (none here): not photos.
    stubs = {"BUFR", "GRIB", "HDF5", "WMF"}
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in stubs)


def _safe_component(text: str) -> str:
    safe = _UNSAFE.sub("_", text)[:COMPONENT_MAX]
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return safe or "_"


def run_rel_for(rel: str) -> str:
    """The run folder (relative) of a photo found at posix path `rel`: sanitized folders, then
    '<stem>-<ext>-<sha256(rel)[:8]>', e.g. 'a b/ç.JPG' -> 'a_b/_-JPG-<8 hex>'."""
    p = PurePosixPath(rel)
    ext = _safe_component(p.suffix[1:]) if p.suffix else "noext"
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    folders = [_safe_component(part) for part in p.parent.parts if part not in ("", "/")]
    leaf = f"{_safe_component(p.stem)[:COMPONENT_MAX]}-{ext}-{digest}"
    return "/".join([*folders, leaf])


def _from_folder(root: Path, exclude: list[Path]) -> list[Photo]:
    exts = image_extensions()
    found: list[Photo] = []
    skip = {str(Path(p).absolute()) for p in exclude}
    for folder, dirs, files in os.walk(root):
        if folder != str(root) and (folder in skip or "run.json" in files):
            dirs[:] = []  # the batch's own output (when --out is inside --images) or another run folder
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden folders are not searched
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                continue
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            found.append(Photo(path.absolute(), rel, run_rel_for(rel)))
    return found


def _from_list(list_file: Path) -> list[Photo]:
    """One path per line; relative paths resolve against the list file's folder; blank lines and
    '#' comments are skipped; a path listed twice is one photo."""
    base = list_file.parent.absolute()
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the photo list {list_file}: {exc}.", "pass a UTF-8 text file with one photo path per line, or a folder.") from None
    found: list[Photo] = []
    seen: set[Path] = set()
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        path = Path(os.path.normpath(path if path.is_absolute() else base / path))
        if path in seen:
            continue
        seen.add(path)
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:  # outside the list's folder: named by its absolute path
            rel = path.as_posix().lstrip("/")
        # A listed file that is missing or not an image is still a photo of the batch: it fails
        # with its own error instead of silently vanishing.
        found.append(Photo(path, rel, run_rel_for(rel)))
    return found


def find_photos(src: Path, *, exclude: list[Path] | tuple[Path, ...] = ()) -> list[Photo]:
    """Every photo under folder `src` (recursive; extensions Pillow reads, any case; hidden files
    and folders skipped; folders in `exclude` and run folders (with a run.json) not searched), or
    listed in text file `src`. Sorted by relative path."""
    src = Path(src).expanduser()
    if src.is_dir():
        photos = _from_folder(src.absolute(), list(exclude))
        where = f"in {src} (searched recursively for .jpg, .png, .webp, .tif and every other format Pillow reads)"
    elif src.is_file():
        photos = _from_list(src)
        where = f"listed in {src}"
    else:
        raise InputError(f"--images {src} does not exist.", "pass a folder of photos or a text file listing one photo path per line.")
    if not photos:
        raise InputError(f"no photos found {where}.", "pass a folder that holds photos, or a list file with one photo path per line.")
    photos.sort(key=lambda p: p.rel)
    return photos
