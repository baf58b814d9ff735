"""The Ray engine against the local engine on the same batch, and VLM requests in flight.

`python -m pipeline batch` over N photos (default 8) with the built-in backends and the stand-in
vLLM (tests/fake_vllm.py; each answer takes --chat-delay seconds, as a real VLM takes seconds), once
with `--engine local` and once with `--engine ray` (a local Ray started by the driver), each into a
fresh output folder; process wall time, best of --repeat. The stand-in counts the requests in flight.

Targets (issue 9, docs/PERFORMANCE.md), on 2 cores: Ray within 1.3x of local for 8 photos;
>= 8 VLM requests in flight (--vlm-concurrency 8).

Usage: python bench/batch_engines.py [--photos 8] [--repeat 2] [--chat-delay 2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from batch_fixture import FAST, ROOT, VLM_LITE, batch_argv, make_photos, max_in_flight, read_stats, server_starts, stand_in_vllm  # noqa: E402
from timing import machine_line  # noqa: E402


def one_batch(photos: Path, work: Path, engine: str, chat_delay: float) -> tuple[float, dict]:
    flags, env = stand_in_vllm(work / "vllm", chat_delay=chat_delay)
    argv = batch_argv(photos, work / "out", *VLM_LITE, *FAST, *flags, "--engine", engine, "--vlm-concurrency", "8")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{engine} batch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    batch = json.loads((work / "out" / "batch.json").read_text())
    stats = read_stats(work / "vllm" / "stats.jsonl")
    return seconds, {
        "done": sum(p["status"] == "done" for p in batch["photos"]),
        "in_flight": max_in_flight(stats),
        "starts": server_starts(stats),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--chat-delay", type=float, default=2.0, help="seconds each stand-in VLM answer takes")
    args = parser.parse_args()
    print(machine_line())
    print(f"command: python bench/batch_engines.py --photos {args.photos} --repeat {args.repeat} --chat-delay {args.chat_delay}\n")
    results: dict[str, list[tuple[float, dict]]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos, args.photos)
        for r in range(args.repeat):
            for engine in ("local", "ray"):  # interleaved, so slow phases of a shared machine hit both
                results[engine].append(one_batch(photos, Path(tmp) / f"{engine}-{r}", engine, args.chat_delay))
    print(f"| engine | wall time, best of {args.repeat} (s) | photos done | VLM requests in flight (max) | vLLM servers started |")
    print("| --- | --- | --- | --- | --- |")
    best = {}
    for engine, runs in results.items():
        seconds, info = min(runs, key=lambda x: x[0])
        best[engine] = seconds
        print(f"| {engine} | {seconds:.1f} | {info['done']}/{args.photos} | {max(i['in_flight'] for _, i in runs)} | {info['starts']} |")
    ratio = best["ray"] / best["local"]
    in_flight = min(max(i["in_flight"] for _, i in runs) for runs in results.values())
    print(f"\nray / local: {ratio:.2f} (target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")
    want = min(8, args.photos)
    print(f"VLM requests in flight: {in_flight} with both engines (target >= {want}: {'met' if in_flight >= want else 'NOT met'})")
    return 0 if ratio <= 1.3 and in_flight >= want else 1


if __name__ == "__main__":
    raise SystemExit(main())
