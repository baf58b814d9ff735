"""Stage2.warm_up: before a batch worker's first photo, what every photo's export needs is loaded
(torch for gaussians.pt, the export modules, the built-in lifter's scipy.ndimage and OpenCV) and the turntable renderer has drawn once, in a fresh
interpreter where none of it was loaded before."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

CODE = """
import json, sys
from pipeline.stages import Configs, Stage2
c = Configs(); c.lifter.lifter = "inflate"; c.export.renderer = "cpu"; c.run.progress = False
s = Stage2(c, log=lambda m: None); s.lifter()
before = {m: m in sys.modules for m in ("torch", "pipeline.scene.export", "pipeline.scene.render_cpu", "scipy.ndimage", "cv2")}
import pipeline.scene.render_cpu as R
drawn = []
real = R.render
R.render = lambda *a, **k: drawn.append(a[1].width) or real(*a, **k)
report = s.warm_up()
after = {m: m in sys.modules for m in before}
print(json.dumps({"before": before, "after": after, "report": report, "drawn": drawn}))
"""


def test_warm_up_loads_the_export_path_and_renders_once():
    proc = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(got["before"].values()), got["before"]
    assert all(got["after"].values()), got["after"]
    assert got["report"]["renderer"] == "cpu" and got["drawn"] == [32]
