"""Batch throughput against the number of GPUs: the same photos through both stages with 1, 2, ... GPUs.

Stage 1: SAM3 (random weights written once to a checkpoint file, masks forced the way
bench/stage1_sam3.py forces them: confidence 0, one mask per phrase, duplicate removal off, any box
overlap), prompted with five boxes (no VLM: the demo scene's objects, so every photo has five).
Stage 2: the built-in inflate lifter and every export, turntables through gsplat (--renderer gsplat).
Each GPU count is one `python -m pipeline batch` run (default --engine ray, a local Ray that sees
CUDA_VISIBLE_DEVICES=0..k-1) into a fresh folder over the same photos, with the batch's defaults:
one stage 1 worker and one stage 2 worker per GPU (on Ray, both in one placement-group bundle per
GPU, so stage 2's workers start while stage 1 runs).

Per run: process wall time; photos/s end to end (wall) and in steady state (stage 1 and stage 2
spans from the run folders' file times: the first to the last photo finished, times N/(N-1)); the
fixed time (wall minus photos / steady rate: starting Ray and the workers, loading models, stopping);
the ratio to the first GPU count; the GPU busy share (nvidia-smi utilization.gpu sampled every 0.5 s,
mean over the GPUs used and the run). Target (issue 9): >= 1.8x from 1 to 2 GPUs; issue 10:
>= 0.9 x the GPU count up to 8. `--gpus 0` is a CPU smoke run (classical pieces stay the same).

Run (light env with Ray, sam3 and gsplat importable; CUDA GPUs):
  python bench/batch_scaling.py --photos 32 --gpus 1,2 [--work DIR] [--engine ray|local]
Prints a markdown table for docs/PERFORMANCE.md and writes WORK/batch_scaling.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.runfolder import RunPaths  # noqa: E402 - after the sys.path line above

FORCED = ["--confidence", "0", "--max-masks-per-phrase", "1", "--dedup-iou", "1.01", "--dedup-iom", "1.01", "--box-min-iou", "0"]


def _one_photo(args: tuple[int, int, int, str]) -> None:
    seed, w, h, path = args
    import tempfile

    from pipeline.demo.scene import make_demo_scene

    with tempfile.TemporaryDirectory() as tmp:
        make_demo_scene(Path(tmp), width=w, height=h, seed=seed)
        Image.open(Path(tmp) / "image.png").convert("RGB").save(path)


def make_photos(folder: Path, n: int, w: int, h: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:04d}.png" for i in range(n)]
    todo = [(i + 1, w, h, str(p)) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        with ProcessPoolExecutor(max(1, min(len(todo), (os.cpu_count() or 2) - 1))) as ex:
            list(ex.map(_one_photo, todo))
    return paths


def demo_boxes(w: int, h: int) -> list[str]:
    """--box values (pixels, with labels) around the demo scene's five objects, a little padded."""
    import tempfile

    from pipeline.demo.scene import make_demo_scene

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_scene(Path(tmp), width=w, height=h, seed=0)
        names = [o["name"] for o in json.loads((Path(tmp) / "scene.json").read_text()).get("objects", [])]
        for i, gt in enumerate(sorted((Path(tmp) / "gt").glob("*.png"))):
            m = np.asarray(Image.open(gt)) > 127
            ys, xs = np.nonzero(m)
            pad = 0.03 * max(w, h)
            box = [max(0, xs.min() - pad), max(0, ys.min() - pad), min(w, xs.max() + 1 + pad), min(h, ys.max() + 1 + pad)]
            label = names[i] if i < len(names) else f"object {i}"
            out.append(",".join(f"{v:.0f}" for v in box) + f",{label}")
    return out


def write_random_sam3(path: Path, bpe: Path | None) -> None:
    """SAM3's real architecture with random weights, saved as an image-model state dict (what
    --sam3-checkpoint accepts), so the batch's workers load it with no download.

    Seeded: the forced masks of random weights are whatever those weights give, and stage 2's cost
    follows the masks' sizes (the built-in lifter's height field and samples). Unseeded, each machine
    drew other weights, and stage 2 took 0.9 to 2.9 s a photo from one device call to the next."""
    import torch

    from pipeline.core.config import SegmenterConfig
    from pipeline.masks.sam3 import Sam3Segmenter

    torch.manual_seed(0)  # the model is built on the CPU (Sam3Segmenter.load): the same weights everywhere
    seg = Sam3Segmenter(SegmenterConfig(sam3_bpe=bpe), device="cuda" if torch.cuda.is_available() else "cpu", load_from_hf=False)
    model = seg.load()
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


class GpuSampler:
    """nvidia-smi utilization.gpu of the given GPUs every 0.5 s, in a thread."""

    def __init__(self, gpus: list[int]):
        self.gpus, self.samples, self._stop = gpus, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                util = {int(a): float(b) for a, b in (line.split(",") for line in out.strip().splitlines())}
                self.samples.append([util[g] for g in self.gpus if g in util])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> GpuSampler:
        if self.gpus:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def busy(self) -> float | None:
        values = [v for s in self.samples for v in s]
        return statistics.mean(values) / 100 if values else None


def span_rate(times: list[float]) -> float | None:
    """Photos per second from finish times: (N - 1) photos in (last - first) seconds."""
    if len(times) < 2 or max(times) <= min(times):
        return None
    return (len(times) - 1) / (max(times) - min(times))


_STAMP = re.compile(r"^#? ?(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:,(\d{3}))? (.*)$")


def _stamp(line: str) -> tuple[float, str] | None:
    m = _STAMP.match(line)
    if not m:
        return None
    t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2) or 0) / 1000
    return t, m.group(3)


def timeline(out: Path, t0: float) -> dict[str, float]:
    """Seconds from the batch command's start to each milestone: the driver's "timeline: ..." lines
    (ROOT/logs/pipeline.log), each worker child's start line and its 'SAM3 built' line (ROOT/logs/)."""
    marks: dict[str, float] = {}
    logs = out / "logs"
    for line in (logs / "pipeline.log").read_text(errors="replace").splitlines() if (logs / "pipeline.log").exists() else []:
        hit = _stamp(line)
        if hit and "timeline: " in hit[1]:
            marks.setdefault(hit[1].split("timeline: ", 1)[1], round(hit[0] - t0, 2))
    for log in sorted(logs.glob("stage*-worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            hit = _stamp(line)
            if not hit:
                continue
            if "starting " in hit[1] and hit[1].startswith("starting "):
                marks.setdefault(f"{log.stem} child started", round(hit[0] - t0, 2))
            elif "SAM3 built on" in hit[1]:
                marks.setdefault(f"{log.stem} SAM3 built ({hit[1].split(' in ', 1)[1].split(' ', 1)[0]} s)", round(hit[0] - t0, 2))
    return dict(sorted(marks.items(), key=lambda kv: kv[1]))


def photo_breakdown(out: Path, rows: list[dict]) -> dict[str, float]:
    """Median seconds per photo of each step the stages time (run.json "timings" and export's own
    split), over the photos done: where a photo's time goes, and which step slows down when more
    workers run at once."""
    steps: dict[str, list[float]] = {}
    for r in rows:
        if r["status"] != "done":
            continue
        try:
            run = json.loads(RunPaths(out / r["run_dir"]).manifest.read_text())
        except (OSError, ValueError):
            continue
        items = dict(run.get("timings") or {})
        export = (run.get("export") or {}).get("seconds") or {}
        items.update({f"export.{k}": v for k, v in export.items() if k in ("objects", "scene")})
        items["batch row"] = r.get("seconds")
        for name, v in items.items():
            if isinstance(v, (int, float)):
                steps.setdefault(name, []).append(float(v))
    return {name: round(statistics.median(vs), 3) for name, vs in sorted(steps.items())}


def run_batch(args, k: int, photos: Path, checkpoint: Path, boxes: list[str], tag: str = "") -> dict:
    out = args.work / f"out-{args.engine}-{k}gpu{tag}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    gpus = list(range(k))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    argv = [
        sys.executable, "-m", "pipeline", "batch", "--images", str(photos), "--out", str(out), "--engine", args.engine, "--no-progress",
        "--planner", "none", "--segmenter", args.segmenter, *(["--sam3-checkpoint", str(checkpoint)] if args.segmenter == "sam3" else []),
        *FORCED, *[f"--box={b}" for b in boxes],
        "--lifter", "inflate", "--renderer", "gsplat" if k else "cpu",
    ]  # fmt: skip
    if k == 0:
        argv += ["--device", "cpu", "--gif-frames", "6", "--inflate-gaussians", "2000"]
    if args.stage1_python:
        argv += ["--stage1-python", str(args.stage1_python)]
    if args.sam3_bpe:
        argv += ["--sam3-bpe", str(args.sam3_bpe)]
    argv += args.extra
    t0 = time.time()
    with GpuSampler(gpus) as sampler:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    driver_log = out / "logs" / "pipeline.log"  # timestamped: where the fixed time goes
    driver_text = driver_log.read_text(errors="replace") if driver_log.exists() else ""
    (args.work / f"batch-{args.engine}-{k}gpu{tag}.log").write_text(proc.stdout + proc.stderr + "\n== ROOT/logs/pipeline.log\n" + driver_text)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{k} GPU(s): batch failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}")
    batch = json.loads((out / "batch.json").read_text())
    rows = batch["photos"]
    done = [r for r in rows if r["status"] == "done"]
    s1 = [RunPaths(out / r["run_dir"]).masks_json.stat().st_mtime for r in rows if RunPaths(out / r["run_dir"]).masks_json.exists()]
    s2 = [RunPaths(out / r["run_dir"]).report.stat().st_mtime for r in done if RunPaths(out / r["run_dir"]).report.exists()]
    r1, r2 = span_rate(s1), span_rate(s2)
    steady = 1 / (1 / r1 + 1 / r2) if r1 and r2 else None  # stage-major: a photo costs 1/r1 + 1/r2
    fixed = wall - len(done) / steady if steady else None  # starting Ray, loading models, stopping: not per photo
    objects = sum(r.get("objects") or 0 for r in rows)
    marks = timeline(out, t0)
    return {
        "gpus": k, "photos": len(rows), "done": len(done), "objects": objects, "wall_s": wall, "photos_per_s": len(done) / wall,
        "stage1_photos_per_s": r1, "stage2_photos_per_s": r2, "steady_photos_per_s": steady, "fixed_s": fixed, "gpu_busy": sampler.busy(),
        "exit_code": proc.returncode, "errors": sorted({r["error"] for r in rows if r["error"]})[:3], "timeline": marks,
        "per_photo_median_s": photo_breakdown(out, rows),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--gpus", default="1,2", help="GPU counts, comma-separated (0: a CPU smoke run)")
    ap.add_argument("--size", default="1024x768", help="photo size WxH")
    ap.add_argument("--engine", default="ray", choices=["ray", "local"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/batch_scaling"))
    ap.add_argument("--sam3-checkpoint", type=Path, default=None, help="default: seeded random weights written to WORK/sam3-random-seed0.pt")
    ap.add_argument("--warm-up", type=int, default=2, metavar="N",
                    help="first an untimed batch of N photos per GPU on the most GPUs asked for, so every timed run finds the machine's "
                         "file cache warm (libraries, the checkpoint), not only the ones after the first (0: none)")
    ap.add_argument("--segmenter", default="sam3", choices=["sam3", "classical"], help="classical: a quick CPU check of the benchmark itself")
    ap.add_argument("--stage1-python", type=Path, default=None, help="interpreter with sam3 for stage 1 (default: this one)")
    ap.add_argument("--sam3-bpe", type=Path, default=None, help="SAM3's BPE vocab file, if sam3/open_clip do not carry it")
    ap.add_argument("--write-random-sam3", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="more batch flags, after --")
    args = ap.parse_args(argv)
    if args.write_random_sam3:
        write_random_sam3(args.write_random_sam3, args.sam3_bpe)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.size.split("x"))
    counts = [int(v) for v in args.gpus.split(",")]
    t = time.time()
    # One folder per count: the batch takes every photo of its folder, and a folder made for a larger
    # count earlier in WORK would otherwise be run whole (a warm machine keeps WORK between calls).
    photos = args.work / f"photos-{w}x{h}-{args.photos}"
    make_photos(photos, args.photos, w, h)
    photos_s = time.time() - t
    boxes = demo_boxes(w, h)
    checkpoint = args.sam3_checkpoint or args.work / "sam3-random-seed0.pt"
    if args.segmenter == "sam3" and not checkpoint.exists():
        t = time.time()
        py = str(args.stage1_python or sys.executable)
        bpe = ["--sam3-bpe", str(args.sam3_bpe)] if args.sam3_bpe else []
        subprocess.run([py, __file__, "--write-random-sam3", str(checkpoint), *bpe], cwd=ROOT, check=True)
        print(f"random SAM3 checkpoint written in {time.time() - t:.0f} s", flush=True)
    print(f"{args.photos} photos {w}x{h} made in {photos_s:.0f} s; boxes: {boxes}", flush=True)
    if args.warm_up > 0 and max(counts) > 0:
        t = time.time()
        warm = args.work / f"photos-{w}x{h}-warm-up-{args.warm_up * max(counts)}"
        make_photos(warm, args.warm_up * max(counts), w, h)
        r = run_batch(args, max(counts), warm, checkpoint, boxes, tag="-warm-up")
        print(f"warm-up batch ({r['photos']} photos, {max(counts)} GPU(s), untimed): {r['done']} done in {time.time() - t:.0f} s", flush=True)
    results = []
    for k in counts:
        r = run_batch(args, k, photos, checkpoint, boxes)
        results.append(r)
        print(json.dumps(r), flush=True)
    gpu_name = ""
    try:
        gpu_name = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        gpu_name = "no GPU"
    import torch

    head = (
        f"Machine: {platform.node() or '?'}, {os.cpu_count()} CPUs, {gpu_name} x {torch.cuda.device_count()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Command: python bench/batch_scaling.py --photos {args.photos} --gpus {args.gpus} --size {args.size} --engine {args.engine} --warm-up {args.warm_up}"
        + (f" --segmenter {args.segmenter}. " if args.segmenter != "sam3" else ". ")
        + ("Stage 1: SAM3 random weights, 5 box prompts, masks forced; " if args.segmenter == "sam3" else "Stage 1: the classical segmenter, 5 box prompts; ")
        + "stage 2: inflate lifter, exports with gsplat turntables."
    )

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    base = results[0]
    lines = [
        head,
        "",
        "| GPUs | photos done | objects | wall s | photos/s (wall) | stage 1 photos/s | stage 2 photos/s | steady photos/s | fixed s | ratio (steady) | ratio (wall) | GPU busy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ratio_s = (
            r["steady_photos_per_s"] / base["steady_photos_per_s"] if r["steady_photos_per_s"] and base["steady_photos_per_s"] else None
        )
        ratio_w = r["photos_per_s"] / base["photos_per_s"] if base["photos_per_s"] else None
        lines.append(
            f"| {r['gpus']} | {r['done']}/{r['photos']} | {r['objects']} | {r['wall_s']:.1f} | {f(r['photos_per_s'])} | {f(r['stage1_photos_per_s'])} | "
            f"{f(r['stage2_photos_per_s'])} | {f(r['steady_photos_per_s'])} | {f(r.get('fixed_s'), '{:.0f}')} | {f(ratio_s, '{:.2f}x')} | {f(ratio_w, '{:.2f}x')} | "
            f"{f(r['gpu_busy'], '{:.0%}')} |"
        )
    lines += ["", "Where the time goes (seconds from the batch command's start; ROOT/logs/):", ""]
    for r in results:
        lines.append(f"- {r['gpus']} GPU(s): " + "; ".join(f"{name} {t:.1f}" for name, t in r.get("timeline", {}).items()))
    lines += ["", "Median seconds per photo, by step (run.json timings; each worker's own clock):", ""]
    for r in results:
        lines.append(f"- {r['gpus']} GPU(s): " + "; ".join(f"{name} {t:.3f}" for name, t in r.get("per_photo_median_s", {}).items()))
    table = "\n".join(lines)
    print(table)
    (args.work / "batch_scaling.md").write_text(table + "\n")
    (args.work / "batch_scaling.json").write_text(json.dumps({"head": head, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
