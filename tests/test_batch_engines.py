"""`python -m pipeline batch` with both engines, in real subprocesses, on CPU: the built-in backends,
the stand-in vLLM (tests/fake_vllm.py) counting its starts and the chat requests in flight, a real
local Ray and a simulated two-node Ray cluster (ray.cluster_utils.Cluster).

What a user with a folder of photos expects: one vLLM server per batch (none on a rerun, none with
--vlm-url), --vlm-concurrency requests in flight, a rerun that redoes nothing, and the same objects
whichever engine ran them.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from batch_fixture import (
    FAST,
    VLM_LITE,
    make_photos,
    max_in_flight,
    planned_ahead,
    read_batch,
    read_stats,
    run_batch,
    server_starts,
    stand_in_vllm,
    statuses,
    temp_files,
)
from fake_openai_server import FakeOpenAIServer, Reply

N_PHOTOS = 8
CHAT_DELAY = 0.6  # each stand-in answer takes this long, so requests overlap visibly


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


needs_ray = pytest.mark.skipif(not _has_ray(), reason="Ray is not installed: pip install -r envs/requirements-ray.txt (run_tests.sh does)")


# ---------------------------------------------------------------- the counting stand-in itself


def test_stand_in_counts_starts_and_requests_in_flight(tmp_path: Path):
    """The instrument the batch tests rely on: one 'start' line per server, in-flight counts per request."""
    flags, env = stand_in_vllm(tmp_path, chat_delay=0.5)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(tmp_path / "vllm"), "serve", str(tmp_path / "model"), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "m"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return urllib.request.urlopen(url + "/health", timeout=1).status == 200
            except OSError:
                return False

        deadline = time.monotonic() + 30
        while not up():
            assert time.monotonic() < deadline and server.poll() is None, "stand-in did not come up"
            time.sleep(0.1)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()

        def ask() -> None:
            req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=30).read()

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=10)
    stats = read_stats(tmp_path / "stats.jsonl")
    assert server_starts(stats) == 1
    assert sum(1 for e in stats if e["event"] == "chat") == 6
    assert max_in_flight(stats) == 6  # all six held for 0.5 s at once


# ---------------------------------------------------------------- local engine


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    make_photos(folder, N_PHOTOS)
    return folder


@pytest.fixture(scope="module")
def local_batch(photos: Path, tmp_path_factory):
    work = tmp_path_factory.mktemp("local")
    flags, env = stand_in_vllm(work / "vllm", chat_delay=CHAT_DELAY)
    out = work / "out"
    args = [*VLM_LITE, *FAST, *flags, "--engine", "local", "--vlm-concurrency", "8"]
    proc = run_batch(photos, out, *args, env=env)
    return {"out": out, "proc": proc, "args": args, "env": env, "stats": work / "vllm" / "stats.jsonl"}


def test_local_engine_one_server_and_requests_in_flight(local_batch, photos: Path):
    proc = local_batch["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = read_batch(local_batch["out"])
    assert batch["engine"] == "local"
    assert len(batch["photos"]) == N_PHOTOS
    assert set(statuses(batch).values()) == {"done"}, statuses(batch)
    for p in batch["photos"]:
        run = local_batch["out"] / p["run_dir"]
        assert p["objects"] == 5 and p["error"] is None
        assert (run / "run.json").is_file() and (run / "scene" / "scene.ply").is_file()
        assert len(list((run / "objects").glob("obj_*/gaussians.pt"))) == 5
    stats = read_stats(local_batch["stats"])
    assert server_starts(stats) == 1, "one vLLM server for the whole batch"
    assert sum(1 for e in stats if e["event"] == "chat") == N_PHOTOS
    assert max_in_flight(stats) >= min(8, N_PHOTOS), f"at most {max_in_flight(stats)} VLM requests were in flight"
    # Planned while the worker started (all eight in flight then), each photo asked once all the same.
    assert planned_ahead(local_batch["out"]) == (N_PHOTOS, N_PHOTOS)
    # The stage 2 worker loaded its export path before its first photo (Stage2.warm_up; FAST: no turntables).
    assert "warmed up for the first photo: {'renderer': 'none'" in (local_batch["out"] / "logs" / "stage2-worker-0.log").read_text()
    assert (local_batch["out"] / "index.html").is_file()
    assert not temp_files(local_batch["out"])


def test_rerun_of_a_finished_batch_starts_nothing_and_redoes_nothing(local_batch, photos: Path):
    out = local_batch["out"]
    assert local_batch["proc"].returncode == 0
    # Everything but the batch's own summary, index, lock file and the driver's log (which a rerun appends to).
    driver_log = out / "logs" / "pipeline.log"
    log_size = driver_log.stat().st_size if driver_log.exists() else 0
    before = {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name not in ("batch.json", "index.html", ".batch.lock") and p != driver_log
    }
    starts = server_starts(read_stats(local_batch["stats"]))
    t0 = time.monotonic()
    proc = run_batch(photos, out, *local_batch["args"], env=local_batch["env"])
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server_starts(read_stats(local_batch["stats"])) == starts, "a rerun of a finished batch started a vLLM server"
    changed = [str(p.relative_to(out)) for p, m in before.items() if not p.exists() or p.stat().st_mtime_ns != m]
    assert not changed, f"a rerun rewrote finished files: {changed[:5]}"
    assert set(statuses(read_batch(out)).values()) == {"done"}
    if driver_log.exists():
        assert "starting" not in driver_log.read_bytes()[log_size:].decode(), "a rerun of a finished batch started a worker or server"
    # No worker at all: a stage worker's start alone (python, imports) takes seconds here. The speed
    # target itself is checked by bench/batch_rerun.py.
    assert seconds < 60, seconds


def test_vlm_url_starts_no_server(photos: Path, tmp_path: Path):
    flags, env = stand_in_vllm(tmp_path / "vllm")
    stats_path = tmp_path / "hosted.jsonl"
    replies = json.loads(Path(env["FAKE_VLLM_REPLY_FILE"]).read_text())
    with FakeOpenAIServer([Reply(content=replies[0])], chat_delay=CHAT_DELAY, stats_path=stats_path) as hosted:
        proc = run_batch(photos, tmp_path / "out", *VLM_LITE, *FAST, *flags, "--vlm-url", hosted.url, "--vlm-concurrency", "4", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server_starts(read_stats(tmp_path / "vllm" / "stats.jsonl")) == 0, "a vLLM server was started although --vlm-url was given"
    chats = [e for e in read_stats(stats_path) if e["event"] == "chat"]
    assert len(chats) == N_PHOTOS
    assert max_in_flight(chats) == 4, "--vlm-concurrency 4 keeps exactly four requests in flight"
    # The URL (and key) reach the stage 1 worker through its environment, never its argv.
    worker_logs = "".join(p.read_text() for p in (tmp_path / "out" / "logs").glob("stage1*.log"))
    assert "starting" in worker_logs and hosted.url not in worker_logs


# ---------------------------------------------------------------- Ray engine


@pytest.fixture(scope="module")
def ray_batch(photos: Path, tmp_path_factory):
    if not _has_ray():
        pytest.skip("Ray is not installed: pip install -r envs/requirements-ray.txt")
    work = tmp_path_factory.mktemp("ray")
    flags, env = stand_in_vllm(work / "vllm", chat_delay=CHAT_DELAY)
    out = work / "out"
    proc = run_batch(photos, out, *VLM_LITE, *FAST, *flags, "--engine", "ray", "--vlm-concurrency", "8", env=env)
    return {"out": out, "proc": proc, "stats": work / "vllm" / "stats.jsonl"}


@needs_ray
@pytest.mark.slow
def test_ray_engine_local_ray_one_server_and_requests_in_flight(ray_batch):
    proc = ray_batch["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = read_batch(ray_batch["out"])
    assert batch["engine"] == "ray"
    assert set(statuses(batch).values()) == {"done"}, statuses(batch)
    assert all(p["objects"] == 5 for p in batch["photos"])
    stats = read_stats(ray_batch["stats"])
    assert server_starts(stats) == 1, "one vLLM server on the one node"
    assert max_in_flight(stats) >= min(8, N_PHOTOS), f"at most {max_in_flight(stats)} VLM requests were in flight"
    # Our own local Ray: the driver plans while Ray and the actors start; the actors ask nothing again.
    assert sum(1 for e in stats if e["event"] == "chat") == N_PHOTOS
    assert planned_ahead(ray_batch["out"]) == (N_PHOTOS, N_PHOTOS)
    assert not temp_files(ray_batch["out"])


@needs_ray
@pytest.mark.slow
def test_both_engines_make_the_same_objects(local_batch, ray_batch):
    import torch

    assert local_batch["proc"].returncode == 0 and ray_batch["proc"].returncode == 0
    local, ray_ = read_batch(local_batch["out"]), read_batch(ray_batch["out"])
    assert [p["run_dir"] for p in local["photos"]] == [p["run_dir"] for p in ray_["photos"]], "run folders depend on the engine"
    compared = 0
    for p in local["photos"]:
        a, b = local_batch["out"] / p["run_dir"], ray_batch["out"] / p["run_dir"]
        objs_a = sorted(x.parent.name for x in a.glob("objects/*/gaussians.pt"))
        assert objs_a == sorted(x.parent.name for x in b.glob("objects/*/gaussians.pt"))
        for obj in objs_a:
            ga = torch.load(a / "objects" / obj / "gaussians.pt", weights_only=True)
            gb = torch.load(b / "objects" / obj / "gaussians.pt", weights_only=True)
            assert ga.keys() == gb.keys()
            for key in ga:
                if isinstance(ga[key], torch.Tensor):
                    assert torch.equal(ga[key], gb[key]), (p["run_dir"], obj, key)
                    compared += 1
        assert _same_masks(a, b), p["run_dir"]
    assert compared >= N_PHOTOS * 5 * 5


def _same_masks(a: Path, b: Path) -> bool:
    """The same objects, boxes and mask pixels in both masks.json files."""
    ja, jb = json.loads((a / "masks/masks.json").read_text()), json.loads((b / "masks/masks.json").read_text())
    keep = ("id", "label", "box_xyxy", "area", "rle")
    return [{k: o.get(k) for k in keep} for o in ja["objects"]] == [{k: o.get(k) for k in keep} for o in jb["objects"]]


# ---------------------------------------------------------------- a simulated two-node cluster


def _raylet_pids_of_workers(stop: threading.Event, seen: dict[int, str], mark: str) -> None:
    """Poll /proc for this test's stage worker children (`mark` in their argv) and record which raylet
    (node) each one lives under."""
    while not stop.is_set():
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if b"worker" not in cmd or b"--stage" not in cmd or b"pipeline" not in cmd or mark.encode() not in b" ".join(cmd):
                    continue
                env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            if b"RAY_RAYLET_PID" in env:
                seen[int(proc.name)] = env[b"RAY_RAYLET_PID"].decode()
        stop.wait(0.2)


@needs_ray
@pytest.mark.slow
def test_ray_engine_on_a_two_node_cluster(photos: Path, tmp_path: Path, monkeypatch):
    from ray.cluster_utils import Cluster

    # On a cluster, actors get the environment of their node's raylet (what `ray start` had), not
    # the driver's: the stand-in's switches must be there, as HF_TOKEN would be on a real cluster.
    flags, env = stand_in_vllm(tmp_path / "vllm", chat_delay=CHAT_DELAY)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Two raylets on this machine; small object stores (rows are paths, nothing big travels).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "object_store_memory": 80 * 1024**2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=4, object_store_memory=80 * 1024**2)
        cluster.wait_for_nodes()
        seen: dict[int, str] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_raylet_pids_of_workers, args=(stop, seen, str(tmp_path)), daemon=True)
        watcher.start()
        try:
            proc = run_batch(
                photos,
                tmp_path / "out",
                *VLM_LITE,
                *FAST,
                *flags,
                "--engine",
                "ray",
                "--ray-address",
                cluster.address,
                "--stage2-workers",
                "2",
                "--vlm-concurrency",
                "8",
                env=env,
            )
            chats = sum(1 for e in read_stats(tmp_path / "vllm" / "stats.jsonl") if e["event"] == "chat")
            # Stage 1 again with other segmenter settings: every plan is kept, so no node starts a vLLM.
            again = run_batch(photos, tmp_path / "out", *VLM_LITE, *FAST, *flags, "--engine", "ray", "--ray-address", cluster.address,
                              "--stage", "1", "--dedup-iou", "0.5", env=env)
        finally:
            stop.set()
            watcher.join()
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = read_batch(tmp_path / "out")
    assert batch["engine"] == "ray"
    assert set(statuses(batch).values()) == {"done"}, statuses(batch)
    nodes = set(seen.values())
    assert len(nodes) == 2, f"stage workers ran under {len(nodes)} raylet(s), expected both nodes: {seen}"
    stats = read_stats(tmp_path / "vllm" / "stats.jsonl")
    assert 1 <= server_starts(stats) <= 2, "at most one vLLM server per node"
    assert sum(1 for e in stats if e["event"] == "chat") == N_PHOTOS
    # Each node's vLLM listens on its own loopback: the driver does not plan ahead on a cluster.
    assert planned_ahead(tmp_path / "out") == (0, None)
    assert again.returncode == 0, again.stderr[-3000:]
    after = read_stats(tmp_path / "vllm" / "stats.jsonl")
    assert server_starts(after) == server_starts(stats) and sum(1 for e in after if e["event"] == "chat") == chats == N_PHOTOS
    plans = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("stage1/plan.json")]
    assert len(plans) == N_PHOTOS and all(p["request"].get("kept") for p in plans)


def test_ray_engine_without_ray_is_one_line_naming_the_install(photos: Path, tmp_path: Path):
    """An interpreter without Ray: exit 3 and one line that says how to get it (envs/requirements-ray.txt)."""
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # `import ray` raises ImportError\n")
    env = {"PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = run_batch(photos, tmp_path / "out", "--profile", "lite", *FAST, "--engine", "ray", env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "requirements-ray.txt" in errors[0], proc.stderr[-2000:]


def _timeline(root: Path) -> dict[str, float]:
    """The driver's 'timeline: ...' milestones (ROOT/logs/pipeline.log) as seconds from the first."""
    import datetime as dt

    marks: dict[str, float] = {}
    for line in (root / "logs" / "pipeline.log").read_text().splitlines():
        if "timeline: " in line:
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            marks.setdefault(line.split("timeline: ", 1)[1], stamp)
    first = min(marks.values())
    return {k: v - first for k, v in marks.items()}


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("shares", [None, ["--stage1-gpus", "1", "--stage2-gpus", "1"]], ids=["default", "whole-gpus-given"])
def test_ray_engine_gives_each_gpu_one_worker_of_each_stage(photos: Path, tmp_path: Path, shares):
    """A cluster with 2 (logical) GPUs and no vLLM to start (a hosted one, --vlm-url, whose answers
    take 2.5 s): by default each GPU gets one stage 1 and one stage 2 actor (one placement-group
    bundle per GPU), so stage 2's actors are ready before stage 1 has finished, and the two stage 1
    actors are on different GPUs (Ray alone packs two half-GPU actors onto one). With whole GPUs
    asked for, stage 2 waits for stage 1 to end."""
    from ray.cluster_utils import Cluster

    flags, env = stand_in_vllm(tmp_path / "vllm")
    replies = json.loads(Path(env["FAKE_VLLM_REPLY_FILE"]).read_text())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2, "object_store_memory": 80 * 1024**2, "include_dashboard": False})
    try:
        root = tmp_path / "out"
        with FakeOpenAIServer([Reply(content=replies[0])], chat_delay=2.5) as hosted:
            proc = run_batch(
                photos, root, *VLM_LITE, "--device", "cpu", *FAST, *flags, "--vlm-url", hosted.url, "--vlm-concurrency", "2",
                "--engine", "ray", "--ray-address", cluster.address, *(shares or []), env=env,
            )  # fmt: skip
        import ray

        ray.init(address=cluster.address)
        try:
            groups = [g for g in ray.util.placement_group_table().values() if g.get("state") != "REMOVED"]
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = read_batch(root)
    assert set(statuses(batch).values()) == {"done"}, statuses(batch)
    assert not groups, f"the batch left placement groups on the cluster: {groups}"
    marks = _timeline(root)
    workers = batch["workers"]
    gpus1 = sorted(w["gpu"] for w in workers["stage1"])
    gpus2 = sorted(w["gpu"] for w in workers["stage2"])
    if shares is None:
        assert "stages share 2 GPU bundle(s)" in marks, sorted(marks)
        assert gpus1 == gpus2 == ["0", "1"], workers
        ready2 = min(t for k, t in marks.items() if k.startswith("stage2-worker-") and k.endswith(" ready"))
        assert ready2 < marks["stage1 last photo answered (8)"], f"stage 2 did not start during stage 1: {marks}"
    else:
        assert not any(k.startswith("stages share") for k in marks), sorted(marks)
        assert gpus1 == ["0", "1"] and gpus2 == ["0", "1"], workers
        ready2 = min(t for k, t in marks.items() if k.startswith("stage2-worker-") and k.endswith(" ready"))
        assert ready2 > marks["stage1 workers closing"], f"whole GPUs asked for, yet stage 2 started during stage 1: {marks}"


@pytest.mark.slow
def test_pipelined_batch_runs_stage_2_while_stage_1_plans(photos: Path, tmp_path: Path):
    """--pipelined: a photo goes to stage 2 as soon as it is planned (the driver's _collect hands it
    on), one vLLM server serves the planning, stage 1's workers close, and every photo ends done."""
    flags, env = stand_in_vllm(tmp_path / "vllm", chat_delay=CHAT_DELAY)
    root = tmp_path / "out"
    proc = run_batch(photos, root, *VLM_LITE, *FAST, *flags, "--pipelined", "--vlm-concurrency", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(statuses(read_batch(root)).values()) == {"done"}
    assert server_starts(read_stats(tmp_path / "vllm" / "stats.jsonl")) == 1
    marks = _timeline(root)
    assert marks["stage2 first photo answered"] < marks[f"stage1 last photo answered ({N_PHOTOS})"], marks
    assert "stage1 workers closed" in marks, marks


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("free_mib,shared", [(81000, True), (1500, False)], ids=["fits", "too-little-free-memory"])
def test_local_ray_shares_gpus_only_where_free_memory_allows(photos: Path, tmp_path: Path, free_mib: int, shared: bool):
    """The local-Ray side of co-location: the GPUs come from Ray (2, given through Ray's own
    RAY_OVERRIDE_RESOURCES, ray/_private/resource_and_label_spec.py:180-192) and their free memory
    from nvidia-smi (a stand-in on PATH that prints memory.free in MiB, as `--format=csv,noheader,
    nounits` does). The classical segmenter and the built-in lifter need 2.5 GiB together: 79 GiB free
    shares each GPU between the stages, 1.5 GiB free does not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "smi-args"}\nprintf "{free_mib}\\n{free_mib}\\n"\n')
    smi.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "0,1", "RAY_OVERRIDE_RESOURCES": json.dumps({"GPU": 2, "CPU": 4})}
    root = tmp_path / "out"
    proc = run_batch(photos, root, "--planner", "none", "--segmenter", "classical", "--lifter", "inflate", "--renderer", "cpu", "--device", "cpu",
                     *FAST, "--engine", "ray", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(statuses(read_batch(root)).values()) == {"done"}
    assert "--query-gpu=memory.free" in (tmp_path / "smi-args").read_text() and "-i 0,1" in (tmp_path / "smi-args").read_text()
    marks = _timeline(root)
    assert ("stages share 2 GPU bundle(s)" in marks) is shared, sorted(marks)
    workers = read_batch(root)["workers"]
    assert sorted(w["gpu"] for w in workers["stage1"]) == ["0", "1"], workers
