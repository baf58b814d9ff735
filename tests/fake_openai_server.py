"""A real OpenAI-compatible HTTP server on 127.0.0.1 that replays scripted chat answers.

It speaks the parts of vLLM's API the pipeline uses: GET /health, GET /v1/models and
POST /v1/chat/completions, with vLLM's JSON shapes (message.reasoning_content / reasoning,
`{"error": {...}}` bodies, 401 without the key). Each scripted `Reply` can set a status code,
a delay, a dropped connection, non-JSON bytes, or a 400 for `response_format=json_schema`.

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
    reasoning_field: str = "reasoning_content"  # "reasoning_content" (vLLM <0.11), "reasoning" or "both"
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
        self._send_json(401, {"error": "Unauthorized"})  # vLLM's middleware answers exactly this
        return False

    def _record(self, body: dict[str, Any] | None) -> None:
        with self.owner._lock:
            self.owner.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))

    def do_GET(self) -> None:
        self._record(None)
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.rstrip("/") == "/v1/models":
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
                            "owned_by": "vllm",
                            "root": self.owner.model,
                            "parent": None,
                            "max_model_len": 16384,
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
            if reply.reasoning_field in ("reasoning", "both"):
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
