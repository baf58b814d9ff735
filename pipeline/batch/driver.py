"""`python -m pipeline batch`: find the photos, skip what is done, run the stages on an engine.

    run_batch(batch_cfg, configs) -> exit code (0 all done, 1 some photos or objects failed)

Stage-major by default: every photo's stage 1 (one vLLM server for all of it, only if some photo
still needs planning and no --vlm-url was given), then every photo's stage 2 on all workers.
--pipelined sends a photo to stage 2 as soon as its stage 1 is done. What is done is decided from
each run folder's run.json records (pipeline.batch.manifest), so a rerun of a finished batch starts
no server and no worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from pipeline.batch import manifest as M
from pipeline.batch.photos import Photo, find_photos
from pipeline.batch.protocol import WorkerSpec, config_argv, config_env
from pipeline.batch.timeline import mark
from pipeline.core.atomic import TMP_PREFIX
from pipeline.core.config import to_record
from pipeline.core.device import requested_device
from pipeline.core.errors import InputError, describe
from pipeline.core.runfolder import RunPaths
from pipeline.selection import choose_planner

STAGE_NAMES = {"stage1": "stage 1", "stage2": "stage 2"}


def _stages(stage: str) -> list[str]:
    return {"all": ["stage1", "stage2"], "1": ["stage1"], "2": ["stage2"]}[stage]


def _photos_from_batch(root: Path) -> list[Photo]:
    data = M.read_batch(root)
    if data is None:
        raise InputError(
            f"{root} has no batch.json, and no --images was given.",
            "pass --images DIR (or a list file), or --out the root of an earlier batch.",
        )
    photos = []
    for row in data["photos"]:
        image, run_rel = str(row.get("image", "")), str(row.get("run_dir", ""))
        if not run_rel or run_rel.startswith(("/", "..")) or "/../" in f"/{run_rel}/":
            continue  # a hand-edited row pointing outside the root is ignored
        photos.append(Photo(Path(image), image, run_rel))
    if not photos:
        raise InputError(f"{root}/batch.json lists no photos.", "pass --images DIR to (re)discover them.")
    return photos


@contextlib.contextmanager
def _root_lock(root: Path):
    """One batch at a time per root (flock: released by the kernel even after kill -9)."""
    lock_path = root / ".batch.lock"
    fh = open(lock_path, "a+")  # noqa: SIM115 - held for the whole batch
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise InputError(f"another batch is running on {root} (pid {holder}).", "wait for it to finish, or use another --out.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


class _Progress:
    """One bar over photo-stages, labelled with the current stage; on a terminal only."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and total and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="batch", unit="photo", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def stage(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"batch {name}")

    def step(self, note: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if note:
                self.bar.set_postfix_str(note[:40])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def wrap(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` that lifts the bar out of the way while it prints."""

        def write(msg: str) -> None:
            if self.bar is None:
                log(msg)
                return
            with self.bar.external_write_mode(file=sys.stderr):
                log(msg)

        return write


def make_engine(bcfg: Any):
    if bcfg.engine == "ray":
        from pipeline.batch.ray_engine import RayEngine  # the only place Ray is imported

        return RayEngine(bcfg)
    from pipeline.batch.local import LocalEngine

    return LocalEngine(bcfg)


def run_batch(bcfg: Any, cfgs: Any, *, log: Callable[[str], None] = print, on_root: Callable[[Path], Any] | None = None) -> int:
    """Run the batch; returns 0 when every photo is done, 1 when some failed, are partial or pending.
    Raises PipelineError for bad input (no photos, --image with --images ...). `on_root(ROOT)` is
    called once the input is checked and ROOT exists (the CLI moves its log to ROOT/logs/ then)."""
    if cfgs.run.image is not None:
        raise InputError("--image and --images are exclusive.", "use --image PHOTO for one photo, or --images DIR for a batch.")
    if cfgs.run.out is None:
        raise InputError("a batch needs --out ROOT.", "pass --out ROOT: one run folder per photo goes under it.")
    root = Path(cfgs.run.out).expanduser().absolute()
    stages = _stages(bcfg.stage)
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root} is a file, not a folder.", "pass a new folder or the root of an earlier batch.")
    device = requested_device(cfgs.run.device)
    if device.startswith("cuda:"):
        raise InputError(
            f"--device {device} (or SAM3DGS_DEVICE) picks one GPU for one photo; a batch spreads its workers over GPUs.",
            "drop --device (or use --device cuda), and choose GPUs with --worker-gpus or CUDA_VISIBLE_DEVICES.",
        )
    if bcfg.images is not None:
        photos = find_photos(Path(bcfg.images), exclude=[root])  # --out may sit inside --images
    elif stages == ["stage2"]:
        photos = _photos_from_batch(root)
    else:
        raise InputError("no --images given.", "pass --images DIR (a folder of photos) or a text file listing them.")
    if bcfg.max_attempts < 1 or bcfg.vlm_concurrency < 1:
        raise InputError("--max-attempts and --vlm-concurrency must be at least 1.", "pass a positive number.")
    root.mkdir(parents=True, exist_ok=True)
    with _root_lock(root):
        # A driver killed while rewriting batch.json or index.html leaves their temporaries; ours only.
        for leftover in [*root.glob(TMP_PREFIX + "batch-*"), *root.glob(TMP_PREFIX + "index-*")]:
            leftover.unlink(missing_ok=True)
        if on_root is not None:
            on_root(root)
        return _Batch(bcfg, cfgs, root, photos, stages, log).run()


class _Batch:
    def __init__(self, bcfg: Any, cfgs: Any, root: Path, photos: list[Photo], stages: list[str], log: Callable[[str], None]):
        self.bcfg, self.cfgs, self.root, self.photos, self.stages, self.log = bcfg, cfgs, root, photos, stages, log
        self.keys = {s: M.stage_key(s, cfgs) for s in ("stage1", "stage2")}
        self.records: list[dict[str, dict | None]] = []
        from pipeline.stages import versions

        self.manifest = M.BatchManifest(
            root,
            engine=bcfg.engine,
            config={"batch": to_record(bcfg), **cfgs.record()},
            versions=versions(),
            rows=[M.PhotoRow(str(p.path), p.run_rel) for p in photos],
            images=str(bcfg.images) if bcfg.images is not None else None,
            stages=stages,
        )
        self.progress: _Progress | None = None
        self.engine = None
        self.pools: dict[str, Any] = {}
        self._closing: list[threading.Thread] = []
        self.vlm = None

    # ---- state from the run folders

    def run_dir(self, i: int) -> Path:
        return self.root / self.photos[i].run_rel

    def _known(self, i: int, stage: str) -> dict | None:
        if self.cfgs.run.force:
            return None
        rec = M.stage_record(self.run_dir(i), stage, self.photos[i].path if stage == "stage1" else None, self.keys[stage])
        if rec is not None and self.bcfg.retry_failed and rec.get("status") in ("failed", "partial"):
            return None
        return rec

    def _refresh_row(self, i: int) -> None:
        row, recs = self.manifest.rows[i], self.records[i]
        row.status = M.photo_status(self.stages, recs)
        row.stage = next((s for s in reversed(self.stages) if recs.get(s) is not None), None)
        last = recs[row.stage] if row.stage else None
        row.error = next((recs[s].get("error") for s in self.stages if recs.get(s) and recs[s].get("error")), None)
        row.objects = int(last.get("objects", 0)) if last else 0
        row.seconds = sum(float(recs[s].get("seconds") or 0) for s in self.stages if recs.get(s))
        if self.stages == ["stage2"] and recs.get("stage2") is None and not self._needs_stage2(i):
            # Stage 2 alone cannot run without masks: say why instead of a bare 'pending'.
            earlier = M.any_stage_record(self.run_dir(i), "stage1")
            if earlier is not None and earlier.get("status") == "failed":
                row.status, row.error = "failed", f"stage 1 failed: {earlier.get('error')}"
            else:
                row.error = "no masks/ yet: run stage 1 first"

    def _needs_stage2(self, i: int) -> bool:
        if self.records[i].get("stage2") is not None:
            return False
        if "stage1" in self.stages:
            rec = self.records[i].get("stage1")
            return rec is not None and rec.get("status") == "done"
        return RunPaths(self.run_dir(i)).masks_json.is_file()

    # ---- the run

    def run(self) -> int:
        t0 = time.perf_counter()
        for i in range(len(self.photos)):
            self.records.append({s: self._known(i, s) for s in self.stages})
            self._refresh_row(i)
        todo1 = [i for i in range(len(self.photos)) if "stage1" in self.stages and self.records[i]["stage1"] is None]
        todo2 = [i for i in range(len(self.photos)) if "stage2" in self.stages and self._needs_stage2(i)]
        waiting = sum(1 for r in self.manifest.rows if r.status == "pending") - len({*todo1, *todo2})
        finished = len(self.photos) - len({*todo1, *todo2}) - waiting
        parts = [f"{finished} finished before"]
        if "stage1" in self.stages:
            parts.append(f"{len(todo1)} to do from stage 1")
        if "stage2" in self.stages:
            parts.append(f"{len(todo2)} to do from stage 2")
        if waiting:
            parts.append(f"{waiting} without masks")
        self.log(f"batch: {len(self.photos)} photos under {self.root}: " + ", ".join(parts))
        interrupted = False
        try:
            if todo1 or todo2:
                self.progress = _Progress(self.cfgs.run.progress, len(todo1) + (len(todo2) if "stage1" not in self.stages else 0))
                self.log = self.progress.wrap(self.log)
                mark("engine starts")
                self.engine = make_engine(self.bcfg)
                if todo1:
                    self._stage1(todo1)
                if "stage2" in self.stages and not (self.bcfg.pipelined and todo1):
                    todo2 = [i for i in range(len(self.photos)) if self._needs_stage2(i)]
                    if todo2:
                        self._run_stage("stage2", todo2)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self._shutdown(kill=interrupted)
            for i in range(len(self.photos)):
                self._refresh_row(i)
            self.manifest.save(force=True)
            self._index()
            if self.progress is not None:
                self.progress.close()
        counts = self.manifest.counts()
        self.log(f"batch: {counts['done']} done, {counts['partial']} partial, {counts['failed']} failed, "
                 f"{counts['pending']} pending of {len(self.photos)} photos in {time.perf_counter() - t0:.1f} s "
                 f"(summary: {self.manifest.path}, index: {self.root / 'index.html'})")
        for row in self.manifest.rows:
            if row.status in ("failed", "partial") and row.error:
                self.log(f"  {row.status}: {row.image}: {row.error}")
        return 0 if counts["done"] == len(self.photos) else 1

    def _spec(self, stage: str, concurrency: int, env: dict[str, str]) -> WorkerSpec:
        python = (self.bcfg.stage1_python if stage == "stage1" else self.bcfg.stage2_python) or sys.executable
        return WorkerSpec(
            stage=stage,
            flags=config_argv(self.cfgs),
            python=str(python),
            concurrency=concurrency,
            env={**config_env(self.cfgs), **env},
            max_attempts=self.bcfg.max_attempts,
            ready_timeout=self.bcfg.worker_ready_timeout,
            log_dir=self.root / "logs",
        )

    def _stage1(self, todo: list[int]) -> None:
        # 'vlm' or 'none' for every stage 1 worker, decided once here, with GPUs counted by the
        # engine (nvidia-smi, or Ray's resources): the driver's env may hold a CPU torch, or none.
        planner, _ = choose_planner(self.cfgs.run, self.cfgs.planner, self.cfgs.server, has_gpu=self.engine.has_gpus)
        # Workers get the decision as a flag, so none of them decides otherwise in its own env.
        self.cfgs.planner.planner = planner  # type: ignore[assignment]
        env: dict[str, str] = {}
        no_server = False  # every photo to do keeps its plan, in scene mode
        kept = self._kept_plans(todo) if planner == "vlm" else set()
        if kept:
            self.log(f"batch: {len(kept)} of {len(todo)} photos to do keep the plan in their stage1/plan.json (--force asks the VLM again)")
        if planner == "vlm" and not self.cfgs.planner.vlm_url:
            no_server = len(kept) == len(todo) and not self.cfgs.planner.prompt
            if no_server:
                # Scene mode needs the VLM for planning only: no photo needs it.
                self.log("batch: no vLLM server needed")
                env = {"SAM3DGS_PLANS_KEPT": "1"}
            else:
                self.vlm = self.engine.vlm(self.cfgs, self.root / "logs")
                self.log("batch: starting one vLLM server for stage 1")
                env = self.vlm.start()
                mark("vLLM ready")
                self.manifest.vlm = self.vlm.info()
        # The server is up: plan the first photos in the driver while Ray and the workers start.
        ahead = planner == "vlm" and not no_server and self.bcfg.plan_ahead and self.engine.plans_ahead
        planning = self._plan_ahead([i for i in todo if i not in kept], self._ahead_stage(env)) if ahead else None
        with self._abandoned_on_error(planning):
            if "stage2" in self.stages and hasattr(self.engine, "colocate"):
                # Ray: one stage 1 and one stage 2 actor per GPU where both fit, so stage 2 starts meanwhile.
                self.engine.colocate(self.cfgs, vlm_started=self.vlm is not None)
            n = self.engine.default_workers("stage1")
            concurrency = max(1, math.ceil(self.bcfg.vlm_concurrency / n)) if planner == "vlm" else 1
            if self.progress:
                self.progress.stage("stage 1")
            spec = self._spec("stage1", concurrency, env)
            if self.bcfg.pipelined and "stage2" in self.stages:
                self._pipelined(todo, spec, n, planning)
                return
            self._run_stage("stage1", todo, spec=spec, n=n, prewarm="stage2" in self.stages, planning=planning)
        self._stop_vlm()

    def _kept_plans(self, todo: list[int]) -> set[int]:
        """The photos whose stage1/plan.json keeps a plan for these settings and this photo file
        (pipeline/stages.py, kept_plan_fits): their workers plan nothing. No photo is read here."""
        if self.cfgs.run.force:
            return set()
        from pipeline.stages import kept_plan_fits, kept_plan_settings

        settings = kept_plan_settings(self.cfgs, own_server=not self.cfgs.planner.vlm_url)
        return {i for i in todo if kept_plan_fits(RunPaths(self.run_dir(i)).plan, settings, self.photos[i].path)}

    def _ahead_stage(self, env: dict[str, str]) -> Any:
        """A Stage1 in the driver that reaches the running server, for planning while the workers start."""
        import copy

        from pipeline.selection import BackendChoice
        from pipeline.stages import Stage1

        cfgs = copy.deepcopy(self.cfgs)
        cfgs.planner.vlm_url = env.get("SAM3DGS_VLM_URL") or cfgs.planner.vlm_url
        cfgs.planner.vlm_api_key = env.get("SAM3DGS_VLM_API_KEY") or cfgs.planner.vlm_api_key
        cfgs.planner.vlm_model = env.get("SAM3DGS_VLM_MODEL") or cfgs.planner.vlm_model
        choice = BackendChoice("vlm", cfgs.segmenter.segmenter, cfgs.lifter.lifter, reasons={"planner": "planning ahead in the batch driver"})
        return Stage1(cfgs, choice, log=lambda _msg: None, started_vllm=env.get("SAM3DGS_VLM_STARTED") == "1")

    def _plan_ahead(self, todo: list[int], ahead: Any) -> Any:
        if not todo:
            return None
        from pipeline.batch.ahead import PlanAhead

        mark("planning ahead begins")
        return PlanAhead(ahead, [(i, str(self.photos[i].path)) for i in todo], self.bcfg.vlm_concurrency)

    @contextlib.contextmanager
    def _abandoned_on_error(self, planning: Any):
        """Stage 1 fails (its workers do not start, or later): planning ahead takes no more photos (its
        threads are daemons). Harmless once `_planned` has finished it."""
        try:
            yield
        except BaseException:
            if planning is not None:
                planning.abandon()
            raise

    def _planned(self, planning: Any) -> dict[int, dict]:
        """The workers are ready: the plans made meanwhile (after the requests in flight)."""
        if planning is None:
            return {}
        plans = planning.finish()
        mark(f"planning ahead done ({len(plans)} planned, {planning.failed} left to the workers)")
        return plans

    def _stop_vlm(self) -> None:
        if self.vlm is not None:
            self.vlm.stop()
            self.vlm = None

    def _open(self, stage: str, spec: WorkerSpec, n: int, *, wait: bool = True):
        self.log(f"batch: starting {n} {STAGE_NAMES[stage]} worker(s) on the {self.engine.name} engine")
        pool = self.engine.open_pool(spec, n, wait=wait)
        mark(f"{stage} workers ready" if wait else f"{stage} workers asked for")
        self.pools[stage] = pool
        self.manifest.workers[stage] = pool.info()
        return pool

    def _close(self, stage: str, *, background: bool = False) -> None:
        pool = self.pools.pop(stage, None)
        if pool is None:
            return

        def close() -> None:
            mark(f"{stage} workers closing")
            pool.close()
            mark(f"{stage} workers closed")

        if background:  # the next stage's workers are up already: they need not wait for these to exit
            t = threading.Thread(target=close, name=f"close-{stage}", daemon=True)
            t.start()
            self._closing.append(t)
        else:
            close()

    def _run_stage(self, stage: str, todo: list[int], *, spec: WorkerSpec | None = None, n: int | None = None, prewarm: bool = False, planning: Any = None) -> None:
        if spec is None:
            spec = self._spec(stage, 1, {})
        if self.progress:
            self.progress.stage(STAGE_NAMES[stage])
            if stage == "stage2" and "stage1" in self.stages and self.progress.bar is not None:
                self.progress.bar.total = (self.progress.bar.total or 0) + len(todo)
                self.progress.bar.refresh()
        pool = self.pools.get(stage)
        if pool is None:
            pool = self._open(stage, spec, self.engine.default_workers(stage) if n is None else n)
        elif hasattr(pool, "wait_started"):
            pool.wait_started()  # opened early (prewarm): its start errors surface here
            mark(f"{stage} workers ready")
        if prewarm and getattr(self.engine, "prewarm_stage2", False):
            self._open("stage2", self._spec("stage2", 1, {}), self.engine.default_workers("stage2"), wait=False)
        plans = self._planned(planning)
        futures = {self._submit(pool, stage, i, plans.get(i)): (stage, i) for i in todo}
        self._collect(futures)
        self._close(stage, background=stage == "stage1" and "stage2" in self.pools)

    def _pipelined(self, todo: list[int], spec1: WorkerSpec, n1: int, planning: Any = None) -> None:
        pool1 = self._open("stage1", spec1, n1)
        # Not waited for: on a small cluster stage 2's actors may only fit once stage 1's are gone.
        pool2 = self._open("stage2", self._spec("stage2", 1, {}), self.engine.default_workers("stage2"), wait=False)
        if self.progress and self.progress.bar is not None:
            self.progress.bar.total = (self.progress.bar.total or 0) + len(todo)
        plans = self._planned(planning)
        futures = {self._submit(pool1, "stage1", i, plans.get(i)): ("stage1", i) for i in todo}
        in_stage1 = set(todo)
        for i in range(len(self.photos)):
            if i not in in_stage1 and self._needs_stage2(i):
                futures[self._submit(pool2, "stage2", i)] = ("stage2", i)

        def then(stage: str, i: int) -> dict[Future, tuple[str, int]]:
            if stage == "stage1" and self._needs_stage2(i):
                return {self._submit(pool2, "stage2", i): ("stage2", i)}
            return {}

        self._collect(futures, then=then, until_stage1_done=self._stop_vlm_when_planned)
        self._close("stage1")
        self._close("stage2")

    def _stop_vlm_when_planned(self) -> None:
        self._stop_vlm()
        self._close("stage1")

    def _submit(self, pool: Any, stage: str, i: int, plan: dict | None = None) -> Future:
        self.manifest.rows[i].stage = stage
        return pool.submit(str(self.photos[i].path), str(self.run_dir(i)), self.keys[stage], plan)

    def _collect(self, futures: dict[Future, tuple[str, int]], *, then=None, until_stage1_done=None) -> None:
        pending = dict(futures)
        left = Counter(s for s, _ in pending.values())  # photos in flight per stage
        answered: Counter[str] = Counter()
        while pending:
            done, _ = wait(list(pending), timeout=1.0, return_when=FIRST_COMPLETED)
            for f in done:
                stage, i = pending.pop(f)
                left[stage] -= 1
                self._finish(stage, i, f)
                answered[stage] += 1
                if answered[stage] == 1:
                    mark(f"{stage} first photo answered")
                if left[stage] == 0:
                    mark(f"{stage} last photo answered ({answered[stage]})")
                if then is not None:
                    more = then(stage, i)
                    pending.update(more)
                    left.update(s for s, _ in more.values())
                if stage == "stage1" and left["stage1"] == 0 and until_stage1_done is not None:
                    until_stage1_done()
            for name, pool in self.pools.items():  # pids, restarts and states as they change
                self.manifest.workers[name] = pool.info()
            self.manifest.save()

    def _finish(self, stage: str, i: int, future: Future) -> None:
        try:
            ans = future.result()
        except Exception as exc:  # noqa: BLE001 - a worker that cannot run is this photo's failure
            ans = {"status": "failed", "error": describe(exc), "objects": 0, "seconds": 0.0, "final": False}
        rec = {k: ans.get(k) for k in ("status", "error", "objects", "seconds", "final")}
        self.records[i][stage] = rec
        self._refresh_row(i)
        if rec["status"] != "done" and not rec.get("final", True):
            self.log(f"{STAGE_NAMES[stage]}: {self.photos[i].rel}: {rec['status']}: {rec['error']}")
        if self.progress:
            self.progress.step(self.photos[i].rel)

    def _shutdown(self, *, kill: bool) -> None:
        mark("shutdown begins")
        for stage in list(self.pools):
            pool = self.pools.pop(stage)
            with contextlib.suppress(Exception):
                pool.kill() if kill else pool.close()
        for t in self._closing:  # pools closing in the background (_close) are gone before Ray is
            t.join()
        with contextlib.suppress(Exception):
            self._stop_vlm()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.shutdown()
        mark("shutdown done")

    def _index(self) -> None:
        try:
            from pipeline.report.html import write_batch_index

            write_batch_index(self.root, [r.record() for r in self.manifest.rows])
        except Exception as exc:  # noqa: BLE001 - the index is a convenience; batch.json has it all
            self.log(f"batch: index.html not written: {describe(exc, with_type=True)}")
