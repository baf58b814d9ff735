"""The VLM planner through the real `openai` client against a real HTTP server on 127.0.0.1.

Covers the VLM side of issue 3's faults: unreachable, timeout, HTTP 4xx/5xx, non-JSON, an empty
list, hundreds of phrases, phrases with paths or instructions, a dropped connection.
"""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer, Reply
from PIL import Image

from pipeline.core.atomic import write_json_atomic
from pipeline.core.config import PlannerConfig
from pipeline.core.errors import BackendError, InputError
from pipeline.core.types import ObjectMask
from pipeline.plan.server import pick_free_port
from pipeline.plan.vlm import (
    EmptyPlanError,
    VLMAnswerError,
    VLMPlanner,
    draw_numbered_candidates,
    normalize_base_url,
    parse_verify_answer,
    plan_from_record,
    plan_record,
)

KEY = "test-key-123"
FAST = (0.01, 0.01)  # retry delays


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (600, 1600, 3), dtype=np.uint8)  # (H, W, 3), wider than vlm_max_image_side


def planner(server: FakeOpenAIServer, **cfg: object) -> VLMPlanner:
    fields = {"vlm_url": server.url, "vlm_api_key": KEY, "vlm_timeout": 5.0}
    fields.update(cfg)
    return VLMPlanner(PlannerConfig(**fields), retry_delays=FAST)  # type: ignore[arg-type]


def sent_image(recorded_body: dict) -> Image.Image:
    parts = recorded_body["messages"][0]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    assert url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_scene_plan_with_reasoning_field(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply.fixture("good_scene_reasoning_field")], api_key=KEY) as server:
        p = planner(server, vlm_max_image_side=800)
        plan = p.plan(photo)
        request = server.chat_requests[0]
    assert plan.mode == "scene" and plan.query is None and plan.model == "qwen3-vl-8b-thinking"
    assert [i.phrase for i in plan.items][:3] == ["white ceramic mug", "silver laptop", "potted plant"]
    assert plan.items[0].box_xyxy == pytest.approx((95 * 1.6, 420 * 0.6, 210 * 1.6, 610 * 0.6))  # original pixels
    assert plan.reasoning.startswith("Got it") and plan.raw_response.startswith('{"objects"')
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "qwen3-vl-8b-thinking" and body["max_completion_tokens"] == 16384 and "max_tokens" not in body
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["objects"]
    assert sent_image(body).size == (800, 300)  # downscaled inline, no file path anywhere
    assert "file:" not in json.dumps(body)
    meta = p.last_request
    assert meta["structured_output"] is True and meta["image_sent"] == [800, 300] and meta["answer_format"] == "json"
    assert "api_key" not in meta and KEY not in json.dumps(meta)


@pytest.mark.parametrize("name", ["good_scene_reasoning_new_field", "good_scene_think_inline", "good_scene_think_block"])
def test_reasoning_found_in_any_place(photo: np.ndarray, name: str) -> None:
    with FakeOpenAIServer([Reply.fixture(name)], api_key=KEY) as server:
        plan = planner(server).plan(photo)
    assert len(plan.items) == 9
    assert plan.reasoning.startswith("Got it") and "</think>" not in plan.reasoning


def test_query_mode_keeps_separate_instances(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply.fixture("query_two_mugs")], api_key=KEY) as server:
        p = planner(server, prompt="the two mugs left of the laptop")
        plan = p.plan(photo)
        text = server.chat_requests[0].body["messages"][0]["content"][1]["text"]
    assert plan.mode == "query" and plan.query == "the two mugs left of the laptop"
    assert [i.phrase for i in plan.items] == ["mug", "mug"] and plan.items[0].box_xyxy != plan.items[1].box_xyxy
    assert '"the two mugs left of the laptop"' in text and "List only the objects" in text


def test_structured_output_rejected_falls_back_per_request(photo: np.ndarray) -> None:
    replies = [Reply.fixture("messy_prose_fenced", reject_json_schema=True)]
    with FakeOpenAIServer(replies, api_key=KEY) as server:
        p = planner(server)
        plan = p.plan(photo)
        plan2 = p.plan(photo)
        bodies = [r.body for r in server.chat_requests]
    assert [i.phrase for i in plan.items] == ["red armchair", "floor lamp", "side table", "teapot"]
    assert any("rejected structured output (HTTP 400: Unsupported response_format" in w for w in plan.warnings)
    assert "response_format" in bodies[0] and "response_format" not in bodies[1]
    # Decided per request: the next one asks for the schema again (the first rejection is no verdict on the server).
    assert "response_format" in bodies[2] and "response_format" not in bodies[3]
    assert len(bodies) == 4 and plan2.warnings == plan.warnings and p.last_request["structured_output"] is False


def test_unreachable_server(photo: np.ndarray) -> None:
    port = pick_free_port()
    p = VLMPlanner(PlannerConfig(vlm_url=f"http://127.0.0.1:{port}/v1"), retry_delays=FAST)
    with pytest.raises(BackendError) as info:
        p.plan(photo)
    message = str(info.value)
    assert f"Cannot reach the VLM server at http://127.0.0.1:{port}/v1 after 3 tries (connection refused)" in message
    assert "serve-vlm" in message and "--vlm-url" in message


def test_timeout_is_not_retried(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(content="{}", delay=1.5)], api_key=KEY) as server:
        p = planner(server, vlm_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(BackendError) as info:
            p.plan(photo)
        elapsed = time.monotonic() - started
        count = len(server.chat_requests)
    assert "did not answer within 0.3 s" in str(info.value) and "--vlm-timeout" in str(info.value)
    assert count == 1 and elapsed < 1.4


def test_bad_api_key(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply.fixture("good_scene_reasoning_field")], api_key=KEY) as server:
        with pytest.raises(BackendError) as info:
            planner(server, vlm_api_key="wrong").plan(photo)
        count = len(server.chat_requests)
    assert "refused the API key (HTTP 401: Unauthorized)" in str(info.value)
    assert "--vlm-api-key" in str(info.value) and "wrong" not in str(info.value)
    assert count == 1  # a 4xx is not retried


def test_api_key_from_environment(photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM3DGS_VLM_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "not-this-one")
    with FakeOpenAIServer([Reply.fixture("good_scene_reasoning_field")], api_key=KEY) as server:
        plan = VLMPlanner(PlannerConfig(vlm_url=server.url), retry_delays=FAST).plan(photo)
    assert len(plan.items) == 9


def test_unknown_model_lists_served_ones(photo: np.ndarray) -> None:
    with FakeOpenAIServer([], api_key=KEY, model="served-name") as server:
        with pytest.raises(BackendError) as info:
            planner(server, vlm_model="qwen3-vl-8b-thinking").plan(photo)
    assert "no model 'qwen3-vl-8b-thinking'" in str(info.value) and "it serves: served-name" in str(info.value)
    assert "--vlm-model" in str(info.value)


def test_5xx_retried_then_succeeds(photo: np.ndarray) -> None:
    replies = [Reply(status=503, error_message="engine busy"), Reply.fixture("messy_python_list")]
    with FakeOpenAIServer(replies, api_key=KEY) as server:
        p = planner(server)
        plan = p.plan(photo)
    assert [i.phrase for i in plan.items] == ["bicycle", "helmet", "backpack", "water bottle"]
    assert p.last_request["attempts"] == 2


def test_5xx_gives_up_after_bounded_retries(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(status=500, error_message="CUDA error: an illegal memory access")], api_key=KEY) as server:
        with pytest.raises(BackendError) as info:
            planner(server).plan(photo)
        count = len(server.chat_requests)
    assert count == 3
    assert "failed with HTTP 500 after 3 tries (CUDA error: an illegal memory access)" in str(info.value)


def test_other_4xx_names_the_server_message(photo: np.ndarray) -> None:
    message = "This model's maximum context length is 16384 tokens. However, you requested 20000 tokens."
    with FakeOpenAIServer([Reply(status=400, error_message=message)], api_key=KEY) as server:
        with pytest.raises(BackendError) as info:
            planner(server).plan(photo)
        count = len(server.chat_requests)
    assert count == 1  # the message does not name response_format/json_schema: no plain-text retry
    assert "rejected the request (HTTP 400: This model's maximum context length is 16384" in str(info.value)


def test_dropped_connection_retried_then_fatal(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(drop_connection=True), Reply.fixture("messy_bullets")], api_key=KEY) as server:
        plan = planner(server).plan(photo)
    assert [i.phrase for i in plan.items] == ["Guitar", "Amplifier", "Microphone stand", "stool"]
    with FakeOpenAIServer([Reply(drop_connection=True)], api_key=KEY) as server:
        with pytest.raises(BackendError) as info:
            planner(server).plan(photo)
        count = len(server.chat_requests)
    assert count == 3 and "Cannot reach the VLM server" in str(info.value)


def test_non_json_http_body(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(raw_body=b"<html><body>502 Bad Gateway</body></html>")], api_key=KEY) as server:
        with pytest.raises(BackendError) as info:
            planner(server).plan(photo)
    assert "not an OpenAI chat completion" in str(info.value) and "/v1" in str(info.value)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assis',  # cut off
        b'{"id": "x", "object": "chat.completion", "model": "m", "created": 0, "choices": {"0": 1}}',  # choices not a list
        b'{"id": "x", "object": "chat.completion", "model": "m", "created": 0, "choices": [{"index": 0, "finish_reason": "stop", '
        b'"message": {"role": "assistant", "content": 42}}]}',  # content not text
    ],
)
def test_malformed_json_completion_is_one_clear_error(photo: np.ndarray, body: bytes) -> None:
    """A 200 answer with a JSON content type that is not a usable completion: BackendError, not a traceback."""
    with FakeOpenAIServer([Reply(raw_body=body, status=200, raw_content_type="application/json")], api_key=KEY) as server:
        with pytest.raises(BackendError) as info:
            planner(server).plan(photo)
    assert "not an OpenAI chat completion" in str(info.value)


def test_unreadable_answer_raises_with_the_plan(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply.fixture("broken_garbage")], api_key=KEY) as server:
        with pytest.raises(VLMAnswerError) as info:
            planner(server).plan(photo)
    assert not isinstance(info.value, EmptyPlanError)
    assert "no object list could be read" in str(info.value)
    assert info.value.plan is not None and info.value.plan.raw_response.startswith("I'm sorry")


def test_empty_list_raises_empty_plan_error(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply.fixture("broken_empty_list")], api_key=KEY) as server:
        with pytest.raises(EmptyPlanError) as info:
            planner(server).plan(photo)
        assert "returned no usable objects" in str(info.value) and "--planner none" in str(info.value)
        assert isinstance(info.value, BackendError) and info.value.plan.reasoning.startswith("The image")
        with pytest.raises(EmptyPlanError) as info:
            planner(server).plan(photo, query="a purple giraffe")
    assert "found nothing matching 'a purple giraffe'" in str(info.value) and "--prompt" in str(info.value)


def test_hundreds_of_phrases_capped(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply.fixture("broken_300_phrases")], api_key=KEY) as server:
        plan = planner(server, max_objects=12).plan(photo)
    assert len(plan.items) == 12
    assert any("kept the first 12" in w for w in plan.warnings)
    assert any("finish_reason=length" in w for w in plan.warnings)


def test_paths_and_instructions_sanitized(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply.fixture("broken_injection")], api_key=KEY) as server:
        plan = planner(server).plan(photo)
    assert [i.phrase for i in plan.items] == ["laptop", "sticky note", "coffee mug"]
    assert sum("dropped a phrase" in w for w in plan.warnings) == 4


def test_all_phrases_sanitized_away_is_an_empty_plan(photo: np.ndarray) -> None:
    content = json.dumps({"objects": [{"phrase": "../../etc/passwd", "bbox_2d": [0, 0, 10, 10]}]})
    with FakeOpenAIServer([Reply(content=content)], api_key=KEY) as server:
        with pytest.raises(EmptyPlanError) as info:
            planner(server).plan(photo)
    assert "1 entries were dropped" in str(info.value)
    assert any("path characters" in w for w in info.value.plan.warnings)


def test_url_normalized_and_bad_input() -> None:
    assert normalize_base_url("127.0.0.1:8001") == "http://127.0.0.1:8001/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_base_url("https://api.example.com/openai/v1") == "https://api.example.com/openai/v1"
    with pytest.raises(InputError):
        VLMPlanner(PlannerConfig(vlm_url=None))
    p = VLMPlanner(PlannerConfig(vlm_url="http://127.0.0.1:9/v1"))
    with pytest.raises(InputError):
        p.plan(np.zeros((10, 10), np.uint8))


def _candidates() -> list[ObjectMask]:
    masks = []
    for i in range(4):
        m = np.zeros((600, 1600), bool)
        m[100:300, 100 + 350 * i : 350 + 350 * i] = True
        masks.append(ObjectMask(mask=m, label=f"mug {i}"))
    return masks


@pytest.mark.parametrize("name, kept", [("verify_json", [0, 2]), ("verify_prose", [0, 3]), ("verify_none", [])])
def test_verify_returns_indices(photo: np.ndarray, name: str, kept: list[int]) -> None:
    with FakeOpenAIServer([Reply.fixture(name)], api_key=KEY) as server:
        p = planner(server, vlm_max_image_side=800)
        assert p.verify(photo, _candidates(), "the mugs left of the laptop") == kept
        body = server.chat_requests[0].body
    assert "from 1 to 4" in body["messages"][0]["content"][1]["text"]
    assert body["response_format"]["json_schema"]["schema"]["properties"]["matches"]["items"]["maximum"] == 4
    overlay = np.asarray(sent_image(body).convert("RGB"))
    assert overlay.shape == (300, 800, 3)
    assert p.last_verification is not None and p.last_verification["kept"] == kept


def test_verify_unreadable_keeps_all_with_warning(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(content="Hmm, hard to say.")], api_key=KEY) as server:
        p = planner(server)
        assert p.verify(photo, _candidates(), "mugs") == [0, 1, 2, 3]
    assert any("kept all" in w for w in p.last_verification["warnings"])
    assert p.verify(photo, [], "mugs") == []


def test_parse_verify_answer_out_of_range() -> None:
    numbers, warnings, readable = parse_verify_answer('```json\n{"matches": [2, 9, "3", "x"]}\n```', None, 4)
    assert readable and numbers == [2, 3]
    assert any("9" in w for w in warnings) and any("not a number" in w for w in warnings)


def test_numbered_overlay_drawn_inside_masks() -> None:
    image = np.full((200, 400, 3), 128, np.uint8)
    masks = [np.zeros((200, 400), bool), np.zeros((200, 400), bool)]
    masks[0][20:120, 20:150] = True
    masks[1][50:180, 200:380] = True
    overlay = draw_numbered_candidates(image, masks, max_side=0)
    assert overlay.shape == (200, 400, 3) and overlay.dtype == np.uint8
    assert not np.array_equal(overlay[30, 30], image[30, 30])  # tinted
    assert np.array_equal(overlay[190, 10], image[190, 10])  # outside every mask: untouched
    label_area = overlay[60:80, 75:95]  # around the first mask's centre: the black label box with a white digit
    assert (label_area.min(axis=2) > 200).any() and (label_area.max(axis=2) < 40).any()


def test_plan_record_round_trip(photo: np.ndarray, tmp_path) -> None:
    with FakeOpenAIServer([Reply.fixture("boxes_bad")], api_key=KEY) as server:
        p = planner(server)
        plan = p.plan(photo)
    record = plan_record(plan, {**p.last_request, "api_key": KEY})
    path = write_json_atomic(tmp_path / "stage1" / "plan.json", record)
    text = path.read_text()
    assert KEY not in text
    loaded = json.loads(text)
    assert loaded["format_version"] == 1 and loaded["planner"] == "vlm" and loaded["mode"] == "scene"
    assert loaded["request"]["answer_format"] == "json" and loaded["timing"]["seconds"] >= 0
    assert loaded["request"]["max_completion_tokens"] == 16384 and "api_key" not in loaded["request"]
    assert loaded["request"]["sampling"] == {"temperature": 0.6, "top_p": 0.95, "presence_penalty": 0.0}
    assert len(loaded["warnings"]) == 5 and loaded["items"][0]["box_xyxy"] is None
    back = plan_from_record(loaded)
    assert back.items == plan.items and back.warnings == plan.warnings and back.raw_response == plan.raw_response
