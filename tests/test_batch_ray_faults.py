"""The Ray engine when a stage actor's own process dies (OOM killer, lost node): Ray restarts the
actor (bounded), its worker child goes with it, and the photos it had are sent again and finish,
on the restarted actor when it is the only one."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install -r envs/requirements-ray.txt"),
]

FAST = ["--profile", "lite", "--no-progress", "--gif-frames", "3", "--gif-size", "48", "--scene-gif-size", "64", "--inflate-gaussians", "800"]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_killed_stage_actor_is_restarted_and_its_photos_finish(tmp_path: Path):
    from pipeline.demo.scene import make_demo_scene

    scene = make_demo_scene(tmp_path / "demo")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        shutil.copy(scene.image_path, photos / f"p{i}.png")
    root = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "batch", "--images", str(photos), "--out", str(root), *FAST, "--engine", "ray", "--stage2-workers", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    killed: tuple[int, int] | None = None
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and killed is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                workers = json.loads((root / "batch.json").read_text()).get("workers", {}).get("stage2") or []
            except (OSError, ValueError):
                continue
            child = next((w["pid"] for w in workers if w.get("pid")), None)
            if child is None:
                continue
            actor = _ppid(child)  # the Ray actor process that owns this worker child
            time.sleep(0.5)  # it has photos in flight by now
            os.kill(actor, signal.SIGKILL)
            killed = (child, actor)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the stage 2 workers never showed up in batch.json"
    assert proc.returncode == 0, out[-3000:]
    batch = json.loads((root / "batch.json").read_text())
    assert batch["counts"]["done"] == 6
    # The only stage 2 actor was killed: Ray restarted it, it started a new child (its log holds both
    # starts) and took the photos again; the old child is gone.
    assert (root / "logs" / "stage2-worker-0.log").read_text().count("starting stage2-worker-0") == 2
    time.sleep(1)
    assert not Path(f"/proc/{killed[0]}").exists() or "zombie" in Path(f"/proc/{killed[0]}/status").read_text().lower()
    for row in batch["photos"]:
        assert row["status"] == "done" and (root / row["run_dir"] / "scene" / "scene.ply").is_file()
    assert not list(root.rglob(".tmp-*"))


def test_prewarmed_pool_that_cannot_be_placed_names_the_gpus_it_asks_for(tmp_path: Path):
    """A pool opened without waiting (stage 2's, created during stage 1) and never placed: the error
    raised when the driver waits for it later names what each actor asked for, not 0 GPUs."""
    from pipeline.batch.protocol import WorkerSpec
    from pipeline.batch.ray_engine import RayEngine
    from pipeline.core.config import BatchConfig
    from pipeline.core.errors import BackendError

    engine = RayEngine(BatchConfig(engine="ray", stage2_gpus=64.0))
    try:
        spec = WorkerSpec(stage="stage2", flags=[], python=sys.executable, ready_timeout=2.0, log_dir=tmp_path)
        pool = engine.open_pool(spec, 1, wait=False)
        try:
            with pytest.raises(BackendError) as caught:
                pool.wait_started()
        finally:
            pool.kill()
        # With Ray up in this process, a child's exit code still reads true (Ray's subreaper mode would
        # ignore SIGCHLD here and make every exit code 0: a dead vLLM would look like success).
        assert subprocess.run(["false"]).returncode == 1, "SIGCHLD is ignored in the driver after ray.init"
    finally:
        engine.shutdown()
    text = str(caught.value)
    assert "each asks for 64 GPU(s)" in text and "\n" not in text, text


def test_shutdown_of_our_local_ray_stops_the_autoscaler_monitor_first_and_leaves_nothing(monkeypatch):
    """ray.shutdown() gives each process SIGTERM and up to 1 s, and the autoscaler monitor used the
    whole second (it reports its own "failure" first, ray/autoscaler/_private/monitor.py:588-596).
    The engine SIGKILLs it just before ray.shutdown(); every process of the local Ray is gone after."""
    import ray

    from pipeline.batch.ray_engine import RayEngine
    from pipeline.core.config import BatchConfig

    engine = RayEngine(BatchConfig(engine="ray"))
    engine.ready()
    node = ray._private.worker._global_node  # Ray 2.60's own record of the processes ray.init started
    procs = {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
    assert procs.get("monitor"), f"Ray {ray.__version__} no longer lists its autoscaler monitor where the engine looks: {sorted(procs)}"
    seen: dict[str, object] = {}
    real_shutdown = ray.shutdown

    def watched_shutdown(*args, **kwargs):
        seen["monitor_code"] = procs["monitor"][0].poll()
        return real_shutdown(*args, **kwargs)

    monkeypatch.setattr(ray, "shutdown", watched_shutdown)
    engine.shutdown()
    assert seen.get("monitor_code") == -signal.SIGKILL, f"the monitor was still running (or ended otherwise) when ray.shutdown began: {seen}"
    left = {kind: [p.pid for p in ps if p.poll() is None] for kind, ps in procs.items()}
    assert not any(left.values()), f"processes of the local Ray outlived its shutdown: {left}"
    assert not ray.is_initialized()
