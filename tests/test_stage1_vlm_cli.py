"""Stage 1 through the CLI with a VLM: a real HTTP server on 127.0.0.1 (replaying Qwen3-VL-style
answers), the real openai client, the real launcher starting a stand-in `vllm serve` executable,
and the built-in box refinement turning the VLM's boxes into masks (a user with only a hosted
VLM endpoint and no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from fake_openai_server import FakeOpenAIServer, Reply
from fake_vllm import make_launchable
from PIL import Image

from pipeline.demo.scene import make_demo_scene


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scene")
    make_demo_scene(d)
    return d


def _boxes_on_qwen_grid(demo: Path) -> list[dict]:
    scene = json.loads((demo / "scene.json").read_text())
    out = []
    for i, gt in enumerate(sorted((demo / "gt").glob("*.png"))):
        m = np.asarray(Image.open(gt)) > 127
        ys, xs = np.nonzero(m)
        h, w = m.shape
        box = [round(xs.min() / w * 1000) - 5, round(ys.min() / h * 1000) - 5, round((xs.max() + 1) / w * 1000) + 5, round((ys.max() + 1) / h * 1000) + 5]
        name = scene["objects"][i]["name"] if "objects" in scene else f"object {i}"
        out.append({"phrase": f"{name}", "bbox_2d": box})
    return out


def _run(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _iou_with_gt(run: Path, demo: Path) -> list[float]:
    masks = json.loads((run / "masks/masks.json").read_text())["objects"]
    got = [np.asarray(Image.open(run / "masks" / m["mask"])) > 127 for m in masks]
    return [max(float((g & t).sum()) / float((g | t).sum()) for g in got) for t in (np.asarray(Image.open(p)) > 127 for p in sorted((demo / "gt").glob("*.png")))]


def test_launcher_starts_and_stops_vllm_and_boxes_become_masks(demo: Path, tmp_path: Path):
    think = "<think>The photo shows five simple objects on a plain floor.</think>"
    reply = think + json.dumps({"objects": _boxes_on_qwen_grid(demo)})
    (tmp_path / "replies.json").write_text(json.dumps([reply]))
    wrapper, model = make_launchable(tmp_path)
    run = tmp_path / "run"
    env = {"FAKE_VLLM_REPLY_FILE": str(tmp_path / "replies.json"), "FAKE_VLLM_PIDFILE": str(tmp_path / "pid"), "FAKE_VLLM_START_DELAY": "0.5"}
    proc = _run("stage1", "--image", demo / "image.png", "--out", run, "--planner", "vlm", "--segmenter", "classical",
                "--vllm-command", wrapper, "--vlm-model-id", model, "--ready-timeout", "60", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    ious = _iou_with_gt(run, demo)
    assert len(ious) == 5 and min(ious) >= 0.9, ious
    plan = json.loads((run / "stage1/plan.json").read_text())
    assert len(plan["items"]) == 5 and "five simple objects" in plan["reasoning"]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["backends"]["planner"] == "vlm" and manifest["backends"]["vlm_server_started"] is True
    assert manifest["config"]["planner"]["vlm_api_key"] in (None, "<redacted>")
    assert (run / "logs/vllm.log").is_file()
    server_pid = int((tmp_path / "pid").read_text().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)


def test_hosted_endpoint_garbage_answer_writes_no_masks(demo: Path, tmp_path: Path):
    run = tmp_path / "run"
    with FakeOpenAIServer([Reply(content="I cannot help with that.")]) as server:
        proc = _run("stage1", "--image", demo / "image.png", "--out", run, "--vlm-url", server.url, "--segmenter", "classical", "--no-progress")
    assert proc.returncode == 4, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert not (run / "masks").exists()
    assert "I cannot help" in (run / "stage1/plan.json").read_text()


def test_unreachable_vlm_is_one_clear_line(demo: Path, tmp_path: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _run("stage1", "--image", demo / "image.png", "--out", tmp_path / "run", "--vlm-url", f"http://127.0.0.1:{port}/v1", "--segmenter", "classical", "--no-progress")
    assert proc.returncode == 4
    assert not (tmp_path / "run" / "masks").exists()
    assert str(port) in proc.stderr


def test_query_mode_keeps_only_what_the_vlm_confirms(demo: Path, tmp_path: Path):
    boxes = _boxes_on_qwen_grid(demo)
    replies = [Reply(content=json.dumps({"objects": boxes[:3]})), Reply(content=json.dumps({"matches": [2]}))]
    run = tmp_path / "run"
    with FakeOpenAIServer(replies) as server:
        proc = _run("stage1", "--image", demo / "image.png", "--out", run, "--vlm-url", server.url, "--segmenter", "classical", "--prompt", "the second thing", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    masks = json.loads((run / "masks/masks.json").read_text())["objects"]
    assert len(masks) == 1 and masks[0]["label"] == boxes[1]["phrase"]
    plan = json.loads((run / "stage1/plan.json").read_text())
    assert plan["verification"]["kept"] == [1]


def test_vllm_dying_mid_run_is_named_and_leaves_no_masks(demo: Path, tmp_path: Path):
    wrapper, model = make_launchable(tmp_path)
    run = tmp_path / "run"
    proc = _run("stage1", "--image", demo / "image.png", "--out", run, "--planner", "vlm", "--segmenter", "classical",
                "--vllm-command", wrapper, "--vlm-model-id", model, "--ready-timeout", "60", "--no-progress",
                env={"FAKE_VLLM_DIE_ON_CHAT": "1", "FAKE_VLLM_PIDFILE": str(tmp_path / "pid")})
    assert proc.returncode == 4, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "vLLM exited during stage 1 (exit code 3)" in errors[0] and "illegal memory access" in errors[0]
    assert not (run / "masks").exists()


def test_query_mode_never_drops_the_users_own_boxes(demo: Path, tmp_path: Path):
    """The VLM rejects every candidate; the object asked for with --box stays."""
    boxes = _boxes_on_qwen_grid(demo)
    h, w = np.asarray(Image.open(demo / "image.png")).shape[:2]
    x0, y0, x1, y1 = boxes[4]["bbox_2d"]
    user_box = f"{x0 * w / 1000:.0f},{y0 * h / 1000:.0f},{x1 * w / 1000:.0f},{y1 * h / 1000:.0f},my thing"
    replies = [Reply(content=json.dumps({"objects": boxes[:2]})), Reply(content=json.dumps({"matches": []}))]
    run = tmp_path / "run"
    with FakeOpenAIServer(replies) as server:
        proc = _run("stage1", "--image", demo / "image.png", "--out", run, "--vlm-url", server.url, "--segmenter", "classical",
                    "--prompt", "nothing here", "--box", user_box, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    masks = json.loads((run / "masks/masks.json").read_text())["objects"]
    assert [m["label"] for m in masks] == ["my thing"]
    assert json.loads((run / "stage1/plan.json").read_text())["verification"]["candidates"] == 2
