"""A plan the VLM made is kept in stage1/plan.json and used again, without asking the VLM and, in
scene mode, without starting a server, when the photo (its pixels) and the planner settings are
the same: a rerun with other segmenter settings, a retry after a crash. Otherwise the VLM is asked.
Real HTTP servers on 127.0.0.1 count the asks; the stand-in vLLM (tests/fake_vllm.py) counts its
starts, started by the pipeline as a real vLLM is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_fixture import make_photos, read_stats, run_batch, server_starts, stand_in_vllm
from fake_openai_server import FakeOpenAIServer, Reply
from fake_vllm import make_launchable
from PIL import Image

from pipeline.batch.photos import run_rel_for
from pipeline.core.errors import PipelineError
from pipeline.stages import Configs, Stage1


def _cfgs(**settings: object) -> Configs:
    cfgs = Configs()
    cfgs.run.progress = False
    cfgs.planner.planner = "vlm"
    cfgs.segmenter.segmenter = "classical"
    for name, value in settings.items():
        section, field = name.split("__")
        setattr(getattr(cfgs, section), field, value)
    return cfgs


def _plan(run: Path) -> dict:
    return json.loads((run / "stage1" / "plan.json").read_text())


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    from pipeline.demo.scene import make_demo_scene

    return make_demo_scene(tmp_path / "demo").image_path


def test_a_kept_plan_is_used_for_its_photo_and_settings_only(photo: Path, tmp_path: Path):
    run = tmp_path / "run"
    logs: list[str] = []
    with FakeOpenAIServer([Reply.fixture("good_scene_think_block")]) as server:
        def stage1(**settings: object) -> Stage1:
            return Stage1(_cfgs(planner__vlm_url=server.url, **settings), log=logs.append)

        stage1().process(photo, run)
        first = _plan(run)
        assert len(server.chat_requests) == 1 and first["items"] and first["box_prompts"] == 0
        assert first["reuse"]["pixels_sha256"] and first["reuse"]["image_stamp"]["size"] == photo.stat().st_size

        # Other segmenter settings: the masks are redone, the plan is kept (no ask).
        got = stage1(segmenter__dedup_iou=0.5).process(photo, run)
        assert not got["skipped"] and len(server.chat_requests) == 1
        kept = _plan(run)
        assert kept["request"]["kept"] is True and kept["items"] == first["items"] and kept["reasoning"] == first["reasoning"]
        assert any("kept the plan" in line for line in logs)

        # A --box prompt comes first; the kept plan's own items follow, without the box twice.
        stage1(segmenter__box=["10,10,60,60,corner"]).process(photo, run)
        boxed = _plan(run)
        assert len(server.chat_requests) == 1 and boxed["box_prompts"] == 1
        assert boxed["items"][0]["phrase"] == "corner" and boxed["items"][1:] == first["items"]
        stage1(segmenter__dedup_iou=0.6).process(photo, run)
        assert len(server.chat_requests) == 1 and _plan(run)["items"] == first["items"]

        # Other planner settings: asked again. So with --force, and for a photo changed in place.
        stage1(planner__max_objects=2, segmenter__dedup_iou=0.7).process(photo, run)
        assert len(server.chat_requests) == 2 and len(_plan(run)["items"]) <= 2
        stage1(planner__max_objects=2, run__force=True).process(photo, run)
        assert len(server.chat_requests) == 3 and "kept" not in _plan(run)["request"]
        with Image.open(photo) as im:
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo)
        stage1(planner__max_objects=2, segmenter__dedup_iou=0.8).process(photo, run)
        assert len(server.chat_requests) == 4


def test_a_plan_without_objects_is_not_kept(photo: Path, tmp_path: Path):
    """An answer with no usable object is recorded, never kept: the retry asks the VLM again."""
    with FakeOpenAIServer([Reply(content='{"objects": []}')]) as server:
        for attempt in (1, 2):
            with pytest.raises(PipelineError):
                Stage1(_cfgs(planner__vlm_url=server.url), log=lambda _m: None).process(photo, tmp_path / "run")
            assert len(server.chat_requests) == attempt
            assert _plan(tmp_path / "run").get("reuse") is None


def test_a_kept_plan_starts_no_server(photo: Path, tmp_path: Path, monkeypatch):
    """Scene mode with a vLLM the pipeline starts: the first run starts one, the rerun with other
    segmenter settings starts none. Query mode starts it again, for the verification."""
    exe, model = make_launchable(tmp_path)
    monkeypatch.setenv("FAKE_VLLM_STATS", str(tmp_path / "stats.jsonl"))
    replies = tmp_path / "replies.json"
    replies.write_text(json.dumps([json.loads(Path(__file__).with_name("fixtures").joinpath("vlm_responses/good_scene_think_block.json").read_text())["content"]]))
    monkeypatch.setenv("FAKE_VLLM_REPLY_FILE", str(replies))

    def stage1(**settings: object) -> Stage1:
        settings = {"server__vllm_command": str(exe), "server__vlm_model_id": str(model), "server__ready_timeout": 60.0, **settings}
        return Stage1(_cfgs(**settings), log=lambda _m: None)

    run = tmp_path / "run"

    def started() -> bool:
        return json.loads((run / "run.json").read_text())["backends"]["vlm_server_started"]

    stage1().process(photo, run)
    assert server_starts(read_stats(tmp_path / "stats.jsonl")) == 1 and started()
    stage1(segmenter__dedup_iou=0.5).process(photo, run)
    assert server_starts(read_stats(tmp_path / "stats.jsonl")) == 1 and _plan(run)["request"]["kept"] is True
    assert not started()  # run.json says so
    # Another served model under the same name: not the same planner, asked again.
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    stage1(server__vlm_model_id=str(other), segmenter__dedup_iou=0.6).process(photo, run)
    assert server_starts(read_stats(tmp_path / "stats.jsonl")) == 2 and "kept" not in _plan(run)["request"]


def test_a_batch_whose_plans_are_all_kept_starts_no_server(tmp_path: Path):
    images = tmp_path / "photos"
    make_photos(images, 3)
    flags, env = stand_in_vllm(tmp_path / "vllm")
    stats = tmp_path / "vllm" / "stats.jsonl"
    common = ["--stage", "1", "--planner", "vlm", "--segmenter", "classical", "--no-progress", *flags]
    first = run_batch(images, tmp_path / "out", *common, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    chats = sum(e["event"] == "chat" for e in read_stats(stats))
    assert server_starts(read_stats(stats)) == 1 and chats >= 3

    # Other segmenter settings: stage 1 is redone for every photo, with the kept plans: no server.
    again = run_batch(images, tmp_path / "out", *common, "--dedup-iou", "0.5", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert server_starts(read_stats(stats)) == 1 and sum(e["event"] == "chat" for e in read_stats(stats)) == chats
    assert "no vLLM server needed" in (tmp_path / "out" / "logs" / "pipeline.log").read_text()
    plans = [json.loads((tmp_path / "out" / run_rel_for(p.name) / "stage1" / "plan.json").read_text()) for p in sorted(images.iterdir())]
    assert all(p["request"].get("kept") is True for p in plans)

    # One photo replaced: that one needs the VLM, so the batch starts its server and asks for it alone.
    changed = sorted(images.iterdir())[0]
    with Image.open(changed) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)
    third = run_batch(images, tmp_path / "out", *common, "--dedup-iou", "0.6", env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    assert server_starts(read_stats(stats)) == 2
    assert sum(e["event"] == "chat" for e in read_stats(stats)) == chats + 1
    plans = {p.name: json.loads((tmp_path / "out" / run_rel_for(p.name) / "stage1" / "plan.json").read_text()) for p in images.iterdir()}
    assert [name for name, p in sorted(plans.items()) if not p["request"].get("kept")] == [changed.name]


def test_query_mode_keeps_the_plan_and_verifies_the_new_masks(photo: Path, tmp_path: Path):
    """Query mode: the kept plan is used, but the new masks are verified by the VLM (one ask each run)."""
    run = tmp_path / "run"
    replies = [Reply.fixture("query_two_mugs"), Reply.fixture("verify_json")]
    with FakeOpenAIServer(replies) as server:
        def stage1(**settings: object) -> Stage1:
            return Stage1(_cfgs(planner__vlm_url=server.url, planner__prompt="the two mugs", **settings), log=lambda _m: None)

        stage1().process(photo, run)
        assert len(server.chat_requests) == 2 and _plan(run)["verification"] is not None  # the plan, then the check
        first = _plan(run)
        stage1(segmenter__dedup_iou=0.5).process(photo, run)
        again = _plan(run)
        assert len(server.chat_requests) == 3  # the check only
        assert again["request"]["kept"] is True and again["items"] == first["items"] and again["verification"] is not None
