"""LocalEngine: stage workers as child processes of the driver, on this machine, no Ray.

Per stage, W worker children (W: one per GPU, or --stage1-workers / --stage2-workers), each pinned
to its GPU with CUDA_VISIBLE_DEVICES; feeder threads take photos from one queue, so a slow worker
never holds photos another could run.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.batch.protocol import WorkerProcess, WorkerSpec, WorkerStartError
from pipeline.core.device import nvidia_smi


def visible_gpus(worker_gpus: str | None) -> list[str]:
    """GPU ids for the workers: --worker-gpus, else CUDA_VISIBLE_DEVICES, else what nvidia-smi lists
    (no torch import: the driver stays light)."""
    if worker_gpus:
        return [g.strip() for g in worker_gpus.split(",") if g.strip()]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    return [cells[0] for cells in nvidia_smi("index", timeout=20) if cells and cells[0]]


class LocalPool:
    """One stage's workers. `submit` returns a Future of the protocol answer."""

    def __init__(self, spec: WorkerSpec, n_workers: int, gpus: list[str]):
        self.spec = spec
        self.workers: list[WorkerProcess] = []
        for i in range(max(1, n_workers)):
            env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {}
            self.workers.append(spec.make(f"{spec.stage}-worker-{i}", env))
        self.queue: queue.Queue[tuple[str, str, str | None, dict | None, Future] | None] = queue.Queue()
        self.threads: list[threading.Thread] = []
        self._alive = 0
        self._dead: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> list[dict[str, Any]]:
        """Start every worker at once; raise if none becomes ready. Returns their ready messages."""
        errors: list[WorkerStartError] = []
        readies: list[dict[str, Any]] = []
        with ThreadPoolExecutor(len(self.workers)) as ex:
            futures = [ex.submit(w.start) for w in self.workers]
        ok = []
        for w, f in zip(self.workers, futures):
            try:
                readies.append(f.result())
                ok.append(w)
            except WorkerStartError as exc:
                errors.append(exc)
        if not ok:
            raise errors[0]
        self.workers = ok
        self._alive = len(ok)
        for w in ok:
            for j in range(w.concurrency):
                t = threading.Thread(target=self._feed, args=(w,), name=f"{w.name}-feed-{j}", daemon=True)
                t.start()
                self.threads.append(t)
        return readies

    def _feed(self, worker: WorkerProcess) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            image, run_dir, key, plan, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(worker.process(image, run_dir, key=key, plan=plan))
            except WorkerStartError as exc:
                with self._lock:
                    if worker.name not in self._dead:
                        self._dead.add(worker.name)
                        self._alive -= 1
                    others = self._alive > 0
                if others:  # this worker cannot come back: its photos go to the others
                    fresh: Future = Future()
                    fresh.add_done_callback(lambda f, fut=future: _copy(f, fut))
                    self.queue.put((image, run_dir, key, plan, fresh))
                    return
                future.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - the driver records it as the photo's failure
                future.set_exception(exc)

    def submit(self, image: str, run_dir: str, key: str | None = None, plan: dict | None = None) -> Future:
        future: Future = Future()
        self.queue.put((image, run_dir, key, plan, future))
        return future

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(timeout=0.1)
        for w in self.workers:
            w.close()

    def kill(self) -> None:
        for w in self.workers:
            w.kill()

    def info(self) -> list[dict[str, Any]]:
        return [{"name": w.name, "pid": w.pid, "starts": w.starts, "gpu": w.extra_env.get("CUDA_VISIBLE_DEVICES")} for w in self.workers]


def started_vllm_env(server: Any) -> dict[str, str]:
    """The environment that tells stage 1 workers about a vLLM the batch started (docs/BATCH.md)."""
    return {"SAM3DGS_VLM_URL": server.url, "SAM3DGS_VLM_API_KEY": server.api_key, "SAM3DGS_VLM_MODEL": server.model_name, "SAM3DGS_VLM_STARTED": "1"}


def _copy(src: Future, dst: Future) -> None:
    if src.exception() is not None:
        dst.set_exception(src.exception())
    else:
        dst.set_result(src.result())


class LocalVLM:
    """One vLLM server on this machine for the whole of stage 1 (pipeline.plan.server.VLLMServer)."""

    def __init__(self, cfgs: Any, log_path: Path):
        from pipeline.plan.server import VLLMServer
        from pipeline.stages import vllm_server_args

        # Query mode's GPU share: the server stays up while SAM3 workers segment on the same GPU.
        self.server = VLLMServer(cfgs.server, log_path, **vllm_server_args(cfgs, mode="query"))

    def start(self) -> dict[str, str]:
        """Start and wait until ready; returns the env the stage 1 workers need to reach it."""
        self.server.start()
        return started_vllm_env(self.server)

    def info(self) -> dict[str, Any]:
        return {"url": self.server.url, "pid": self.server.pid, "ready_seconds": self.server.ready_seconds}

    def stop(self) -> None:
        if not self.server.cfg.keep_server:
            self.server.stop()


class LocalEngine:
    name = "local"
    plans_ahead = True  # the driver reaches the server its workers use (pipeline/batch/ahead.py)

    def __init__(self, bcfg: Any):
        self.bcfg = bcfg
        self._gpus: list[str] | None = None

    def gpus(self) -> list[str]:
        if self._gpus is None:
            self._gpus = visible_gpus(self.bcfg.worker_gpus)
        return self._gpus

    def has_gpus(self) -> bool:
        return bool(self.gpus())

    def default_workers(self, stage: str) -> int:
        n = self.bcfg.stage1_workers if stage == "stage1" else self.bcfg.stage2_workers
        return n if n > 0 else max(1, len(self.gpus()))

    def open_pool(self, spec: WorkerSpec, n_workers: int, *, wait: bool = True) -> LocalPool:
        """Start the workers (always waiting: local children start at once or fail)."""
        pool = LocalPool(spec, n_workers, self.gpus())
        pool.start()
        return pool

    def vlm(self, cfgs: Any, log_dir: Path) -> LocalVLM:
        return LocalVLM(cfgs, log_dir / "vllm.log")

    def shutdown(self) -> None:
        pass

