"""Demo end to end, per stage: `python -m pipeline demo` in a subprocess (setup excluded).

Target (docs/PERFORMANCE.md): <= 30 s on 2 cores. Prints a markdown table and the machine.
Usage: python bench/bench_demo.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    walls, stage_runs = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
            walls.append(time.perf_counter() - t)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            stage_runs.append(json.loads((out / "run.json").read_text())["timings"])
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}; {args.repeat} runs, median\n")
    print("| step | seconds |\n| --- | --- |")
    for key in stage_runs[0]:
        print(f"| {key} | {statistics.median(r[key] for r in stage_runs):.2f} |")
    print(f"| **end to end (process wall time)** | **{statistics.median(walls):.2f}** |")
    print(f"\ntarget <= 30 s: {'met' if statistics.median(walls) <= 30 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
