"""RayEngine (`--engine ray [--ray-address ADDR]`): stage workers as Ray actors, on one machine or a cluster.

The only module that imports Ray, and only inside functions (so `import pipeline.batch.ray_engine`
works without it). Ray Core actors, not Ray Data (docs/BATCH.md says why):

- each stage worker is an actor (num_gpus / num_cpus from the flags; Ray sets CUDA_VISIBLE_DEVICES)
  owning ONE WorkerProcess child started with that stage's interpreter, which inherits the actor's
  CUDA_VISIBLE_DEVICES. Ray itself stays in the light env; the model envs never import it;
- the driver keeps the photo queue and gives an actor a photo only when it has a free slot (ray.wait
  on the requests in flight), so a dead actor takes at most its in-flight photos with it, and those are
  sent again (bounded by --max-attempts). Actors: max_restarts bounded, max_task_retries=0: we retry
  ourselves, idempotently (atomic writes, skip-done in the stages);
- one vLLM server per node, as an actor pinned there (NodeAffinitySchedulingStrategy) that runs
  pipeline.plan.server.VLLMServer; each stage 1 actor is pinned to a node with a server and reaches it
  on 127.0.0.1 (the server never listens on other interfaces).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pipeline.batch.protocol import WorkerSpec, WorkerStartError, project_pythonpath
from pipeline.batch.timeline import mark
from pipeline.core.errors import BackendError, PipelineError, describe, missing_dependency

ACTOR_MAX_RESTARTS = 2
PROBES = 30  # start calls (1 s apart) an actor that lost its process gets before it counts as dead


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise missing_dependency("ray", "light venv (.venv)", "pip install -r envs/requirements-ray.txt") from exc
    return ray


# ---------------------------------------------------------------- actor bodies (plain classes; Ray wraps them)


class StageActor:
    """Owns one stage worker child; `process` is called by up to `concurrency` threads at once."""

    def __init__(self, spec: WorkerSpec, name: str, env: dict[str, str]):
        self.worker = spec.make(name, env)

    def start(self) -> dict[str, Any]:
        import ray

        ready = dict(self.worker.start())
        ready["node_id"] = ray.get_runtime_context().get_node_id()
        ready["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return ready

    def process(self, image: str, run_dir: str, key: str | None, plan: dict | None = None) -> dict[str, Any]:
        return self.worker.process(image, run_dir, key=key, plan=plan)  # (re)starts the child when needed

    def close(self) -> None:
        self.worker.close()


class VLMServerActor:
    """One vLLM server on this actor's node for the duration of stage 1."""

    def __init__(self, cfgs: Any, log_path: str):
        from pipeline.plan.server import VLLMServer
        from pipeline.stages import vllm_server_args

        # Query mode's GPU share: the server stays up while SAM3 actors segment beside it.
        self.server = VLLMServer(cfgs.server, Path(log_path), **vllm_server_args(cfgs, mode="query"))

    def start(self) -> dict[str, str]:
        from pipeline.batch.local import started_vllm_env

        self.server.start()
        return started_vllm_env(self.server)

    def stop(self) -> None:
        self.server.stop()


# ---------------------------------------------------------------- pools


class _Job:
    __slots__ = ("image", "run_dir", "key", "plan", "future", "tries")

    def __init__(self, image: str, run_dir: str, key: str | None, plan: dict | None, future: Future):
        self.image, self.run_dir, self.key, self.plan, self.future, self.tries = image, run_dir, key, plan, future, 0


class RayPool:
    """One stage's actors, fed by a dispatcher thread: photos wait in the driver until an actor has a slot."""

    def __init__(
        self, engine: RayEngine, spec: WorkerSpec, n: int, *, num_gpus: float, node_env: dict[str, dict[str, str]] | None = None, slots: Any = None
    ):
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        self.spec = spec
        self.max_tries = spec.max_attempts
        self.cpus = engine.bcfg.worker_cpus
        self.gpus = num_gpus
        remote = ray.remote(StageActor)
        nodes = sorted(node_env) if node_env else []
        self.actors: list[dict[str, Any]] = []
        for i in range(max(1, n)):
            options: dict[str, Any] = {
                "num_gpus": num_gpus,
                "num_cpus": engine.bcfg.worker_cpus,
                "max_concurrency": spec.concurrency,
                "max_restarts": ACTOR_MAX_RESTARTS,
                "max_task_retries": 0,
            }
            env: dict[str, str] = {}
            if slots is not None:  # one bundle per GPU, shared by one stage 1 and one stage 2 actor (RayEngine.colocate)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=slots, placement_group_bundle_index=i % slots.bundle_count)
            elif nodes:  # stage 1 with per-node vLLM servers: on a node that has one, using it
                node = nodes[i % len(nodes)]
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
                env = node_env[node]  # type: ignore[index]
            else:
                # Ray's default packs a node before the next one; workers belong on every node.
                options["scheduling_strategy"] = "SPREAD"
            handle = remote.options(**options).remote(spec, f"{spec.stage}-worker-{i}", env)
            self.actors.append({"handle": handle, "name": f"{spec.stage}-worker-{i}", "state": "starting", "busy": 0,
                                "start": handle.start.remote(), "ready": None, "error": None})
        self.jobs: collections.deque[_Job] = collections.deque()
        self.cond = threading.Condition()
        self.running: dict[Any, tuple[_Job, dict[str, Any]]] = {}
        self.fatal: BaseException | None = None
        self._stop = False
        self.thread = threading.Thread(target=self._dispatch, name=f"ray-{spec.stage}-dispatch", daemon=True)
        self.thread.start()

    def wait_started(self) -> None:
        """Block until one actor is ready; raise the start error if every one failed, or if none
        could even be placed (e.g. more GPUs asked per worker than any node has) in time."""
        deadline = time.monotonic() + self.spec.ready_timeout
        while True:
            with self.cond:
                states = [a["state"] for a in self.actors]
                if "ready" in states:
                    return
                if all(s == "dead" for s in states):
                    if isinstance(self.fatal, PipelineError):
                        raise self.fatal
                    raise BackendError(
                        f"no {self.spec.stage} Ray actor started: {describe(self.fatal, with_type=True) if self.fatal else 'unknown'}.",
                        "see ROOT/logs/ and Ray's logs (/tmp/ray/session_latest/logs on each node).",
                    )
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"no {self.spec.stage} Ray actor was ready after {self.spec.ready_timeout:g} s (each asks for {self.gpus:g} GPU(s) "
                        f"and {self.cpus:g} CPU(s); the cluster has {_ray().cluster_resources()}).",
                        f"lower --{self.spec.stage}-gpus / --worker-cpus, add nodes, or raise --worker-ready-timeout; see ROOT/logs/.",
                    )
                self.cond.wait(0.2)

    def submit(self, image: str, run_dir: str, key: str | None = None, plan: dict | None = None) -> Future:
        future: Future = Future()
        with self.cond:
            self.jobs.append(_Job(image, run_dir, key, plan, future))
            self.cond.notify_all()
        return future

    def _dispatch(self) -> None:
        ray = _ray()
        from ray.exceptions import RayActorError, RayTaskError

        while True:
            with self.cond:
                if self._stop:
                    return
                alive = [a for a in self.actors if a["state"] != "dead"]
                if not alive:
                    self._fail_all(self.fatal or BackendError(f"every {self.spec.stage} Ray actor died.", "see ROOT/logs/ and the Ray logs."))
                for a in self.actors:
                    while a["state"] == "ready" and a["busy"] < self.spec.concurrency and self.jobs:
                        job = self.jobs.popleft()
                        job.tries += 1
                        ref = a["handle"].process.remote(job.image, job.run_dir, job.key, job.plan)
                        a["busy"] += 1
                        self.running[ref] = (job, a)
                now = time.monotonic()
                for a in self.actors:
                    if a["state"] == "probing" and now >= a["probe_at"]:
                        a["state"], a["start"] = "starting", a["handle"].start.remote()
                starts = {a["start"]: a for a in self.actors if a["state"] == "starting"}
                refs = list(self.running) + list(starts)
                if not refs:
                    self.cond.wait(0.2)
                    continue
            done, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in done:
                with self.cond:
                    if ref in starts:
                        a = starts[ref]
                        try:
                            a["ready"] = ray.get(ref)
                            a["state"], a["probes"] = "ready", 0
                            mark(f"{a['name']} ready")
                        except RayTaskError as exc:  # the worker child could not start: no retry helps
                            a["state"], a["error"] = "dead", exc
                            self.fatal = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                        except RayActorError as exc:
                            # Restarting (or gone): ask again a little later, a bounded number of times.
                            a["probes"] = a.get("probes", 0) + 1
                            if a["probes"] <= PROBES:
                                a["state"], a["probe_at"], a["error"] = "probing", time.monotonic() + 1.0, exc
                            else:
                                a["state"], a["error"] = "dead", exc
                                self.fatal = self.fatal or exc
                        self.cond.notify_all()
                        continue
                    job, a = self.running.pop(ref)
                    a["busy"] -= 1
                try:
                    job.future.set_result(ray.get(ref))
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, WorkerStartError):
                        with self.cond:
                            a["state"], a["error"] = "dead", cause
                            self.fatal = cause
                        self._retry(job, cause)
                    else:
                        job.future.set_exception(cause if isinstance(cause, BaseException) else exc)
                except RayActorError as exc:
                    # The actor's process died (node lost, OOM-killed): Ray restarts it (bounded). It gets
                    # photos again once a start call succeeds; if that fails too, it is dead for good.
                    with self.cond:
                        if a["state"] == "ready":
                            a["state"], a["error"] = "starting", exc
                            a["start"] = a["handle"].start.remote()
                    self._retry(job, exc)

    def _retry(self, job: _Job, exc: BaseException) -> None:
        with self.cond:
            if job.tries < self.max_tries and any(a["state"] != "dead" for a in self.actors):
                self.jobs.appendleft(job)
                self.cond.notify_all()
                return
        job.future.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        while self.jobs:
            job = self.jobs.popleft()
            if not job.future.done():
                job.future.set_exception(exc)

    def close(self, *, graceful: bool = True) -> None:
        ray = _ray()
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=5)
        if graceful:
            closing = [a["handle"].close.remote() for a in self.actors if a["state"] == "ready"]
            if closing:
                ray.wait(closing, num_returns=len(closing), timeout=60)
        for a in self.actors:
            try:
                ray.kill(a["handle"], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def kill(self) -> None:
        self.close(graceful=False)

    def info(self) -> list[dict[str, Any]]:
        out = []
        for a in self.actors:
            r = a["ready"] or {}
            out.append({"name": a["name"], "state": a["state"], "pid": r.get("pid"), "node_id": r.get("node_id"), "gpu": r.get("cuda_visible_devices")})
        return out


class RayVLM:
    """One vLLM server actor per node that has GPUs (every alive node on a cluster without GPUs)."""

    def __init__(self, engine: RayEngine, cfgs: Any, log_dir: Path):
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.engine = engine
        nodes = engine.nodes(gpu_only=True) or engine.nodes()
        gpus = engine.vlm_gpus()
        remote = ray.remote(VLMServerActor)
        self.actors: dict[str, Any] = {}
        for node in nodes:
            self.actors[node] = remote.options(
                num_gpus=gpus, num_cpus=1, max_restarts=0, max_concurrency=2,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote(cfgs, str(log_dir / f"vllm-{node[:8]}.log"))
        self.env_by_node: dict[str, dict[str, str]] = {}

    def start(self) -> dict[str, str]:
        ray = _ray()
        from ray.exceptions import RayTaskError

        refs = {node: a.start.remote() for node, a in self.actors.items()}
        for node, ref in refs.items():
            try:
                self.env_by_node[node] = ray.get(ref)
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise cause if isinstance(cause, BaseException) else exc from None
        return {}  # stage 1 actors take their node's server from env_by_node

    def info(self) -> dict[str, Any]:
        return {"servers": {node: env["SAM3DGS_VLM_URL"] for node, env in self.env_by_node.items()}}

    def stop(self) -> None:
        ray = _ray()
        stops = [a.stop.remote() for a in self.actors.values()]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=60)
        for a in self.actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = {}


# ---------------------------------------------------------------- engine


class RayEngine:
    name = "ray"
    # Stage 2's actors are created while stage 1 runs. Ray places them only on resources stage 1 does
    # not hold (so GPU stage-major still holds), unless colocate() gave each GPU one bundle for one
    # worker of each stage; then they start beside stage 1's, off the critical path.
    prewarm_stage2 = True

    def __init__(self, bcfg: Any):
        ray = _ray()
        self.bcfg = bcfg
        self.vlm_handle: RayVLM | None = None
        # No address: a new local Ray of our own ("local"), never whatever Ray happens to run on this
        # machine (ray.init() alone joins a cluster started by `ray start`) -- unless RAY_ADDRESS says so.
        self.address = bcfg.ray_address or (None if os.environ.get("RAY_ADDRESS") else "local")
        self.local = self.address == "local"
        if self.local:
            # Never Ray's subreaper mode: with it, Ray sets SIGCHLD to SIG_IGN in the driver and in every
            # worker (ray 2.60.0, src/ray/util/subreaper.cc), so each subprocess's exit code reads as 0
            # there (a dead vLLM or a crashed stage child looks like success). Our stage children watch
            # their parent and exit with it instead (pipeline/batch/worker.py).
            os.environ["RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"] = "0"
            # Its raylet inherits this process's environment and hands it to every worker it starts, so
            # the actors find the project without a runtime_env: a job-level runtime_env makes the
            # raylet start new workers through its runtime-env agent instead of taking the ones it
            # prestarted (1.3 s more per actor start on 2 cores, docs/PERFORMANCE.md "Batches").
            # up: ray/_private/services.py:994 (start_ray_process: os.environ.copy() for the raylet)
            os.environ["PYTHONPATH"] = project_pythonpath(os.environ.get("PYTHONPATH"))
        self.slots: Any = None  # the placement group of RayEngine.colocate, one bundle per GPU
        self._started = not ray.is_initialized()
        self._init_error: BaseException | None = None
        self._init_done = threading.Event()
        self._release = threading.Event()
        if self._started:
            # Seconds of start-up, overlapped with what the driver does meanwhile (a local vLLM's start).
            # The thread lives until shutdown: Ray starts its local GCS and raylet with a parent-death
            # signal, which the kernel sends when the *thread* that started them ends.
            threading.Thread(target=self._init, name="ray-init", daemon=True).start()
        else:
            self._init_done.set()

    def _init(self) -> None:
        import logging

        ray = _ray()
        # ray.init off the main thread only skips Ray's SIGTERM handler; say nothing about it.
        quiet = logging.getLogger("ray._private.worker")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        mark("ray.init begins")
        try:
            ray.init(
                address=self.address,
                include_dashboard=False,
                log_to_driver=False,  # workers log to ROOT/logs/ and the run folders
                # A cluster's nodes do not have our environment: there the project's path travels with the job.
                runtime_env=None if self.local else {"env_vars": {"PYTHONPATH": project_pythonpath(os.environ.get("PYTHONPATH"))}},
            )
        except BaseException as exc:  # noqa: BLE001 - raised in the driver's thread by ready()
            self._init_error = exc
        finally:
            quiet.setLevel(level)
            mark("ray.init done")
            self._init_done.set()
        self._release.wait()  # see __init__: ending this thread would stop a local Ray

    @property
    def plans_ahead(self) -> bool:
        """Our own local Ray is this machine: the driver reaches the server the actors use, so it
        plans while Ray and the actors start (pipeline/batch/ahead.py). A cluster's nodes each use
        their own vLLM on their loopback."""
        return self.local

    def ready(self) -> None:
        """Wait for ray.init; raise its error in the caller's thread."""
        self._init_done.wait()
        if self._init_error is not None:
            exc, self._init_error = self._init_error, None
            if isinstance(exc, ConnectionError):
                raise BackendError(f"cannot reach the Ray cluster at {self.address}: {exc}.", "start it with `ray start --head`, fix --ray-address, or export RAY_AUTH_MODE=token if the cluster uses token authentication (Ray 2.60's default once ~/.ray/auth_token exists).") from exc
            raise exc

    def nodes(self, *, gpu_only: bool = False) -> list[str]:
        self.ready()
        return sorted(n["NodeID"] for n in _ray().nodes() if n.get("Alive") and (not gpu_only or n.get("Resources", {}).get("GPU", 0) > 0))

    def _node_gpus(self) -> list[float]:
        self.ready()
        return [float(n.get("Resources", {}).get("GPU", 0)) for n in _ray().nodes() if n.get("Alive")]

    def total_gpus(self) -> float:
        self.ready()
        return float(_ray().cluster_resources().get("GPU", 0))

    def has_gpus(self) -> bool:
        if self.local:  # the GPUs our own local Ray will find, known without waiting for it
            from pipeline.batch.local import visible_gpus

            return bool(visible_gpus(None))
        return self.total_gpus() > 0

    def colocate(self, cfgs: Any, *, vlm_started: bool) -> bool:
        """Before stage 1's actors exist, when stage 2 follows: give every GPU one stage 1 and one
        stage 2 actor, half a GPU each, in one placement-group bundle per GPU, so stage 2's actors
        (and their models) start while stage 1 runs instead of after it; otherwise stage 2 waits for
        stage 1 to hand back every GPU (each stage worker asks for a whole one). Returns whether it did.

        Only where both fit at once: no vLLM started by this batch (it holds most of a GPU), no GPU
        share or worker count given, a bundle's 2 x --worker-cpus on every GPU node, and GPU memory
        for SAM3 and stage 2 together: free memory per GPU from nvidia-smi on a local Ray; on a
        cluster (memory unknown here) only with the built-in lifter, whose GPU use is small.

        Ray places half-GPU requests best-fit (ray 2.60.0 src/ray/common/scheduling/
        resource_instance_set.cc, TryAllocate: the instance with the least capacity left that fits),
        so two stage 1 actors would share one GPU and leave another idle; a bundle per GPU keeps one
        of each stage on each GPU, also when Ray restarts an actor (it stays in its bundle)."""
        b = self.bcfg
        if vlm_started or self.slots is not None or b.stage1_gpus is not None or b.stage2_gpus is not None or b.stage1_workers or b.stage2_workers:
            return False
        self.ready()
        ray = _ray()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        gpu_nodes = [r for r in nodes if int(r.get("GPU", 0)) > 0]
        # Whole GPUs free now (a shared cluster may run other jobs): a bundle per GPU we can have.
        count = min(sum(int(r["GPU"]) for r in gpu_nodes), int(ray.available_resources().get("GPU", 0)))
        if count < 1 or any(r.get("CPU", 0) < 2 * b.worker_cpus * int(r["GPU"]) for r in gpu_nodes):
            return False
        need = colocated_gpu_need(cfgs)
        if self.local:
            from pipeline.core.device import nvidia_smi

            # The GPUs our local Ray sees: CUDA_VISIBLE_DEVICES (nvidia-smi -i takes its ids), else all.
            rows = nvidia_smi("memory.free", ids=os.environ.get("CUDA_VISIBLE_DEVICES") or None)
            free = [float(cells[0]) / 1024 for cells in rows if cells and cells[0].replace(".", "", 1).isdigit()]  # MiB -> GiB
            if need is None or not free or len(free) < len(rows) or min(free) < need:
                return False
        elif need is None:
            return False
        from ray.util.placement_group import placement_group, remove_placement_group

        group = placement_group([{"GPU": 1.0, "CPU": 2 * b.worker_cpus}] * count, strategy="PACK")
        ready, _ = ray.wait([group.ready()], timeout=15)
        if not ready:  # e.g. GPUs taken in part by other jobs: go stage by stage instead
            remove_placement_group(group)
            return False
        self.slots = group
        mark(f"stages share {count} GPU bundle(s)")
        return True

    def stage_gpus(self, stage: str) -> float:
        value = self.bcfg.stage1_gpus if stage == "stage1" else self.bcfg.stage2_gpus
        if value is not None:
            return float(value)
        if self.slots is not None:
            return 0.5
        if not self.total_gpus():
            return 0.0
        # Stage 1 shares a GPU with its node's vLLM actor when there is one.
        return 0.5 if stage == "stage1" and self.vlm_handle is not None else 1.0

    def vlm_gpus(self) -> float:
        if self.bcfg.vlm_gpus is not None:
            return float(self.bcfg.vlm_gpus)
        return 0.5 if self.total_gpus() else 0.0

    def default_workers(self, stage: str) -> int:
        """One per GPU (as the local engine), as far as they fit beside each node's vLLM actor; one
        on a cluster without GPUs."""
        n = self.bcfg.stage1_workers if stage == "stage1" else self.bcfg.stage2_workers
        if n > 0:
            return n
        if self.slots is not None:
            return self.slots.bundle_count
        per = self.stage_gpus(stage)
        if not per:
            return 1
        held = self.vlm_gpus() if stage == "stage1" and self.vlm_handle is not None else 0.0
        count = 0
        for gpus in self._node_gpus():
            if gpus > 0:
                count += max(0, min(int(gpus), int((gpus - held) // per)))
        return max(1, count)

    def open_pool(self, spec: WorkerSpec, n: int, *, wait: bool = True) -> RayPool:
        self.ready()
        node_env = self.vlm_handle.env_by_node if (spec.stage == "stage1" and self.vlm_handle is not None) else None
        gpus = self.stage_gpus(spec.stage)
        pool = RayPool(self, spec, n, num_gpus=gpus, node_env=node_env, slots=self.slots)
        if wait:
            try:
                pool.wait_started()
            except BaseException:
                pool.kill()
                raise
        return pool

    def vlm(self, cfgs: Any, log_dir: Path) -> Any:
        """A local Ray is this machine: one vLLM in the driver, started while Ray starts. On a cluster,
        one vLLM actor per node."""
        if self.local:
            from pipeline.batch.local import LocalVLM

            return LocalVLM(cfgs, log_dir / "vllm.log")
        self.ready()
        self.vlm_handle = RayVLM(self, cfgs, log_dir)
        return self.vlm_handle

    def shutdown(self) -> None:
        if self._started:
            mark("ray.shutdown begins")
            try:
                self.ready()
                self._drop_slots()
                _stop_autoscaler_monitor(_ray())
                _ray().shutdown()
            except BaseException:  # noqa: BLE001 - nothing (more) to shut down
                pass
            mark("ray.shutdown done")
        else:
            self._drop_slots()  # a cluster outlives this batch: hand its GPUs back
        self._release.set()

    def _drop_slots(self) -> None:
        if self.slots is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.slots)
            except Exception:  # noqa: BLE001 - gone with the cluster
                pass
            self.slots = None


def colocated_gpu_need(cfgs: Any) -> float | None:
    """GiB one GPU needs for a stage 1 and a stage 2 worker at once (doctor.py's figures), or None
    where stage 2's need is unknown without the GPU's size (SAM 3D Objects, 'auto')."""
    from pipeline.doctor import sam3_gpu_need

    stage1 = sam3_gpu_need(cfgs.segmenter) if cfgs.segmenter.segmenter in ("sam3", "auto") else 0.5
    lifter = cfgs.lifter.lifter
    if lifter == "inflate":
        return stage1 + 2.0  # the built-in lifter: gsplat turntables, about 1 GiB with the CUDA context
    return stage1 + float(cfgs.lifter.sam3d_min_gpu_gib)


def _stop_autoscaler_monitor(ray: Any) -> bool:
    """SIGKILL the autoscaler monitor of a local Ray this driver started, just before ray.shutdown().
    Returns True when it was stopped here.

    ray.shutdown() stops the node's processes one at a time, SIGTERM then up to 1 s each
    (ray 2.60.0: ray/_private/node.py:1862-1903, kill_all_processes at 2033). The monitor's SIGTERM
    handler first reports its own "failure" to the GCS and the driver
    (ray/autoscaler/_private/monitor.py:588-596), and it used the whole second every time (measured on
    2 cores: monitor 1.02 s of a 1.41 s ray.shutdown; raylet 0.07, GCS 0.02, dashboard 0.02). A local
    Ray of our own has nothing to autoscale, and SIGKILL reports nothing. Private to Ray 2.60 (pinned
    in envs/requirements-ray.txt); if that attribute moves, ray.shutdown() simply takes its second."""
    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    if node is None or not getattr(node, "is_head", lambda: False)():
        return False
    stopped = False
    for info in list(getattr(node, "all_processes", {}).get("monitor", [])):
        proc = getattr(info, "process", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - ray.shutdown() deals with it
                continue
            stopped = True
    return stopped

