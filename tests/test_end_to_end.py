"""The whole pipeline through its CLI on the demo scene, in real subprocesses, on CPU.

Covers: the demo end to end, run.json contents, resume (skip done objects, --force redoes),
recovery after a killed run, stage 2 on the three mask layouts, and bad inputs (one line,
non-zero exit, nothing half-written).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

OBJECT_FILES = ("gaussians.pt", "object.ply", "object.splat", "turntable.gif", "status.json")
FAST = ["--no-progress", "--gif-frames", "6", "--gif-size", "96", "--inflate-gaussians", "2000"]


def pipeline_cmd(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = pipeline_cmd("demo", "--out", out, *FAST)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def test_demo_writes_every_file(demo_run: Path):
    for rel in ("run.json", "input/image.png", "stage1/plan.json", "masks/masks.json", "masks/overlay.png", "scene/scene.ply", "scene/scene.splat", "scene/scene.gif", "report.html"):
        assert (demo_run / rel).is_file(), rel
    masks = json.loads((demo_run / "masks/masks.json").read_text())["objects"]
    assert len(masks) == 5
    for m in masks:
        assert m["id"].startswith("obj_") and (demo_run / "masks" / m["mask"]).is_file()
        for name in OBJECT_FILES:
            assert (demo_run / "objects" / m["id"] / name).is_file(), (m["id"], name)
    assert not list(demo_run.rglob(".tmp-*")), "temporary files left behind"


def test_manifest_records_inputs_backends_versions_timings(demo_run: Path):
    manifest = json.loads((demo_run / "run.json").read_text())
    image = manifest["inputs"]["image"]
    assert len(image["sha256"]) == 64
    assert manifest["backends"]["segmenter"] == "classical" and manifest["backends"]["lifter"] == "inflate"
    assert manifest["backends"]["reasons"]["lifter"]
    assert manifest["config"]["run"]["profile"] == "lite"
    assert "numpy" in manifest["versions"] and "python" in manifest["versions"]
    for key in ("stage1.segment", "stage2.lift", "export"):
        assert manifest["timings"][key] >= 0
    assert {o["status"] for o in manifest["objects"].values()} == {"done"}
    assert all(o["n_gaussians"] > 0 for o in manifest["objects"].values())


def test_gaussians_pt_is_plain_tensors(demo_run: Path):
    import torch

    data = torch.load(demo_run / "objects/obj_001/gaussians.pt", weights_only=True)
    n = data["xyz"].shape[0]
    assert data["features_dc"].shape == (n, 3) and data["opacity"].shape == (n, 1)
    assert data["scale"].shape == (n, 3) and data["rotation"].shape == (n, 4)
    assert set(data["pose"]) == {"rotation", "translation", "scale"}
    assert float(data["pose"]["translation"][2]) > 0, "objects sit in front of the camera (+Z forward)"


def test_rerun_skips_done_objects_and_force_redoes_them(demo_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    pt = run / "objects/obj_002/gaussians.pt"
    before = pt.stat().st_mtime_ns
    proc = pipeline_cmd("run", "--image", run / "input/image.png", "--out", run, "--profile", "lite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "already done" in proc.stderr
    assert pt.stat().st_mtime_ns == before
    proc = pipeline_cmd("stage2", "--out", run, "--profile", "lite", "--force", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert pt.stat().st_mtime_ns != before


def test_stage2_without_image_reuses_the_run_photo_and_its_done_objects(demo_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    before = json.loads((run / "run.json").read_text())["inputs"]["image"]
    proc = pipeline_cmd("stage2", "--out", run, "--profile", "lite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "5 objects already done" in proc.stderr
    assert json.loads((run / "run.json").read_text())["inputs"]["image"] == before


def test_objects_no_longer_in_masks_are_removed(demo_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    flat = tmp_path / "three"
    _write_flat_layout(demo_run, flat)
    for extra in ("3.png", "4.png"):
        (flat / extra).unlink()
    proc = pipeline_cmd("stage2", "--image", run / "input/image.png", "--masks", flat, "--out", run, "--profile", "lite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run / "objects").iterdir()) == ["obj_001", "obj_002", "obj_003"]
    assert set(json.loads((run / "run.json").read_text())["objects"]) == {"obj_001", "obj_002", "obj_003"}
    assert json.loads((run / "run.json").read_text())["export"]["scene"]["n_objects"] == 3


def test_killed_run_continues_where_it_stopped(demo_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    shutil.rmtree(run / "objects")
    shutil.rmtree(run / "scene")
    # A real kill: stop stage 2 as soon as the first object is finished.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "stage2", "--out", str(run), "--profile", "lite", *FAST, "--inflate-gaussians", "20000"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "objects").glob("*/status.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_first = sorted(p.parent.name for p in (run / "objects").glob("*/status.json"))
    assert done_first, "stage 2 never finished an object"
    # Every file that exists is complete: gaussians.pt loads wherever a status says done.
    import torch

    for oid in done_first:
        torch.load(run / "objects" / oid / "gaussians.pt", weights_only=True)
    # A half-written leftover from the kill must not confuse the next run.
    (run / "objects" / done_first[0] / ".tmp-gaussians-x.pt").write_bytes(b"half")
    again = pipeline_cmd("stage2", "--out", run, "--profile", "lite", *FAST, "--inflate-gaussians", "20000")
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stderr
    assert not list(run.rglob(".tmp-*"))
    assert len(list((run / "objects").glob("*/gaussians.pt"))) == 5


def _write_flat_layout(run: Path, dest: Path) -> None:
    """SAM 3D Objects' example layout: image.png beside 0.png, 1.png, ... (mask in the alpha channel)."""
    dest.mkdir()
    image = np.asarray(Image.open(run / "input/image.png"))
    Image.fromarray(image).save(dest / "image.png")
    for i, m in enumerate(json.loads((run / "masks/masks.json").read_text())["objects"]):
        mask = np.asarray(Image.open(run / "masks" / m["mask"]))
        Image.fromarray(np.dstack([image, mask])).save(dest / f"{i}.png")


def _write_reference_layout(run: Path, dest: Path) -> None:
    """The reference system's layout: masks/obj_i/<json name>/mask_k.png."""
    for i, m in enumerate(json.loads((run / "masks/masks.json").read_text())["objects"]):
        folder = dest / f"obj_{i}" / f"{m['label'].replace(' ', '_')}_result"
        folder.mkdir(parents=True)
        shutil.copy(run / "masks" / m["mask"], folder / "mask_0.png")


@pytest.mark.parametrize("layout", ["flat", "reference", "run"])
def test_stage2_on_existing_masks(demo_run: Path, tmp_path: Path, layout: str):
    masks = tmp_path / "masks_in"
    if layout == "flat":
        _write_flat_layout(demo_run, masks)
    elif layout == "reference":
        _write_reference_layout(demo_run, masks)
    else:
        masks = demo_run
    out = tmp_path / "out"
    proc = pipeline_cmd("stage2", "--image", demo_run / "input/image.png", "--masks", masks, "--out", out, "--profile", "lite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((out / "masks/masks.json").read_text())["objects"]) == 5
    assert len(list((out / "objects").glob("*/object.ply"))) == 5
    assert (out / "scene/scene.ply").is_file()
    if layout != "run":  # where foreign masks came from stays on record
        assert json.loads((out / "run.json").read_text())["inputs"]["masks"]["layout"] == layout


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_photo_is_one_line_and_writes_nothing(tmp_path: Path):
    out = tmp_path / "run"
    proc = pipeline_cmd("run", "--image", tmp_path / "nope.jpg", "--out", out, "--profile", "lite")
    assert proc.returncode == 2
    assert "nope.jpg" in _one_line_error(proc)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated", "not_an_image", "empty"])
def test_bad_photo_is_rejected_before_anything_is_written(demo_run: Path, tmp_path: Path, kind: str):
    bad = tmp_path / "bad.png"
    data = (demo_run / "input/image.png").read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "not_an_image": b"hello, I am text\n" * 10, "empty": b""}[kind])
    out = tmp_path / "run"
    proc = pipeline_cmd("run", "--image", bad, "--out", out, "--profile", "lite")
    assert proc.returncode == 2, proc.stderr
    _one_line_error(proc)
    assert not out.exists()


def test_masks_of_the_wrong_size_are_rejected(demo_run: Path, tmp_path: Path):
    masks = tmp_path / "masks_in"
    masks.mkdir()
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(masks / "0.png")
    out = tmp_path / "run"
    proc = pipeline_cmd("stage2", "--image", demo_run / "input/image.png", "--masks", masks, "--out", out, "--profile", "lite")
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "0.png" in line and "12x10" in line.replace(" ", "")
    assert not (out / "objects").exists() and not (out / "masks").exists()


def test_no_masks_found_is_an_error(demo_run: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = pipeline_cmd("stage2", "--image", demo_run / "input/image.png", "--masks", empty, "--out", tmp_path / "run", "--profile", "lite")
    assert proc.returncode == 2
    assert "mask" in _one_line_error(proc).lower()


def test_export_alone_rebuilds_files_from_gaussians_pt(demo_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    for p in list(run.glob("objects/*/object.ply")) + [run / "scene/scene.ply"]:
        p.unlink()
    proc = pipeline_cmd("export", run, "--no-turntable")
    assert proc.returncode == 0, proc.stderr
    assert len(list(run.glob("objects/*/object.ply"))) == 5 and (run / "scene/scene.ply").is_file()


def test_very_large_photo_runs_within_memory(tmp_path: Path):
    """A 6000x4500 photo end to end on the built-in backends: masks at full size, bounded memory."""
    import resource

    h, w = 4500, 6000
    img = np.full((h, w, 3), 235, np.uint8)
    yy, xx = np.ogrid[0:h, 0:w]
    img[((xx - 1500) ** 2 + (yy - 2200) ** 2) < 900**2] = (200, 30, 30)
    img[1500:3200, 3500:5200] = (30, 60, 200)
    Image.fromarray(img).save(tmp_path / "big.jpg", quality=90)
    del img, yy, xx
    out = tmp_path / "run"
    proc = pipeline_cmd("run", "--image", tmp_path / "big.jpg", "--out", out, "--profile", "lite", *FAST)
    assert proc.returncode == 0, proc.stderr
    masks = json.loads((out / "masks/masks.json").read_text())
    assert masks["image"]["width"] == w and len(masks["objects"]) == 2
    assert Image.open(out / "masks/obj_001.png").size == (w, h)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    assert peak_gib < 2.0, f"peak memory {peak_gib:.2f} GiB"


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(demo_run: Path, tmp_path: Path):
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    proc = pipeline_cmd("run", "--image", demo_run / "input/image.png", "--out", a_file, "--profile", "lite")
    assert proc.returncode == 2 and "is a file" in _one_line_error(proc)
    foreign = tmp_path / "project"
    (foreign / "src").mkdir(parents=True)
    (foreign / "src" / ".tmp-notes.txt").write_text("user data")
    proc = pipeline_cmd("run", "--image", demo_run / "input/image.png", "--out", foreign, "--profile", "lite")
    assert proc.returncode == 2 and "no run.json" in _one_line_error(proc)
    assert sorted(p.name for p in foreign.iterdir()) == ["src"] and (foreign / "src" / ".tmp-notes.txt").exists()


def test_bad_box_is_rejected_before_the_run_folder_exists(demo_run: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = pipeline_cmd("stage1", "--image", demo_run / "input/image.png", "--out", out, "--profile", "lite", "--box", "1,2,3")
    assert proc.returncode == 2 and "--box" in _one_line_error(proc)
    assert not out.exists()


def test_only_the_projects_own_temporaries_are_cleaned(demo_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "notes").mkdir()
    (run / "notes" / ".tmp-keep.txt").write_text("user data")
    (run / "objects" / "obj_001" / ".tmp-gaussians-x.pt").write_bytes(b"half")
    proc = pipeline_cmd("stage2", "--out", run, "--profile", "lite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert (run / "notes" / ".tmp-keep.txt").exists()
    assert not (run / "objects" / "obj_001" / ".tmp-gaussians-x.pt").exists()


def test_outputs_are_readable_like_any_file_the_user_writes(demo_run: Path):
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for rel in ("report.html", "run.json", "objects/obj_001/gaussians.pt", "scene/scene.ply", "masks/obj_001.png"):
        assert stat.S_IMODE((demo_run / rel).stat().st_mode) == 0o666 & ~umask, rel
    assert stat.S_IMODE((demo_run / "masks").stat().st_mode) == 0o777 & ~umask


def test_stage1_again_with_fewer_masks_drops_the_old_objects(demo_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    first = json.loads((run / "masks/masks.json").read_text())["objects"][0]
    x0, y0, x1, y1 = first["box_xyxy"]
    box = f"{max(0, x0 - 8):.0f},{max(0, y0 - 8):.0f},{x1 + 8:.0f},{y1 + 8:.0f},thing"
    proc = pipeline_cmd("stage1", "--image", run / "input/image.png", "--out", run, "--profile", "lite", "--box", box)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (run / "objects").iterdir()] == ["obj_001"]
    assert list(json.loads((run / "run.json").read_text())["objects"]) == ["obj_001"]


def test_ctrl_c_exits_130_and_the_next_run_continues(demo_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    shutil.rmtree(run / "objects")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "stage2", "--out", str(run), "--profile", "lite", *FAST, "--inflate-gaussians", "20000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "objects").glob("*/status.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    again = pipeline_cmd("stage2", "--out", run, "--profile", "lite", *FAST, "--inflate-gaussians", "20000")
    assert again.returncode == 0, again.stderr
    assert not list(run.rglob(".tmp-*"))


def test_report_needs_a_run_folder(tmp_path: Path):
    proc = pipeline_cmd("report", tmp_path)
    assert proc.returncode == 2 and "run.json" in _one_line_error(proc)
    assert not (tmp_path / "report.html").exists()
