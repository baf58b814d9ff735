"""What the planner sends, checked against vLLM 0.33.0 and Qwen3-VL's own settings (issue 8, stage 1a):
loopback traffic bypasses HTTP proxies, Qwen's Thinking sampling, the thinking budget, vLLM-only
fields only to vLLM, the structured-output fallback decided per request, and the schema order.
A real openai client against real HTTP servers on 127.0.0.1 (tests/fake_openai_server.py)."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from conftest import set_proxy
from fake_openai_server import FakeOpenAIServer, Reply

from pipeline.core.config import PlannerConfig
from pipeline.core.errors import BackendError, InputError
from pipeline.core.types import ObjectMask
from pipeline.plan import vlm
from pipeline.plan.parse import parse_plan_text
from pipeline.plan.server import pick_free_port
from pipeline.plan.vlm import VLMPlanner

KEY = "k-123"
FAST = (0.01, 0.01)
QWEN_ANSWER = json.dumps({"objects": [{"bbox_2d": [100, 100, 300, 400], "label": "mug"}, {"bbox_2d": [500, 200, 900, 700], "label": "laptop"}]})


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)


def planner(url: str, **cfg: object) -> VLMPlanner:
    fields = {"vlm_url": url, "vlm_api_key": KEY, "vlm_timeout": 10.0}
    fields.update(cfg)
    return VLMPlanner(PlannerConfig(**fields), retry_delays=FAST)  # type: ignore[arg-type]


# ---- proxies ------------------------------------------------------------------------------------


def test_loopback_server_is_reached_despite_a_dead_proxy(photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    set_proxy(monkeypatch, f"http://127.0.0.1:{pick_free_port()}")  # nobody listens: a dead proxy
    with FakeOpenAIServer([Reply(content=QWEN_ANSWER)], api_key=KEY) as server:
        plan = planner(server.url).plan(photo)
        localhost = planner(f"http://localhost:{server.port}/v1").plan(photo)
        assert server.proxied == []
    assert [i.phrase for i in plan.items] == ["mug", "laptop"] and len(localhost.items) == 2


def test_remote_url_still_goes_through_the_users_proxy(photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in doubles as the proxy: it serves absolute-form requests and counts them.
    with FakeOpenAIServer([Reply(content=QWEN_ANSWER)], api_key=KEY) as proxy:
        set_proxy(monkeypatch, f"http://127.0.0.1:{proxy.port}")
        plan = planner("http://vlm.example.invalid/v1").plan(photo)
        proxied = list(proxy.proxied)
    assert len(plan.items) == 2
    assert "http://vlm.example.invalid/v1/chat/completions" in proxied


def test_loopback_detection() -> None:
    assert vlm.is_loopback_url("http://127.0.0.1:8000/v1") and vlm.is_loopback_url("http://127.5.0.1/v1")
    assert vlm.is_loopback_url("http://[::1]:8000/v1") and vlm.is_loopback_url("http://LOCALHOST:1/v1")
    assert not vlm.is_loopback_url("https://api.example.com/v1") and not vlm.is_loopback_url("http://10.0.0.2:8000/v1")


# ---- sampling, budget and vLLM-only fields ------------------------------------------------------


def test_qwen_thinking_sampling_and_budget_sent_to_vllm(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(content=QWEN_ANSWER)], api_key=KEY) as server:
        p = planner(server.url)
        p.plan(photo)
        body = server.chat_requests[0].body
    # QwenLM/Qwen3-VL README "Generation Hyperparameters", Thinking models.
    assert body["temperature"] == 0.6 and body["top_p"] == 0.95 and body["presence_penalty"] == 0.0
    assert body["top_k"] == 20 and body["repetition_penalty"] == 1.0
    assert body["max_completion_tokens"] == 16384 and "max_tokens" not in body
    assert body["thinking_token_budget"] == 16384 - 2048  # below the cap: room left for the JSON
    assert p.last_request["vllm_fields"]["thinking_token_budget"] == 14336


def test_budget_flags(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(content=QWEN_ANSWER)], api_key=KEY) as server:
        planner(server.url, vlm_thinking_budget=-1, vlm_top_k=5).plan(photo)
        planner(server.url, vlm_thinking_budget=3000, vlm_max_tokens=4000).plan(photo)
        planner(server.url, vlm_max_tokens=1000).plan(photo)
        bodies = [r.body for r in server.chat_requests]
    assert "thinking_token_budget" not in bodies[0] and bodies[0]["top_k"] == 5
    assert bodies[1]["thinking_token_budget"] == 3000 and bodies[1]["max_completion_tokens"] == 4000
    assert bodies[2]["thinking_token_budget"] == 750  # small caps keep a quarter for the answer


def test_other_servers_get_standard_fields_only(photo: np.ndarray) -> None:
    """A server that is not vLLM (OpenAI-style: unknown fields are a 400) gets no top_k/budget."""
    with FakeOpenAIServer([Reply(content=QWEN_ANSWER)], api_key=KEY, owned_by="openai", strict_fields=True) as server:
        p = planner(server.url)
        plan = p.plan(photo)
        body = server.chat_requests[0].body
    assert len(plan.items) == 2 and p.last_request["vllm_fields"] == {}
    assert body["temperature"] == 0.6 and not {"top_k", "repetition_penalty", "thinking_token_budget"} & set(body)
    with FakeOpenAIServer([Reply(content=QWEN_ANSWER)], api_key=KEY, owned_by="openai", strict_fields=True) as server:
        with pytest.raises(BackendError, match="Unrecognized request argument supplied: repetition_penalty"):
            planner(server.url, vlm_vllm_fields="on").plan(photo)


def test_budget_refused_by_a_vllm_without_reasoning_parser(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(content=QWEN_ANSWER)], api_key=KEY, reasoning_parser=False) as server:
        plan = planner(server.url).plan(photo)
        bodies = [r.body for r in server.chat_requests]
    assert len(plan.items) == 2 and len(bodies) == 2
    assert "thinking_token_budget" in bodies[0] and "thinking_token_budget" not in bodies[1]
    assert any("refused thinking_token_budget" in w for w in plan.warnings)


def test_started_vllm_without_reasoning_parser_gets_no_schema_and_no_budget(photo: np.ndarray) -> None:
    with FakeOpenAIServer([Reply(content="<think>a mug</think>" + QWEN_ANSWER)], api_key=KEY, reasoning_parser=False) as server:
        p = VLMPlanner(PlannerConfig(vlm_api_key=KEY), url=server.url, vllm_server=True, reasoning_parser=False, retry_delays=FAST)
        plan = p.plan(photo)
        bodies = [r.body for r in server.chat_requests]
    assert len(bodies) == 1 and "response_format" not in bodies[0] and "thinking_token_budget" not in bodies[0]
    assert bodies[0]["top_k"] == 20 and [i.phrase for i in plan.items] == ["mug", "laptop"]
    assert any("structured output is off" in w for w in plan.warnings)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_refused_for_a_thinking_model(temperature: float) -> None:
    with pytest.raises(InputError) as info:
        VLMPlanner(PlannerConfig(vlm_url="http://127.0.0.1:9/v1", vlm_temperature=temperature))
    assert "\n" not in str(info.value) and "thinking model" in str(info.value) and "0.6" in str(info.value)
    # A model that does not think may be greedy.
    VLMPlanner(PlannerConfig(vlm_url="http://127.0.0.1:9/v1", vlm_temperature=0.0, vlm_model="qwen3-vl-8b-instruct"))


# ---- structured-output fallback -----------------------------------------------------------------


def test_a_400_that_is_not_about_the_schema_is_an_error_at_once(photo: np.ndarray) -> None:
    message = "At most 1 image(s) may be provided in one prompt."
    with FakeOpenAIServer([Reply(status=400, error_message=message)], api_key=KEY) as server:
        with pytest.raises(BackendError, match="rejected the request \\(HTTP 400: At most 1 image"):
            planner(server.url).plan(photo)
        bodies = [r.body for r in server.chat_requests]
    assert len(bodies) == 1 and "response_format" in bodies[0]


def test_schema_rejection_does_not_stick_to_the_verify_call(photo: np.ndarray) -> None:
    replies = [Reply(status=422, error_message="json_schema response_format is not supported"), Reply(content=QWEN_ANSWER),
               Reply(content='{"matches": [1]}')]
    mask = np.zeros(photo.shape[:2], bool)
    mask[50:150, 50:150] = True
    with FakeOpenAIServer(replies, api_key=KEY) as server:
        p = planner(server.url, prompt="the mug")
        plan = p.plan(photo)
        kept = p.verify(photo, [ObjectMask(mask=mask, label="mug")], "the mug")
        bodies = [r.body for r in server.chat_requests]
    assert len(plan.items) == 2 and kept == [0]
    assert "response_format" in bodies[0] and "response_format" not in bodies[1]
    assert bodies[2]["response_format"]["json_schema"]["name"] == "candidate_matches"  # asked again
    assert p.last_verification is not None and p.last_verification["structured_output"] is True


# ---- schema order and the stand-in's answer shape -----------------------------------------------


def test_schema_puts_the_box_before_the_label(photo: np.ndarray) -> None:
    item = vlm.plan_schema(5)["properties"]["objects"]["items"]
    assert list(item["properties"]) == ["bbox_2d", "label"] and item["required"] == ["bbox_2d", "label"]
    with FakeOpenAIServer([Reply(content=QWEN_ANSWER)], api_key=KEY) as server:
        planner(server.url).plan(photo)
        text = server.chat_requests[0].body["messages"][0]["content"][1]["text"]
    assert '{"bbox_2d": [x1, y1, x2, y2], "label": "..."}' in text
    # The parser reads the old order and key as well as Qwen's own.
    old = json.dumps({"objects": [{"phrase": "mug", "bbox_2d": [100, 100, 300, 400]}]})
    assert [i.phrase for i in parse_plan_text(old, image_size=(400, 300), max_objects=5)[0]] == ["mug"]
    assert [i.phrase for i in parse_plan_text(QWEN_ANSWER, image_size=(400, 300), max_objects=5)[0]] == ["mug", "laptop"]


def test_stand_in_answers_with_vllm_033s_reasoning_field() -> None:
    with FakeOpenAIServer([Reply(content="{}", reasoning="thinking")]) as server:
        request = urllib.request.Request(
            f"{server.url}/chat/completions", data=json.dumps({"model": server.model, "messages": []}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5) as response:
            message = json.loads(response.read())["choices"][0]["message"]
    assert message["reasoning"] == "thinking" and "reasoning_content" not in message
