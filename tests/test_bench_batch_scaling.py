"""bench/batch_scaling.py itself, end to end on the CPU (its GPU runs cost device time: a crash after
the first batch there loses the run). The classical segmenter and 2 photos keep it short; the Ray
engine, as on the GPUs, so the timeline carries Ray's milestones too."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install -r envs/requirements-ray.txt")
def test_batch_scaling_runs_and_reports_its_timeline(tmp_path: Path):
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "bench/batch_scaling.py", "--photos", "2", "--gpus", "0", "--size", "160x120", "--engine", "ray",
         "--segmenter", "classical", "--work", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((work / "batch_scaling.json").read_text())["results"][0]
    assert result["done"] == 2 and result["exit_code"] == 0, result
    marks = result["timeline"]
    for name in ("engine starts", "ray.init done", "stage1 workers ready", "stage1 last photo answered (2)", "stage2 last photo answered (2)", "shutdown done"):
        assert name in marks, f"{name!r} missing from the timeline: {sorted(marks)}"
    assert any(k.startswith("stage1-worker-0 child started") for k in marks), sorted(marks)
    times = list(marks.values())
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= result["wall_s"], marks
    assert marks["ray.init done"] <= marks["stage1 workers ready"] <= marks["stage1 last photo answered (2)"] <= marks["shutdown done"]
    steps = result["per_photo_median_s"]
    assert {"stage1.segment", "stage2.lift", "export", "export.objects", "batch row"} <= set(steps), steps
    assert 0 < steps["export.objects"] <= steps["export"] <= steps["batch row"], steps
    table = (work / "batch_scaling.md").read_text()
    assert "Where the time goes" in table and "| 0 | 2/2 |" in table, table
