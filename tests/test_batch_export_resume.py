"""Export resumes: objects (and the scene) whose files are already written for the same inputs are
not written again; a changed gaussians.pt or setting redoes exactly what depends on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from scipy.spatial.transform import Rotation
from test_export import blob, small_cfg

from pipeline.core.types import ObjectGaussians, Pose
from pipeline.objects.gaussians_pt import save_object_pt
from pipeline.scene.export import export_run

OBJECT_FILES = ("object.ply", "object.splat", "turntable.gif")
SCENE_FILES = ("scene.ply", "scene.splat", "scene.gif")


def make_run(tmp_path: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    (run / "input").mkdir(parents=True)
    Image.new("RGB", (80, 60), "white").save(run / "input" / "image.png")
    for i in range(n):
        pose = Pose(Rotation.random(random_state=rng).as_quat(scalar_first=True), [0.5 * (i - 1), 0.0, 3.0], np.full(3, 0.4))
        save_object_pt(run / "objects" / f"obj_00{i + 1}" / "gaussians.pt", ObjectGaussians(blob(rng, 150, (0.9, 0.2, 0.1 * i)), pose, "test"))
    return run


def small_cfg_frames(frames: int):
    cfg = small_cfg()
    cfg.gif_frames = frames
    return cfg


def stamps(run: Path) -> dict[str, int]:
    """mtime_ns of every export file (a rewrite replaces the file: a new inode and mtime)."""
    out = {}
    for d in sorted((run / "objects").iterdir()):
        for name in OBJECT_FILES:
            if (d / name).exists():
                out[f"{d.name}/{name}"] = (d / name).stat().st_mtime_ns
    for name in SCENE_FILES:
        out[f"scene/{name}"] = (run / "scene" / name).stat().st_mtime_ns
    return out


def test_second_export_with_previous_summary_writes_nothing(tmp_path: Path):
    run = make_run(tmp_path)
    first = export_run(run, small_cfg(), progress=False)
    before = stamps(run)
    assert len(before) == 3 * len(OBJECT_FILES) + len(SCENE_FILES)
    second = export_run(run, small_cfg(), progress=False, previous=json.loads(json.dumps(first)))
    assert stamps(run) == before
    assert all(o.get("resumed") for o in second["objects"].values())
    assert second["scene"].get("resumed") and second["scene"]["files"] == first["scene"]["files"]


def test_a_changed_object_redoes_it_and_the_scene_only(tmp_path: Path):
    run = make_run(tmp_path)
    first = export_run(run, small_cfg(), progress=False)
    before = stamps(run)
    rng = np.random.default_rng(7)
    pose = Pose(np.array([1.0, 0, 0, 0]), [0.0, 0.2, 2.0], np.full(3, 0.5))
    save_object_pt(run / "objects" / "obj_002" / "gaussians.pt", ObjectGaussians(blob(rng, 120, (0.1, 0.1, 0.9)), pose, "test"))
    second = export_run(run, small_cfg(), progress=False, previous=first)
    after = stamps(run)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {f"obj_002/{n}" for n in OBJECT_FILES} | {f"scene/{n}" for n in SCENE_FILES}
    assert second["objects"]["obj_002"].get("resumed") is None
    assert second["objects"]["obj_001"]["resumed"] and second["objects"]["obj_003"]["resumed"]
    assert second["scene"]["n_gaussians"] == 150 + 120 + 150


def test_changed_settings_or_missing_files_redo(tmp_path: Path):
    run = make_run(tmp_path, n=2)
    first = export_run(run, small_cfg(), progress=False)
    # Another GIF size: every turntable (and so every object) and the scene depend on it.
    second = export_run(run, small_cfg_frames(4), progress=False, previous=first)
    assert not any(o.get("resumed") for o in second["objects"].values()) and not second["scene"].get("resumed")
    with Image.open(run / "objects" / "obj_001" / "turntable.gif") as gif:
        assert gif.n_frames == 4
    # A deleted file is written again, the rest is kept.
    (run / "objects" / "obj_001" / "object.splat").unlink()
    third = export_run(run, small_cfg_frames(4), progress=False, previous=second)
    assert (run / "objects" / "obj_001" / "object.splat").is_file()
    assert third["objects"]["obj_001"].get("resumed") is None and third["objects"]["obj_002"]["resumed"]


def test_unreadable_object_does_not_block_resume(tmp_path: Path):
    run = make_run(tmp_path, n=2)
    bad = run / "objects" / "obj_003"
    bad.mkdir()
    (bad / "gaussians.pt").write_bytes(b"PK\x03\x04 truncated")
    first = export_run(run, small_cfg(), progress=False)
    assert first["objects"]["obj_003"]["unreadable"]
    before = stamps(run)
    second = export_run(run, small_cfg(), progress=False, previous=first)
    assert stamps(run) == before and second["scene"]["resumed"]
    assert second["objects"]["obj_003"]["error"] == first["objects"]["obj_003"]["error"]


@pytest.mark.parametrize("force", [False, True])
def test_rerun_of_a_finished_photo_renders_nothing(tmp_path: Path, force: bool):
    """Through the CLI: the second `run` of the same photo rewrites no export file (--force does)."""
    from pipeline.demo.scene import make_demo_scene

    scene = make_demo_scene(tmp_path / "demo")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline", "run", "--image", str(scene.image_path), "--out", str(out), "--profile", "lite",
            "--no-progress", "--gif-frames", "3", "--gif-size", "48", "--scene-gif-size", "64", "--inflate-gaussians", "800"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    before = stamps(out)
    report = (out / "report.html").stat().st_mtime_ns
    second = subprocess.run(args + (["--force"] if force else []), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr
    after = stamps(out)
    if force:
        assert all(after[k] != before[k] for k in before)
    else:
        assert after == before
        assert (out / "report.html").stat().st_mtime_ns == report
        export = json.loads((out / "run.json").read_text())["export"]
        assert export["scene"]["resumed"] and all(o["resumed"] for o in export["objects"].values())
