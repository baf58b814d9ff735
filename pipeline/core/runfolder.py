"""The run folder layout (documented in docs/FORMATS.md) and its manifest, run.json.

    <run>/run.json                     manifest
    <run>/input/image.png              the photo, normalized to RGB
    <run>/stage1/plan.json             planner request, raw answer, reasoning, parsed plan
    <run>/masks/masks.json             one entry per object, plus masks/<id>.png and overlay.png
    <run>/objects/<id>/gaussians.pt    plain tensors, torch.load(weights_only=True)
    <run>/objects/<id>/object.ply|.splat|turntable.gif|mesh.glb|status.json
    <run>/scene/scene.ply|.splat|.gif|.glb
    <run>/report.html
    <run>/logs/                        logs of subprocesses (vLLM)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.atomic import TMP_PREFIX, write_json_atomic

MANIFEST_VERSION = 1
OBJECT_ID_RE = re.compile(r"^obj_\d{3,}$")


def object_id(index: int) -> str:
    """IDs come from a counter, never from model or user text."""
    return f"obj_{index + 1:03d}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | Path) -> dict[str, int] | None:
    """Size and mtime of a file: how a rerun recognises an unchanged photo without reading it."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_outputs_root() -> Path:
    """SAM3DGS_OUTPUTS, else the checkout's outputs/ (beside pipeline/), else ./outputs."""
    import os

    if os.environ.get("SAM3DGS_OUTPUTS"):
        return Path(os.environ["SAM3DGS_OUTPUTS"])
    checkout = Path(__file__).resolve().parents[2] / "outputs"
    return checkout if (checkout / "README.md").is_file() else Path("outputs")


def default_run_dir(image: Path, root: Path | None = None) -> Path:
    root = default_outputs_root() if root is None else root
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", image.stem)[:60] or "image"
    return root / f"{stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def foreign_entries(run_dir: Path, allow: frozenset[str] = frozenset()) -> list[str]:
    """What stops us writing into an existing folder: its entries, sorted, when it has no run.json
    (not a run folder of ours), leaving out our own temporaries (a killed run's) and `allow` (what
    the caller put there itself). [] for a new, empty or own folder. Both the CLI (--out) and the
    batch worker (a photo's run folder) refuse a folder where this is not empty."""
    import os

    if not run_dir.is_dir() or (run_dir / "run.json").exists():
        return []
    return sorted(e for e in os.listdir(run_dir) if not e.startswith(TMP_PREFIX) and e not in allow)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def input_image(self) -> Path:
        return self.root / "input" / "image.png"

    @property
    def plan(self) -> Path:
        return self.root / "stage1" / "plan.json"

    @property
    def masks_dir(self) -> Path:
        return self.root / "masks"

    @property
    def masks_json(self) -> Path:
        return self.masks_dir / "masks.json"

    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    def object_dir(self, oid: str) -> Path:
        if not OBJECT_ID_RE.match(oid):
            raise ValueError(f"not an object id: {oid!r}")
        return self.objects_dir / oid

    @property
    def scene_dir(self) -> Path:
        return self.root / "scene"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def written_folders(self) -> list[Path]:
        """Every folder this project writes files into (where a killed run can leave '.tmp-*')."""
        folders = [self.root, self.input_image.parent, self.plan.parent, self.masks_dir, self.scene_dir]
        if self.objects_dir.is_dir():
            folders += [d for d in self.objects_dir.iterdir() if d.is_dir() and OBJECT_ID_RE.match(d.name)]
        return folders


class Manifest:
    """run.json: read-modify-write with atomic replacement. One process writes at a time."""

    def __init__(self, paths: RunPaths):
        self.paths = paths
        self.data: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        if self.paths.manifest.exists():
            try:
                return json.loads(self.paths.manifest.read_text())
            except (OSError, json.JSONDecodeError):
                pass
        return {
            "format_version": MANIFEST_VERSION,
            "created": _now(),
            "inputs": {},
            "config": {},
            "backends": {},
            "versions": {},
            "timings": {},
            "objects": {},
        }

    def update(self, **sections: Any) -> None:
        """Merge dict sections (inputs, config, backends, versions, timings, objects) and save."""
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(self.data.get(key), dict):
                self.data[key].update(value)
            else:
                self.data[key] = value
        self.save()

    def set_object(self, oid: str, **fields: Any) -> None:
        self.data.setdefault("objects", {}).setdefault(oid, {}).update(fields)
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json_atomic(self.paths.manifest, self.data)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
