"""The two stages as reusable units: build once (models loaded once), then `process` photo after photo.

    stage1 = Stage1(configs); stage1.process(image, run_dir)        photo -> plan -> masks/
    stage2 = Stage2(configs); stage2.process(run_dir, image, masks)  masks -> objects/ -> scene/ -> report

This is the shape a Ray actor wants: construct on a GPU worker, then feed it photos.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline.core import config as C
from pipeline.core.atomic import clean_stale_temporaries, write_json_atomic
from pipeline.core.errors import BackendError, InputError, describe
from pipeline.core.progress import progress
from pipeline.core.runfolder import Manifest, RunPaths, file_stamp, sha256_file
from pipeline.core.types import ObjectMask, Plan, PlanItem
from pipeline.selection import BackendChoice, choose_backends


@dataclass
class Configs:
    run: C.RunConfig = field(default_factory=C.RunConfig)
    planner: C.PlannerConfig = field(default_factory=C.PlannerConfig)
    server: C.VLMServerConfig = field(default_factory=C.VLMServerConfig)
    segmenter: C.SegmenterConfig = field(default_factory=C.SegmenterConfig)
    lifter: C.LifterConfig = field(default_factory=C.LifterConfig)
    export: C.ExportConfig = field(default_factory=C.ExportConfig)

    def record(self) -> dict[str, Any]:
        return {name: C.to_record(getattr(self, name)) for name in ("run", "planner", "server", "segmenter", "lifter", "export")}


def versions() -> dict[str, str]:
    """Versions of what ran, for run.json (only modules already imported or cheap to query)."""
    from importlib import metadata

    out = {"sam3d-gs": pipeline.__version__, "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("numpy", "pillow", "torch", "opencv-python-headless", "scipy", "openai", "sam3", "gsplat", "viser"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def parse_box_flags(values: list[str], width: int, height: int) -> list[PlanItem]:
    """`--box x0,y0,x1,y1[,label]` in pixels -> plan items (clamped; bad boxes are errors)."""
    items = []
    for raw in values:
        parts = [p.strip() for p in raw.split(",")]
        try:
            x0, y0, x1, y1 = (float(p) for p in parts[:4])
        except ValueError:
            raise InputError(f"--box {raw!r} is not 'x0,y0,x1,y1[,label]'.", "give four pixel numbers, e.g. --box 10,20,200,180,mug") from None
        x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
        y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise InputError(f"--box {raw!r} is empty or outside the {width}x{height} image.", "give x0 < x1 and y0 < y1 inside the image.")
        # No label: an empty phrase, so SAM3 gets upstream's box-only text "visual" (not the concept
        # "object"); the mask is still labelled "object" (pipeline/masks/sam3.py _prompts).
        label = ",".join(parts[4:]).strip()
        items.append(PlanItem(phrase=label[:60], box_xyxy=(x0, y0, x1, y1)))
    return items


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pixels_sha256(rgb: np.ndarray) -> str:
    """Identity of a photo for resume keys: its normalized pixels, so the original file and the run's
    own input/image.png count as the same photo."""
    h = hashlib.sha256(f"{rgb.shape}".encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _decoded(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, str]:
    from pipeline.image.load import load_photo

    rgb = load_photo(Path(path))
    rgb.setflags(write=False)  # shared between the CLI's check and both stages: nobody may draw on it
    return rgb, pixels_sha256(rgb)


def load_input_photo(image_path: Path) -> tuple[np.ndarray, str]:
    """The normalized photo (read-only) and its pixel sha256, decoded once per file version: the
    CLI's up-front check and both stages of `run` share one decode."""
    path = Path(image_path).resolve()
    try:
        st = path.stat()
    except OSError:
        from pipeline.image.load import load_photo

        load_photo(path)  # raises the one-line InputError for a missing or unreadable path
        raise
    return _decoded(str(path), st.st_mtime_ns, st.st_size)


def prepare_input(paths: RunPaths, manifest: Manifest, image_path: Path) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Normalize the photo into <run>/input/image.png (unless it already holds these pixels).

    Returns (rgb, pixel sha256 for resume keys, the run.json record of the photo). The record names
    the original file and its sha256; for the run's own input/image.png it is the one already there.
    """
    from pipeline.image.load import save_png

    rgb, pixels = load_input_photo(image_path)
    own = paths.input_image.exists() and Path(image_path).resolve() == paths.input_image.resolve()
    previous = manifest.data.get("inputs", {}).get("image", {})
    same_pixels = paths.input_image.exists() and previous.get("pixels_sha256") == pixels
    if own and same_pixels:
        return rgb, pixels, previous
    record = {"path": str(image_path), "sha256": sha256_file(image_path), "pixels_sha256": pixels, "width": rgb.shape[1], "height": rgb.shape[0]}
    if not own and not same_pixels:
        save_png(paths.input_image, rgb)
    return rgb, pixels, record


def _planner_settings(cfg: Configs) -> dict[str, Any]:
    """Every planner setting a plan depends on: all but where the server is and its key."""
    return {k: v for k, v in C.to_record(cfg.planner).items() if k not in ("vlm_url", "vlm_api_key")}


def kept_plan_settings(cfg: Configs, *, own_server: bool) -> str:
    """What a plan kept in stage1/plan.json depends on besides the photo: the planner settings, the
    seed, and the model that answers: the model id of a vLLM the pipeline starts (a batch's own too:
    its port changes from run to run), else the --vlm-url server."""
    server = {"vlm_model_id": cfg.server.vlm_model_id} if own_server else {"vlm_url": cfg.planner.vlm_url}
    return _key("kept plan", _planner_settings(cfg), cfg.run.seed, server)


def _recorded_plan(record: dict[str, Any]) -> tuple[Plan, dict[str, Any]]:
    """A plan.json record read back: the plan, and its request with its timing (what `_write_plan`
    writes again for a plan made ahead or kept)."""
    from pipeline.plan.vlm import plan_from_record

    return plan_from_record(record), {**record.get("request", {}), "timing": record.get("timing", {})}


def _kept_record(plan_json: Path, settings: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """stage1/plan.json's record and its `reuse`, when that plan was kept for these settings
    (`kept_plan_settings`); None otherwise (no file, unreadable, asked again)."""
    try:
        record = json.loads(Path(plan_json).read_text(encoding="utf-8"))
        reuse = record.get("reuse")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(reuse, dict) or reuse.get("settings") != settings:
        return None
    return record, reuse


def kept_plan_fits(plan_json: Path, settings: str, image: Path) -> bool:
    """Whether stage1/plan.json keeps a plan for these settings and this photo file (unchanged size
    and mtime): the batch driver's check, which reads no photo. The stage checks the pixels too."""
    kept = _kept_record(plan_json, settings)
    return kept is not None and kept[1].get("image_stamp") == file_stamp(image)


def vllm_server_args(cfg: Configs, *, mode: str | None = None) -> dict[str, Any]:
    """How the pipeline starts vLLM for stage 1 (one photo here, a whole batch in pipeline.batch).
    Scene mode stops vLLM before SAM3 starts, query mode runs both at once: the GPU share follows."""
    mode = mode or ("query" if cfg.planner.prompt else "scene")
    return {"served_model_name": cfg.planner.vlm_model, "mode": mode, "max_image_side": cfg.planner.vlm_max_image_side}


def started_vllm_planner_args(cfg: Configs) -> dict[str, Any]:
    """VLMPlanner arguments for a vLLM the pipeline started itself (with our flags)."""
    return {"vllm_server": True, "reasoning_parser": bool(cfg.server.reasoning_parser)}


class Stage1:
    """photo -> plan -> masks/. Loads the planner and segmenter once.

    `started_vllm`: --vlm-url is a vLLM the pipeline started with these settings (a batch's server),
    so the planner talks to it exactly as to one started here."""

    def __init__(self, cfg: Configs, choice: BackendChoice | None = None, log=print, *, started_vllm: bool = False, kept_plans_only: bool = False):
        self.cfg = cfg
        self.choice = choice or choose_backends(cfg.run, cfg.planner, cfg.server, cfg.segmenter, cfg.lifter)
        self.log = log
        self.started_vllm = started_vllm
        # A batch that started no server because every photo keeps its plan: a photo whose plan no
        # longer fits fails (the next run starts a server for it) instead of starting vLLM here.
        self.kept_plans_only = kept_plans_only
        self._segmenter = None
        # A batch worker plans several photos at once in threads (VLM requests overlap); the one
        # segmenter (one model on one GPU) takes them one at a time.
        self._segment_lock = threading.RLock()

    def segmenter(self):
        with self._segment_lock:
            if self._segmenter is None:
                if self.choice.segmenter == "sam3":
                    from pipeline.masks.sam3 import Sam3Segmenter

                    self._segmenter = Sam3Segmenter(self.cfg.segmenter, device=self.cfg.run.device)
                else:
                    from pipeline.masks.classical import ClassicalSegmenter

                    self._segmenter = ClassicalSegmenter()
            return self._segmenter

    def _segment(self, image: np.ndarray, plan: Plan | None) -> tuple[list[ObjectMask], Any]:
        """Masks and the segmenter's report for this call, read under the same lock."""
        with self._segment_lock:
            masks = self.segmenter().segment(image, plan)
            return masks, getattr(self._segmenter, "last_report", None)

    @contextlib.contextmanager
    def planner(self, paths: RunPaths):
        """Yields a planner (or None); starts and stops vLLM around it when no --vlm-url was given."""
        if self.choice.planner != "vlm":
            yield None
            return
        from pipeline.plan.vlm import VLMPlanner

        if not self.choice.start_vlm_server:
            yield self._client_planner()
            return
        from pipeline.plan.server import VLLMServer

        log_path = paths.logs_dir / "vllm.log"
        with VLLMServer(self.cfg.server, log_path, **vllm_server_args(self.cfg)) as server:
            self.log(f"vLLM ready at {server.url} (log: {log_path})")
            try:
                yield VLMPlanner(self.cfg.planner, url=server.url, api_key=server.api_key, model=server.model_name, seed=self.cfg.run.seed,
                                 **started_vllm_planner_args(self.cfg))
            except BackendError as exc:
                if server.alive():
                    raise
                # The request failed because the server died: say that, not "unreachable".
                from pipeline.plan.server import read_log_tail

                code = server.process.returncode if server.process is not None else None
                last = next((line for line in reversed(read_log_tail(log_path)) if line.strip()), "")
                raise BackendError(
                    f"vLLM exited during stage 1 (exit code {code}); its last log line: {last.strip()[:200]}",
                    f"see {log_path}; if it ran out of GPU memory, lower --gpu-memory-utilization or --max-model-len.",
                ) from exc

    def _client_planner(self):
        """A planner for a server that runs already (--vlm-url, or the batch's own vLLM)."""
        from pipeline.plan.vlm import VLMPlanner

        started = started_vllm_planner_args(self.cfg) if self.started_vllm else {}
        return VLMPlanner(self.cfg.planner, seed=self.cfg.run.seed, **started)

    def plan_key(self, image_sha: str) -> str:
        """What a plan depends on: the photo's pixels, every planner setting but where the server is
        and its key, and the seed. A plan made ahead is used only where this key matches."""
        return _key("plan", image_sha, _planner_settings(self.cfg), self.cfg.run.seed)

    def plan_ahead(self, image_path: Path) -> dict[str, Any]:
        """Plan a photo without a run folder and without the segmenter: {"key", "record"} (the record
        is plan.json's content) for `process(..., ahead=...)`. A batch asks the VLM this way while its
        stage 1 workers still start. Needs a running server; raises what planning raises."""
        from pipeline.plan.vlm import plan_record

        if self.choice.planner != "vlm" or self.choice.start_vlm_server:
            raise InputError("planning ahead needs a running VLM server (--vlm-url or the batch's own).", "start one, or plan in the workers.")
        image, sha = load_input_photo(Path(image_path))
        planner = self._client_planner()
        plan = planner.plan(image, query=self.cfg.planner.prompt)
        return {"key": self.plan_key(sha), "record": plan_record(plan, {**planner.last_request, "planned_ahead": True})}

    def kept_settings(self) -> str:
        return kept_plan_settings(self.cfg, own_server=self.choice.start_vlm_server or self.started_vllm)

    def _kept_plan(self, paths: RunPaths, image_sha: str) -> tuple[Plan, dict[str, Any]] | None:
        """The plan kept in stage1/plan.json when it was made for this photo (pixels) and these
        settings (`kept_plan_settings`): (the planner's plan, its request) or None."""
        kept = _kept_record(paths.plan, self.kept_settings())
        if kept is None or kept[1].get("pixels_sha256") != image_sha:
            return None
        record = kept[0]
        try:
            plan, request = _recorded_plan(record)
        except (KeyError, TypeError, ValueError):
            return None
        plan.items = plan.items[int(record.get("box_prompts") or 0) :]
        if not plan.items:
            return None
        return plan, {**request, "kept": True}

    def _forget_kept_plan(self, paths: RunPaths) -> None:
        """plan.json's plan fits no more (the photo changed under the same size and mtime): drop its
        `reuse`, so the next batch run sees that this photo needs planning."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            record = json.loads(paths.plan.read_text(encoding="utf-8"))
            if record.get("reuse"):
                write_json_atomic(paths.plan, {**record, "reuse": None})

    def input_key(self, image_sha: str) -> str:
        c = self.cfg
        return _key(image_sha, self.choice.planner, self.choice.segmenter, C.to_record(c.segmenter), c.planner.prompt, c.planner.max_objects, c.planner.vlm_model if self.choice.planner == "vlm" else None)

    def process(self, image_path: Path, run_dir: Path, *, ahead: dict[str, Any] | None = None) -> dict[str, Any]:
        """`ahead`: a plan made by `plan_ahead` for this photo; used in place of asking the VLM when
        its key matches this photo and these settings, else ignored."""
        paths = RunPaths(Path(run_dir))
        paths.root.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(paths.written_folders())
        manifest = Manifest(paths)
        t0 = time.perf_counter()
        image, sha, image_record = prepare_input(paths, manifest, Path(image_path))
        h, w = image.shape[:2]
        key = self.input_key(sha)
        manifest.update(
            inputs={"image": image_record},
            config=self.cfg.record(),
            backends=self.choice.record(),
            versions=versions(),
        )
        if not self.cfg.run.force and paths.masks_json.exists():
            done = json.loads(paths.masks_json.read_text())
            if done.get("meta", {}).get("input_key") == key:
                self.log(f"stage 1: masks/ already done for these inputs ({len(done.get('objects', []))} objects); --force redoes them")
                return {"skipped": True, "objects": len(done.get("objects", []))}

        boxes = parse_box_flags(self.cfg.segmenter.box, w, h)
        timings: dict[str, float] = {}
        vlm = self.choice.planner == "vlm"
        # A plan the VLM made for this photo and these settings in an earlier run (a retry after a
        # crash, other segmenter settings) is kept: in scene mode no server starts for it.
        kept = self._kept_plan(paths, sha) if vlm and not self.cfg.run.force else None
        need_server = vlm and (kept is None or bool(self.cfg.planner.prompt))
        if need_server and self.kept_plans_only:
            self._forget_kept_plan(paths)
            raise InputError(
                "this batch started no VLM server (every photo to do kept its plan in stage1/plan.json), but this photo's plan does not fit it any more.",
                "run the same command again: the batch then starts a server for this photo.",
            )
        if vlm and not need_server and self.choice.start_vlm_server:
            manifest.update(backends={**self.choice.record(), "vlm_server_started": False})  # the plan is kept: no server
        made_by_vlm = False  # then plan.json says how a later run may keep it (`reuse`)
        with contextlib.ExitStack() as server_scope:
            planner = server_scope.enter_context(self.planner(paths)) if need_server else None
            t = time.perf_counter()
            request = None
            if kept is not None:
                plan, request = kept
                made_by_vlm = True
                self.log(f"stage 1: kept the plan in {paths.plan} ({len(plan.items)} objects; made for this photo and these settings; --force asks the VLM again)")
                plan.items = boxes + plan.items
            elif planner is not None:
                made_by_vlm = True
                if ahead and ahead.get("key") == self.plan_key(sha) and isinstance(ahead.get("record"), dict):
                    plan, request = _recorded_plan(ahead["record"])
                    self.log(f"stage 1: planned ahead while the workers started ({len(plan.items)} objects)")
                else:
                    plan = self._plan_or_record(paths, planner, image)
                plan.items = boxes + plan.items
            else:
                plan = Plan(items=boxes, mode="none", query=self.cfg.planner.prompt)
            timings["plan"] = time.perf_counter() - t
            reuse = None
            if made_by_vlm and len(plan.items) > len(boxes):
                reuse = {"settings": self.kept_settings(), "pixels_sha256": sha, "image_stamp": file_stamp(image_path)}
            # Kept now: a segmenter failure below must not lose minutes of VLM thinking.
            self._write_plan(paths, plan, planner, request, reuse=reuse, box_prompts=len(boxes))
            if not self.cfg.planner.prompt:
                # Scene mode needs the VLM no more: stop vLLM now so SAM3 gets its GPU memory.
                server_scope.close()
            t = time.perf_counter()
            masks, seg_report = self._segment(image, plan if plan.items else None)
            timings["segment"] = time.perf_counter() - t
            # The user's own --box objects are kept as asked; only the planner's candidates are checked.
            own = [m for m in masks if _from_user_box(m, boxes)]
            candidates = [m for m in masks if not _from_user_box(m, boxes)]
            if planner is not None and self.cfg.planner.prompt and candidates:
                t = time.perf_counter()
                keep = set(planner.verify(image, candidates, self.cfg.planner.prompt))
                masks = own + [m for i, m in enumerate(candidates) if i in keep]
                timings["verify"] = time.perf_counter() - t
                self._write_plan(paths, plan, planner, request, reuse=reuse, box_prompts=len(boxes))  # now with the verification
        if not masks:
            raise InputError(
                "stage 1 found no objects in the photo; nothing was written to masks/.",
                "try --segmenter/--planner options, a --prompt, or give --box x0,y0,x1,y1 prompts.",
            )
        from pipeline.masks.store import write_masks

        written = write_masks(paths.masks_dir, image, masks, image_sha256=image_record["sha256"], meta={"input_key": key, "segmenter": self.choice.segmenter, "planner": self.choice.planner, "segmenter_report": seg_report})
        timings["total"] = time.perf_counter() - t0
        # New masks replace the old list: objects of an earlier masks/ must not linger in run.json or objects/.
        drop_stale_objects(paths, manifest, {m.id for m in written}, self.log)
        manifest.data["objects"] = {
            m.id: {"label": m.label, "score": m.score if np.isfinite(m.score) else None, "area": m.area, "status": "masked"} for m in written
        }
        manifest.update(timings={f"stage1.{k}": round(v, 4) for k, v in timings.items()})
        self.log(f"stage 1: {len(written)} objects -> {paths.masks_dir}")
        return {"skipped": False, "objects": len(written), "timings": timings}

    def _plan_or_record(self, paths: RunPaths, planner, image: np.ndarray) -> Plan:
        """Plan; when the VLM answered but nothing usable came back, keep its answer in plan.json."""
        from pipeline.plan.vlm import VLMAnswerError

        try:
            return planner.plan(image, query=self.cfg.planner.prompt)
        except VLMAnswerError as exc:
            if getattr(exc, "plan", None) is not None:
                self._write_plan(paths, exc.plan, planner)
            raise

    def _write_plan(self, paths: RunPaths, plan: Plan, planner, request: dict[str, Any] | None = None, *,
                    reuse: dict[str, Any] | None = None, box_prompts: int = 0) -> None:
        """`request`: what was asked for a plan made ahead or kept (else the planner's last request).
        `reuse`: what a later run checks before it keeps this plan (None: it asks again)."""
        if self.choice.planner != "vlm":
            record = {"format_version": 1, "planner": "none", "mode": plan.mode, "query": plan.query,
                      "items": [{"phrase": i.phrase, "box_xyxy": list(i.box_xyxy) if i.box_xyxy else None} for i in plan.items]}
        else:
            from pipeline.plan.vlm import plan_record

            record = plan_record(plan, request or planner.last_request, verification=getattr(planner, "last_verification", None))
            record["box_prompts"] = box_prompts
            record["reuse"] = reuse
        write_json_atomic(paths.plan, record)


class Stage2:
    """masks -> objects/ (gaussians.pt per object) -> scene/ and exports -> report. Loads the lifter once."""

    def __init__(self, cfg: Configs, choice: BackendChoice | None = None, log=print):
        self.cfg = cfg
        self.choice = choice or choose_backends(cfg.run, cfg.planner, cfg.server, cfg.segmenter, cfg.lifter)
        self.log = log
        self._lifter = None

    def lifter(self):
        if self._lifter is None:
            if self.choice.lifter == "sam3d":
                from pipeline.objects.sam3d import Sam3dLifter

                self._lifter = Sam3dLifter(self.cfg.lifter, device=self.cfg.run.device)
            else:
                from pipeline.objects.inflate import InflateLifter

                self._lifter = InflateLifter(n_gaussians=self.cfg.lifter.inflate_gaussians)
        return self._lifter

    def warm_up(self) -> dict[str, Any]:
        """What every photo's export uses, once before the first photo: torch (gaussians.pt), the
        export modules, the lifter's own imports, and one small GIF rendered and written as export
        writes them (on a GPU: CUDA's start, gsplat's kernels, the palette search's). A batch worker
        calls it before saying ready, so its first photo costs what the others cost: stage 2's first
        photo took 7 s against 2.5 s a photo after it on an H200 (docs/PERFORMANCE.md), and 1.8 s
        against 0.1 s on 2 cores, 2.7 s of that importing torch."""
        t = time.perf_counter()
        from pipeline.core.types import Gaussians
        from pipeline.objects.gaussians_pt import _torch
        from pipeline.scene import export  # noqa: F401 - its imports (PIL's GIF writer, PLY, splat)
        from pipeline.scene.camera import Camera, default_intrinsics
        from pipeline.scene.render_gsplat import pick_renderer

        _torch()
        lifter_warm_up = getattr(self.lifter(), "warm_up", None)
        if callable(lifter_warm_up):
            lifter_warm_up()
        renderer = "none"
        if self.cfg.export.turntable:
            render, renderer, _ = pick_renderer(self.cfg.export.renderer)
            n = 64
            rng = np.random.default_rng(0)
            tiny = Gaussians(
                xyz=(rng.normal(0, 0.2, (n, 3)) + [0, 0, 3]).astype(np.float32),
                features_dc=np.zeros((n, 3), np.float32),
                opacity=np.full((n, 1), 0.8, np.float32),
                scale=np.full((n, 3), 0.05, np.float32),
                rotation=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
            )
            cam = Camera(viewmat=np.eye(4, dtype=np.float32), K=default_intrinsics(32, 32), width=32, height=32)
            with tempfile.TemporaryDirectory(prefix="sam3dgs-warm-up-") as tmp:
                export.write_frames(Path(tmp) / "warm-up.gif", tiny, [cam], self.cfg.export.gif_fps, render, renderer)
            if renderer == "gsplat":  # the palette search's GPU kernels too (those few frames need no search)
                import torch

                from pipeline.scene.gif_palette import palette_indices

                palette_indices(torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, device="cuda"))
        return {"renderer": renderer, "seconds": round(time.perf_counter() - t, 3)}

    def load_masks(
        self, paths: RunPaths, manifest: Manifest, image: np.ndarray, image_sha: str, image_path: Path, masks_path: Path | None, mask_set=None
    ) -> list[ObjectMask]:
        from pipeline.masks.layouts import find_masks
        from pipeline.masks.store import write_masks

        h, w = image.shape[:2]
        source = Path(masks_path) if masks_path else paths.root
        if mask_set is None:
            mask_set = find_masks(source, (w, h), exclude=[image_path])
        if mask_set.skipped:
            for s in mask_set.skipped:
                self.log(f"stage 2: skipped {s['file']}: {s['reason']}")
        ours = paths.masks_json.exists() and source.resolve() in (paths.root.resolve(), paths.masks_dir.resolve())
        if ours:
            return mask_set.masks
        # Foreign masks are copied into this run's masks/ so the run folder stands on its own.
        written = write_masks(paths.masks_dir, image, mask_set.masks, image_sha256=image_sha, meta={"imported_from": str(source), "layout": mask_set.layout, "sources": mask_set.sources, "skipped": mask_set.skipped})
        manifest.update(inputs={"masks": {"path": str(source), "layout": mask_set.layout, "skipped": mask_set.skipped}})
        return written

    def process(self, run_dir: Path, image_path: Path | None = None, masks_path: Path | None = None, *, mask_set=None) -> dict[str, Any]:
        """`mask_set`: masks already read from `masks_path` by the caller (pipeline.masks.layouts.find_masks)."""
        from pipeline.objects.gaussians_pt import save_object_pt

        paths = RunPaths(Path(run_dir))
        paths.root.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(paths.written_folders())
        manifest = Manifest(paths)
        t0 = time.perf_counter()
        if image_path is None:
            if not paths.input_image.exists():
                raise InputError(f"{paths.root} has no input/image.png and no --image was given.", "pass --image PHOTO.")
            image_path = paths.input_image
        image, sha, image_record = prepare_input(paths, manifest, Path(image_path))
        masks = self.load_masks(paths, manifest, image, image_record["sha256"], Path(image_path), masks_path, mask_set)
        drop_stale_objects(paths, manifest, {m.id for m in masks}, self.log)
        manifest.update(
            inputs={"image": image_record},
            config=self.cfg.record(),
            backends={"lifter": self.choice.lifter, "reasons": {**manifest.data.get("backends", {}).get("reasons", {}), "lifter": self.choice.reasons.get("lifter", "")}},
            versions=versions(),
        )
        lifter = self.lifter()
        if callable(getattr(lifter, "versions", None)):
            manifest.update(versions=lifter.versions())  # e.g. the sam-3d-objects commit and checkpoint revision
        todo, results = [], {}
        for m in masks:
            key = _key(sha, hashlib.sha256(np.packbits(m.mask).tobytes()).hexdigest(), self.choice.lifter, C.to_record(self.cfg.lifter), self.cfg.run.seed)
            status_path = paths.object_dir(m.id) / "status.json"
            if not self.cfg.run.force and status_path.exists() and (paths.object_dir(m.id) / "gaussians.pt").exists():
                st = json.loads(status_path.read_text())
                if st.get("input_key") == key and st.get("status") == "done":
                    results[m.id] = st
                    continue
            todo.append((m, key))
        if len(todo) < len(masks):
            self.log(f"stage 2: {len(masks) - len(todo)} objects already done for the same inputs (--force redoes them)")
        t = time.perf_counter()
        pointmaps_before = getattr(lifter, "pointmap_computations", 0)
        context = lifter.prepare(image) if todo else None
        prepare_s = time.perf_counter() - t
        # The camera the lifter placed objects with (the scene GIF starts from the photo's view).
        K = getattr(lifter, "intrinsics", None) if todo else None
        K = getattr(context, "intrinsics", None) if K is None else K
        if K is not None:
            manifest.data.setdefault("stats", {})["intrinsics"] = np.asarray(K, dtype=float).round(4).tolist()
        for m, key in progress(todo, self.cfg.run.progress, "stage 2: objects"):
            t = time.perf_counter()
            status: dict[str, Any] = {"id": m.id, "label": m.label, "input_key": key, "lifter": self.choice.lifter}
            _remove_outputs(paths.object_dir(m.id))  # nothing of an earlier run (e.g. another lifter's mesh) may survive
            try:
                obj = _lift_with_retry(lifter, context, m, self.cfg.run.seed)
                save_object_pt(paths.object_dir(m.id) / "gaussians.pt", obj)
                if obj.mesh_glb:
                    from pipeline.core.atomic import write_bytes_atomic

                    write_bytes_atomic(paths.object_dir(m.id) / "mesh.glb", obj.mesh_glb)
                status.update(status="done", n_gaussians=len(obj.gaussians), error=None)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one object failing never loses the others
                status.update(status="failed", error=describe(exc))
                self.log(f"stage 2: {m.id} failed: {status['error']}")
            lifter.release()  # after the except block, so a failed call's tensors can really go
            status["seconds"] = round(time.perf_counter() - t, 3)
            write_json_atomic(paths.object_dir(m.id) / "status.json", status)
            results[m.id] = status
            manifest.set_object(m.id, **{k: status[k] for k in ("status", "error", "seconds") if k in status}, n_gaussians=status.get("n_gaussians"), label=m.label, score=m.score if np.isfinite(m.score) else None, area=m.area)
        for oid, st in results.items():
            if st.get("status") == "done":
                manifest.data["objects"].setdefault(oid, {}).update(status="done", n_gaussians=st.get("n_gaussians"), error=None)
        timings = {"stage2.prepare": round(prepare_s, 4), "stage2.lift": round(time.perf_counter() - t0, 4)}
        if todo and hasattr(lifter, "pointmap_computations"):
            stats = manifest.data.setdefault("stats", {})
            stats["pointmap_computations"] = lifter.pointmap_computations - pointmaps_before  # for this photo
            stats["pointmap_method"] = getattr(lifter, "pointmap_method", None)
            stats["retried_objects"] = list(getattr(lifter, "retried", []))
        manifest.update(timings=timings)
        export_summary = self.export(paths, manifest)
        return {"objects": results, "export": export_summary}

    def export(self, paths: RunPaths, manifest: Manifest) -> dict[str, Any]:
        from pipeline.scene.export import export_run

        t = time.perf_counter()
        K = manifest.data.get("stats", {}).get("intrinsics")
        previous = None if self.cfg.run.force else manifest.data.get("export")  # files already written for the same inputs stay
        summary = export_run(paths.root, self.cfg.export, progress=self.cfg.run.progress, intrinsics=None if K is None else np.asarray(K, np.float32), previous=previous)
        manifest.update(timings={"export": round(time.perf_counter() - t, 4)}, export=_jsonable(summary))
        if not (summary.get("scene", {}).get("resumed") and paths.report.is_file()):
            write_report(paths, manifest)  # nothing new to show when every export file was reused
        return summary


def drop_stale_objects(paths: RunPaths, manifest: Manifest, current: set[str], log=print) -> None:
    """Object folders (and run.json entries) whose id the current masks/ no longer has would end up in
    the scene and the report: remove them."""
    import shutil

    if paths.objects_dir.is_dir():
        for d in sorted(paths.objects_dir.iterdir()):
            if d.is_dir() and d.name.startswith("obj_") and d.name not in current:
                shutil.rmtree(d)
                log(f"removed {d.relative_to(paths.root)} (not in the current masks/)")
    for oid in set(manifest.data.get("objects", {})) - current:
        del manifest.data["objects"][oid]


def write_report(paths: RunPaths, manifest: Manifest) -> None:
    from pipeline.report.html import write_report as _write

    t = time.perf_counter()
    _write(paths.root)
    manifest.update(timings={"report": round(time.perf_counter() - t, 4)})


def _lift_with_retry(lifter, context, m: ObjectMask, seed: int):
    """One retry after freeing memory; the lifter's own retry (sam3d) happens inside lift_with_retry."""
    if hasattr(lifter, "lift_with_retry"):
        return lifter.lift_with_retry(context, m, seed=seed)
    try:
        return lifter.lift(context, m, seed=seed)
    except (MemoryError, RuntimeError, BackendError):
        lifter.release()
        return lifter.lift(context, m, seed=seed)


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _from_user_box(m: ObjectMask, boxes: list[PlanItem]) -> bool:
    """Whether a mask answers one of the user's --box prompts: same label, and its tight box fills
    most of that prompt box (a refined mask is a little smaller than a loose box, hence 0.5)."""
    return any((m.label == b.phrase or not b.phrase) and _box_iou(m.box_xyxy, b.box_xyxy) >= 0.5 for b in boxes)


OBJECT_OUTPUTS = ("gaussians.pt", "mesh.glb", "object.ply", "object.splat", "turntable.gif")


def _remove_outputs(obj_dir: Path) -> None:
    for name in OBJECT_OUTPUTS:
        (obj_dir / name).unlink(missing_ok=True)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
