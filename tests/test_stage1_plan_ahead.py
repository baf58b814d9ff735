"""A plan made ahead (Stage1.plan_ahead, as the batch driver makes it while its workers start) is used
by Stage1.process in place of asking the VLM, only when its key matches the photo and the planner
settings; otherwise the photo is planned as usual. A real HTTP server on 127.0.0.1 counts the asks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from fake_openai_server import FakeOpenAIServer, Reply
from PIL import Image

from pipeline.stages import Configs, Stage1


def _stage1(url: str, **planner: object) -> Stage1:
    cfgs = Configs()
    cfgs.run.progress = False
    cfgs.planner.planner = "vlm"
    cfgs.planner.vlm_url = url
    cfgs.segmenter.segmenter = "classical"
    for k, v in planner.items():
        setattr(cfgs.planner, k, v)
    return Stage1(cfgs, log=lambda msg: None)


def test_plan_made_ahead_is_used_only_for_its_photo_and_settings(tmp_path: Path):
    from pipeline.demo.scene import make_demo_scene

    scene = make_demo_scene(tmp_path / "demo")
    flipped = tmp_path / "flipped.png"
    with Image.open(scene.image_path) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    with FakeOpenAIServer([Reply.fixture("good_scene_think_block")]) as server:
        ahead = _stage1(server.url).plan_ahead(scene.image_path)
        assert len(server.chat_requests) == 1 and ahead["record"]["items"]

        # The worker's own Stage1 (another object, the same settings, the URL from elsewhere): no ask.
        worker = _stage1(server.url)
        got = worker.process(scene.image_path, tmp_path / "run-same", ahead=copy.deepcopy(ahead))
        assert got["objects"] > 0 and len(server.chat_requests) == 1
        plan = json.loads((tmp_path / "run-same/stage1/plan.json").read_text())
        assert plan["request"]["planned_ahead"] is True and plan["items"] == ahead["record"]["items"]
        assert plan["reasoning"] == ahead["record"]["reasoning"] and plan["timing"] == ahead["record"]["timing"]

        # Another photo's plan: ignored, this photo is planned.
        worker.process(flipped, tmp_path / "run-other-photo", ahead=copy.deepcopy(ahead))
        assert len(server.chat_requests) == 2
        assert "planned_ahead" not in json.loads((tmp_path / "run-other-photo/stage1/plan.json").read_text())["request"]

        # Other planner settings (fewer objects): ignored too.
        _stage1(server.url, max_objects=2).process(scene.image_path, tmp_path / "run-other-settings", ahead=copy.deepcopy(ahead))
        assert len(server.chat_requests) == 3
        assert len(json.loads((tmp_path / "run-other-settings/stage1/plan.json").read_text())["items"]) <= 2
