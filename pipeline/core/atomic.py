"""Atomic file and folder writes: write beside the target, then rename over it.

A killed run therefore leaves either the old file or the new one, never half of one.
Temporary names start with '.tmp-' so readers and resume logic can ignore them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
_UMASK: int | None = None


def _umask() -> int:
    """The process umask (read once; os.umask can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def _publish_mode(path: Path, *, folder: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give the result the mode a plain open() would."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`.

    The temporary file keeps the target's suffix so writers that pick a format by
    suffix (Pillow, imageio) still work.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.stem + "-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _publish_mode(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    return write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> Path:
    return write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_with_atomic(target: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Call `writer(tmp_path)` and move the result onto `target` once it returned."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a whole folder under a temporary name, then swap it into place.

    Used for `masks/`: readers see the complete old folder or the complete new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + "-", dir=target.parent))
    try:
        yield tmp
        _publish_mode(tmp, folder=True)
        old = None
        if target.exists():
            old = target.with_name(TMP_PREFIX + target.name + "-old-" + tmp.name[-8:])
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temporaries(folders: list[Path]) -> int:
    """Remove '.tmp-*' leftovers of a killed run directly inside each of `folders` (not below them:
    only the places this project writes to are touched). Returns how many were removed."""
    count = 0
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in Path(folder).glob(TMP_PREFIX + "*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            count += 1
    return count


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
