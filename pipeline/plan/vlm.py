"""The `vlm` planner: any OpenAI-compatible chat server (vLLM + Qwen3-VL-8B-Thinking by default).

The photo is sent inline as a base64 JPEG data URL, downscaled to `--vlm-max-image-side`, so the
server never needs filesystem access. JSON is requested through structured output
(`response_format` json_schema); when a server's HTTP 400/422 names response_format/json_schema/
structured output/grammar, that request is asked again in plain text (decided per request), and
`pipeline.plan.parse` reads whatever comes back.

Request settings (vLLM 0.33 entrypoints/openai/chat_completion/protocol.py:236-300):
- `max_completion_tokens` (the deprecated `max_tokens` is not sent), `temperature`, `top_p`,
  `presence_penalty`: standard OpenAI fields, Qwen3-VL Thinking's recommended values by default
  (QwenLM/Qwen3-VL README, "Generation Hyperparameters", Thinking models: top_p 0.95, top_k 20,
  repetition_penalty 1.0, presence_penalty 0.0, temperature 0.6).
- `top_k`, `repetition_penalty`, `thinking_token_budget`: vLLM's own fields, sent only to vLLM
  (`--vlm-vllm-fields`): a vLLM the pipeline started, or a server whose GET /v1/models says
  owned_by "vllm" (serve/engine/protocol.py:109). vLLM ignores unknown fields, other servers may not.
  `thinking_token_budget` makes vLLM close `</think>` after that many thinking tokens
  (v1/sample/thinking_budget_state.py), so the JSON answer still fits under the output cap; it
  needs a reasoning parser on the server (v1/engine/input_processor.py:203-211), so it is never
  sent to a started vLLM without one, and a 400 naming it drops it for that request.
- Loopback URLs (127.0.0.0/8, ::1, localhost) never go through http(s)_proxy/ALL_PROXY: the client
  gets its own HTTP client with trust_env off; any other URL honours the user's proxy settings.

Decisions worth knowing:
- A readable but empty object list raises `EmptyPlanError` (a `BackendError`): the run cannot go on
  without objects, and the error carries the plan (raw answer, reasoning) so `stage1/plan.json`
  can still be written. The lead's stage may catch it to fall back to the classical segmenter.
- An unreadable answer raises `VLMAnswerError` (also carrying the plan).
- `verify` fails open: when its answer cannot be read, every candidate is kept and a warning is
  recorded in `last_verification`.
- Retries: up to len(retry_delays) more tries for connection errors and HTTP 5xx only; a timeout
  is not retried (it already waited `--vlm-timeout`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image

from pipeline.core.config import PlannerConfig, display_url
from pipeline.core.errors import BackendError, InputError, missing_dependency
from pipeline.core.types import ObjectMask, Plan, PlanItem
from pipeline.plan.parse import (
    FENCE_RE,
    ParsedPlan,
    entries_of,
    json_or_none,
    parse_plan_details,
    reasoning_from_text,
    strip_reasoning,
)

PLAN_FORMAT_VERSION = 1
MAX_QUERY_CHARS = 500
ANSWER_ROOM = 2048
"""Tokens kept for the JSON answer after thinking when --vlm-thinking-budget is not given."""
LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}
_SCHEMA_WORDS = re.compile(r"response_format|json_schema|structured|grammar", re.IGNORECASE)

SCENE_INSTRUCTIONS = (
    "You plan the 3D reconstruction of the objects in one photo. List every distinct physical object in the "
    "image that is worth reconstructing in 3D: furniture, devices, containers, tools, toys, plants, food, "
    "vehicles, people, animals. Usually 8 to 15 objects. Skip walls, floor, ceiling, sky, ground and other "
    "background surfaces, and parts of objects (a handle, a leg). Name each object with a short English noun "
    "phrase of 1 to 4 words that a text-prompted segmentation model can find; add a colour or position only to "
    "tell similar objects apart. Give each object's bounding box as bbox_2d [x1, y1, x2, y2] on a 0-1000 grid "
    "relative to the image. List each physical object once.\n"
    'Answer with JSON only: {"objects": [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]}'
)
QUERY_INSTRUCTIONS = (
    "You find objects in one photo for a user. The user asks for: {query}\n"
    "List only the objects in the image that match this request, each matching instance separately with its "
    "own box, and nothing else. Name each with a short English noun phrase of 1 to 4 words that a "
    "text-prompted segmentation model can find. Give its bounding box as bbox_2d [x1, y1, x2, y2] on a 0-1000 "
    "grid relative to the image. If nothing matches, answer with an empty list.\n"
    'Answer with JSON only: {{"objects": [{{"bbox_2d": [x1, y1, x2, y2], "label": "..."}}]}}'
)
VERIFY_INSTRUCTIONS = (
    "Each candidate object in this image is tinted with a colour, outlined and labelled with a number from 1 to "
    "{count}. The user asked for: {query}\n"
    "Which numbered candidates show what the user asked for? Answer with JSON only: "
    '{{"matches": [numbers]}} (an empty list if none match).'
)


def plan_schema(max_items: int) -> dict[str, Any]:
    """JSON schema of the planner's answer (also valid for OpenAI's strict mode).

    `bbox_2d` comes before `label`, the order Qwen3-VL was trained to write
    (QwenLM/Qwen3-VL evaluation/ODinW-13/run_odinw.py:224-231): xgrammar emits properties in
    schema order."""
    return {
        "type": "object",
        "properties": {
            "objects": {
                "type": "array",
                "maxItems": max(1, max_items),
                "items": {
                    "type": "object",
                    "properties": {
                        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                        "label": {"type": "string"},
                    },
                    "required": ["bbox_2d", "label"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["objects"],
        "additionalProperties": False,
    }


def verify_schema(count: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"matches": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": max(1, count)}}},
        "required": ["matches"],
        "additionalProperties": False,
    }


class VLMAnswerError(BackendError):
    """The server answered, but no usable object list came back. `.plan` holds what did come back."""

    def __init__(self, problem: str, fix: str | None = None, *, plan: Plan | None = None):
        super().__init__(problem, fix)
        self.plan = plan


class EmptyPlanError(VLMAnswerError):
    """The model answered with an empty object list (or only phrases that were sanitized away)."""


@dataclass
class ChatAnswer:
    content: str
    reasoning: str
    finish_reason: str | None
    model: str
    usage: dict[str, Any]
    seconds: float
    attempts: int
    structured: bool
    warnings: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    vllm_fields: dict[str, Any] = field(default_factory=dict)


class VLMPlanner:
    """Planner backed by an OpenAI-compatible chat endpoint serving a vision-language model."""

    name = "vlm"

    def __init__(
        self,
        cfg: PlannerConfig,
        *,
        url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        seed: int | None = None,
        retry_delays: tuple[float, ...] = (1.0, 4.0),
        vllm_server: bool | None = None,
        reasoning_parser: bool = True,
    ):
        """`url`, `api_key` and `model` override the config (e.g. with a `VLLMServer`'s values).

        `vllm_server=True` says the server is a vLLM (one the pipeline started); None lets
        `--vlm-vllm-fields auto` ask the server. `reasoning_parser=False` says that vLLM runs
        without one: structured output then constrains from the first token (vLLM 0.33
        v1/structured_output/__init__.py:300-310) and the Thinking model would never think, so
        structured output is turned off, and no thinking budget is sent (the server would refuse it).
        """
        self.cfg = cfg
        raw_url = url or cfg.vlm_url
        if not raw_url:
            raise InputError(
                "No VLM server URL was given.",
                "pass --vlm-url http://HOST:PORT/v1 (or env SAM3DGS_VLM_URL), or let the pipeline start vLLM.",
            )
        self.url = normalize_base_url(raw_url)
        # Never OPENAI_API_KEY: a user's OpenAI key must not be sent to an arbitrary --vlm-url.
        self.api_key = api_key or cfg.vlm_api_key or os.environ.get("SAM3DGS_VLM_API_KEY") or "EMPTY"
        self.model = model or cfg.vlm_model
        if cfg.vlm_temperature <= 0 and "think" in self.model.lower():
            raise InputError(
                f"--vlm-temperature {cfg.vlm_temperature:g} means greedy decoding, which Qwen's settings for thinking models ('{self.model}') rule out (it tends to loop).",
                "use Qwen's recommended 0.6 (the default) or another value above 0.",
            )
        self.seed = seed
        self.retry_delays = tuple(retry_delays)
        self.structured_output = cfg.vlm_structured_output
        self.reasoning_parser = reasoning_parser
        self.notes: list[str] = []
        if self.structured_output and not reasoning_parser:
            self.structured_output = False
            self.notes.append(
                "structured output is off: vLLM runs without a reasoning parser, and a JSON grammar from the first token would keep the model from thinking"
            )
        if cfg.vlm_vllm_fields != "auto":
            vllm_server = cfg.vlm_vllm_fields == "on"
        self._vllm_server = vllm_server
        self.last_request: dict[str, Any] = {}
        self.last_verification: dict[str, Any] | None = None
        self._client: Any = None

    # ---- public API -------------------------------------------------------------------------

    def plan(self, image: np.ndarray, *, query: str | None = None) -> Plan:
        """Ask the VLM what to segment. Query mode when `query` (or cfg.prompt) is set."""
        image = _check_image(image)
        height, width = image.shape[:2]
        query = clean_query(query if query is not None else self.cfg.prompt)
        mode = "query" if query else "scene"
        text = QUERY_INSTRUCTIONS.format(query=json.dumps(query)) if query else SCENE_INSTRUCTIONS
        data_url, sent_size = encode_image_data_url(image, self.cfg.vlm_max_image_side)
        messages = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": text}],
            }
        ]
        schema_items = max(1, 2 * self.cfg.max_objects)
        answer = self._chat(messages, schema=plan_schema(schema_items), schema_name="object_plan")
        parsed: ParsedPlan = parse_plan_details(
            answer.content, answer.reasoning, image_size=(width, height), max_objects=self.cfg.max_objects
        )
        warnings = self.notes + answer.warnings + parsed.warnings
        if answer.finish_reason == "length":
            warnings.append(f"the answer was cut off at {self.cfg.vlm_max_tokens} tokens (finish_reason=length); raise --vlm-max-tokens")
        plan = Plan(
            items=parsed.items,
            mode=mode,  # type: ignore[arg-type]
            query=query,
            raw_response=answer.content,
            reasoning=answer.reasoning,
            warnings=warnings,
            model=answer.model or self.model,
        )
        self.last_request = {
            "planner": self.name,
            "url": display_url(self.url),
            "model": self.model,
            "mode": mode,
            "query": query,
            "prompt": text,
            "image_original": [width, height],
            "image_sent": list(sent_size),
            "structured_output": answer.structured,
            "max_completion_tokens": self.cfg.vlm_max_tokens,
            "sampling": answer.sampling,
            "vllm_fields": answer.vllm_fields,
            "seed": self.seed,
            "finish_reason": answer.finish_reason,
            "usage": answer.usage,
            "answer_format": parsed.answer_format,
            "entries_found": parsed.entries_found,
            "attempts": answer.attempts,
            "timing": {"seconds": round(answer.seconds, 3)},
        }
        if not plan.items:
            if parsed.answer_format == "none":
                raise VLMAnswerError(
                    f"The VLM '{self.model}' answered, but no object list could be read from it "
                    f"({_one_line(answer.content or answer.reasoning, 80)!r}).",
                    "try again, raise --vlm-max-tokens if the answer was cut off, or check that the model is a "
                    "vision-language model; the raw answer is in stage1/plan.json.",
                    plan=plan,
                )
            if mode == "query":
                problem = f"The VLM '{self.model}' found nothing matching {query!r} in the photo."
                fix = "rephrase --prompt, or drop it to reconstruct every object in the scene."
            else:
                problem = f"The VLM '{self.model}' returned no usable objects for this photo."
                fix = "check that the photo shows distinct objects, or run with --planner none to let the classical segmenter find them."
            if parsed.entries_found:
                problem = problem[:-1] + f" ({parsed.entries_found} entries were dropped while cleaning them)."
            raise EmptyPlanError(problem, fix, plan=plan)
        return plan

    def verify(self, image: np.ndarray, candidates: list[ObjectMask], query: str) -> list[int]:
        """Show the candidates numbered 1..N on one overlay; return the 0-based indices the VLM picks."""
        image = _check_image(image)
        if not candidates:
            self.last_verification = {"candidates": 0, "kept": [], "warnings": []}
            return []
        query = clean_query(query) or ""
        overlay = draw_numbered_candidates(image, [c.mask for c in candidates], max_side=self.cfg.vlm_max_image_side)
        data_url, sent_size = encode_image_data_url(overlay, self.cfg.vlm_max_image_side)
        text = VERIFY_INSTRUCTIONS.format(count=len(candidates), query=json.dumps(query))
        messages = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": text}],
            }
        ]
        answer = self._chat(messages, schema=verify_schema(len(candidates)), schema_name="candidate_matches")
        numbers, warnings, readable = parse_verify_answer(answer.content, answer.reasoning, len(candidates))
        warnings = self.notes + answer.warnings + warnings
        if readable:
            kept = sorted({n - 1 for n in numbers})
        else:
            kept = list(range(len(candidates)))
            warnings.append("could not read which candidates match; kept all of them")
        self.last_verification = {
            "query": query,
            "candidates": len(candidates),
            "labels": [c.label for c in candidates],
            "kept": kept,
            "raw_response": answer.content,
            "reasoning": answer.reasoning,
            "warnings": warnings,
            "image_sent": list(sent_size),
            "structured_output": answer.structured,
            "timing": {"seconds": round(answer.seconds, 3)},
        }
        return kept

    # ---- transport ----------------------------------------------------------------------------

    def _openai(self) -> Any:
        try:
            import openai
        except ImportError as exc:
            raise missing_dependency("openai", "sam3", "pip install 'openai>=1.40'") from exc
        return openai

    def _get_client(self) -> Any:
        if self._client is None:
            openai = self._openai()
            extra: dict[str, Any] = {}
            if is_loopback_url(self.url):
                # trust_env=False: no http(s)_proxy/ALL_PROXY (nor .netrc) for a server on this machine.
                extra["http_client"] = openai.DefaultHttpxClient(trust_env=False, timeout=self.cfg.vlm_timeout)
            # Retries are ours (bounded, 5xx/connection only), so the client's own are off.
            self._client = openai.OpenAI(base_url=self.url, api_key=self.api_key, timeout=self.cfg.vlm_timeout, max_retries=0, **extra)
        return self._client

    def is_vllm(self) -> bool:
        """Whether to send vLLM's own request fields (see the module docstring); asked once."""
        if self._vllm_server is None:
            try:
                models = self._get_client().models.list().data
                self._vllm_server = any(getattr(m, "owned_by", None) == "vllm" for m in models)
            except Exception:  # an unknown server gets only standard fields
                self._vllm_server = False
        return self._vllm_server

    def thinking_budget(self) -> int | None:
        """The thinking_token_budget to send, or None."""
        budget = self.cfg.vlm_thinking_budget
        if budget is None:
            budget = self.cfg.vlm_max_tokens - min(ANSWER_ROOM, self.cfg.vlm_max_tokens // 4)
        if budget < 0 or not self.reasoning_parser:
            return None
        return min(budget, self.cfg.vlm_max_tokens)

    def request_fields(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(standard sampling fields, vLLM-only fields) for every request."""
        cfg = self.cfg
        sampling = {"temperature": cfg.vlm_temperature, "top_p": cfg.vlm_top_p, "presence_penalty": cfg.vlm_presence_penalty}
        vllm: dict[str, Any] = {}
        if self.is_vllm():
            vllm = {"top_k": cfg.vlm_top_k, "repetition_penalty": cfg.vlm_repetition_penalty}
            budget = self.thinking_budget()
            if budget is not None:
                vllm["thinking_token_budget"] = budget
        return sampling, vllm

    def _chat(self, messages: list[dict[str, Any]], *, schema: dict[str, Any], schema_name: str) -> ChatAnswer:
        openai = self._openai()
        client = self._get_client()
        warnings: list[str] = []
        use_schema = self.structured_output  # decided per request: a rejection affects this one only
        sampling, vllm_fields = self.request_fields()
        attempts = 0
        failures = 0
        started = time.monotonic()
        while True:
            attempts += 1
            kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "max_completion_tokens": self.cfg.vlm_max_tokens, **sampling}
            if self.seed is not None:
                kwargs["seed"] = self.seed
            if vllm_fields:
                kwargs["extra_body"] = dict(vllm_fields)
            if use_schema:
                kwargs["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": schema_name, "schema": schema, "strict": True},
                }
            try:
                response = client.chat.completions.create(**kwargs)
                break
            except openai.APITimeoutError as exc:
                raise BackendError(
                    f"The VLM at {display_url(self.url)} did not answer within {self.cfg.vlm_timeout:g} s.",
                    "raise --vlm-timeout (thinking models can take minutes), lower --vlm-max-image-side or "
                    "--vlm-max-tokens, or check that the server is not overloaded.",
                ) from exc
            except openai.APIConnectionError as exc:
                failures += 1
                if failures <= len(self.retry_delays):
                    time.sleep(self.retry_delays[failures - 1])
                    continue
                raise BackendError(
                    f"Cannot reach the VLM server at {display_url(self.url)} after {attempts} tries ({_connection_reason(exc)}).",
                    "start it with `python -m pipeline serve-vlm` (or run_agent_with_vllm.sh), or fix --vlm-url / "
                    "SAM3DGS_VLM_URL; if it was running, its log says why it stopped.",
                ) from exc
            except openai.APIStatusError as exc:
                status = exc.status_code
                message = _server_message(exc, 400)
                if use_schema and status in (400, 422) and _SCHEMA_WORDS.search(message):
                    # Some OpenAI-compatible servers do not know response_format=json_schema.
                    use_schema = False
                    warnings.append(
                        f"the server rejected structured output (HTTP {status}: {_one_line(message, 120)}); asked again for plain JSON"
                    )
                    continue
                if "thinking_token_budget" in vllm_fields and status in (400, 422) and "thinking_token_budget" in message:
                    # A vLLM started without a reasoning parser (v1/engine/input_processor.py:203-211).
                    del vllm_fields["thinking_token_budget"]
                    warnings.append(f"the server refused thinking_token_budget (HTTP {status}: {_one_line(message, 120)}); asked again without it")
                    continue
                if status >= 500:
                    failures += 1
                    if failures <= len(self.retry_delays):
                        time.sleep(self.retry_delays[failures - 1])
                        continue
                raise self._status_error(exc, attempts) from exc
            except (openai.APIError, ValueError, TypeError, KeyError, AttributeError) as exc:
                # ValueError & co.: a 200 answer whose body the client could not read (cut-off JSON).
                raise self._not_a_completion(exc) from exc
        seconds = time.monotonic() - started
        try:
            choices = list(response.choices or [])
            message = choices[0].message if choices else None
            if message is None:
                raise VLMAnswerError(
                    f"The VLM server at {display_url(self.url)} returned a completion without any answer.",
                    "check the server log; try again.",
                )
            content = _content_text(message.content)
            reasoning = _message_reasoning(message) or reasoning_from_text(content)
            usage_obj = getattr(response, "usage", None)
            usage = usage_obj.model_dump() if hasattr(usage_obj, "model_dump") else {}
            finish_reason = choices[0].finish_reason
        except (AttributeError, TypeError, KeyError, ValueError, IndexError) as exc:
            raise self._not_a_completion(exc) from exc
        return ChatAnswer(
            content=content,
            reasoning=reasoning,
            finish_reason=finish_reason,
            model=getattr(response, "model", "") or self.model,
            usage={k: v for k, v in usage.items() if isinstance(v, (int, float))},
            seconds=seconds,
            attempts=attempts,
            structured=use_schema,
            warnings=warnings,
            sampling=sampling,
            vllm_fields=vllm_fields,
        )

    def _not_a_completion(self, exc: BaseException) -> BackendError:
        return BackendError(
            f"The VLM server at {display_url(self.url)} sent something that is not an OpenAI chat "
            f"completion ({type(exc).__name__}: {_one_line(str(exc), 120)}).",
            "check that --vlm-url points at an OpenAI-compatible API (it usually ends in /v1).",
        )

    def _status_error(self, exc: Any, attempts: int) -> BackendError:
        status = exc.status_code
        where = display_url(self.url)
        detail = _server_message(exc, 160)
        if status == 401:
            return BackendError(
                f"The VLM server at {where} refused the API key (HTTP 401: {detail}).",
                "pass the server's key with --vlm-api-key or env SAM3DGS_VLM_API_KEY (a server started by serve-vlm prints it).",
            )
        if status == 403:
            return BackendError(
                f"The VLM server at {where} denied access (HTTP 403: {detail}).",
                "check that the API key is allowed to use this model.",
            )
        if status == 404:
            served = self._served_models()
            listing = f"; it serves: {', '.join(served)}" if served else ""
            return BackendError(
                f"The VLM server at {where} has no model '{self.model}' or no chat endpoint (HTTP 404{listing}).",
                "pass the served name with --vlm-model (env SAM3DGS_VLM_MODEL), and a --vlm-url that ends in /v1.",
            )
        if status == 429:
            return BackendError(
                f"The VLM server at {where} is rate-limiting requests (HTTP 429: {detail}).",
                "wait and run again, or use a server with more capacity.",
            )
        if status >= 500:
            return BackendError(
                f"The VLM server at {where} failed with HTTP {status} after {attempts} tries ({detail}).",
                "check the server's log (logs/vllm.log for a server the pipeline started), e.g. for GPU memory; then run again.",
            )
        return BackendError(
            f"The VLM server at {where} rejected the request (HTTP {status}: {detail}).",
            "lower --vlm-max-image-side or --vlm-max-tokens if the message mentions length (--vlm-max-tokens must stay below the server's "
            "--max-model-len), use --vlm-vllm-fields off if it names top_k or thinking_token_budget, or check --vlm-model.",
        )

    def _served_models(self) -> list[str]:
        try:
            return [m.id for m in self._get_client().models.list().data][:10]
        except Exception:  # best effort, only to improve the message
            return []


# ---- helpers ------------------------------------------------------------------------------------


def is_loopback_url(url: str) -> bool:
    """Whether the URL's host is this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    host = (urlsplit(url).hostname or "").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_base_url(url: str) -> str:
    """Strip trailing slashes and add '/v1' to a bare host URL (the usual mistake)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        url = urlunsplit((parts.scheme, parts.netloc, "/v1", parts.query, parts.fragment))
    return url


def clean_query(query: str | None) -> str | None:
    """The user's request as one line of printable text, at most MAX_QUERY_CHARS."""
    if query is None:
        return None
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in query).split())
    return text[:MAX_QUERY_CHARS] or None


def encode_image_data_url(image: np.ndarray, max_side: int, *, quality: int = 90) -> tuple[str, tuple[int, int]]:
    """RGB uint8 (H, W, 3) -> ('data:image/jpeg;base64,...', (w, h) sent); longest side <= max_side."""
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False), "RGB")
    scale = max_side / max(pil.size) if max_side and max(pil.size) > max_side else 1.0
    if scale < 1.0:
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), pil.size


def draw_numbered_candidates(image: np.ndarray, masks: list[np.ndarray], *, max_side: int = 0) -> np.ndarray:
    """The masks over the photo, numbered 1..N (pipeline.masks.overlay.draw_overlay), drawn at the
    size the VLM will see (`max_side`) so the numbers stay legible after downscaling."""
    from pipeline.masks.overlay import draw_overlay

    height, width = image.shape[:2]
    scale = max_side / max(height, width) if max_side and max(height, width) > max_side else 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False), "RGB")
    small_masks = [np.asarray(m, dtype=bool) for m in masks]
    if scale < 1.0:
        base = base.resize(size, Image.Resampling.LANCZOS)
        small_masks = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127 for m in small_masks]
    # No ids: draw_overlay then numbers the masks by position, 1..N, as the prompt does.
    return draw_overlay(np.asarray(base), [ObjectMask(mask=m, label="") for m in small_masks], numbered=True)


_NONE_ANSWER = re.compile(r"\b(?:none|no candidates?|nothing|neither)\b", re.IGNORECASE)


def _content_text(content: Any) -> str:
    """The answer text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(getattr(p, "text", "")) for p in content)
    raise TypeError(f"message content is a {type(content).__name__}")


def parse_verify_answer(content: str | None, reasoning: str | None, count: int) -> tuple[list[int], list[str], bool]:
    """Read the candidate numbers (1-based) from a verification answer.

    Returns (numbers, warnings, readable). JSON ({"matches": [...]}, a bare list, fenced) first,
    then the numbers written in the answer text; out-of-range numbers are dropped with a warning.
    """
    warnings: list[str] = []
    answer = strip_reasoning(content or "")
    values: list[Any] | None = None
    candidates_text = [answer] + [body for _lang, body in FENCE_RE.findall(answer)]
    for text in candidates_text:
        value = json_or_none(text.strip())
        if value is None:
            match = re.search(r"\{[^{}]*\}|\[[^\[\]]*\]", text)
            value = json_or_none(match.group(0)) if match else None
        if isinstance(value, dict):
            for key in ("matches", "numbers", "ids", "indices", "candidates", "selected"):
                if isinstance(value.get(key), list):
                    values = value[key]
                    break
            else:
                values = entries_of(value)
        elif isinstance(value, list):
            values = value
        if values is not None:
            break
    if values is None:
        # Prose. The reasoning is never read for numbers (it mentions candidates it rejects). "None"
        # alone means none; "none" next to numbers ("None of the 3 match", "2 matches, none of the
        # others") and ranges ("1-3") are ambiguous: unreadable, so the caller keeps every candidate.
        numbers_in_text = [int(n) for n in re.findall(r"(?<![\d.])\d{1,4}(?!\d|\.\d)", answer)]
        says_none = bool(_NONE_ANSWER.search(answer))
        if says_none and not numbers_in_text:
            return [], warnings, True
        if says_none or re.search(r"\d\s*(?:-|–|to)\s*\d", answer):
            return [], warnings + ["the verification answer mixes numbers with 'none' or a range; it was not used"], False
        if not numbers_in_text:
            return [], warnings, False
        values = numbers_in_text
    numbers: list[int] = []
    for value in values:
        if isinstance(value, dict):
            value = next((value[k] for k in ("number", "id", "index", "candidate") if k in value), None)
        try:
            number = int(str(value).strip().lstrip("#"))
        except (TypeError, ValueError):
            warnings.append(f"ignored a verification entry that is not a number: {_one_line(repr(value), 40)}")
            continue
        if 1 <= number <= count:
            numbers.append(number)
        else:
            warnings.append(f"ignored candidate number {number}: only 1..{count} were shown")
    return numbers, warnings, True


def plan_record(plan: Plan, request_meta: dict[str, Any] | None = None, *, verification: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of stage1/plan.json (see docs): request, raw answer, reasoning, parsed items, warnings."""
    request = {k: v for k, v in (request_meta or {}).items() if not _is_secret_key(k) and k != "timing"}
    return {
        "format_version": PLAN_FORMAT_VERSION,
        "planner": request.get("planner", "vlm"),
        "model": plan.model,
        "mode": plan.mode,
        "query": plan.query,
        "items": [{"phrase": item.phrase, "box_xyxy": list(item.box_xyxy) if item.box_xyxy is not None else None} for item in plan.items],
        "warnings": list(plan.warnings),
        "raw_response": plan.raw_response,
        "reasoning": plan.reasoning,
        "request": request,
        "timing": dict((request_meta or {}).get("timing") or {}),
        "verification": verification,
    }


def plan_from_record(record: dict[str, Any]) -> Plan:
    """Read back what `plan_record` wrote (for resuming a run)."""
    items = []
    for entry in record.get("items", []):
        box = entry.get("box_xyxy")
        items.append(PlanItem(phrase=str(entry["phrase"]), box_xyxy=tuple(float(v) for v in box) if box else None))  # type: ignore[arg-type]
    return Plan(
        items=items,
        mode=record.get("mode", "scene"),
        query=record.get("query"),
        raw_response=record.get("raw_response", ""),
        reasoning=record.get("reasoning", ""),
        warnings=list(record.get("warnings", [])),
        model=record.get("model", ""),
    )


def _is_secret_key(name: str) -> bool:
    lowered = name.lower()
    return lowered in ("key", "token", "secret", "password", "authorization") or lowered.endswith(
        ("_key", "_token", "_secret", "_password")
    )


def _message_reasoning(message: Any) -> str:
    """The reasoning vLLM split off: `reasoning` (since vllm-project/vllm PR #27752, Nov 2025, after
    0.11.0; the only field in 0.33, chat_completion/protocol.py:86) or `reasoning_content` (up to
    its removal in PR #33402, Jan 2026)."""
    for name in ("reasoning_content", "reasoning"):
        value = getattr(message, name, None)
        if value is None:
            value = (getattr(message, "model_extra", None) or {}).get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(
            f"The planner needs an RGB image of shape (H, W, 3), got {image.shape}.", "pass the photo as loaded by the pipeline."
        )
    if image.dtype != np.uint8:
        raise InputError(f"The planner needs a uint8 image, got {image.dtype}.", "pass the photo as loaded by the pipeline.")
    return image


def _server_message(exc: Any, limit: int) -> str:
    body = getattr(exc, "body", None)  # the client already unwrapped {"error": ...}
    message: Any = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        message = message or body.get("message") or body.get("detail")
    elif isinstance(body, str):
        message = body
    if not message:
        message = getattr(exc, "message", None) or str(exc)
    return _one_line(str(message), limit)


def _connection_reason(exc: Any) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(cause) if cause is not None else str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return _one_line(text or type(exc).__name__, 100)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
