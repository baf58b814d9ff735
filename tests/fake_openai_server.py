"""A real OpenAI-compatible HTTP server on 127.0.0.1 that replays scripted chat answers.

It speaks the parts of vLLM's API the pipeline uses: GET /health, GET /v1/models and
POST /v1/chat/completions, with vLLM's JSON shapes. Each scripted `Reply` can set a status code,
a delay, a dropped connection, non-JSON bytes, or a 400 for `response_format=json_schema`.

What it imitates, in vLLM 0.33.0 (paths under vllm/ of the PyPI wheel, lines of that version):
- entrypoints/serve/middleware/authenticate.py:11,60 — the key guards /v1 only, a wrong or
  missing key gets 401 `{"error": "Unauthorized"}`; /health is open (serve/instrumentator/health.py:22).
- entrypoints/openai/models/api_router.py:20 + serve/engine/protocol.py:105-113 — GET /v1/models
  lists model cards with owned_by "vllm" and max_model_len.
- entrypoints/openai/chat_completion/protocol.py:76-86 — the answer's reasoning is in
  `message.reasoning` (the only field since PR #33402, Jan 2026; `reasoning_content` before).
- serve/engine/protocol.py:37-76 — unknown request fields are accepted and ignored (extra="allow").
- v1/engine/input_processor.py:203-211 — thinking_token_budget without a reasoning parser is a 400.
- serve/engine/protocol.py:79-88 — errors are `{"error": {message, type, param, code}}`.
Not vLLM: `strict_fields=True` answers like OpenAI's own API, a 400 for a field it does not know;
an absolute-form request target (`POST http://host/v1/...`) is served and counted in `proxied`,
so the same server doubles as an HTTP proxy in front of a remote host.

Used in-process by the planner tests and as the HTTP layer of tests/fake_vllm.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "vlm_responses"


@dataclass
class Reply:
    """One scripted answer to POST /v1/chat/completions."""

    content: str | None = ""
    reasoning: str | None = None
    reasoning_field: str = "reasoning"  # "reasoning" (vLLM 0.33), "reasoning_content" (before PR #33402) or "both"
    finish_reason: str = "stop"
    status: int = 200
    error_message: str = ""
    delay: float = 0.0
    drop_connection: bool = False
    raw_body: bytes | None = None  # sent as is (e.g. an HTML error page) with status
    raw_content_type: str = "text/html"
    reject_json_schema: bool = False  # answer 400 while the request carries response_format json_schema

    @staticmethod
    def fixture(name: str, **overrides: Any) -> Reply:
        """A reply from tests/fixtures/vlm_responses/<name>.json."""
        data = json.loads((FIXTURES / f"{name}.json").read_text())
        fields = {k: data[k] for k in ("content", "reasoning", "reasoning_field", "finish_reason") if k in data}
        fields.update(overrides)
        return Reply(**fields)


OPENAI_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "presence_penalty",
    "frequency_penalty", "seed", "response_format", "n", "stop", "stream", "logprobs", "user",
}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class FakeOpenAIServer:
    """Start with `with FakeOpenAIServer([...]) as server:`; `server.url` ends in /v1."""

    replies: list[Reply] = field(default_factory=list)
    api_key: str | None = None
    model: str = "qwen3-vl-8b-thinking"
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    owned_by: str = "vllm"  # up: serve/engine/protocol.py:109 — ModelCard.owned_by
    reasoning_parser: bool = True  # vLLM started with --reasoning-parser
    strict_fields: bool = False  # OpenAI-style: a 400 for request fields outside OPENAI_FIELDS
    max_model_len: int = 32768
    proxied: list[str] = field(default_factory=list)  # absolute-form targets received (used as a proxy)
    # Test instrumentation, not an imitation of vLLM (its counterpart would be the Prometheus gauge
    # vllm:num_requests_running): each chat request waits chat_delay seconds while counted in flight,
    # and appends {"event": "chat", "in_flight": k, "max_in_flight": m} to stats_path when it arrives.
    chat_delay: float = 0.0
    stats_path: Path | None = None
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def serve_forever(self) -> None:
        """Blocking variant for a separate process (tests/fake_vllm.py)."""
        self.start()
        assert self._thread is not None
        self._thread.join()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record_stat(self, event: dict[str, Any]) -> None:
        """One JSON line appended to stats_path (one write per line: lines of concurrent requests never interleave)."""
        if self.stats_path is not None:
            with open(self.stats_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")

    def next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            if not self.replies:
                return Reply(content='{"objects": [{"phrase": "mug", "bbox_2d": [100, 100, 300, 400]}]}')
            reply = self.replies[0]
            wants_schema = (body.get("response_format") or {}).get("type") == "json_schema"
            if reply.reject_json_schema and wants_schema:
                return Reply(status=400, error_message="Unsupported response_format type: json_schema")
            if len(self.replies) > 1:
                self.replies.pop(0)
            return reply


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _authorized(self) -> bool:
        key = self.owner.api_key
        if not key:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._send_json(401, {"error": "Unauthorized"})  # up: serve/middleware/authenticate.py:60
        return False

    def _record(self, body: dict[str, Any] | None) -> None:
        if "://" in self.path:  # absolute form: the client took us for its HTTP proxy
            with self.owner._lock:
                self.owner.proxied.append(self.path)
            self.path = "/" + self.path.split("://", 1)[1].partition("/")[2]
        with self.owner._lock:
            self.owner.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))

    def do_GET(self) -> None:
        self._record(None)
        if self.path == "/health":  # up: serve/instrumentator/health.py:22, no key needed
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.rstrip("/") == "/v1/models":  # up: openai/models/api_router.py:20
            if not self._authorized():
                return
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.owner.model,
                            "object": "model",
                            "created": int(time.time()),
                            "owned_by": self.owner.owned_by,
                            "root": self.owner.model,
                            "parent": None,
                            "max_model_len": self.owner.max_model_len,
                        }
                    ],
                },
            )
            return
        self._error(404, "Not Found", "NotFoundError")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        self._record(body)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, "Not Found", "NotFoundError")
            return
        if not self._authorized():
            return
        if not isinstance(body, dict):
            self._error(400, "request body is not JSON", "BadRequestError")
            return
        if body.get("model") != self.owner.model:
            self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            return
        unknown = sorted(set(body) - OPENAI_FIELDS)
        if self.owner.strict_fields and unknown:
            self._error(400, f"Unrecognized request argument supplied: {unknown[0]}", "invalid_request_error")
            return
        if body.get("thinking_token_budget") is not None and not self.owner.reasoning_parser:
            # up: v1/engine/input_processor.py:203-211
            self._error(
                400,
                "thinking_token_budget is set but reasoning_config is not configured. Please set --reasoning-parser "
                "and/or --reasoning-config to use thinking_token_budget.",
                "BadRequestError",
            )
            return
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        out_cap = body.get(param)
        if isinstance(out_cap, int) and out_cap > self.owner.max_model_len:
            # up: renderers/params.py:272-283 (chat_completion/protocol.py:684-700 picks the param)
            # — only an output cap above the whole context is refused
            message = f"{param}={out_cap} cannot be greater than max_model_len={self.owner.max_model_len}. Please request fewer output tokens."
            self._error(400, message, "BadRequestError")
            return
        owner = self.owner
        with owner._lock:
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
            owner.record_stat({"event": "chat", "in_flight": owner.in_flight, "max_in_flight": owner.max_in_flight, "time": time.time()})
        try:
            if owner.chat_delay:
                time.sleep(owner.chat_delay)
            self._answer_chat(body)
        finally:
            with owner._lock:
                owner.in_flight -= 1

    def _answer_chat(self, body: dict[str, Any]) -> None:
        reply = self.owner.next_reply(body)
        if reply.delay:
            time.sleep(reply.delay)
        if reply.drop_connection:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if reply.raw_body is not None:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.raw_content_type)
            self.send_header("Content-Length", str(len(reply.raw_body)))
            self.end_headers()
            self.wfile.write(reply.raw_body)
            return
        if reply.status != 200:
            kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(reply.status, "InternalServerError")
            self._error(reply.status, reply.error_message or "scripted failure", kind)
            return
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "tool_calls": []}
        if reply.reasoning is not None:
            if reply.reasoning_field in ("reasoning_content", "both"):
                message["reasoning_content"] = reply.reasoning
            if reply.reasoning_field in ("reasoning", "both"):  # up: chat_completion/protocol.py:86
                message["reasoning"] = reply.reasoning
        completion_tokens = len((reply.content or "") + (reply.reasoning or "")) // 4
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{len(self.owner.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.owner.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason, "stop_reason": None}],
                "usage": {"prompt_tokens": 1200, "completion_tokens": completion_tokens, "total_tokens": 1200 + completion_tokens},
            },
        )
