"""`python -m pipeline batch` on the local engine with the built-in backends, through the CLI in real
subprocesses: run folders, batch.json, index.html, exit codes, and reruns that start nothing."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image

from pipeline.batch.photos import run_rel_for

FAST = ["--profile", "lite", "--no-progress", "--gif-frames", "3", "--gif-size", "48", "--scene-gif-size", "64", "--inflate-gaussians", "800"]


def batch(*args: object, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "batch", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def worker_starts(root: Path) -> int:
    """Worker children started under ROOT so far (each start appends an argv line to its log)."""
    logs = root / "logs"
    return sum(f.read_text().count(" starting ") for f in logs.glob("stage*-worker-*.log")) if logs.is_dir() else 0


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from pipeline.demo.scene import make_demo_scene

    base = tmp_path_factory.mktemp("batch")
    scene = make_demo_scene(base / "demo")
    folder = base / "photos"
    (folder / "sub dir").mkdir(parents=True)
    shutil.copy(scene.image_path, folder / "scène.png")
    with Image.open(scene.image_path) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "sub dir" / "scène.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


@pytest.fixture(scope="module")
def first_batch(photos: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("out") / "root"
    return root, batch("--images", photos, "--out", root, *FAST)


def test_batch_runs_every_photo_and_records_it(photos: Path, first_batch):
    root, proc = first_batch
    assert proc.returncode == 1, proc.stderr  # one photo failed, the rest are done
    data = json.loads((root / "batch.json").read_text())
    assert data["engine"] == "local" and data["stages"] == ["stage1", "stage2"]
    rows = {r["image"]: r for r in data["photos"]}
    assert set(rows) == {str(photos / "broken.jpg"), str(photos / "scène.png"), str(photos / "sub dir" / "scène.png")}
    for rel in ("scène.png", "sub dir/scène.png"):
        row = rows[str(photos / rel)]
        assert row["run_dir"] == run_rel_for(rel) and row["status"] == "done" and row["objects"] == 5 and row["error"] is None
        run = root / row["run_dir"]
        for f in ("run.json", "masks/masks.json", "scene/scene.ply", "report.html"):
            assert (run / f).is_file(), (rel, f)
        record = json.loads((run / "run.json").read_text())["batch"]
        assert record["stage1"]["status"] == record["stage2"]["status"] == "done"
    bad = rows[str(photos / "broken.jpg")]
    assert bad["status"] == "failed" and "broken.jpg" in bad["error"]
    assert "failed: " in proc.stderr and "broken.jpg" in proc.stderr
    index = (root / "index.html").read_text()
    assert index.count('<tr class="photo"') == 3 and "2 done" in index and "1 failed" in index
    assert worker_starts(root) == 2  # one stage 1 and one stage 2 worker for all photos
    assert not list(root.rglob(".tmp-*"))


def test_rerun_of_a_finished_batch_starts_nothing(photos: Path, first_batch):
    root, _ = first_batch
    before = json.loads((root / "batch.json").read_text())
    starts = worker_starts(root)
    (root / ".tmp-batch-killed.json").write_text("{")  # a driver killed while rewriting batch.json
    proc = batch("--images", photos, "--out", root, *FAST)
    assert not (root / ".tmp-batch-killed.json").exists()
    assert proc.returncode == 1  # the broken photo stays failed for the same inputs: not retried
    assert worker_starts(root) == starts
    after = json.loads((root / "batch.json").read_text())
    assert [(r["image"], r["status"], r["objects"]) for r in after["photos"]] == [(r["image"], r["status"], r["objects"]) for r in before["photos"]]
    assert "3 finished before, 0 to do from stage 1, 0 to do from stage 2" in proc.stderr


def test_changed_stage2_setting_redoes_stage2_only(photos: Path, first_batch, tmp_path: Path):
    root, _ = first_batch
    mirror = tmp_path / "root"  # a copy, so the other tests keep the original batch
    shutil.copytree(root, mirror)
    shutil.rmtree(mirror / "logs")
    args = [*FAST]
    args[args.index("--gif-frames") + 1] = "4"  # stage 2 depends on it, stage 1 does not
    proc = batch("--images", photos, "--out", mirror, *args)
    assert proc.returncode == 1, proc.stderr
    logs = sorted(p.name for p in (mirror / "logs").glob("stage*-worker-*.log"))
    assert logs == ["stage2-worker-0.log"]  # stage 1 was done for these settings: no stage 1 worker
    with Image.open(mirror / run_rel_for("scène.png") / "scene" / "scene.gif") as gif:
        assert gif.n_frames == 4


def test_stage1_then_stage2_from_batch_json(photos: Path, tmp_path: Path):
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(photos / "scène.png", folder / "only.png")
    root = tmp_path / "root"
    one = batch("--images", folder, "--out", root, "--stage", "1", *FAST)
    assert one.returncode == 0, one.stderr
    run = root / run_rel_for("only.png")
    assert (run / "masks" / "masks.json").is_file() and not (run / "objects").exists()
    assert json.loads((root / "batch.json").read_text())["photos"][0]["status"] == "done"
    two = batch("--out", root, "--stage", "2", *FAST)  # the photos come from batch.json
    assert two.returncode == 0, two.stderr
    assert (run / "scene" / "scene.ply").is_file()
    data = json.loads((root / "batch.json").read_text())
    assert data["stages"] == ["stage2"] and data["photos"][0]["status"] == "done" and data["photos"][0]["objects"] == 5


def test_bad_input_exits_2_and_writes_nothing(photos: Path, tmp_path: Path):
    both = batch("--images", photos, "--image", photos / "scène.png", "--out", tmp_path / "a", *FAST)
    assert both.returncode == 2 and "--image and --images are exclusive" in both.stderr
    (tmp_path / "empty").mkdir()
    empty = batch("--images", tmp_path / "empty", "--out", tmp_path / "b", *FAST)
    assert empty.returncode == 2 and "no photos found" in empty.stderr
    no_batch = batch("--out", tmp_path / "c", "--stage", "2", *FAST)
    assert no_batch.returncode == 2 and "batch.json" in no_batch.stderr
    no_images = batch("--out", tmp_path / "d", *FAST)
    assert no_images.returncode == 2 and "--images" in no_images.stderr
    one_gpu = batch("--images", photos, "--out", tmp_path / "e", "--device", "cuda:1", *FAST)
    assert one_gpu.returncode == 2 and "--worker-gpus" in one_gpu.stderr
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_a_second_driver_on_the_same_root_is_refused(photos: Path, tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    with open(root / ".batch.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.write("12345")
        fh.flush()
        proc = batch("--images", photos, "--out", root, *FAST)
    assert proc.returncode == 2 and "another batch is running" in proc.stderr
    assert sorted(os.listdir(root)) == [".batch.lock"]


def _script(name: str, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / name), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "SAM3DGS_PYTHON": sys.executable, **(env or {})})


def test_scripts_run_each_stage_in_its_own_env(photos: Path, tmp_path: Path):
    """conda mode: the driver and stage 1 workers run with the sam3 env's python, stage 2 workers with
    the sam3d-objects env's (here wrappers of this interpreter that log how they were called)."""
    calls = tmp_path / "calls.log"
    listing = []
    for env_name in ("sam3", "sam3d-objects"):
        prefix = tmp_path / "envs" / env_name
        (prefix / "bin").mkdir(parents=True)
        wrapper = prefix / "bin" / "python"
        wrapper.write_text(f'#!/bin/sh\necho "{env_name} $*" >> "{calls}"\nexec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
        listing.append(f"echo '{env_name}  {prefix}'")
    conda = tmp_path / "conda"
    conda.write_text("#!/bin/sh\necho '# conda environments:'\n" + "\n".join(listing) + "\n")
    conda.chmod(0o755)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "scène.png", folder / "one.png")
    root = tmp_path / "root"
    env = {"CONDA_EXE": str(conda)}
    both = _script("run_pipeline.sh", "--images", folder, "--image", folder / "one.png", "--out", root, env=env)
    assert both.returncode == 2 and "--image and --images are exclusive" in both.stderr
    one = _script("run_agent_with_vllm.sh", "--env-manager", "conda", "--images", folder, "--out", root, *FAST, env=env)
    assert one.returncode == 0, one.stderr
    two = _script("run_sam3d_from_masks.sh", "--env-manager", "conda", "--out", root, *FAST, env=env)  # root has batch.json
    assert two.returncode == 0, two.stderr
    lines = calls.read_text().splitlines()
    assert any(ln.startswith("sam3 -m pipeline batch") and "--stage 1" in ln for ln in lines)
    assert any(ln.startswith("sam3 -m pipeline worker --stage stage1") for ln in lines)
    assert any(ln.startswith("sam3d-objects -m pipeline worker --stage stage2") for ln in lines)
    assert not any("worker --stage stage2" in ln and not ln.startswith("sam3d-objects") for ln in lines)
    assert json.loads((root / "batch.json").read_text())["photos"][0]["status"] == "done"
    assert (root / run_rel_for("one.png") / "scene" / "scene.ply").is_file()


@pytest.mark.parametrize("gpus", ["0", ""])
def test_profile_auto_plans_with_vllm_only_where_gpus_are(photos: Path, tmp_path: Path, gpus: str):
    """--profile auto decides the planner once, in the driver, from `vllm` on PATH and the GPUs the
    engine sees (CUDA_VISIBLE_DEVICES / nvidia-smi, not torch); every worker gets that decision."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_vllm import make_launchable

    exe, model = make_launchable(tmp_path)
    replies = tmp_path / "replies.json"
    replies.write_text(json.dumps([json.loads((ROOT / "tests/fixtures/vlm_responses/good_scene_think_block.json").read_text())["content"]]))
    stats = tmp_path / "stats.jsonl"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "scène.png", folder / "one.png")
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": gpus, "FAKE_VLLM_STATS": str(stats), "FAKE_VLLM_REPLY_FILE": str(replies)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "batch", "--images", str(folder), "--out", str(root), "--stage", "1", "--profile", "auto",
                           "--vllm-command", str(exe), "--vlm-model-id", str(model), "--segmenter", "classical", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    starts = [json.loads(line) for line in stats.read_text().splitlines()] if stats.exists() else []
    plan = json.loads((root / run_rel_for("one.png") / "stage1" / "plan.json").read_text())
    if gpus:
        assert sum(e["event"] == "start" for e in starts) == 1 and plan["planner"] != "none"
    else:
        assert starts == [] and plan["planner"] == "none"


def test_batch_vllm_is_started_and_used_like_stage1s(photos: Path, tmp_path: Path):
    """The batch's one vLLM gets the settings Stage1 would give its own (query-mode GPU share, since
    SAM3 runs beside it; the image size cap), and the workers talk to it as to a vLLM we started:
    without a reasoning parser they ask for no JSON grammar."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_vllm import make_launchable

    exe, model = make_launchable(tmp_path)
    replies = tmp_path / "replies.json"
    replies.write_text(json.dumps([json.loads((ROOT / "tests/fixtures/vlm_responses/good_scene_think_block.json").read_text())["content"]]))
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "scène.png", folder / "one.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_VLLM_REPLY_FILE": str(replies)}
    for parser, structured in (("qwen3", True), ("", False)):
        root = tmp_path / f"root-{parser or 'none'}"
        proc = subprocess.run([sys.executable, "-m", "pipeline", "batch", "--images", str(folder), "--out", str(root), "--stage", "1",
                               "--planner", "vlm", "--segmenter", "classical", "--vllm-command", str(exe), "--vlm-model-id", str(model),
                               "--reasoning-parser", parser, "--vlm-max-image-side", "640", "--no-progress"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        request = json.loads((root / run_rel_for("one.png") / "stage1" / "plan.json").read_text())["request"]
        assert request["structured_output"] is structured
        assert request["vllm_fields"]  # vLLM-only sampling fields: the workers know it is our vLLM
        argv = (root / "logs" / "vllm.log").read_text().splitlines()[0]
        assert '"max_pixels": 409600' in argv  # 640 x 640, from --vlm-max-image-side
