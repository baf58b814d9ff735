"""The batch worker protocol: messages, flags for the child, WorkerProcess against real children
(a scripted stand-in child for crash timing, and the real `python -m pipeline worker`)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.batch import manifest as M
from pipeline.batch.protocol import WorkerProcess, WorkerStartError, answer, config_argv, config_env, decode, encode
from pipeline.cli import _configs, build_parser
from pipeline.core import config as C
from pipeline.stages import Configs

# A stand-in child: speaks the protocol; the photo name says what to do ("crash" kills it with
# SIGKILL mid-photo, "slow" takes 1 s, "boom" answers failed). Env STANDIN_FATAL: fail the start.
STANDIN = r'''
import json, os, signal, sys, threading, time
if os.environ.get("STANDIN_FATAL"):
    print(json.dumps({"event": "fatal", "error": "no module named sam3 (stand-in)", "exit_code": 3}), flush=True)
    sys.exit(3)
log = open(os.environ["STANDIN_LOG"], "a")
print(json.dumps({"event": "ready", "pid": os.getpid(), "stage": "stage1", "argv": sys.argv[1:]}), flush=True)
lock = threading.Lock()
def handle(req):
    name = os.path.basename(req["image"])
    with lock:
        log.write(json.dumps({"pid": os.getpid(), "image": name, "event": "start"}) + "\n"); log.flush()
    if "crash" in name:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0 if "slow" in name else 0.05)
    status = "failed" if "boom" in name else "done"
    with lock:
        log.write(json.dumps({"pid": os.getpid(), "image": name, "event": "end"}) + "\n"); log.flush()
        print(json.dumps({"id": req["id"], "status": status, "error": "boom" if status == "failed" else None,
                          "objects": 2, "seconds": 0.05, "final": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req.get("op") == "exit":
        break
    threading.Thread(target=handle, args=(req,)).start()
'''


@pytest.fixture()
def standin(tmp_path: Path):
    script = tmp_path / "standin-python"
    script.write_text(f"#!{sys.executable}\n{STANDIN}")
    script.chmod(0o755)
    log = tmp_path / "requests.jsonl"
    workers: list[WorkerProcess] = []

    def make(**kw) -> WorkerProcess:
        env = {"STANDIN_LOG": str(log), **kw.pop("env", {})}
        w = WorkerProcess("stage1", ["--profile=lite"], python=str(script), env=env, log_path=tmp_path / "worker.log", **kw)
        workers.append(w)
        return w

    make.log = log  # type: ignore[attr-defined]
    yield make
    for w in workers:
        w.kill()


def requests_seen(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_messages_round_trip():
    msg = {"id": "7", "image": "/p/café ☕\nline.jpg", "run_dir": "/r/x-jpg-1234abcd"}
    line = encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == msg
    a = answer("7", "partial", error="1 of 3 objects failed", objects=2, seconds=1.23456, final=True)
    assert decode(encode(a)) == a == {"id": "7", "status": "partial", "error": "1 of 3 objects failed", "objects": 2, "seconds": 1.235, "final": True}
    with pytest.raises(ValueError):
        decode(b"[1, 2]")
    with pytest.raises(ValueError):
        answer("1", "ok")


def test_config_flags_rebuild_the_same_configs_in_the_child():
    cfgs = Configs()
    cfgs.run.profile, cfgs.run.seed, cfgs.run.force, cfgs.run.progress = "lite", 3, True, False
    cfgs.planner.prompt = "the two mugs, left"
    cfgs.planner.vlm_url, cfgs.planner.vlm_api_key = "http://user:pw@127.0.0.1:9/v1", "sk-secret"
    cfgs.planner.vlm_temperature = 0.25
    cfgs.segmenter.box = ["1,2,30,40,red mug", "5,5,9,9"]
    cfgs.segmenter.confidence = 0.35
    cfgs.lifter.inflate_gaussians = 900
    cfgs.export.turntable = False
    cfgs.export.gif_fps = 7.5
    cfgs.server.vllm_arg = ["--enforce-eager"]
    argv = config_argv(cfgs)
    assert not any("sk-secret" in a or "127.0.0.1:9" in a for a in argv)  # secrets and URLs go by env
    env = config_env(cfgs)
    assert env["SAM3DGS_VLM_URL"] == "http://user:pw@127.0.0.1:9/v1" and env["SAM3DGS_VLM_API_KEY"] == "sk-secret"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        child = _configs(build_parser().parse_args(["worker", "--stage", "stage1", *argv]))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    for section in ("run", "planner", "server", "segmenter", "lifter", "export"):
        assert C.to_record(getattr(child, section)) == C.to_record(getattr(cfgs, section)), section
    assert M.stage_key("stage1", child) == M.stage_key("stage1", cfgs)
    assert M.stage_key("stage2", child) == M.stage_key("stage2", cfgs)


def test_answers_and_concurrency(standin, tmp_path: Path):
    w = standin(concurrency=4)
    ready = w.start()
    assert ready["event"] == "ready" and ready["pid"] == w.pid
    assert ready["argv"][:6] == ["-m", "pipeline", "worker", "--stage", "stage1", "--concurrency"]
    results: dict[str, dict] = {}

    def go(name: str) -> None:
        results[name] = w.process(f"/x/{name}.jpg", str(tmp_path / name))

    t0 = time.monotonic()
    threads = [threading.Thread(target=go, args=(f"slow{i}",)) for i in range(4)] + [threading.Thread(target=go, args=("boom",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert time.monotonic() - t0 < 3.5  # four 1 s photos in flight at once, not one after another
    assert all(results[f"slow{i}"]["status"] == "done" and results[f"slow{i}"]["attempts"] == 1 for i in range(4))
    assert results["boom"]["status"] == "failed" and results["boom"]["error"] == "boom"
    assert w.starts == 1
    w.close()
    assert w.process_.returncode == 0


def test_a_crash_is_retried_alone_then_failed_with_the_signal(standin, tmp_path: Path):
    w = standin(concurrency=2, max_attempts=3)
    w.start()
    results: dict[str, dict] = {}

    def go(name: str) -> None:
        results[name] = w.process(f"/x/{name}.jpg", str(tmp_path / name))

    threads = [threading.Thread(target=go, args=(n,)) for n in ("crash", "slow-innocent")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    crash, innocent = results["crash"], results["slow-innocent"]
    assert crash["status"] == "failed" and crash["attempts"] == 3 and crash["final"] is False
    assert "signal 9" in crash["error"] and "while processing /x/crash.jpg" in crash["error"]
    # The photo in flight beside the crash was charged one attempt, then ran again and finished.
    assert innocent["status"] == "done" and innocent["attempts"] == 2
    # The first child, then one per crash that still had a photo to run (the innocent photo may share
    # a restarted child with the crashing one, one after the other).
    assert w.starts in (3, 4)
    by_pid: dict[int, list[tuple[str, str]]] = {}
    for r in requests_seen(standin.log):
        by_pid.setdefault(r["pid"], []).append((r["event"], r["image"]))
    children = list(by_pid.values())
    assert sorted(img for ev, img in children[0] if ev == "start") == ["crash.jpg", "slow-innocent.jpg"]  # both in flight at once
    assert len(children) == w.starts
    for events in children[1:]:
        # Retries run alone: in a restarted child each photo ends before the next one starts.
        for (ev, img), (ev2, img2) in zip(events, events[1:]):
            assert ev == "start" and ev2 == "end" and img == img2 or ev == "end" and ev2 == "start", events
        assert events[-1] == ("start", "crash.jpg") or events[-1] == ("end", "slow-innocent.jpg")


def test_fatal_start_carries_the_childs_exit_code(standin):
    w = standin(env={"STANDIN_FATAL": "1"})
    with pytest.raises(WorkerStartError) as err:
        w.start()
    assert err.value.exit_code == 3 and "no module named sam3" in str(err.value)


def test_missing_interpreter_is_a_start_error(tmp_path: Path):
    w = WorkerProcess("stage2", [], python=str(tmp_path / "no-python"))
    with pytest.raises(WorkerStartError, match="--stage2-python"):
        w.start()


def test_real_worker_child(tmp_path: Path):
    """`python -m pipeline worker` on the built-in backends: ready, a done photo with its run.json
    record, a failed one (not an image) that is final, and exit 0 when stdin closes."""
    from pipeline.demo.scene import make_demo_scene

    scene = make_demo_scene(tmp_path / "demo")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    w = WorkerProcess("stage1", ["--profile=lite", "--no-progress"], log_path=tmp_path / "logs" / "w.log")
    ready = w.start()
    assert ready["stage"] == "stage1" and ready["backends"]["segmenter"] == "classical" and ready["versions"]["sam3d-gs"]
    good = w.process(str(scene.image_path), str(tmp_path / "out" / "good"), key="k1")
    assert good["status"] == "done" and good["objects"] == 5 and good["final"] is True
    rec = json.loads((tmp_path / "out" / "good" / "run.json").read_text())["batch"]["stage1"]
    assert rec["status"] == "done" and rec["key"] == "k1" and rec["image_stamp"] == M.file_stamp(scene.image_path)
    failed = w.process(str(bad), str(tmp_path / "out" / "bad"))
    assert failed["status"] == "failed" and failed["final"] is True and "not an image" in failed["error"]
    # A folder that is not ours is refused, not written into.
    foreign = tmp_path / "out" / "foreign"
    foreign.mkdir()
    (foreign / "holiday.doc").write_text("x")
    refused = w.process(str(scene.image_path), str(foreign))
    assert refused["status"] == "failed" and "holiday.doc" in refused["error"] and sorted(os.listdir(foreign)) == ["holiday.doc"]
    w.close()
    assert w.process_.returncode == 0
    assert "starting stage1" in (tmp_path / "logs" / "w.log").read_text()


def test_worker_exits_at_once_when_the_driver_vanishes(tmp_path: Path):
    """stdin closed with a photo in flight (the driver was killed): the child stops now instead of
    finishing the photo while a resumed driver may already be working on it."""
    import subprocess

    from pipeline.demo.scene import make_demo_scene

    scene = make_demo_scene(tmp_path / "demo")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--stage", "stage2", "--profile=lite", "--inflate-gaussians=200000"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert decode(proc.stdout.readline())["event"] == "ready"
    run = tmp_path / "run"
    first = WorkerProcess("stage1", ["--profile=lite", "--no-progress"])
    assert first.process(str(scene.image_path), str(run))["status"] == "done"
    first.close()
    proc.stdin.write(encode({"id": "1", "image": str(scene.image_path), "run_dir": str(run)}))
    proc.stdin.flush()
    time.sleep(1.0)  # stage 2 on 200k Gaussians per object takes far longer than this
    t0 = time.monotonic()
    proc.stdin.close()
    assert proc.wait(timeout=20) == 0
    assert time.monotonic() - t0 < 10
    if proc.poll() is None:  # pragma: no cover - cleanup on failure
        os.kill(proc.pid, signal.SIGKILL)


def test_real_worker_that_cannot_load_its_model_fails_its_start(tmp_path: Path):
    """The models are loaded before 'ready': a missing sam3 package is one start error with the
    child's exit code (3), not a failure of every photo."""
    from pipeline.selection import module_available

    if module_available("sam3.model_builder"):
        pytest.skip("sam3 is installed in this env")
    w = WorkerProcess("stage1", ["--profile=lite", "--segmenter=sam3", "--box=1,1,40,40,cup"], log_path=tmp_path / "w.log")
    with pytest.raises(WorkerStartError) as err:
        w.start()
    assert err.value.exit_code == 3 and "sam3" in str(err.value) and "Fix:" in str(err.value)


def _worker_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_worker_exits_when_its_named_starter_dies_even_behind_a_wrapper(tmp_path: Path):
    """The starter's pid travels in SAM3DGS_WORKER_PARENT (WorkerProcess sets it). A worker run
    through a wrapper that keeps it as a child (the wrapper stays, stdin stays open) still exits
    when the starter dies; and a worker whose starter is already dead when it starts (killed while
    the interpreter was loading: its parent had changed before it could look) exits at once."""
    import subprocess

    worker_cmd = f"{sys.executable} -m pipeline worker --stage stage1 --profile=lite; true"  # `; true`: sh stays the parent
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    starter = subprocess.Popen(["sleep", "600"])
    wrapper = subprocess.Popen(["sh", "-c", worker_cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               cwd=ROOT, env={**env, "SAM3DGS_WORKER_PARENT": str(starter.pid)})
    try:
        ready = json.loads(wrapper.stdout.readline())
        assert ready["event"] == "ready", ready
        time.sleep(1.0)
        assert not _worker_gone(ready["pid"]), "a worker whose parent is a wrapper left while its starter lived"
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 15
        while not _worker_gone(ready["pid"]):
            assert time.monotonic() < deadline, "the worker outlived its starter (the wrapper and stdin were still there)"
            time.sleep(0.2)
    finally:
        for p in (starter, wrapper):
            if p.poll() is None:
                p.kill()
            p.wait()

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process now
    t0 = time.monotonic()
    late = subprocess.run([sys.executable, "-m", "pipeline", "worker", "--stage", "stage1", "--profile=lite"], stdin=subprocess.PIPE,
                          capture_output=True, text=True, cwd=ROOT, env={**env, "SAM3DGS_WORKER_PARENT": str(dead.pid)}, timeout=60)
    assert '"ready"' not in late.stdout, "a worker whose starter was already gone loaded its models"
    assert "exiting now" in late.stderr and time.monotonic() - t0 < 30


def test_worker_exits_when_the_process_that_started_it_dies(tmp_path: Path):
    """kill -9 of the driver (or of the Ray actor owning the worker): the worker exits even while its
    stdin stays open elsewhere (here the test holds the pipe), e.g. while it is still loading models."""
    import subprocess

    read_fd, write_fd = os.pipe()
    pid_file = tmp_path / "worker.pid"
    parent_code = (
        "import subprocess, sys, time, os\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'pipeline', 'worker', '--stage', 'stage1', '--profile=lite'], stdin={read_fd}, "
        f"pass_fds=({read_fd},), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd={str(ROOT)!r})\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], pass_fds=(read_fd,), env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        time.sleep(1.0)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while Path(f"/proc/{worker}").exists() and "zombie" not in Path(f"/proc/{worker}/status").read_text().lower():
            assert time.monotonic() < deadline, "the worker outlived the process that started it"
            time.sleep(0.2)
    finally:
        os.close(read_fd)
        os.close(write_fd)
        if parent.poll() is None:
            parent.kill()
