"""Stage1 with several photos at once in one process (a batch worker's threads): the VLM requests
overlap, the one segmenter takes the photos one at a time, and each photo gets its own plan and masks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from fake_openai_server import FakeOpenAIServer, Reply
from PIL import Image

from pipeline.masks.classical import ClassicalSegmenter
from pipeline.stages import Configs, Stage1


class CountingSegmenter(ClassicalSegmenter):
    """The built-in segmenter, holding each call for a moment and counting calls that overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self._count = threading.Lock()

    def segment(self, image, plan):
        with self._count:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(0.3)
            return super().segment(image, plan)
        finally:
            with self._count:
                self.active -= 1


def test_concurrent_photos_plan_together_and_segment_one_at_a_time(tmp_path: Path):
    from pipeline.demo.scene import make_demo_scene

    scene = make_demo_scene(tmp_path / "demo")
    with Image.open(scene.image_path) as im:
        photos = [scene.image_path, *(tmp_path / f"p{i}.png" for i in range(3))]
        for i, p in enumerate(photos[1:]):
            (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else im).save(p)
    with FakeOpenAIServer([Reply.fixture("good_scene_think_block")], chat_delay=0.8) as server:
        cfgs = Configs()
        cfgs.run.progress = False
        cfgs.planner.planner = "vlm"
        cfgs.planner.vlm_url = server.url
        cfgs.segmenter.segmenter = "classical"
        stage1 = Stage1(cfgs, log=lambda msg: None)
        counting = CountingSegmenter()
        stage1._segmenter = counting
        results: dict[int, dict] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = stage1.process(photos[i], tmp_path / "runs" / f"r{i}")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(photos))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert server.max_in_flight == len(photos)  # every photo's VLM request was in flight at once
    assert counting.calls == len(photos) and counting.max_active == 1  # the segmenter: one photo at a time
    for i in range(len(photos)):
        run = tmp_path / "runs" / f"r{i}"
        masks = json.loads((run / "masks" / "masks.json").read_text())
        plan = json.loads((run / "stage1" / "plan.json").read_text())
        assert results[i]["objects"] == len(masks["objects"]) > 0
        assert plan["items"] and masks["meta"]["planner"] == "vlm"
        assert json.loads((run / "run.json").read_text())["inputs"]["image"]["path"] == str(photos[i])
