"""A stand-in for `vllm serve` (the real one needs a GPU and the weights).

Accepts the flags VLLMServer passes, reads the API key from --api-key or VLLM_API_KEY as vLLM does,
refuses a taken port, and serves tests/fake_openai_server.py on --host/--port once "loaded".
What it imitates, in vLLM 0.33.0 (paths under vllm/ of the PyPI wheel):
- entrypoints/cli/serve.py:164-172 + common/cli_args.py (make_arg_parser): `serve [model_tag]`
  and flags; an unknown flag is an argparse error (exit 2, "unrecognized arguments"), and so is
  a JSON-valued flag that is not JSON. KNOWN_FLAGS holds only flags the real parser accepts
  (tests/test_vllm_argparse.py checks each one against it).
- utils/argparse_utils.py:373-392 — `--flag_name` is read as `--flag-name`.
- serve/middleware/register.py:32-35 + envs.py:829 — --api-key wins over VLLM_API_KEY.
- launchers/launcher.py:340-392 — the port is bound before the model loads, served after.
- --reasoning-parser '' leaves the server without one: thinking_token_budget is then refused
  (v1/engine/input_processor.py:203-211, in tests/fake_openai_server.py).
Behaviour switches (environment):
  FAKE_VLLM_START_DELAY   seconds of pretend model loading before the port opens
  FAKE_VLLM_CRASH_AFTER   exit 1 with a CUDA out-of-memory traceback after this many seconds of loading
  FAKE_VLLM_IGNORE_TERM   1: ignore SIGTERM (forces the launcher's SIGKILL)
  FAKE_VLLM_WORKER        1: start a worker process in the same group, like vLLM's engine core
  FAKE_VLLM_PIDFILE       write "<server pid> <worker pid>" here
  FAKE_VLLM_REPLY_FILE    a JSON list of chat answers (strings) to replay, in order (the last one repeats)
  FAKE_VLLM_DIE_ON_CHAT   1: exit (code 3, a CUDA error in the log) on the first chat request, mid-run
  FAKE_VLLM_STATS         append JSON lines here: {"event": "start", "pid": N, "port": P} per server start and
                          {"event": "chat", "in_flight": k, "max_in_flight": m} per chat request (test counting only)
  FAKE_VLLM_CHAT_DELAY    seconds each chat request takes (while counted in flight), so concurrency is observable
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai_server import FakeOpenAIServer, Reply  # noqa: E402


def make_launchable(folder: Path) -> tuple[Path, Path]:
    """An executable named `vllm` that runs this stand-in, and a model folder it accepts."""
    exe = folder / "vllm"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    exe.chmod(0o755)
    model = folder / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return exe, model


BEHAVIOUR_ENV = ("FAKE_VLLM_START_DELAY", "FAKE_VLLM_CRASH_AFTER", "FAKE_VLLM_IGNORE_TERM", "FAKE_VLLM_WORKER")
"""The switches above that change how a start goes: a test's fixture clears them."""


def server_config(exe: Path, model: Path, **fields: object):
    """A VLMServerConfig that launches this stand-in (from `make_launchable`), `fields` on top."""
    from pipeline.core.config import VLMServerConfig

    return VLMServerConfig(**{"vlm_model_id": str(model), "vllm_command": str(exe), "ready_timeout": 10.0, **fields})  # type: ignore[arg-type]


def log(message: str) -> None:
    print(f"INFO {time.strftime('%m-%d %H:%M:%S')} [fake_vllm] {message}", flush=True)


def _json(text: str) -> object:
    return json.loads(text)  # dict-valued flags are parsed as JSON (the old `image=1` form is an error)


# flag -> argparse keywords; only flags vLLM 0.33's own parser accepts (checked by test_vllm_argparse.py).
KNOWN_FLAGS: dict[str, dict] = {
    "--host": {"default": None},
    "--port": {"type": int, "default": 8000},
    "--api-key": {"default": None},
    "--served-model-name": {"default": None},
    "--max-model-len": {"type": int, "default": None},
    "--gpu-memory-utilization": {"type": float, "default": 0.92},
    "--tensor-parallel-size": {"type": int, "default": 1},
    "--limit-mm-per-prompt": {"type": _json, "default": None},
    "--mm-processor-kwargs": {"type": _json, "default": None},
    "--reasoning-parser": {"default": ""},
    "--allowed-local-media-path": {"default": ""},
    "--enforce-eager": {"action": "store_true"},
    "--max-num-seqs": {"type": int, "default": None},
}


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    for flag, kwargs in KNOWN_FLAGS.items():
        serve.add_argument(flag, **kwargs)
    normalized = []
    for arg in argv:
        if arg.startswith("--"):  # up: utils/argparse_utils.py:373-392 — underscores read as dashes
            key, sep, value = arg.partition("=")
            arg = key.replace("_", "-") + sep + value
        normalized.append(arg)
    return parser.parse_args(normalized)


def main(argv: list[str]) -> int:
    args = parse_serve_args(argv)

    log(f"argv: {' '.join(argv)}")
    log(f"api key from: {'argv' if args.api_key else ('env' if os.environ.get('VLLM_API_KEY') else 'none')}")
    log(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    stats = Path(os.environ["FAKE_VLLM_STATS"]) if os.environ.get("FAKE_VLLM_STATS") else None
    if stats is not None:
        with open(stats, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": "start", "pid": os.getpid(), "port": args.port, "time": time.time()}) + "\n")
    if os.environ.get("FAKE_VLLM_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = None
    if os.environ.get("FAKE_VLLM_WORKER") == "1":
        worker = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        log(f"EngineCore worker pid {worker.pid}")
    if os.environ.get("FAKE_VLLM_PIDFILE"):
        Path(os.environ["FAKE_VLLM_PIDFILE"]).write_text(f"{os.getpid()} {worker.pid if worker else 0}")

    host = args.host or "0.0.0.0"
    delay = float(os.environ.get("FAKE_VLLM_START_DELAY", "0"))
    crash_after = os.environ.get("FAKE_VLLM_CRASH_AFTER")
    log(f"Loading model weights from {args.model}")
    start = time.monotonic()
    while time.monotonic() - start < delay:
        if crash_after is not None and time.monotonic() - start >= float(crash_after):
            break
        time.sleep(0.05)
    if crash_after is not None:
        time.sleep(max(0.0, float(crash_after) - (time.monotonic() - start)))
        print("Traceback (most recent call last):", flush=True)
        print('  File "vllm/worker/gpu_worker.py", line 201, in determine_available_memory', flush=True)
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB", flush=True)
        return 1

    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((host, args.port))
    except OSError as exc:
        print(
            f"ERROR [fake_vllm] [Errno {exc.errno}] error while attempting to bind on address ({host!r}, {args.port}): address already in use",
            flush=True,
        )
        return 1
    finally:
        probe.close()
    replies = []
    if os.environ.get("FAKE_VLLM_REPLY_FILE"):
        replies = [Reply(content=text) for text in json.loads(Path(os.environ["FAKE_VLLM_REPLY_FILE"]).read_text())]
    server = FakeOpenAIServer(
        replies=replies,
        api_key=args.api_key or os.environ.get("VLLM_API_KEY"),  # up: serve/middleware/register.py:32-35
        model=args.served_model_name or args.model,
        host=host,
        port=args.port,
        reasoning_parser=bool(args.reasoning_parser),
        max_model_len=args.max_model_len or 32768,
        chat_delay=float(os.environ.get("FAKE_VLLM_CHAT_DELAY", "0")),
        stats_path=stats,
    )
    if os.environ.get("FAKE_VLLM_DIE_ON_CHAT") == "1":

        def die(body: dict) -> Reply:
            print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
            os._exit(3)

        server.next_reply = die  # type: ignore[method-assign]
    log(f"Uvicorn running on http://{host}:{args.port} (Press CTRL+C to quit)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
