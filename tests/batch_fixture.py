"""Photo folders and helpers for the batch tests and benchmarks (tests/test_batch_*.py, bench/batch_*.py).

Photos are the demo scene at a small size with a different seed each (distinct pixels, the same
layout give or take 5 cm), so the built-in backends find the same five objects in every one and a
batch of many photos stays fast on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# Small, quick exports: what the batch tests need is the run folder's files, not pretty GIFs.
FAST = ["--no-progress", "--no-turntable", "--inflate-gaussians", "300"]
# The built-in backends with the stand-in VLM as planner (boxes from the VLM, refined classically).
VLM_LITE = ["--planner", "vlm", "--segmenter", "classical", "--lifter", "inflate", "--renderer", "cpu"]
SIZE = (160, 120)


def demo_photo(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """The demo scene drawn with `seed` (RGB)."""
    from pipeline.demo.scene import make_demo_scene

    with tempfile.TemporaryDirectory() as tmp:
        make_demo_scene(Path(tmp), width=size[0], height=size[1], seed=seed)
        with Image.open(Path(tmp) / "image.png") as im:
            return im.convert("RGB")


def make_photos(folder: Path, n: int, *, ext: str = "png", start_seed: int = 1, size: tuple[int, int] = SIZE) -> list[Path]:
    """`n` distinct photos folder/photo_000.<ext> ..., sorted by name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:03d}.{ext}"
        demo_photo(start_seed + i, size).save(path, quality=95) if ext in ("jpg", "jpeg") else demo_photo(start_seed + i, size).save(path)
        paths.append(path)
    return paths


def make_user_folder(folder: Path) -> dict[str, str]:
    """A folder like a user's. Returns {relative path: expected status} for every photo the batch
    must find ('done' or 'failed'); hidden files, hidden folders and non-image extensions are not in it."""
    expect: dict[str, str] = {}

    def put(rel: str, seed: int, status: str = "done") -> Path:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        demo_photo(seed).save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else demo_photo(seed).save(path)
        expect[rel] = status
        return path

    put("holiday/beach.jpg", 1)
    put("work/beach.jpg", 2)  # the same stem in another folder
    put("holiday/beach.png", 3)  # the same stem in another format
    put("a b/ç été №1.JPG", 4)  # spaces, non-ASCII, upper-case extension
    put("deep/er/still/déjà vu (2).png", 5)  # nested, brackets
    original = put("holiday/sunset.png", 6)
    shutil.copyfile(original, folder / "holiday/sunset copy.png")  # a duplicate photo: same bytes, other name
    expect["holiday/sunset copy.png"] = "done"
    # A truncated JPEG: the first half of a real one.
    good = folder / "broken" / "cut.jpg"
    good.parent.mkdir(parents=True, exist_ok=True)
    demo_photo(7).save(good, quality=95)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    expect["broken/cut.jpg"] = "failed"
    # A text file with an image extension.
    (folder / "broken" / "notes.jpg").write_text("these are my notes, not a photo\n")
    expect["broken/notes.jpg"] = "failed"
    # Not photos of the batch: hidden file, hidden folder, other extension.
    demo_photo(8).save(folder / ".hidden.png")
    (folder / ".thumbs").mkdir()
    demo_photo(9).save(folder / ".thumbs" / "beach.png")
    (folder / "holiday" / "readme.txt").write_text("not a photo")
    return expect


def vlm_replies(path: Path) -> Path:
    """A FAKE_VLLM_REPLY_FILE with Qwen3-VL-style boxes (0..1000 grid) around the demo scene's objects."""
    from pipeline.demo.scene import make_demo_scene

    with tempfile.TemporaryDirectory() as tmp:
        make_demo_scene(Path(tmp), width=SIZE[0], height=SIZE[1], seed=0)
        scene = json.loads((Path(tmp) / "scene.json").read_text())
        objects = []
        for i, gt in enumerate(sorted((Path(tmp) / "gt").glob("*.png"))):
            m = np.asarray(Image.open(gt)) > 127
            ys, xs = np.nonzero(m)
            h, w = m.shape
            box = [
                round(xs.min() / w * 1000) - 15,
                round(ys.min() / h * 1000) - 15,
                round((xs.max() + 1) / w * 1000) + 15,
                round((ys.max() + 1) / h * 1000) + 15,
            ]
            objects.append(
                {
                    "phrase": scene["objects"][i]["name"] if "objects" in scene else f"object {i}",
                    "bbox_2d": [max(0, min(1000, v)) for v in box],
                }
            )
    path.write_text(json.dumps(["<think>Five simple objects on a plain floor.</think>" + json.dumps({"objects": objects})]))
    return path


def stand_in_vllm(folder: Path, *, chat_delay: float = 0.0) -> tuple[list[str], dict[str, str]]:
    """Flags and env that make the batch start tests/fake_vllm.py as its vLLM, counting into folder/stats.jsonl."""
    sys.path.insert(0, str(TESTS))
    from fake_vllm import make_launchable

    folder.mkdir(parents=True, exist_ok=True)
    wrapper, model = make_launchable(folder)
    flags = ["--vllm-command", str(wrapper), "--vlm-model-id", str(model), "--ready-timeout", "60"]
    env = {
        "FAKE_VLLM_STATS": str(folder / "stats.jsonl"),
        "FAKE_VLLM_REPLY_FILE": str(vlm_replies(folder / "replies.json")),
        "FAKE_VLLM_CHAT_DELAY": str(chat_delay),
    }
    return flags, env


def read_stats(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def server_starts(stats: list[dict]) -> int:
    return sum(1 for e in stats if e["event"] == "start")


def max_in_flight(stats: list[dict]) -> int:
    return max((e["max_in_flight"] for e in stats if e["event"] == "chat"), default=0)


def planned_ahead(out: Path) -> tuple[int, int | None]:
    """(run folders whose stage1/plan.json was planned ahead by the driver, the count the driver logged)."""
    import re

    files = sum(1 for p in out.rglob("stage1/plan.json") if json.loads(p.read_text()).get("request", {}).get("planned_ahead"))
    log = out / "logs" / "pipeline.log"
    logged = re.findall(r"planning ahead done \((\d+) planned", log.read_text()) if log.exists() else []
    return files, int(logged[-1]) if logged else None


def batch_argv(images: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "batch", "--images", str(images), "--out", str(out), *map(str, extra)]


def start_batch(images: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """The batch driver started in the background (its stdout and stderr piped, text), for a test that
    acts on it while it runs."""
    return subprocess.Popen(
        batch_argv(images, out, *extra),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_batch(images: Path, out: Path, *extra: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        batch_argv(images, out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def read_batch(out: Path) -> dict:
    return json.loads((out / "batch.json").read_text())


def statuses(batch: dict) -> dict[str, str]:
    """{image as found: status}."""
    return {p["image"]: p["status"] for p in batch["photos"]}


def by_rel(batch: dict, images: Path) -> dict[str, dict]:
    """batch.json's photo entries keyed by the photo's path relative to the images folder."""
    base = images.resolve()
    out = {}
    for p in batch["photos"]:
        image = Path(p["image"])
        image = image if image.is_absolute() else ROOT / image  # relative paths are relative to the cwd, the project root here
        out[image.resolve().relative_to(base).as_posix()] = p
    return out


def processes(*needles: str) -> dict[int, str]:
    """{pid: cmdline} of live processes whose command line holds every needle."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = next((line for line in (proc / "status").read_text().splitlines() if line.startswith("State:")), "")
        except OSError:
            continue
        if "Z" in state.split()[1:2]:  # a zombie is dead
            continue
        if all(n in cmd for n in needles):
            found[int(proc.name)] = cmd
    return found


def children(pid: int) -> set[int]:
    """Live direct children of `pid`."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(proc.name))
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def describe_processes(pids: set[int]) -> str:
    """pid, state, parent and command line of each of `pids` still there: what a failed
    'outlived' assertion shows, so a survivor can be told from a reused pid."""
    lines = []
    for pid in sorted(pids):
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        lines.append(f"pid {pid} state {fields[0]} ppid {fields[1]}: {cmd[:300]}")
    return "; ".join(lines)


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Poll until predicate() is truthy (returned) or timeout (returns the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def survivors(find, timeout: float, interval: float = 0.1) -> str:
    """Wait until find() (pids) is empty, at most `timeout` s: processes that outlive something must
    be given the time to go (a watchdog polls every 0.5 s; a process killed inside an fsync leaves
    only when the disk has answered). Those still there are described (describe_processes), then
    killed so they do not reach later tests; the description is returned ('' when none is left)."""
    import signal

    wait_for(lambda: not find(), timeout, interval)
    left = set(find())
    seen = describe_processes(left)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return seen if left else ""


def temp_files(root: Path) -> list[Path]:
    """Temporary files the atomic writers leave if interrupted (pipeline/core/atomic.py names them TMP_PREFIX*)."""
    from pipeline.core.atomic import TMP_PREFIX

    return [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]
