"""The Ray engine against the local engine on the same batch, and VLM requests in flight.

`python -m pipeline batch` over N photos (default 8) with the built-in backends and the stand-in
vLLM (tests/fake_vllm.py; each answer takes --chat-delay seconds, as a real VLM takes seconds), once
with `--engine local`, once with `--engine ray` (a local Ray started by the driver) and, with
`--modes ...,ray-running`, once with `--engine ray --ray-address` against a Ray already running (as a
cluster user runs it: `ray start --head --num-cpus 2` in a temp dir before the batch, not timed, and
stopped after it), each into a fresh output folder; process wall time, best of --repeat. The stand-in
counts the requests in flight.

Targets (issue 9, docs/PERFORMANCE.md), on 2 cores: Ray within 1.3x of local for 8 photos;
>= 8 VLM requests in flight (--vlm-concurrency 8).

Usage: python bench/batch_engines.py [--photos 8] [--repeat 2] [--chat-delay 2.0] [--modes local,ray,ray-running]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from batch_fixture import FAST, ROOT, VLM_LITE, batch_argv, make_photos, max_in_flight, read_stats, server_starts, stand_in_vllm  # noqa: E402
from batch_scaling import timeline  # noqa: E402
from timing import machine_line  # noqa: E402


def _ours(mark: str) -> list[int]:
    """Pids of the processes whose command line names `mark` (the running Ray's temp dir)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


class RunningRay:
    """`ray start --head --block` on a free port with its own temp dir, as a user's running Ray; stopped
    with SIGTERM to that command (its node shuts down its processes), not `ray stop`, which would stop
    every Ray on a shared machine. Actors get the environment of `ray start` (as on a cluster), so the
    stand-in vLLM's switches go there."""

    def __init__(self, env: dict[str, str]):
        from pipeline.plan.server import pick_free_port

        self.temp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.port = pick_free_port()
        ray_cli = Path(sys.executable).with_name("ray")
        argv = [str(ray_cli), "start", "--head", "--port", str(self.port), "--num-cpus", "2", "--include-dashboard=false",
                "--disable-usage-stats", "--temp-dir", self.temp, "--block"]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
        lines = []
        deadline = time.monotonic() + 120
        for line in self.proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "block forever" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit("ray start --head failed:\n" + "".join(lines[-30:]))
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        deadline = time.monotonic() + 15
        while _ours(self.temp) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _ours(self.temp)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if left:
            print(f"warning: {len(left)} process(es) of the running Ray outlived `ray start`'s SIGTERM; killed")
        shutil.rmtree(self.temp, ignore_errors=True)


def one_batch(photos: Path, work: Path, mode: str, chat_delay: float) -> tuple[float, dict]:
    flags, env = stand_in_vllm(work / "vllm", chat_delay=chat_delay)
    engine = ["--engine", "local"] if mode == "local" else ["--engine", "ray"]
    running = None
    if mode == "ray-running":
        # `ray start` turns on Ray's token authentication when ~/.ray/auth_token exists (a local ray.init
        # writes it); a driver given an address sends the token only when told to, as Ray's docs say.
        # up: ray/scripts/scripts.py:1069, ray/_private/worker.py:1973-1977
        env = {**env, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
        running = RunningRay(env)
        engine += ["--ray-address", running.address]
    argv = batch_argv(photos, work / "out", *VLM_LITE, *FAST, *flags, *engine, "--vlm-concurrency", "8")
    try:
        t0 = time.perf_counter()
        wall0 = time.time()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
        seconds = time.perf_counter() - t0
    finally:
        if running is not None:
            running.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} batch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    batch = json.loads((work / "out" / "batch.json").read_text())
    stats = read_stats(work / "vllm" / "stats.jsonl")
    return seconds, {
        "done": sum(p["status"] == "done" for p in batch["photos"]),
        "in_flight": max_in_flight(stats),
        "starts": server_starts(stats),
        "timeline": timeline(work / "out", wall0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--chat-delay", type=float, default=2.0, help="seconds each stand-in VLM answer takes")
    parser.add_argument("--timeline", action="store_true", help="print each mode's best run's milestones (the driver's timeline lines), seconds from its start")
    parser.add_argument("--modes", default="local,ray", help="comma list of local, ray (a local Ray of the driver's own), ray-running (a Ray started before)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "local" not in modes or not set(modes) <= {"local", "ray", "ray-running"} or len(modes) < 2:
        parser.error("--modes: local and at least one of ray, ray-running")
    print(machine_line())
    print(f"command: python bench/batch_engines.py --photos {args.photos} --repeat {args.repeat} --chat-delay {args.chat_delay} --modes {','.join(modes)}\n")
    results: dict[str, list[tuple[float, dict]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos, args.photos)
        for r in range(args.repeat):
            for mode in modes:  # interleaved, so slow phases of a shared machine hit every mode
                results[mode].append(one_batch(photos, Path(tmp) / f"{mode}-{r}", mode, args.chat_delay))
    print(f"| mode | wall time, best of {args.repeat} (s) | all runs (s) | photos done | VLM requests in flight (max) | vLLM servers started |")
    print("| --- | --- | --- | --- | --- | --- |")
    best = {}
    for mode, runs in results.items():
        seconds, info = min(runs, key=lambda x: x[0])
        best[mode] = seconds
        every = ", ".join(f"{s:.1f}" for s, _ in runs)
        print(f"| {mode} | {seconds:.1f} | {every} | {info['done']}/{args.photos} | {max(i['in_flight'] for _, i in runs)} | {info['starts']} |")
    if args.timeline:
        for mode, runs in results.items():
            marks = min(runs, key=lambda x: x[0])[1]["timeline"]
            print(f"\n{mode}, best run: " + "; ".join(f"{k} {v:.2f}" for k, v in marks.items()))
    ok = True
    for mode in modes[1:]:
        ratio = best[mode] / best["local"]
        ok = ok and ratio <= 1.3
        print(f"\n{mode} / local: {ratio:.2f} (target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")
    in_flight = min(max(i["in_flight"] for _, i in runs) for runs in results.values())
    want = min(8, args.photos)
    print(f"VLM requests in flight: {in_flight} in every mode (target >= {want}: {'met' if in_flight >= want else 'NOT met'})")
    return 0 if ok and in_flight >= want else 1


if __name__ == "__main__":
    raise SystemExit(main())
