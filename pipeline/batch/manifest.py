"""What a batch has done: `ROOT/batch.json`, and each photo's stage records in its run.json.

The run folders are the source of truth. After each photo and stage, the worker adds a small
record to the photo's run.json (`"batch": {"stage1": {...}, "stage2": {...}}`) naming the photo
file's size and mtime, the stage's config key and (stage 2) the masks it used. The driver decides
what is still to do from these records alone, without decoding a single image, so the rerun of a
finished batch starts no server and no worker. batch.json is a summary rewritten (atomically) as
photos finish; a killed batch loses at most the summary's last second, never a photo's work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pipeline.core import config as C
from pipeline.core.atomic import write_json_atomic
from pipeline.core.runfolder import Manifest, RunPaths, file_stamp

BATCH_FORMAT_VERSION = 1
PHOTO_STATUSES = ("done", "failed", "partial", "pending")

# The config fields each stage's results depend on (the same ones Stage1.input_key and Stage2's
# per-object keys use, by name): a change to any of them redoes that stage, other flags do not.
_STAGE_FIELDS = {
    "stage1": {
        "run": ("profile", "seed"),
        "planner": ("planner", "prompt", "max_objects", "vlm_model"),
        "server": ("vlm_model_id",),
        "segmenter": None,  # every field
    },
    "stage2": {
        "run": ("profile", "seed"),
        "lifter": None,
        "export": None,
    },
}
# Fields that change how fast or where a stage runs, never what it writes. (--sam3-checkpoint is
# not one of them: other weights give other masks, as in Stage1.input_key.)
_NOT_IN_KEY = {"masks", "sam3d_compile", "sam3d_min_gpu_gib", "sam3_phrase_batch", "sam3_bpe"}


def stage_key(stage: str, cfgs: Any) -> str:
    """A short hash of the settings `stage` depends on (see _STAGE_FIELDS)."""
    parts: dict[str, Any] = {"stage": stage}
    for section, names in _STAGE_FIELDS[stage].items():
        record = C.to_record(getattr(cfgs, section))
        parts[section] = {k: v for k, v in record.items() if (names is None or k in names) and k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_stage(run_dir: Path, stage: str, *, image: str, image_stamp: dict | None, key: str, status: str, error: str | None,
                 objects: int, seconds: float, final: bool, masks_stamp: dict | None = None) -> None:
    """Add this stage's outcome to the photo's run.json (called by the worker after each photo)."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        return
    manifest = Manifest(paths)
    manifest.data.setdefault("batch", {})[stage] = {
        "status": status,
        "error": error,
        "objects": objects,
        "seconds": round(seconds, 3),
        "final": final,
        "image": image,
        "image_stamp": image_stamp,
        "key": key,
        "masks_stamp": masks_stamp,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest.save()


def stage_record(run_dir: Path, stage: str, image: Path | None, key: str) -> dict[str, Any] | None:
    """The photo's record for `stage` if it still holds: same key, same photo file (size and
    mtime), the stage's outputs present, and (stage 2) the masks it used unchanged. Else None."""
    paths = RunPaths(Path(run_dir))
    rec = any_stage_record(run_dir, stage)
    if rec is None or rec.get("key") != key or not rec.get("final"):
        return None
    if image is not None and rec.get("image_stamp") != file_stamp(image):
        return None
    if rec.get("status") in ("done", "partial"):
        if stage == "stage1" and not paths.masks_json.is_file():
            return None
        if stage == "stage2" and rec.get("masks_stamp") != file_stamp(paths.masks_json):
            return None
    return rec


def any_stage_record(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The photo's last record for `stage`, whatever inputs it was for (to explain a status)."""
    try:
        data = json.loads(RunPaths(Path(run_dir)).manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rec = (data.get("batch") or {}).get(stage)
    return rec if isinstance(rec, dict) else None


def photo_status(stages: list[str], records: dict[str, dict | None]) -> str:
    """One status for a photo over the stages asked for: failed if a stage failed, pending if one
    is not finished, partial if some objects failed, else done."""
    recs = [records.get(s) for s in stages]
    if any(r is not None and r.get("status") == "failed" for r in recs):
        return "failed"
    if any(r is None for r in recs):
        return "pending"
    if any(r.get("status") == "partial" for r in recs):  # type: ignore[union-attr]
        return "partial"
    return "done"


@dataclasses.dataclass
class PhotoRow:
    image: str
    run_dir: str  # relative to ROOT
    status: str = "pending"
    error: str | None = None
    objects: int = 0
    seconds: float = 0.0
    stage: str | None = None  # the stage it is at or last finished

    def record(self) -> dict[str, Any]:
        return {"image": self.image, "run_dir": self.run_dir, "status": self.status, "error": self.error,
                "objects": self.objects, "seconds": round(self.seconds, 3), "stage": self.stage}


class BatchManifest:
    """ROOT/batch.json: engine, resolved config, versions, and one row per photo.

    `save()` writes at most once per `min_interval` seconds unless forced, so a fast stage 1 over
    thousands of photos does not rewrite a large file for every photo.
    """

    def __init__(self, root: Path, *, engine: str, config: dict[str, Any], versions: dict[str, Any], rows: list[PhotoRow],
                 images: str | None = None, stages: list[str] | None = None, min_interval: float = 1.0):
        self.root = Path(root)
        self.path = self.root / "batch.json"
        self.engine = engine
        self.config = config
        self.versions = versions
        self.rows = rows
        self.images = images
        self.stages = stages or []
        self.min_interval = min_interval
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._last = 0.0
        self.workers: dict[str, Any] = {}
        self.vlm: dict[str, Any] | None = None

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in PHOTO_STATUSES}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def record(self) -> dict[str, Any]:
        return {
            "format_version": BATCH_FORMAT_VERSION,
            "engine": self.engine,
            "images": self.images,
            "stages": self.stages,
            "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "counts": self.counts(),
            "config": self.config,
            "versions": self.versions,
            "workers": self.workers,
            "vlm_server": self.vlm,
            "photos": [r.record() for r in self.rows],
        }

    def save(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return False
        self._last = now
        write_json_atomic(self.path, self.record())
        return True


def read_batch(root: Path) -> dict[str, Any] | None:
    """ROOT/batch.json as written by an earlier batch, or None."""
    try:
        data = json.loads((Path(root) / "batch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("photos"), list) else None
