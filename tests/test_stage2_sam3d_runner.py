"""Stage 2's runner with the SAM 3D Objects adapter on its contract stand-in (tests/fixtures/
sam3d_standin: the real model cannot be installed here, the stand-in follows upstream's call
signature and output types). Checks what only the runner can: one point map for the whole photo,
a failing object recorded in run.json while the others are finished and exported, exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT

from pipeline.objects import sam3d

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from pipeline.core.config import ExportConfig, LifterConfig, RunConfig
    from pipeline.demo.scene import make_demo_scene
    from pipeline.stages import Configs, Stage1

    out = Path(sys.argv[1]); standin = sys.argv[2]
    make_demo_scene(out / "scene")
    cfg = Configs(run=RunConfig(image=out / "scene/image.png", out=out / "run", profile="lite", progress=False),
                  lifter=LifterConfig(sam3d_root=Path(standin)), export=ExportConfig(gif_frames=4, gif_size=64, scene_gif_size=96))
    Stage1(cfg, log=lambda m: None).process(out / "scene/image.png", out / "run")
    masks = json.loads((out / "run/masks/masks.json").read_text())["objects"]
    print(json.dumps({"area": masks[1]["area"]}))
    """
)

SCRIPT2 = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from pipeline.core.config import ExportConfig, LifterConfig, RunConfig
    from pipeline.objects.sam3d import Sam3dLifter
    from pipeline.selection import BackendChoice
    from pipeline.stages import Configs, Stage2
    from pipeline.cli import _summary

    run = Path(sys.argv[1]); standin = sys.argv[2]
    cfg = Configs(run=RunConfig(out=run, progress=False), lifter=LifterConfig(sam3d_root=Path(standin), lifter="sam3d"),
                  export=ExportConfig(gif_frames=4, gif_size=64, scene_gif_size=96))
    stage2 = Stage2(cfg, BackendChoice("none", "classical", "sam3d"), log=lambda m: print(m, file=sys.stderr))
    stage2._lifter = Sam3dLifter(cfg.lifter, allow_cpu=True)  # the stand-in runs on CPU
    stage2.process(run)
    sys.exit(_summary(run, 0.0))
    """
)


def test_failing_object_is_recorded_and_the_rest_are_done(tmp_path: Path):
    standin = ROOT / "tests" / "fixtures" / "sam3d_standin"
    env = {**os.environ, "CONDA_PREFIX": sys.prefix}
    env.pop("SAM3D_STANDIN_FAIL_AREA", None)
    first = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(standin)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    assert first.returncode == 0, first.stderr
    area = json.loads(first.stdout.strip().splitlines()[-1])["area"]
    run = tmp_path / "run"
    ok = subprocess.run([sys.executable, "-c", SCRIPT2, str(run), str(standin)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    assert ok.returncode == 0, ok.stderr
    assert (run / "objects/obj_002/gaussians.pt").is_file()
    env["SAM3D_STANDIN_FAIL_AREA"] = str(area)  # now obj_002 fails every time (CUDA OOM-like error)
    proc = subprocess.run([sys.executable, "-c", SCRIPT2.replace("progress=False)", "progress=False, force=True)", 1), str(run), str(standin)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 1, proc.stderr
    manifest = json.loads((run / "run.json").read_text())
    objects = manifest["objects"]
    assert objects["obj_002"]["status"] == "failed" and "memory" in objects["obj_002"]["error"].lower()
    assert all(o["status"] == "done" for oid, o in objects.items() if oid != "obj_002")
    assert manifest["stats"]["pointmap_computations"] == 1
    # What ran, for the record: the checkpoints' Hub revision (the stand-in's were not downloaded by us)
    assert manifest["versions"]["sam-3d-objects checkpoints"].startswith("facebook/sam-3d-objects@unknown")
    assert "sam-3d-objects" in manifest["versions"] and manifest["config"]["lifter"]["sam3d_hf_revision"] == sam3d.HF_REVISION
    K = manifest["stats"]["intrinsics"]  # fitted to the shared point map, used for the scene GIF
    assert K[0][0] > 0 and K[1][1] > 0 and K[2] == [0, 0, 1]
    # The earlier run's files of the failed object are gone, so the scene cannot show stale geometry.
    assert (run / "objects/obj_001/gaussians.pt").is_file() and not (run / "objects/obj_002/gaussians.pt").exists()
    assert not (run / "objects/obj_002/object.ply").exists()
    assert manifest["export"]["scene"]["n_objects"] == len(objects) - 1
    assert (run / "scene/scene.ply").is_file()
    assert "obj_002" in proc.stderr
